"""Pruning results on SmolLM2-135M: methods x sparsity, WikiText-2 ppl, LAMBADA acc, pruning time.

Resumable: every finished row is cached in the JSON (rerun to continue; --redo NAME to redo one).
Rows run in priority order (the ones the targets need first). With --lock FILE each row holds that
lock file while it runs, so that heavy jobs sharing it do not overlap with its timings; the load
average is recorded next to each time, and so is the process CPU time (less sensitive to other
users of the cores than wall time). Concurrent runs on the same JSON merge their rows (under the
lock file .<json name>.lock beside it).

    .venv/bin/python scripts/bench_prune.py                      # every row not yet in the JSON
    .venv/bin/python scripts/bench_prune.py --only dense,sparsegpt-50,sparsegpt-80
    .venv/bin/python scripts/bench_prune.py --report-only        # table + plot from the JSON
"""
from __future__ import annotations

import argparse
import fcntl
import json
import os
import sys
import time
from pathlib import Path

from ipu_sparse.fileio import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]

# name -> PruneConfig fields (None = dense). Order = priority.
IMPROVED = dict(method="sparsegpt", owl=True, refit_iters=20, dense_target=True)
ROWS = [
    ("dense", None),
    ("sparsegpt-50", dict(method="sparsegpt", sparsity=0.5)),
    ("sparsegpt-80", dict(method="sparsegpt", sparsity=0.8)),
    ("wanda-50", dict(method="wanda", sparsity=0.5)),
    ("wanda-80", dict(method="wanda", sparsity=0.8)),
    ("magnitude-50", dict(method="magnitude", sparsity=0.5)),
    ("magnitude-80", dict(method="magnitude", sparsity=0.8)),
    ("sparsegpt-owl-80", dict(method="sparsegpt", sparsity=0.8, owl=True)),
    ("improved-80", dict(IMPROVED, sparsity=0.8)),
    ("improved-50", dict(IMPROVED, sparsity=0.5)),
    # + per-projection sparsity searched per layer by layer-output error (same layer totals)
    ("improved-alloc-80", dict(IMPROVED, sparsity=0.8, alloc_step=0.05)),
    # + joint reconstruction of each pruned layer (Adam steps on its kept weights towards the dense outputs)
    ("improved-recon-80", dict(IMPROVED, sparsity=0.8, recon_steps=10)),
    ("improved-alloc-recon-80", dict(IMPROVED, sparsity=0.8, alloc_step=0.05, recon_steps=10)),
    ("sparsegpt-dt-refit-50", dict(method="sparsegpt", sparsity=0.5, refit_iters=20, dense_target=True)),
    ("sparsegpt-2:4", dict(method="sparsegpt", nm="2:4")),
    ("wanda-2:4", dict(method="wanda", nm="2:4")),
    ("magnitude-2:4", dict(method="magnitude", nm="2:4")),
    ("wanda-owl-80", dict(method="wanda", sparsity=0.8, owl=True)),
    ("sparsegpt-60", dict(method="sparsegpt", sparsity=0.6)),
    ("sparsegpt-70", dict(method="sparsegpt", sparsity=0.7)),
    ("wanda-60", dict(method="wanda", sparsity=0.6)),
    ("wanda-70", dict(method="wanda", sparsity=0.7)),
    ("magnitude-60", dict(method="magnitude", sparsity=0.6)),
    ("magnitude-70", dict(method="magnitude", sparsity=0.7)),
    ("improved-60", dict(IMPROVED, sparsity=0.6)),
    ("improved-70", dict(IMPROVED, sparsity=0.7)),
    ("improved-alloc-70", dict(IMPROVED, sparsity=0.7, alloc_step=0.05)),
    ("improved-alloc-50", dict(IMPROVED, sparsity=0.5, alloc_step=0.05)),
    ("sparsegpt-layerseq-50", dict(method="sparsegpt", sparsity=0.5, sequential="layer")),
    ("wanda-layerseq-80", dict(method="wanda", sparsity=0.8, sequential="layer")),
    ("wanda-layerseq-50", dict(method="wanda", sparsity=0.5, sequential="layer")),
    ("wanda-80-seed1", dict(method="wanda", sparsity=0.8, seed=1)),  # calibration-sampling sensitivity
    ("sparsegpt-80-seed1", dict(method="sparsegpt", sparsity=0.8, seed=1)),
]
REFERENCE = {"dense": 29.19, "magnitude-50": 483.2, "magnitude-80": 1.34e6, "wanda-50": 61.46, "wanda-80": 17197,
             "sparsegpt-50": 50.73, "sparsegpt-80": 740.5}


