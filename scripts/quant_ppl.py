"""Perplexity cost of int8 sparse values and of an int8 LM head (WikiText-2 test, the field's protocol).

For each value dtype (bf16, int8) the pruned model is sparsified in memory with ``sparsify_``
(bitmap format) and the final hidden states of the first N windows are computed once; every
LM head variant is then scored on those same hidden states: fp16 (the weight rounded to fp16),
int8 with one scale a row, int8 in groups of 32 columns (``QuantizedLinear``). Same windows,
tokens and NLL as ``ipu-sparse eval --wikitext2`` (``eval.perplexity``), which shares
``hidden_states`` with this script; the head is just evaluated several times.

    flock /tmp/ipu_sparse_heavy.lock python scripts/quant_ppl.py --model runs/wanda50 --json results/quant_ppl_wanda50.json
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch
import torch.nn.functional as F


def main(argv=None) -> int:
    from ipu_sparse.eval.perplexity import hidden_states, wikitext2_ids
    from ipu_sparse.loading import load_model
    from ipu_sparse.sparse import QuantizedLinear, SparseConfig, sparsify_
    from ipu_sparse.sparse.formats import quantize_q8

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="pruned checkpoint (dense with exact zeros) or preset")
    ap.add_argument("--max-windows", type=int, default=40)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--value-dtypes", default="bf16,int8")
    ap.add_argument("--heads", default="fp16,int8,int8-g32", help="fp16, int8 (one scale a row), int8-gN")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    results = []
    for vdt in args.value_dtypes.split(","):
        lm = load_model(args.model)
        model, tok = lm.model.eval(), lm.tokenizer
        head_w = model.lm_head.weight.detach().float().clone()  # the tied embedding, fp32
        sparsify_(model, SparseConfig(format="bitmap", dtype=vdt))
        ids = wikitext2_ids(tok)
        n = min(len(ids) // args.seq_len, args.max_windows)
        data = torch.tensor(ids[: n * args.seq_len]).view(n, args.seq_len)
        t0 = time.time()
        with torch.inference_mode():
            hs = [hidden_states(model, data[s:s + 4, :-1]).reshape(-1, model.config.d_model)
                  for s in range(0, n, 4)]  # (4 * (L-1), D) per batch
        body_s = time.time() - t0
        targets = [data[s:s + 4, 1:].reshape(-1) for s in range(0, n, 4)]
        for head in args.heads.split(","):
            if head == "fp16":
                w = head_w.half().float()
                fn = lambda h, w=w: F.linear(h, w)  # noqa: E731
            else:
                gs = int(head.split("-g")[1]) if "-g" in head else 0
                fn = QuantizedLinear(*quantize_q8(head_w, gs))
            t1 = time.time()
            nll = 0.0
            with torch.inference_mode():
                for h, t in zip(hs, targets):
                    nll += float(F.cross_entropy(fn(h).float(), t, reduction="sum").double())
            count = n * (args.seq_len - 1)
            row = {"values": vdt, "head": head, "ppl": math.exp(nll / count), "nll": nll / count, "tokens": count,
                   "windows": n, "seq_len": args.seq_len, "body_s": round(body_s, 1),
                   "head_s": round(time.time() - t1, 1)}
            results.append(row)
            print(json.dumps(row), flush=True)
    base = next((r["ppl"] for r in results if r["values"] == "bf16" and r["head"] == "fp16"), None)
    print("\n| values | head | ppl | vs bf16 values + fp16 head |\n|---|---|---|---|")
    for r in results:
        rel = f"{100 * (r['ppl'] / base - 1):+.2f}%" if base else "-"
        print(f"| {r['values']} | {r['head']} | {r['ppl']:.3f} | {rel} |")
    if args.json:
        from ipu_sparse.fileio import atomic_write_text

        atomic_write_text(args.json, json.dumps({"model": args.model, "rows": results}, indent=1), True)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
