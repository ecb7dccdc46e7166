"""Every hardware figure the planner and the estimates use, with its source, in one place.

Facts are taken from ``../shared/IPU.md`` (which cites Graphcore's datasheets, the
PopTorch/PopART/PopSparse sources and the PopSparse paper). Figures that no public
source gives are marked ``ASSUMED``: they are placeholders to replace with a measured
value on an IPU host (PopVision memory report, ``gc-monitor`` power readings).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict

from ..errors import UserError

KIB = 1024
MB = 1000 ** 2
GB = 1000 ** 3


@dataclass(frozen=True)
class IpuType:
    """One IPU processor type."""

    name: str
    tiles: int
    sram_per_tile: int          # bytes usable per tile
    fp16_flops: float           # peak FP16 FLOP/s (FP16 in, FP16/FP32 accumulate)
    sram_bandwidth: float       # bytes/s, aggregate on-chip memory bandwidth
    ipu_link_bandwidth: float   # bytes/s, chip-to-chip over all IPU-Links
    clock_hz: float
    sources: str

    @property
    def sram_bytes(self) -> int:
        """On-chip SRAM of one IPU in bytes (tiles x per-tile memory)."""
        return self.tiles * self.sram_per_tile

    def to_dict(self) -> dict:
        d = asdict(self)
        d["sram_bytes"] = self.sram_bytes
        return d


IPU_TYPES: Dict[str, IpuType] = {
    # IPU.md "Hardware": 1472 tiles, 624 KiB usable per tile (~900 MB), 250 TFLOP/s FP16,
    # 47.5 TB/s on-chip memory bandwidth, 10 IPU-Links = 320 GB/s chip to chip.
    # clock_hz is informational only (no estimate uses it); 1.325 GHz is the commonly quoted
    # GC200 clock, not stated in IPU.md.
    "gc200": IpuType(
        name="gc200", tiles=1472, sram_per_tile=624 * KIB, fp16_flops=250e12,
        sram_bandwidth=47.5e12, ipu_link_bandwidth=320e9, clock_hz=1.325e9,
        sources="../shared/IPU.md 'Hardware' (Graphcore IPU-M2000 / GC200 datasheet)",
    ),
    # IPU.md: "Bow IPU: same memory, 1.85 GHz, 350 TFLOP/s". On-chip bandwidth scaled by clock
    # from the GC200 figure (ASSUMED scaling: same tile memory width, higher clock).
    "bow": IpuType(
        name="bow", tiles=1472, sram_per_tile=624 * KIB, fp16_flops=350e12,
        sram_bandwidth=47.5e12 * 1.85 / 1.325, ipu_link_bandwidth=320e9, clock_hz=1.85e9,
        sources="../shared/IPU.md 'Hardware' (Bow IPU); SRAM bandwidth ASSUMED clock-scaled from GC200",
    ),
}

# Systems: IPU.md "IPU-M2000 = 4 IPUs; IPU-POD16 = 4 x M2000 on one host = 16 IPUs, 14.4 GB on chip".
# 14.4 GB is the marketing figure (16 x 900 MB); the planner uses tiles x 624 KiB = 918.6 MB per IPU.
SYSTEMS: Dict[str, int] = {"m2000": 4, "pod4": 4, "pod16": 16, "pod64": 64}
MARKETING_SRAM_PER_IPU = 900 * MB  # IPU.md: "~900 MB on-chip SRAM"

# ----- memory reserves (what is not weights, KV cache or activations) -------------------------
# ASSUMED (no public per-model figure): vertex code, control program, exchange buffers and
# stacks take a fixed share of every IPU. Graphcore's examples leave 10-20 % of tile memory for
# these in large models (PopVision "always live" memory); 8 % is the figure we plan with and
# report; change it with --reserve.
RESERVE_FRACTION = 0.08
# ASSUMED: PopSparse static sparse matmul compiles the pattern into per-tile work lists
# (constants). For 1x1 blocks the planner charges the CSR column indices (2 B per non-zero) plus
# this fraction of the index bytes again for work-list headers and bucket padding.
SPARSE_WORKLIST_OVERHEAD = 0.10
# IPU.md: PopSparse static FP16 uses half partials ("partials use the data type").
PARTIALS_BYTES = 2

# ----- energy model (estimates only) ------------------------------------------------------------
# ASSUMED: no public per-operation energy figure exists for the IPU. We use the 45 nm figures of
# M. Horowitz, "Computing's energy problem", ISSCC 2014 (16-bit FP multiply 1.1 pJ + add 0.4 pJ
# per multiply-add; 8 KB SRAM read of 64 bits ~10 pJ ~ 1.25 pJ/byte), divided by 4 as a crude
# 45 nm -> 7 nm scaling. Both energies are dynamic energy only; static power is not modelled.
ENERGY_PJ_PER_FLOP = (1.1 + 0.4) / 2 / 4     # pJ per FLOP (a multiply-add is 2 FLOPs)
ENERGY_PJ_PER_SRAM_BYTE = 1.25 / 4           # pJ per byte read from tile SRAM
ENERGY_PJ_PER_LINK_BYTE = 10.0               # ASSUMED off-chip SerDes ~10 pJ/byte (order of magnitude)
# ASSUMED: fraction of the roofline (max of compute time at peak FLOP/s and SRAM time at peak
# bandwidth) that a decode-step kernel attains. PopSparse paper (arXiv 2303.16999): static sparse
# FP16 beats dense only near 90 % sparsity on large matrices, i.e. sparse kernels reach a much
# lower fraction of the roofline than dense ones; 0.5 vs 0.15 reproduces "no latency gain at 80 %".
DENSE_EFFICIENCY = 0.5
# ASSUMED: fixed cost per pipeline stage and token (BSP sync + exchange setup + control), a few
# microseconds on chip; IPU.md gives no figure.
STAGE_OVERHEAD_S = 5e-6
SPARSE_EFFICIENCY = 0.15

ENERGY_SOURCES = (
    "ASSUMED: per-op energies from Horowitz ISSCC 2014 (45 nm) / 4; link energy order-of-magnitude; "
    "efficiencies ASSUMED (PopSparse paper arXiv 2303.16999 for the dense/sparse gap)"
)


def get_ipu_type(name: str) -> IpuType:
    key = name.lower()
    if key not in IPU_TYPES:
        raise UserError(f"unknown IPU type {name!r}; known: {', '.join(sorted(IPU_TYPES))}")
    return IPU_TYPES[key]


def constants_table() -> Dict[str, object]:
    """All constants with their sources (written into every plan/simulation JSON)."""
    return {
        "ipu_types": {k: v.to_dict() for k, v in IPU_TYPES.items()},
        "systems_ipus": dict(SYSTEMS),
        "marketing_sram_per_ipu_bytes": MARKETING_SRAM_PER_IPU,
        "reserve_fraction": {"value": RESERVE_FRACTION, "source": "ASSUMED (code, exchange buffers, stacks)"},
        "sparse_worklist_overhead": {"value": SPARSE_WORKLIST_OVERHEAD,
                                     "source": "ASSUMED (PopSparse work lists, fraction of index bytes)"},
        "partials_bytes": {"value": PARTIALS_BYTES, "source": "../shared/IPU.md PopSparse static: half partials"},
        "energy_pj_per_flop": {"value": ENERGY_PJ_PER_FLOP, "source": ENERGY_SOURCES},
        "energy_pj_per_sram_byte": {"value": ENERGY_PJ_PER_SRAM_BYTE, "source": ENERGY_SOURCES},
        "energy_pj_per_link_byte": {"value": ENERGY_PJ_PER_LINK_BYTE, "source": ENERGY_SOURCES},
        "dense_efficiency": {"value": DENSE_EFFICIENCY, "source": ENERGY_SOURCES},
        "sparse_efficiency": {"value": SPARSE_EFFICIENCY, "source": ENERGY_SOURCES},
        "stage_overhead_s": {"value": STAGE_OVERHEAD_S, "source": "ASSUMED (sync + exchange setup per stage)"},
    }
