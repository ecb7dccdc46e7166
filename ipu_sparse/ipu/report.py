"""Plan reporting: the per-IPU table and the dense-vs-sparse comparison."""
from __future__ import annotations

from typing import List

from . import hardware as hw
from .planner import Plan, PlanConfig, fmt_bytes, make_plan


def format_table(plan: Plan) -> str:
    """Per-IPU allocation table (MB = 10^6 bytes)."""
    pc = plan.config
    head = (f"{'IPU':>4} {'units':<26} {'values':>8} {'indices':>8} {'rowptr+wl':>9} {'dense':>8} "
            f"{'KV':>7} {'act+buf':>8} {'reserve':>8} {'total':>8} {'free':>8} {'AMP':>5}  fits")
    lines = [f"plan: {pc.model.name}, {pc.n_ipus} x {pc.ipu_type} ({fmt_bytes(hw.get_ipu_type(pc.ipu_type).sram_bytes)} each), "
             f"format {pc.fmt}, sparsity {pc.sparsity if isinstance(pc.sparsity, (int, float)) else 'per-layer'}, "
             f"{pc.dtype}, batch {pc.batch}, seq {pc.seq_len}, KV {pc.kv_len} (MB = 10^6 B)", head]
    mb = lambda n: f"{n / hw.MB:8.1f}"  # noqa: E731
    for a in plan.ipus:
        names = compact_units(a.units)
        w = a.weights
        lines.append(f"{a.ipu:>4} {names:<26} {mb(w.get('values', 0))} {mb(w.get('indices', 0))} "
                     f"{mb(w.get('row_ptr', 0) + w.get('worklists', 0)):>9} {mb(w.get('dense', 0))} "
                     f"{a.kv_bytes / hw.MB:7.1f} {mb(a.act_bytes + a.stage_buffer_bytes)} {mb(a.reserve_bytes)} "
                     f"{mb(a.total)} {mb(a.free)} {a.matmul_proportion:5.2f}  {'yes' if a.fits else 'NO'}")
    lines.append(f"layers_per_ipu: {plan.layers_per_ipu}")
    lines.append(f"weights {fmt_bytes(plan.model_bytes)}; planned total {fmt_bytes(plan.total_bytes)} of "
                 f"{fmt_bytes(plan.capacity_bytes)} on chip -> {'FITS' if plan.fits else 'DOES NOT FIT'}")
    lines += [f"note: {n}" for n in plan.notes]
    if pc.model.assumed:
        lines.append("note: assumed model fields: " + "; ".join(f"{k}: {v}" for k, v in sorted(pc.model.assumed.items())))
    return "\n".join(lines)


def compact_units(names: List[str]) -> str:
    layers = [int(n.split(".")[1]) for n in names if n.startswith("layers.")]
    other = [n for n in names if not n.startswith("layers.")]
    parts = [n.replace(".shards.", "[") + ("]" if ".shards." in n else "") for n in other if not n.startswith("lm_head")]
    if layers:
        parts.append(f"L{layers[0]}" if len(layers) == 1 else f"L{layers[0]}-{layers[-1]}")
    parts += [n.replace(".shards.", "[") + ("]" if ".shards." in n else "") for n in other if n.startswith("lm_head")]
    s = " ".join(parts) or "-"
    return s if len(s) <= 26 else s[:25] + "~"


def compare_dense_sparse(pc: PlanConfig) -> dict:
    """The same model planned dense and sparse; sizes and the memory ratio."""
    d = {k: getattr(pc, k) for k in pc.__dataclass_fields__}
    dense = make_plan(PlanConfig(**dict(d, fmt="dense", sparsity=0.0, sparse_head=False,
                                        layers_per_ipu=None, matmul_proportion=None)))
    sparse = make_plan(pc)
    return {
        "dense_weight_bytes": dense.model_bytes, "dense_total_bytes": dense.total_bytes, "dense_fits": dense.fits,
        "sparse_weight_bytes": sparse.model_bytes, "sparse_total_bytes": sparse.total_bytes, "sparse_fits": sparse.fits,
        "weight_ratio": sparse.model_bytes / dense.model_bytes,
        "total_ratio": sparse.total_bytes / dense.total_bytes,
        "capacity_bytes": sparse.capacity_bytes,
        "dense_plan": dense, "sparse_plan": sparse,
    }
