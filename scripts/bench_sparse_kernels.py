"""Per-shape sparse x dense kernel times: ours vs dense F.linear vs torch.sparse_csr, one run.

SmolLM2-135M's projection shapes (out x in) and its LM head, random weights pruned to each
sparsity uniformly at random, x of batch 1 / 8 / 32. Columns (median microseconds per call):

  dense fp32      F.linear, fp32 weight (what our dense model runs)
  dense bf16      F.linear, bf16 weight and input
  torch csr fp32  torch.sparse_csr_tensor(fp32) @ x.T (MKL; torch has no bf16/fp16 CSR on CPU)
  ours bitmap     our kernel, bitmap format, --dtype values
  ours csr16      our kernel, csr16 format, --dtype values

    flock /tmp/ipu_sparse_heavy.lock python scripts/bench_sparse_kernels.py
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from ipu_sparse.sparse import kernels
from ipu_sparse.sparse.formats import format_nbytes, from_dense

SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576)]


def time_us(fn, budget_s: float = 0.15, blocks: int = 5) -> float:
    fn()
    t0 = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t0, 1e-6)
    reps = max(1, int(budget_s / blocks / once))
    samples = []
    for _ in range(blocks):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        samples.append((time.perf_counter() - t0) / reps * 1e6)
    return statistics.median(samples)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sparsities", default="0.5,0.7,0.8,0.9")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--dtype", default="bf16", choices=("fp32", "bf16", "fp16"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--budget", type=float, default=0.15, help="seconds per measurement")
    ap.add_argument("--json", default="results/sparse_kernels.json")
    ap.add_argument("--table", default="results/sparse_kernels.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sparsities = [float(s) for s in args.sparsities.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    status = kernels.extension_status()
    print(f"kernel: {status}", file=sys.stderr)
    g = torch.Generator().manual_seed(0)
    rows_out = []
    header = (f"| shape | sparsity | batch | dense fp32 us | dense bf16 us | torch csr fp32 us | ours bitmap us | "
              f"ours csr16 us | bitmap vs dense fp32 | bitmap vs torch csr | bitmap bytes / dense fp16 |")
    lines = [header, "|" + "---|" * 11]
    print(header)
    print(lines[1])
    for rows, cols in SHAPES:
        w_full = torch.randn(rows, cols, generator=g)
        for s in sparsities:
            w = w_full * (torch.rand(rows, cols, generator=g) >= s)
            wb = w.to(torch.bfloat16)
            csr = w.to_sparse_csr()
            bm = from_dense(w, "bitmap", args.dtype)
            c16 = from_dense(w, "csr16", args.dtype)
            for b in batches:
                x = torch.randn(b, cols, generator=g)
                xb = x.to(torch.bfloat16)
                with torch.inference_mode():
                    t = {
                        "dense_fp32": time_us(lambda: F.linear(x, w), args.budget),
                        "dense_bf16": time_us(lambda: F.linear(xb, wb), args.budget),
                        "torch_csr_fp32": time_us(lambda: torch.mm(csr, x.t()).t(), args.budget),
                        "ours_bitmap": time_us(lambda: kernels.sparse_matmul(x, bm), args.budget),
                        "ours_csr16": time_us(lambda: kernels.sparse_matmul(x, c16), args.budget),
                    }
                ratio = bm.nbytes() / format_nbytes("dense", rows, cols, 0, "fp16")
                rec = {"rows": rows, "cols": cols, "sparsity": s, "batch": b, "us": t,
                       "bitmap_speedup_vs_dense_fp32": t["dense_fp32"] / t["ours_bitmap"],
                       "bitmap_speedup_vs_torch_csr": t["torch_csr_fp32"] / t["ours_bitmap"],
                       "bitmap_bytes_vs_dense_fp16": ratio}
                rows_out.append(rec)
                line = (f"| {rows}x{cols} | {s:.2f} | {b} | {t['dense_fp32']:.1f} | {t['dense_bf16']:.1f} | "
                        f"{t['torch_csr_fp32']:.1f} | {t['ours_bitmap']:.1f} | {t['ours_csr16']:.1f} | "
                        f"{rec['bitmap_speedup_vs_dense_fp32']:.2f}x | {rec['bitmap_speedup_vs_torch_csr']:.2f}x | "
                        f"{ratio:.3f} |")
                lines.append(line)
                print(line, flush=True)
    meta = {"torch": torch.__version__, "python": platform.python_version(), "threads": args.threads,
            "value_dtype": args.dtype, "kernel": status, "results": rows_out}
    for path, text in ((args.json, json.dumps(meta, indent=1)),
                       (args.table, f"Kernel: {status}; values {args.dtype}; torch {torch.__version__}; "
                                    f"{args.threads} threads; median us per call.\n\n" + "\n".join(lines) + "\n")):
        if path:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            tmp = path + f".tmp-{os.getpid()}"
            with open(tmp, "w") as fh:
                fh.write(text)
            os.replace(tmp, path)
            print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
