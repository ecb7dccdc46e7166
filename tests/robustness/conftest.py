"""Shared assets and the in-process CLI runner of the robustness suite.

The promise under test: every bad input a user can give ends in one line on stderr naming the
offending file or value, exit code 2, no traceback, and nothing new left on disk.
"""
from __future__ import annotations

import io
import os
import shutil
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import List, Optional

import pytest

# Notices a command may print to stderr before it fails (its progress log); everything else on
# stderr must be the one error line.
PROGRESS_PREFIXES = ("loading ", "student mask:", "training text:")


# The recovery run kept among the assets (a resumable run directory).
RECOVER_RUN = ["recover", "--teacher", "tiny-llama", "--seq-len", "16", "--batch-size", "2", "--heldout-windows", "1",
               "--steps", "2", "--stop-after", "1", "--no-progress"]


class CliResult:
    def __init__(self, rc, out: str, err: str):
        self.rc, self.out, self.err = rc, out, err

    @property
    def error_lines(self) -> List[str]:
        return [ln for ln in self.err.splitlines() if ln.strip() and not ln.startswith(PROGRESS_PREFIXES)]


def run_cli(argv, stdin: Optional[bytes] = None, closed_stdin: bool = False) -> CliResult:
    """``ipu-sparse ARGV`` in this process: exit code, stdout, stderr. An exception that escapes
    ``main`` is re-raised (the test fails with it: that is a traceback a user would see)."""
    from ipu_sparse.cli import main

    out, err = io.StringIO(), io.StringIO()
    old_stdin = sys.stdin
    if closed_stdin:
        sys.stdin = None
    elif stdin is not None:
        sys.stdin = io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8")
    try:
        with redirect_stdout(out), redirect_stderr(err):
            try:
                rc = main([str(a) for a in argv])
            except SystemExit as exc:  # argparse
                rc = exc.code
    finally:
        sys.stdin = old_stdin
    return CliResult(rc, out.getvalue(), err.getvalue())


def listing(*roots) -> List[str]:
    """Every path under ``roots`` (names, sizes and permissions), to compare before and after a command."""
    rows = []
    for root in roots:
        root = Path(root)
        for p in sorted(root.rglob("*")):
            st = p.lstat()
            rows.append(f"{p} {st.st_mode:o} {st.st_size if p.is_file() else ''}")
    return rows


def byte_bpe_tokenizer(chat_template=None):
    """A byte-level BPE tokenizer with the 256 byte symbols and ChatML specials (vocab 259)."""
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    from ipu_sparse.loading.tokenizer import DEFAULT_CHAT_TEMPLATE, Tokenizer

    vocab = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    for ch in sorted(ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")])
    return Tokenizer(backend, 1, 2, chat_template or DEFAULT_CHAT_TEMPLATE), len(vocab)


def unwritable_dir(base: Path) -> Optional[Path]:
    """A directory this process cannot create files in (a 0555 directory; root ignores modes, so
    then a read-only system location), or None."""
    if os.geteuid() != 0:
        d = base / "readonly"
        d.mkdir()
        d.chmod(0o555)
        return d
    for cand in ("/proc/self", "/sys/kernel"):
        try:
            (Path(cand) / ".ipu-sparse-probe").mkdir()
        except OSError:
            return Path(cand)
        shutil.rmtree(Path(cand) / ".ipu-sparse-probe", ignore_errors=True)
    return None


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    """Tiny checkpoints of every format, a GGUF, a text file, a regular file and an unwritable directory."""
    import torch

    from ipu_sparse.checkpoint import save_dense_checkpoint
    from ipu_sparse.config import get_preset
    from ipu_sparse.loading import load_model
    from ipu_sparse.loading.gguf_export import save_gguf
    from ipu_sparse.model import build_model
    from ipu_sparse.sparse.checkpoint import save_sparse_checkpoint
    from ipu_sparse.prune import magnitude_prune_

    root = tmp_path_factory.mktemp("assets")
    (root / "text.txt").write_text("The quick brown fox jumps over the lazy dog. " * 200)
    (root / "afile").write_text("not a directory\n")
    lm = load_model("tiny-llama")
    magnitude_prune_(lm.model, 0.6)
    save_dense_checkpoint(lm.model, lm.tokenizer, root / "dense")
    save_sparse_checkpoint(lm.model, lm.tokenizer, root / "bitmap", format="bitmap", dtype="fp32")
    save_sparse_checkpoint(lm.model, lm.tokenizer, root / "csr16", format="csr16", dtype="bf16")
    from ipu_sparse.loading.hf import save_hf_dir

    save_hf_dir(lm.model, None, root / "hf")
    tok, n_vocab = byte_bpe_tokenizer()
    cfg = get_preset("tiny-llama").replace(vocab_size=n_vocab, name="tiny-bpe")
    bpe_model = build_model(cfg, seed=1)
    save_gguf(bpe_model, tok, root / "tiny.gguf")
    bad_tok, _ = byte_bpe_tokenizer(chat_template="{% for m in messages %}{{ m.content }")
    save_dense_checkpoint(bpe_model, bad_tok, root / "badtemplate")
    with torch.no_grad():  # a finite but broken model: logits of +-1e6, NLL far beyond exp()'s range
        lm.model.lm_head.weight.mul_(1e5)
    save_dense_checkpoint(lm.model, lm.tokenizer, root / "broken")
    res = run_cli(RECOVER_RUN + ["--student", str(root / "dense"), "--text", str(root / "text.txt"),
                                 "--out", str(root / "run")])
    assert res.rc == 0, res.err
    ro = unwritable_dir(root)
    return {"A": str(root), "RO": str(ro) if ro else None, "root": root}