def run_row(name, kw, args):
    import torch

    from ipu_sparse.eval.perplexity import wikitext2_ppl
    from ipu_sparse.eval.zeroshot import evaluate_task
    from ipu_sparse.loading import load_model
    from ipu_sparse.prune import PruneConfig, prune_

    torch.set_num_threads(args.threads)
    lm = load_model("smollm2-135m")
    row = {"name": name, "settings": kw}
    if kw is not None:
        load0 = os.getloadavg()[0]
        t0, c0 = time.time(), time.process_time()
        config = PruneConfig(**{"nsamples": args.nsamples, "seq_len": args.seq_len, **kw})
        out = prune_(lm.model, config, tokenizer=lm.tokenizer, cache_dir=args.cache)
        row["prune_wall_s"] = time.time() - t0
        row["prune_cpu_s"] = time.process_time() - c0
        row["load_avg"] = [load0, os.getloadavg()[0]]
        rep = out["report"]
        row["linear_sparsity"] = rep["linear"]["sparsity"]
        row["all_params_sparsity"] = rep["all_params"]["sparsity"]
        row["per_layer_sparsity"] = [v["sparsity"] for v in rep["per_layer"].values()]
        if name in args.save_rows:
            from ipu_sparse.checkpoint import save_dense_checkpoint

            ckpt = Path(args.cache) / "pruned" / name
            save_dense_checkpoint(lm.model, lm.tokenizer, ckpt, overwrite=True,
                                  extra_meta={"pruning": {k: v for k, v in out.items() if k != "report"}})
            row["checkpoint"] = str(ckpt)
    ppl = wikitext2_ppl(lm.model, lm.tokenizer, seq_len=512, max_windows=args.windows, batch_size=4)
    row["wikitext2_ppl"] = ppl.ppl
    row["ppl_windows"], row["ppl_seq_len"] = ppl.windows, ppl.seq_len
    if args.lambada:
        lam = evaluate_task(lm.model, lm.tokenizer, "lambada", limit=args.lambada, batch_size=16)
        row["lambada_acc"], row["lambada_n"] = lam["acc"], lam["n"]
    row["threads"] = args.threads
    row["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    return row


def fmt_num(v):
    if v is None:
        return "—"
    return f"{v:,.0f}" if v >= 1000 else f"{v:.2f}"


def table(results):
    lines = ["| row | sparsity (Linears) | WikiText-2 ppl (L=512, 40 win) | reference ppl | LAMBADA acc (500) | prune wall s | prune CPU s | load avg |",
             "|---|---|---|---|---|---|---|---|"]
    def order(name):  # dense, then per method by sparsity (2:4 after 80%), then the variants
        for i, m in enumerate(("magnitude", "wanda", "sparsegpt", "improved")):
            tail = name[len(m) + 1:]
            if name.startswith(m + "-") and (tail.isdigit() or tail == "2:4"):
                return (1, i, 100 if tail == "2:4" else int(tail))
        return (0,) if name == "dense" else (2, [n for n, _ in ROWS].index(name))

    for name in sorted((n for n, _ in ROWS), key=order):
        r = results.get(name)
        if not r:
            continue
        sp = r.get("linear_sparsity")
        lines.append("| {} | {} | {} | {} | {} | {} | {} | {} |".format(
            name, "0" if sp is None else f"{sp:.4f}", fmt_num(r["wikitext2_ppl"]), fmt_num(REFERENCE.get(name)),
            f"{r['lambada_acc']:.3f}" if "lambada_acc" in r else "—",
            f"{r['prune_wall_s']:.0f}" if "prune_wall_s" in r else "—",
            f"{r['prune_cpu_s']:.0f}" if "prune_cpu_s" in r else "—",
            "/".join(f"{x:.1f}" for x in r["load_avg"]) if "load_avg" in r else "—"))
    return "\n".join(lines)


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    dense = results.get("dense", {}).get("wikitext2_ppl")
    for method, style in (("magnitude", "o-"), ("wanda", "s-"), ("sparsegpt", "^-"), ("improved", "D-")):
        pts = sorted((r["settings"]["sparsity"], r["wikitext2_ppl"]) for n, r in results.items()
                     if r.get("settings") and n.startswith(method + "-") and n[len(method) + 1:].isdigit())
        if pts:
            line, = ax.plot([p[0] * 100 for p in pts], [p[1] for p in pts], style, label=method if method != "improved"
                            else "SparseGPT+OWL+dense target+refit")
            nm = results.get(method + "-2:4")
            if nm:  # semi-structured 2:4 (50%): a hollow marker of the same colour
                ax.plot([50], [nm["wikitext2_ppl"]], style[0], mfc="none", ms=10, color=line.get_color(),
                        label=f"{method} 2:4")
    if dense:
        ax.axhline(dense, color="gray", ls="--", label=f"dense {dense:.2f}")
    ax.set_yscale("log")
    ax.set_xlabel("sparsity of decoder Linears (%)")
    ax.set_ylabel("WikiText-2 perplexity (L=512, first 40 windows)")
    ax.set_title("SmolLM2-135M one-shot pruning")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = str(path) + ".tmp.png"
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)


