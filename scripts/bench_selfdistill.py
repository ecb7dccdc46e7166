"""Speed of the data-free training text: the dense teacher writing samples of the built-in prompts.

Times ``recover.data.self_distill_ids`` (fresh cache each run) on the first --prompts prompts for
each setting given as PROMPTS_PER_BATCH:DTYPE, e.g. ``1:float32`` (one prompt per batch, fp32
weights: how the text was written before prompts were batched) and ``4:bfloat16``. Prints
generated tokens/s (sample tokens only) and stream tokens/s (prompt + sample + EOS, what the
progress bar counts). Model loading and the dtype conversion of the teacher (once per run) are
not timed.

    flock /tmp/ipu_sparse_heavy.lock .venv/bin/python scripts/bench_selfdistill.py --prompts 4 --max-new 128 1:float32 4:bfloat16
"""
from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time

import torch

from ipu_sparse.loading import load_model
from ipu_sparse.recover.data import SelfDistillConfig, prompt_ids_list, self_distill_ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("settings", nargs="+", help="PROMPTS_PER_BATCH:DTYPE, e.g. 1:float32 4:bfloat16")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompts", type=int, default=4, help="prompts written per setting (a multiple of each batch)")
    ap.add_argument("--samples", type=int, default=8, help="samples per prompt")
    ap.add_argument("--max-new", type=int, default=128, help="tokens per sample at most")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load_model(args.model)
    n_prompts = len(prompt_ids_list(lm.tokenizer))
    for setting in args.settings:
        ppb, dtype = setting.split(":")
        teacher = copy.deepcopy(lm.model).to(getattr(torch, dtype))
        cfg = SelfDistillConfig(n_tokens=1, max_new_tokens=args.max_new, samples_per_prompt=args.samples,
                                prompts_per_batch=int(ppb), dtype=dtype)
        # each call asks for one token more than the cache holds: exactly one more batch is written
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            stream, done = 0, 0
            while done < min(args.prompts, n_prompts):
                cfg.n_tokens = stream + 1
                ids, cache = self_distill_ids(teacher, lm.tokenizer, tmp, cfg)
                stream = len(ids)
                done = sum(1 for _ in open(cache))
            secs = time.perf_counter() - t0
            records = [json.loads(line) for line in open(cache)]
        gen = sum(len(s) for r in records for s in r["samples"])
        print(f"{setting:>12}: {len(records)} prompts x {args.samples} samples, {gen} generated tokens "
              f"({stream} in the stream) in {secs:.1f} s: {gen / secs:.1f} generated tok/s, "
              f"{stream / secs:.1f} stream tok/s  [max_new {args.max_new}, {torch.get_num_threads()} threads]")
        del teacher


if __name__ == "__main__":
    main()
