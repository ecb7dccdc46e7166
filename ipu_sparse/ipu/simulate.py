"""Run a planned model on CPU stage by stage, check it equals the unsplit model, and estimate
what the IPUs would do.

``run_stages`` executes the units of ``plan.stages`` -- the same modules, in the same order and
with the same boundaries as the ``BeginBlock`` sequence of ``pipeline.parallelize_`` -- timing
each stage and measuring the tensor handed to the next stage. ``estimate_stages`` is an
*analytical estimate* (FLOPs, bytes read from SRAM, IPU-Link bytes, time and energy per token,
dense vs sparse) from the constants in ``hardware.py``; nothing in it is measured.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from . import hardware as hw
from .memory import VALUE_BYTES, build_units
from .ops import to_ipu_sparse_
from .pipeline import VocabShardedEmbedding, restore_vocab_, shard_vocab_, unit_modules
from .planner import Plan, PlanConfig
from .report import compact_units


@dataclass
class StageRun:
    ipu: int
    units: List[str]
    cpu_s: float
    out_bytes: int   # size of the activation handed to the next stage (the IPU-Link transfer)


@torch.no_grad()
def run_stages(model, plan: Plan, idx: torch.Tensor):
    """Staged forward of ``model`` (already vocab-sharded per the plan) -> (logits fp32, runs)."""
    T = idx.shape[1]
    cos, sin = model.rope(torch.arange(T))
    modules = {name: (mod, ipu) for name, mod, ipu in unit_modules(model, plan)}
    x = None
    h = None
    logits_parts: List[torch.Tensor] = []
    runs: List[StageRun] = []
    emb_index = 0
    for ipu, names in plan.stages:
        t0 = time.perf_counter()
        for name in names:
            kind = next(u.kind for u in plan.units if u.name == name)
            if kind == "embed":
                if isinstance(model.embed, VocabShardedEmbedding):
                    part = model.embed.shard_forward(emb_index, idx)
                    emb_index += 1
                    x = part if x is None else x + part
                else:
                    x = model.embed(idx)
            elif kind == "layer":
                x = modules[name][0](x, cos, sin)
            else:  # head slice; the final norm runs before the first one
                if h is None:
                    h = model.norm(x)
                logits_parts.append(modules[name][0](h))
        last = logits_parts[-1] if kind == "head" else x
        runs.append(StageRun(ipu, list(names), time.perf_counter() - t0, last.numel() * last.element_size()))
    return torch.cat(logits_parts, dim=-1).float(), runs


def _unit_costs(pc: PlanConfig, embed_shards: int, head_shards: int) -> Dict[str, dict]:
    """Per-unit decode-step cost (one new token per sequence, attending over the static cache)."""
    cfg, B, S = pc.model, pc.batch, pc.kv_len
    vb = VALUE_BYTES[pc.dtype]
    units = build_units(PlanConfig(**dict({k: getattr(pc, k) for k in pc.__dataclass_fields__},
                                          embed_shards=embed_shards,
                                          head_shards=None if cfg.tie_embeddings else head_shards)))
    out = {}
    for u in units:
        if u.kind == "embed":
            flops, read = 0, B * cfg.d_model * vb                      # gather B rows
        elif u.kind == "layer":
            mm = 2 * B * (u.nnz if pc.fmt != "dense" else u.matrix_params)
            attn = 4 * B * cfg.n_heads * cfg.head_dim * S               # q.k and p.v over the cache
            flops, read = mm + attn, u.weight_bytes + u.kv_bytes
        else:
            rows = cfg.vocab_size // max(1, head_shards)
            if u.pinned_to is not None:  # tied: reads the embedding slice
                flops, read = 2 * B * rows * cfg.d_model, rows * cfg.d_model * vb
            else:
                flops = 2 * B * (u.nnz if u.nnz else rows * cfg.d_model)
                read = u.weight_bytes
        out[u.name] = {"flops": flops, "sram_read": read, "sparse": u.nnz > 0}
    return out


def estimate_stages(plan: Plan) -> dict:
    """ESTIMATE (analytical, not measured): per stage and in total, dense vs sparse."""
    pc = plan.config
    ipu = hw.get_ipu_type(pc.ipu_type)
    n_emb = sum(1 for u in plan.units if u.kind == "embed")
    n_head = sum(1 for u in plan.units if u.kind == "head")
    fields = {k: getattr(pc, k) for k in pc.__dataclass_fields__}
    dense_pc = PlanConfig(**dict(fields, fmt="dense", sparsity=0.0, sparse_head=False, layers_per_ipu=None,
                                 matmul_proportion=None))
    costs = {"sparse": _unit_costs(pc, n_emb, n_head), "dense": _unit_costs(dense_pc, n_emb, n_head)}
    link = pc.batch * pc.model.d_model * VALUE_BYTES[pc.dtype]  # hidden state per token between stages
    stages = []
    totals = {k: {"flops": 0, "sram_read": 0, "link": 0, "time_s": 0.0, "max_stage_s": 0.0, "energy_j": 0.0}
              for k in costs}
    for i, (ipu_id, names) in enumerate(plan.stages):
        row = {"stage": i, "ipu": ipu_id, "units": names}
        link_bytes = link if i + 1 < len(plan.stages) else 0
        for kind, table in costs.items():
            flops = sum(table[n]["flops"] for n in names)
            read = sum(table[n]["sram_read"] for n in names)
            # roofline per unit, scaled by the fraction of it a dense / sparse kernel attains
            t = sum(max(table[n]["flops"] / ipu.fp16_flops, table[n]["sram_read"] / ipu.sram_bandwidth)
                    / (hw.SPARSE_EFFICIENCY if table[n]["sparse"] else hw.DENSE_EFFICIENCY) for n in names)
            t += link_bytes / ipu.ipu_link_bandwidth + hw.STAGE_OVERHEAD_S
            energy = (flops * hw.ENERGY_PJ_PER_FLOP + read * hw.ENERGY_PJ_PER_SRAM_BYTE
                      + link_bytes * hw.ENERGY_PJ_PER_LINK_BYTE) * 1e-12
            row[kind] = {"flops": flops, "sram_read_bytes": read, "time_s": t, "energy_j": energy}
            tot = totals[kind]
            tot["flops"] += flops
            tot["sram_read"] += read
            tot["link"] += link_bytes
            tot["time_s"] += t
            tot["max_stage_s"] = max(tot["max_stage_s"], t)
            tot["energy_j"] += energy
        row["link_bytes"] = link_bytes
        stages.append(row)
    B = pc.batch
    summary = {}
    for kind, tot in totals.items():
        summary[kind] = {
            "flops_per_token": tot["flops"] / B, "sram_read_bytes_per_token": tot["sram_read"] / B,
            "ipu_link_bytes_per_token": tot["link"] / B,
            "tokens_per_s_sharded": B / tot["time_s"],          # generation: stages run one after another
            "tokens_per_s_pipelined": B / tot["max_stage_s"],   # throughput: every stage busy
            "energy_per_token_j": tot["energy_j"] / B,
        }
    d, s = summary["dense"], summary["sparse"]
    summary["sparse_over_dense"] = {
        "flops": s["flops_per_token"] / d["flops_per_token"],
        "sram_read_bytes": s["sram_read_bytes_per_token"] / d["sram_read_bytes_per_token"],
        "energy": s["energy_per_token_j"] / d["energy_per_token_j"],
        "tokens_per_s_sharded": s["tokens_per_s_sharded"] / d["tokens_per_s_sharded"],
    }
    summary["label"] = ("ESTIMATE (analytical): decode step, 1 new token per sequence, batch "
                        f"{B}, static KV cache of {pc.kv_len}; constants and sources in constants")
    return {"stages": stages, "summary": summary, "constants": hw.constants_table()}


def simulate(model, plan: Plan, idx: torch.Tensor, sparse_ops: bool = True, repeats: int = 3) -> dict:
    """Plain forward vs staged forward on CPU (+ the sparse op's CPU reference), then estimates.

    ``model`` must already hold the weights to compare (pruned to exact zeros for a sparse plan, e.g. by
    ``ipu_sparse.prune.magnitude_prune_(model, sparsity, scope="row")``).
    """
    model.eval()
    with torch.no_grad():
        reference = model(idx).float()           # plain, unsplit, dense weights with exact zeros
    if sparse_ops:
        to_ipu_sparse_(model)                     # CSR values + CPU reference kernel
    originals = shard_vocab_(model, plan)
    try:
        best = None
        for _ in range(max(1, repeats)):
            logits, runs = run_stages(model, plan, idx)
            if best is None:
                best = runs
            else:
                for b, r in zip(best, runs):
                    b.cpu_s = min(b.cpu_s, r.cpu_s)
        with torch.no_grad():
            unsplit = model(idx).float()          # same modules, not staged
    finally:
        restore_vocab_(model, originals)
    diff_vs_plain = (logits - reference).abs().max().item()
    diff_vs_unsplit = (logits - unsplit).abs().max().item()
    est = estimate_stages(plan)
    stages = []
    for run, row in zip(best, est["stages"]):
        alloc = plan.ipus[run.ipu]
        stages.append(dict(row, cpu_ms=run.cpu_s * 1e3, handoff_bytes_cpu=run.out_bytes,
                           planned_sram_bytes=alloc.total, planned_free_bytes=alloc.free))
    return {"max_abs_diff_vs_plain": diff_vs_plain, "max_abs_diff_vs_unsplit_same_modules": diff_vs_unsplit,
            "logits_absmax": reference.abs().max().item(), "stages": stages, "estimate": est["summary"],
            "constants": est["constants"], "plan": plan.to_dict(), "tokens": list(idx.shape)}


def format_simulation(res: dict) -> str:
    lines = [f"max |staged - plain model| = {res['max_abs_diff_vs_plain']:.3e}   "
             f"max |staged - unsplit (same modules)| = {res['max_abs_diff_vs_unsplit_same_modules']:.3e}   "
             f"(logits up to {res['logits_absmax']:.2f})",
             f"{'stg':>3} {'IPU':>3} {'units':<22} {'CPU ms':>8} {'SRAM MB':>8} {'free MB':>8} | ESTIMATE: "
             f"{'GFLOP d/s':>13} {'SRAM rd MB d/s':>16} {'link kB':>7} {'us d/s':>13}"]
    for s in res["stages"]:
        label = compact_units(s["units"])
        d, sp = s["dense"], s["sparse"]
        lines.append(f"{s['stage']:>3} {s['ipu']:>3} {label[:22]:<22} {s['cpu_ms']:8.2f} "
                     f"{s['planned_sram_bytes'] / hw.MB:8.1f} {s['planned_free_bytes'] / hw.MB:8.1f} |           "
                     f"{d['flops'] / 1e9:6.3f}/{sp['flops'] / 1e9:6.3f} "
                     f"{d['sram_read_bytes'] / hw.MB:7.1f}/{sp['sram_read_bytes'] / hw.MB:7.1f} "
                     f"{s['link_bytes'] / 1e3:7.1f} {d['time_s'] * 1e6:6.1f}/{sp['time_s'] * 1e6:6.1f}")
    e = res["estimate"]
    lines.append(e["label"])
    for kind in ("dense", "sparse"):
        k = e[kind]
        lines.append(f"  {kind:<6}: {k['flops_per_token'] / 1e9:8.3f} GFLOP/token, "
                     f"{k['sram_read_bytes_per_token'] / hw.MB:8.1f} MB SRAM read/token, "
                     f"{k['tokens_per_s_sharded']:9.0f} tokens/s sharded, {k['tokens_per_s_pipelined']:9.0f} pipelined, "
                     f"{k['energy_per_token_j'] * 1e3:8.4f} mJ/token")
    r = e["sparse_over_dense"]
    lines.append(f"  sparse/dense: FLOPs {r['flops']:.2f}, SRAM bytes {r['sram_read_bytes']:.2f}, "
                 f"energy {r['energy']:.2f}, tokens/s (sharded) {r['tokens_per_s_sharded']:.2f}")
    return "\n".join(lines)


def tokens_for(model_cfg, tokenizer: Optional[object], text: str, length: int) -> torch.Tensor:
    """A (1, length) token tensor: the tokenized text repeated / cut to ``length``."""
    ids: List[int] = []
    if tokenizer is not None:
        ids = list(tokenizer.encode(text))
    if not ids:
        g = torch.Generator().manual_seed(0)
        return torch.randint(0, model_cfg.vocab_size, (1, length), generator=g)
    while len(ids) < length:
        ids = ids + ids
    return torch.tensor([ids[:length]], dtype=torch.long)