def save(results, out_json, name):
    """Merge row ``name`` into the JSON on disk (another run may have added rows meanwhile)."""
    on_disk = json.loads(out_json.read_text()) if out_json.is_file() else {}
    on_disk[name] = results[name]
    results.update(on_disk)
    atomic_write_text(out_json, json.dumps(results, indent=1))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=None, help="comma list of row names")
    ap.add_argument("--redo", default="", help="comma list of rows to recompute")
    ap.add_argument("--out", default=str(ROOT / "results" / "prune_smollm2.json"))
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--lambada", type=int, default=500, help="LAMBADA items (0 = skip)")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/ipu_sparse"))
    ap.add_argument("--lock", default=None, metavar="FILE",
                    help="hold this lock file while each row runs (one shared by heavy jobs; recorded in the row)")
    ap.add_argument("--save", default="", help="comma list of rows whose pruned model is saved under "
                    "CACHE/pruned/ROW (a dense checkpoint with exact zeros, for recovery)")
    ap.add_argument("--report-only", action="store_true", help="only rebuild the table and plot from the JSON")
    args = ap.parse_args()
    out_json = Path(args.out)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(out_json.read_text()) if out_json.is_file() else {}
    names = [n for n, _ in ROWS]
    only = [s for s in args.only.split(",")] if args.only else names
    unknown = [n for n in only if n not in names]
    if unknown:
        sys.exit(f"unknown rows: {unknown}; known: {names}")
    redo = set(filter(None, args.redo.split(",")))
    args.save_rows = set(filter(None, args.save.split(",")))
    if not args.report_only:
        rows = dict(ROWS)
        for name, kw in [(n, rows[n]) for n in only]:  # --only order, else priority order
            if name in results and name not in redo:
                continue
            with open(args.lock or os.devnull, "w") as lock:
                if args.lock:
                    fcntl.flock(lock, fcntl.LOCK_EX)
                if out_json.is_file() and name not in redo and name in json.loads(out_json.read_text()):
                    continue  # finished by another run while this one waited
                print(f"== {name}", file=sys.stderr, flush=True)
                results[name] = run_row(name, kw, args)
                # IPU_SPARSE_LOCK_HELD=1: a wrapper holds the lock for a whole chain of runs
                results[name]["heavy_lock"] = bool(args.lock or os.environ.get("IPU_SPARSE_LOCK_HELD"))
            with open(out_json.parent / f".{out_json.name}.lock", "w") as jl:  # concurrent runs merge their rows
                fcntl.flock(jl, fcntl.LOCK_EX)
                save(results, out_json, name)
            print(json.dumps({k: v for k, v in results[name].items() if k != "per_layer_sparsity"}), flush=True)
    if out_json.is_file():
        results = json.loads(out_json.read_text())
    md = table(results)
    print(md)
    atomic_write_text(out_json.with_suffix(".md"), md + "\n")
    if results:
        plot(results, out_json.with_suffix(".png"))


if __name__ == "__main__":
    main()
