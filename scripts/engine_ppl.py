"""Perplexity of the C++ decode engine's own path: WikiText-2 test windows decoded token by token.

``eval.perplexity`` scores whole windows through torch (prefill); the engine only decodes, one
token per call, so its numerics (bf16-rounded or 8-bit activations) need this slower check. The
model is sparsified in memory (bitmap, ``--dtype`` values, ``--head-dtype`` head); each window
starts from an empty cache, the first token goes through torch, the rest through the engine.
Rows: the engine with int8 VNNI dot products (8-bit activations, one scale per 64 columns), the
engine with int8 widened to fp32, and the torch decode path.

    python scripts/engine_ppl.py --model runs/wanda50 --dtype int8 --head-dtype int8 --windows 8 --seq-len 256
"""
from __future__ import annotations

import argparse
import math
import sys
import time

import torch


def main(argv=None) -> int:
    from ipu_sparse.errors import UserError
    from ipu_sparse.eval.data import WIKITEXT2_TEST, data_path, read_rows
    from ipu_sparse.loading import load_model
    from ipu_sparse.sparse.engine import DecodeEngine
    from ipu_sparse.sparse.linear import SparseConfig, sparsify_

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="a pruned model (checkpoint, preset, GGUF)")
    ap.add_argument("--dtype", default="int8", choices=("fp32", "bf16", "fp16", "int8"))
    ap.add_argument("--head-dtype", default="int8", choices=("fp32", "bf16", "fp16", "int8"))
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    try:
        if args.windows < 1 or args.seq_len < 2:
            raise UserError("--windows must be >= 1 and --seq-len >= 2")
        torch.set_num_threads(args.threads)
        lm = load_model(args.model)
        model, tok = lm.model, lm.tokenizer
        sparsify_(model, SparseConfig(format="bitmap", dtype=args.dtype, head_dtype=args.head_dtype))
        model.eval()
        ids = tok.encode("".join(read_rows(data_path(None, WIKITEXT2_TEST))))
        L = args.seq_len
        for name, kw in (("engine, int8 VNNI", dict(int8_dot=True)), ("engine, int8 widened", dict(int8_dot=False)),
                         ("torch decode path", None)):
            nll, n, t0 = 0.0, 0, time.time()
            for w in range(args.windows):
                win = ids[w * L:(w + 1) * L]
                model.setup_cache(1, L)
                try:
                    with torch.inference_mode():
                        logits = model(torch.tensor([win[:1]]), input_pos=torch.arange(1), last_only=True)[0, -1]
                        eng = DecodeEngine.from_model(model, **kw) if kw is not None else None
                        if kw is not None and eng is None:
                            raise UserError("the decode engine cannot run this model (see ipu-sparse generate -v)")
                        if eng is not None:
                            eng.attach_cache()
                        for p in range(1, L):
                            nll -= float(torch.log_softmax(logits.float(), -1)[win[p]])
                            n += 1
                            if p == L - 1:
                                break
                            if eng is not None:
                                logits = eng.step(win[p], p)
                            else:
                                logits = model(torch.tensor([[win[p]]]), input_pos=torch.tensor([p]),
                                               last_only=True)[0, -1]
                finally:
                    model.clear_cache()
            print(f"{name:<22} ppl {math.exp(nll / n):8.3f}  ({n} predictions, {time.time() - t0:.0f} s)", flush=True)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
