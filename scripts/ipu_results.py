"""IPU port results: POD16 plan for Luminous Base (dense vs 80 % sparse), SmolLM2 on 1 IPU, and the
CPU simulation of SmolLM2 over 4 and 16 planned IPUs. Prints tables; writes results/ipu_*.

    flock /tmp/ipu_sparse_heavy.lock .venv/bin/python scripts/ipu_results.py

Memory figures are planned (analytical, constants in ipu_sparse/ipu/hardware.py); CPU times are
measured on this machine; IPU times and energies are labelled estimates.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

from ipu_sparse.config import get_preset
from ipu_sparse.errors import UserError
from ipu_sparse.ipu import hardware as hw
from ipu_sparse.ipu.planner import PlanConfig, make_plan, plan_or_raise
from ipu_sparse.ipu.report import compare_dense_sparse, format_table
from ipu_sparse.ipu.simulate import format_simulation, simulate
from ipu_sparse.prune import magnitude_prune_

ROOT = Path(__file__).resolve().parents[1]


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=str(path.parent), prefix=".tmp-")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def plans(out: Path) -> dict:
    lum = get_preset("luminous-base-13b")
    pc = PlanConfig(lum, n_ipus=16, sparsity=0.8, sparse_head=True, kv_len=512)
    cmp = compare_dense_sparse(pc)
    text = ["# ipu-sparse plan --model luminous-base-13b --ipus 16 --sparsity 0.8 --sparse-head --kv-len 512",
            format_table(cmp["sparse_plan"]), "", "# dense fp16, same settings", format_table(cmp["dense_plan"])]
    errors = {}
    for label, kw in [("default (dense head, KV 2048)", dict(n_ipus=16, sparsity=0.8)),
                      ("dense fp16", dict(n_ipus=16, fmt="dense", sparsity=0.0, kv_len=512)),
                      ("sparse on 8 IPUs", dict(n_ipus=8, sparsity=0.8, sparse_head=True, kv_len=512))]:
        try:
            plan_or_raise(PlanConfig(lum, **kw))
            errors[label] = "fits"
        except UserError as e:
            errors[label] = str(e)
    text += ["", "# planner errors"] + [f"{k}: {v}" for k, v in errors.items()]
    smol = compare_dense_sparse(PlanConfig(get_preset("smollm2-135m"), n_ipus=1, sparsity=0.8, kv_len=8192))
    text += ["", "# ipu-sparse plan --model smollm2-135m --ipus 1 --sparsity 0.8 --kv-len 8192",
             format_table(smol["sparse_plan"]), "", format_table(smol["dense_plan"])]
    summary = {
        "luminous_pod16": {k: v for k, v in cmp.items() if not k.endswith("_plan")},
        "luminous_errors": errors,
        "smollm2_1ipu": {k: v for k, v in smol.items() if not k.endswith("_plan")},
        "luminous_sparse_plan": cmp["sparse_plan"].to_dict(),
        "luminous_dense_plan": cmp["dense_plan"].to_dict(),
    }
    write(out / "ipu_plan.txt", "\n".join(text) + "\n")
    write(out / "ipu_plan.json", json.dumps(summary, indent=1, default=str))
    print("\n".join(text))
    plot_pod16(cmp["dense_plan"], cmp["sparse_plan"], out / "ipu_pod16_memory.png")
    return summary


def plot_pod16(dense, sparse, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib not installed: {path} not written", file=sys.stderr)
        return
    ipus = list(range(len(sparse.ipus)))
    fig, ax = plt.subplots(figsize=(10, 4.5))
    w = 0.4
    ax.bar([i - w / 2 for i in ipus], [a.total / hw.GB for a in dense.ipus], w, label="dense fp16 (planned)", color="#c44e52")
    ax.bar([i + w / 2 for i in ipus], [a.total / hw.GB for a in sparse.ipus], w, label="80% sparse CSR16 (planned)",
           color="#4c72b0")
    ax.axhline(sparse.ipus[0].capacity / hw.GB, color="k", ls="--", lw=1, label="GC200 SRAM (1472 x 624 KiB)")
    ax.set_xticks(ipus)
    ax.set_xlabel("IPU")
    ax.set_ylabel("GB (10^9 bytes)")
    ax.set_title("Luminous-Base-shaped 13.9B on an IPU-POD16: planned on-chip memory per IPU\n"
                 "(batch 1, KV 512; shape partly assumed; dense cannot fit, sparse fits)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def simulations(out: Path, prompt_len: int) -> dict:
    from ipu_sparse.loading import load_model

    lm = load_model("smollm2-135m")
    ids = lm.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 16)[:prompt_len]
    idx = torch.tensor([ids])
    res_all = {}
    for n in (4, 16):
        model = copy.deepcopy(lm.model)
        magnitude_prune_(model, 0.8, scope="row")
        plan = make_plan(PlanConfig(model.config, n_ipus=n, sparsity=0.8, kv_len=2048))
        res = simulate(model, plan, idx, repeats=3)
        assert res["max_abs_diff_vs_plain"] <= 1e-3, res["max_abs_diff_vs_plain"]
        load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
        res["host_load_average"] = load
        text = (f"# ipu-sparse simulate --model smollm2-135m --ipus {n} --sparsity 0.8 --kv-len 2048 "
                f"--prompt-len {prompt_len}  (CPU ms measured with 1 thread; host load average {load} "
                f"on 2 shared cores)\n" + format_simulation(res))
        print(text)
        write(out / f"ipu_simulate_smollm2_{n}.json", json.dumps(res, indent=1, default=str))
        write(out / f"ipu_simulate_smollm2_{n}.txt", text + "\n")
        res_all[n] = res
    # Luminous-shaped estimate over the POD16 plan (analytical only; no weights exist)
    from ipu_sparse.ipu.simulate import estimate_stages

    lum = make_plan(PlanConfig(get_preset("luminous-base-13b"), n_ipus=16, sparsity=0.8, sparse_head=True, kv_len=512))
    est = estimate_stages(lum)
    write(out / "ipu_estimate_luminous_pod16.json", json.dumps(est, indent=1, default=str))
    s = est["summary"]
    print(s["label"])
    for kind in ("dense", "sparse"):
        k = s[kind]
        print(f"  luminous {kind:<6}: {k['flops_per_token'] / 1e9:7.2f} GFLOP/token, "
              f"{k['sram_read_bytes_per_token'] / hw.GB:6.2f} GB SRAM read/token, "
              f"{k['tokens_per_s_sharded']:7.1f} tokens/s sharded, {k['energy_per_token_j'] * 1e3:7.2f} mJ/token")
    print("  sparse/dense:", {k: round(v, 3) for k, v in s["sparse_over_dense"].items()})
    return res_all


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=str(ROOT / "results"))
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-simulation", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    plans(out)
    if not args.skip_simulation:
        simulations(out, args.prompt_len)
    return 0


if __name__ == "__main__":
    sys.exit(main())
