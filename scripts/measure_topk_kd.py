"""How close the top-k + tail-bucket KD loss (what the teacher-output cache stores) is to the full KD loss.

For a student (a checkpoint, or the teacher pruned here by magnitude) and the first N windows of a
training text, prints the full KL(teacher || student) per token and the top-k + tail estimate for
several k, and the teacher's mean probability mass outside its top-k.

    .venv/bin/python scripts/measure_topk_kd.py --teacher smollm2-135m --magnitude 0.8 \\
        --text ../shared/data/wikitext-2/wiki.valid.tokens --windows 4 --ks 16,64,256
"""
from __future__ import annotations

import argparse
import json
import sys

import torch


def main() -> int:
    from ipu_sparse.loading import load_model
    from ipu_sparse.prune import magnitude_masks
    from ipu_sparse.recover import apply_masks_
    from ipu_sparse.recover.data import collect_text_files, tokenize_files
    from ipu_sparse.recover.teacher_cache import kd_topk_vs_full

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", default="smollm2-135m")
    p.add_argument("--student", default=None, help="student checkpoint (default: the teacher pruned with --magnitude)")
    p.add_argument("--magnitude", type=float, default=0.8, help="magnitude sparsity of the default student")
    p.add_argument("--text", required=True)
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--ks", default="16,64,256")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    teacher = load_model(a.teacher)
    if a.student:
        student = load_model(a.student).model
    else:
        student = load_model(a.teacher).model
        apply_masks_(student, magnitude_masks(student, a.magnitude))
    ids = tokenize_files(teacher.tokenizer, collect_text_files([a.text]))[: a.windows * a.seq_len]
    x = torch.tensor(ids).view(-1, a.seq_len)  # (N, L)
    rows = []
    with torch.no_grad():
        for i in range(x.shape[0]):
            t, s = teacher.model(x[i:i + 1]), student(x[i:i + 1])
            for k in (int(v) for v in a.ks.split(",")):
                rows.append(dict(window=i, k=k, **kd_topk_vs_full(s, t, k, a.temperature)))
    out = []
    for k in sorted({r["k"] for r in rows}):
        rs = [r for r in rows if r["k"] == k]
        full = sum(r["full_kd"] for r in rs) / len(rs)
        topk = sum(r["topk_kd"] for r in rs) / len(rs)
        tail = sum(r["teacher_tail_mass"] for r in rs) / len(rs)
        out.append({"k": k, "full_kd": round(full, 4), "topk_kd": round(topk, 4), "ratio": round(topk / full, 4),
                    "teacher_tail_mass": round(tail, 4), "windows": len(rs), "seq_len": a.seq_len})
    print(json.dumps({"student": a.student or f"{a.teacher} magnitude {a.magnitude}", "rows": out}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
