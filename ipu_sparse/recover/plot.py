"""Training curves of a recovery run (PNG)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import List


def plot_history(history: List[dict], path, title: str = "recovery") -> None:
    """KD loss and held-out perplexity against end-to-end tokens seen (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h for h in history if "eval" not in h and "kd" in h]
    evals = [h for h in history if h.get("eval") and h["eval"] != "teacher"]
    teacher = next((h for h in history if h.get("eval") == "teacher"), None)
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    if steps:
        a.plot([h["tokens"] for h in steps], [h["loss"] for h in steps], lw=1)
    a.set_xlabel("end-to-end tokens")
    a.set_ylabel("training loss (KD)")
    a.set_title("training loss")
    if evals:
        b.plot([h["tokens"] for h in evals], [h["heldout_ppl"] for h in evals], "o-", label="sparse student")
    if teacher:
        b.axhline(teacher["heldout_ppl"], color="k", ls="--", label="dense teacher")
    for key in sorted({k for h in evals for k in h if k.startswith("x_") and k.endswith("ppl")}):
        pts = [h for h in evals if key in h]
        b.plot([h["tokens"] for h in pts], [h[key] for h in pts], "s-", label=key[2:])
        if teacher and key in teacher:
            b.axhline(teacher[key], color="gray", ls=":", label=f"dense {key[2:]}")
    b.set_yscale("log")
    b.set_xlabel("end-to-end tokens (block reconstruction happens at the phase starts)")
    b.set_ylabel("held-out perplexity")
    b.set_title("held-out perplexity")
    b.legend()
    fig.suptitle(title)
    fig.tight_layout()
    tmp = Path(str(path) + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
