"""End-to-end batch-1 decode speed of SmolLM2-135M at 80% sparsity: sparse vs dense, one run.

The decoder projections are magnitude-pruned to --sparsity (per layer; speed does not depend
on which weights are pruned). Variants, alternated round by round (median of --rounds):

  dense fp32            our model, fp32 (the pruned weights stored densely)
  dense bf16            our model cast to bf16
  sparse + fp32 head    projections sparse (--format, --dtype), LM head dense fp32 tied
  sparse + fp16 head    projections sparse, LM head dense fp16 (untied copy)
  sparse + sparse head  projections and LM head (untied copy, pruned to --sparsity) sparse

Decode tokens/s = (new tokens - 1) / time from the first to the last generated token (prefill
excluded), greedy, via ``ipu_sparse.generate``. Each variant's greedy tokens are checked
against dense fp32 ones (identical for fp32 values; close for bf16).

    flock /tmp/ipu_sparse_heavy.lock python scripts/bench_sparse_decode.py
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time

import torch

from ipu_sparse.generate import generate
from ipu_sparse.loading import load_model
from ipu_sparse.prune import magnitude_prune_
from ipu_sparse.sparse import kernels
from ipu_sparse.sparse.accounting import account, rows_from_model
from ipu_sparse.sparse.linear import SparseConfig, sparsify_

PROMPT = "Explain in a few sentences why the sky is blue and why sunsets are red."


def decode_rate(model, prompt_ids, new_tokens):
    stamps = []
    out = generate(model, prompt_ids, new_tokens, on_token=lambda t: stamps.append(time.perf_counter()))
    return (len(stamps) - 1) / (stamps[-1] - stamps[0]), out


def model_bytes(model) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--sparsity", type=float, default=0.8)
    ap.add_argument("--format", default="bitmap", choices=("bitmap", "csr16"))
    ap.add_argument("--dtype", default="bf16", choices=("fp32", "bf16", "fp16"))
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--random-init", action="store_true", help="random weights of the preset's shape (no GGUF needed)")
    ap.add_argument("--json", default="results/sparse_decode.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    if args.random_init:  # same shapes, no weights needed (speed only; tokens are meaningless)
        from ipu_sparse.config import get_preset
        from ipu_sparse.model import build_model

        base = build_model(get_preset(args.model), seed=0)
        prompt_ids = torch.randint(0, base.config.vocab_size, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    else:
        lm = load_model(args.model)
        tok = lm.tokenizer
        prompt_ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": PROMPT}]))
        base = lm.model.eval()
    magnitude_prune_(base, args.sparsity)

    variants = {"dense fp32": base, "dense bf16": copy.deepcopy(base).to(torch.bfloat16)}
    fp32_head = sparsify_(copy.deepcopy(base), SparseConfig(format=args.format, dtype=args.dtype))
    variants[f"sparse {args.format}/{args.dtype} + fp32 head"] = fp32_head
    variants[f"sparse {args.format}/{args.dtype} + fp16 head"] = sparsify_(
        copy.deepcopy(base), SparseConfig(format=args.format, dtype=args.dtype, head_dtype="fp16"))
    sh = copy.deepcopy(base)
    magnitude_prune_(sh, args.sparsity, include_head=True)  # unties, prunes the head copy
    variants[f"sparse {args.format}/{args.dtype} + sparse head"] = sparsify_(
        sh, SparseConfig(format=args.format, dtype=args.dtype, include_head=True))
    print(f"kernel: {kernels.extension_status()}", file=sys.stderr)

    rates = {k: [] for k in variants}
    outputs = {}
    for name, m in variants.items():  # warm-up (and the greedy tokens)
        _, outputs[name] = decode_rate(m, prompt_ids, 8)
    for r in range(args.rounds):
        for name, m in variants.items():
            rate, out = decode_rate(m, prompt_ids, args.new_tokens)
            rates[name].append(rate)
            outputs[name] = out
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in rates.items()),
              file=sys.stderr)

    ref = outputs["dense fp32"]
    med = {k: statistics.median(v) for k, v in rates.items()}
    base_rate = med["dense fp32"]
    rows = []
    print(f"{'variant':<36} {'tok/s':>8} {'vs dense fp32':>14} {'weights MB':>11} {'same tokens':>12}")
    for name, m in variants.items():
        same = sum(a == b for a, b in zip(outputs[name], ref))
        mb = model_bytes(m) / 1e6
        rows.append({"variant": name, "tokens_per_s_median": med[name], "tokens_per_s_all": rates[name],
                     "speedup_vs_dense_fp32": med[name] / base_rate, "weight_bytes": model_bytes(m),
                     "greedy_tokens_equal_to_dense_fp32": f"{same}/{len(ref)}"})
        print(f"{name:<36} {med[name]:8.1f} {med[name] / base_rate:13.2f}x {mb:11.1f} {same:>5}/{len(ref):<6}")
    acc = account(base.config, rows_from_model(base, args.format, args.dtype), context=len(prompt_ids) + args.new_tokens)
    result = {
        "model": args.model + (" (random init)" if args.random_init else ""), "sparsity": args.sparsity, "format": args.format, "dtype": args.dtype,
        "pruning": "magnitude, per layer (speed benchmark)", "prompt_tokens": len(prompt_ids),
        "new_tokens": args.new_tokens, "rounds": args.rounds, "threads": args.threads,
        "torch": torch.__version__, "python": platform.python_version(), "kernel": kernels.extension_status(),
        "cpu": platform.processor() or platform.machine(), "variants": rows,
        "sparse_layer_bytes_ratio_vs_fp16": acc["sparse_layers"]["ratio"],
        "llama_cpp_q4_1_tokens_per_s_reported": 123.0,
    }
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        tmp = args.json + f".tmp-{os.getpid()}"
        with open(tmp, "w") as fh:
            json.dump(result, fh, indent=1)
        os.replace(tmp, args.json)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
