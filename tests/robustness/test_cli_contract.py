"""The CLI contract, table-driven: for every subcommand, bad inputs that must each end in exit code 2,
one error line on stderr naming the offending file or value, no traceback, and nothing new on disk.

``{A}`` is the assets directory (tests/robustness/conftest.py), ``{RO}`` a directory no file can be
created in, ``{T}`` the case's own scratch directory (also its working directory).
"""
from __future__ import annotations

import pytest

from .conftest import RECOVER_RUN, listing, run_cli

GEN = ["generate", "--model", "tiny-llama", "--max-new-tokens", "2"]
GEN_CK = ["generate", "--model", "{T}/ck", "--prompt", "hi", "--max-new-tokens", "2"]
PRUNE = ["prune", "--model", "tiny-llama", "--method", "magnitude", "--sparsity", "0.5", "--nsamples", "2",
         "--seq-len", "16", "--calib", "{A}/text.txt"]
EVAL = ["eval", "--model", "tiny-llama", "--text", "{A}/text.txt", "--seq-len", "32", "--max-windows", "2"]
REC = ["recover", "--teacher", "tiny-llama", "--student", "{A}/dense", "--text", "{A}/text.txt", "--seq-len", "16",
       "--batch-size", "2", "--heldout-windows", "1", "--steps", "1", "--no-progress"]
RESUME = RECOVER_RUN + ["--student", "{A}/dense", "--text", "{A}/text.txt", "--resume", "--out", "{T}/ck"]
SPARSIFY = ["sparsify", "--model", "tiny-llama", "--magnitude", "0.5"]
PLAN = ["plan", "--model", "tiny-llama", "--ipus", "1"]
SIM = ["simulate", "--model", "tiny-llama", "--ipus", "1", "--prompt-len", "8"]

# (case id, argv, text the error line must contain, options)
CASES = [
    # generate
    ("generate-missing-model", ["generate", "--model", "{T}/nope", "--prompt", "hi"], "nope", {}),
    ("generate-model-not-gguf", ["generate", "--model", "{A}/afile", "--prompt", "hi"], "afile", {}),
    ("generate-stdin-invalid-utf8", GEN + ["--prompt", "-"], "UTF-8", {"stdin": b"ab\xff\xfe"}),
    ("generate-stdin-closed", GEN + ["--prompt", "-"], "standard input", {"closed_stdin": True}),
    ("generate-prompt-lone-surrogate", GEN + ["--prompt", "a\udcff"], "UTF-8", {}),
    ("generate-temperature-nan", GEN + ["--prompt", "hi", "--temperature", "nan"], "--temperature", {}),
    ("generate-temperature-inf", GEN + ["--prompt", "hi", "--temperature", "inf"], "--temperature", {}),
    ("generate-top-p-nan", GEN + ["--prompt", "hi", "--top-p", "nan"], "nan", {}),
    ("generate-seed-huge", GEN + ["--prompt", "hi", "--seed", str(10 ** 23)], "--seed", {}),
    ("generate-seed-float", GEN + ["--prompt", "hi", "--seed", "1e23"], "--seed", {}),
    ("generate-threads-negative", GEN + ["--prompt", "hi", "--threads", "-1"], "--threads", {}),
    ("generate-max-new-negative", GEN + ["--prompt", "hi", "--max-new-tokens", "-1"], "-1", {}),
    ("generate-too-long", GEN[:-1] + ["1000", "--prompt", "hi"], "context", {}),
    ("generate-bad-chat-template", ["generate", "--model", "{A}/badtemplate", "--prompt", "hi", "--chat"],
     "chat template", {}),
    ("generate-norm-eps-string", GEN_CK, "norm_eps",
     {"tamper": ("dense", "config.norm_eps", "abc")}),
    ("generate-norm-eps-negative", GEN_CK, "norm_eps",
     {"tamper": ("dense", "config.norm_eps", -1.0)}),
    ("generate-config-not-object", GEN_CK, "config",
     {"tamper": ("dense", "config", [1, 2])}),
    ("generate-config-bool-width", GEN_CK, "d_model", {"tamper": ("dense", "config.d_model", True)}),
    ("generate-files-not-object", GEN_CK, "files",
     {"tamper": ("dense", "files", "x")}),
    ("generate-broken-tokenizer-config", GEN_CK, "tokenizer_config.json",
     {"tamper": ("dense", "tokenizer_config.json", "{broken")}),
    ("generate-nan-weights", GEN_CK, "layers.0",
     {"tamper": ("dense", "nan", "layers.0.attn.q_proj.weight")}),
    ("generate-sparse-nan-values", GEN_CK, "layers.0",
     {"tamper": ("bitmap", "nan", "layers.0.attn.q_proj.values")}),
    # chat
    ("chat-stdin-closed", ["chat", "--model", "tiny-llama"], "standard input", {"closed_stdin": True}),
    ("chat-temperature-nan", ["chat", "--model", "tiny-llama", "--temperature", "nan"], "--temperature", {}),
    # info
    ("info-missing", ["info", "--model", "{T}/nope"], "nope", {}),
    ("info-meta-not-json", ["info", "--model", "{T}/ck"], "ipu_sparse.json",
     {"tamper": ("dense", "ipu_sparse.json", "{")}),
    ("info-threads-negative", ["info", "--model", "tiny-llama", "--threads", "-2"], "--threads", {}),
    # export
    ("export-gguf-under-file", ["export", "--model", "{A}/tiny.gguf", "--gguf", "{A}/afile/x.gguf"], "afile", {}),
    ("export-gguf-readonly", ["export", "--model", "{A}/tiny.gguf", "--gguf", "{RO}/x.gguf"], "x.gguf", {"ro": True}),
    ("export-hf-dot", ["export", "--model", "tiny-llama", "--hf", ".", "--overwrite"], ".", {}),
    ("export-hf-root", ["export", "--model", "tiny-llama", "--hf", "/", "--overwrite"], "/", {}),
    ("export-gguf-onto-directory", ["export", "--model", "{A}/tiny.gguf", "--gguf", "{T}/d", "--overwrite"], "d",
     {"dirs": ["d"]}),
    # prune
    ("prune-out-under-file", PRUNE + ["--out", "{A}/afile/out"], "afile", {}),
    ("prune-out-readonly", PRUNE + ["--out", "{RO}/out"], "out", {"ro": True}),
    ("prune-out-dot", PRUNE + ["--out", ".", "--overwrite"], ".", {}),
    ("prune-out-root", PRUNE + ["--out", "/", "--overwrite"], "/", {}),
    ("prune-sparse-dtype-int4", PRUNE + ["--format", "bitmap", "--sparse-dtype", "int4", "--out", "{T}/o"],
     "int4", {}),
    ("prune-sparse-dtype-int8-csr16", PRUNE + ["--format", "csr16", "--sparse-dtype", "int8", "--out", "{T}/o"],
     "csr16", {}),
    ("prune-seq-len-over-context", PRUNE[:2] + ["tiny-llama", "--method", "wanda", "--sparsity", "0.5", "--nsamples", "2",
                                             "--calib", "{A}/text.txt", "--seq-len", "1000", "--out", "{T}/o"],
     "--seq-len", {}),
    ("prune-calib-missing", PRUNE[:-1] + ["{T}/nope.txt", "--out", "{T}/o"], "nope.txt", {}),
    ("prune-threads-negative", PRUNE + ["--threads", "-1", "--out", "{T}/o"], "--threads", {}),
    # eval
    ("eval-json-onto-directory", EVAL + ["--json", "{T}/d", "--overwrite"], "d", {"dirs": ["d"]}),
    ("eval-json-readonly", EVAL + ["--json", "{RO}/r.json"], "r.json", {"ro": True}),
    ("eval-json-under-file", EVAL + ["--json", "{A}/afile/r.json"], "afile", {}),
    ("eval-seq-len-over-context", EVAL[:-4] + ["--seq-len", "1000"], "--seq-len", {}),
    ("eval-limit-negative", ["eval", "--model", "tiny-llama", "--tasks", "piqa", "--limit", "-1"], "--limit", {}),
    ("eval-max-windows-negative", EVAL[:-2] + ["--max-windows", "-1"], "-1", {}),
    ("eval-text-missing", ["eval", "--model", "tiny-llama", "--text", "{T}/nope.txt"], "nope.txt", {}),
    ("eval-text-invalid-utf8", ["eval", "--model", "tiny-llama", "--text", "{T}/bad.txt", "--seq-len", "32"], "bad.txt",
     {"files": {"bad.txt": b"abc\xff\xfe" * 100}}),
    ("eval-unknown-task", ["eval", "--model", "tiny-llama", "--tasks", "nope"], "nope", {}),
    ("eval-chat-probe-missing", ["eval", "--model", "tiny-llama", "--chat-probe", "--chat-probe-file", "{T}/nope.json"],
     "nope.json", {}),
    ("eval-chat-probe-not-json", ["eval", "--model", "tiny-llama", "--chat-probe", "--chat-probe-file", "{T}/bad.json"],
     "bad.json", {"files": {"bad.json": b"{questions"}}),
    ("eval-side-by-side-readonly", ["eval", "--model", "tiny-llama", "--reference", "tiny-llama", "--chat-side-by-side",
                                    "{RO}/s.md"], "s.md", {"ro": True}),
    ("eval-nan-weights", ["eval", "--model", "{T}/ck", "--text", "{A}/text.txt", "--seq-len", "32"], "layers.1",
     {"tamper": ("csr16", "nan", "layers.1.mlp.down_proj.values")}),
    # sparsify / inspect / account
    ("sparsify-out-under-file", SPARSIFY + ["--out", "{A}/afile/o"], "afile", {}),
    ("sparsify-out-readonly", SPARSIFY + ["--out", "{RO}/o"], "o", {"ro": True}),
    ("sparsify-out-root", SPARSIFY + ["--out", "/", "--overwrite"], "/", {}),
    ("sparsify-magnitude-nan", ["sparsify", "--model", "tiny-llama", "--magnitude", "nan", "--out", "{T}/o"],
     "--magnitude", {}),
    ("inspect-missing", ["inspect", "{T}/nope"], "nope", {}),
    ("inspect-verify-dense-no-weights", ["inspect", "--verify", "{T}/ck"], "model.safetensors",
     {"tamper": ("dense", "delete", "model.safetensors")}),
    ("inspect-verify-dense-bad-hash", ["inspect", "--verify", "{T}/ck"], "model.safetensors",
     {"tamper": ("dense", "files.model.safetensors", "0" * 64)}),
    ("inspect-verify-dense-no-hashes", ["inspect", "--verify", "{T}/ck"], "unverifiable",
     {"tamper": ("dense", "files", {})}),
    ("inspect-dense-config-list", ["inspect", "{T}/ck"], "config", {"tamper": ("dense", "config", [])}),
    ("account-json-exists", ["account", "--model", "tiny-llama", "--sparsity", "0.5", "--json", "{T}/a.json"],
     "a.json", {"files": {"a.json": "{}"}}),
    ("account-json-directory", ["account", "--model", "tiny-llama", "--sparsity", "0.5", "--json", "{T}/d",
                                "--overwrite"], "d", {"dirs": ["d"]}),
    ("account-context-negative", ["account", "--model", "tiny-llama", "--sparsity", "0.5", "--context", "-5"],
     "--context", {}),
    ("account-sparsity-out-of-range", ["account", "--model", "tiny-llama", "--sparsity", "1.5"], "1.5", {}),
    # recover
    ("recover-max-minutes-nan", REC[:-3] + ["--max-minutes", "nan", "--no-progress", "--out", "{T}/r"],
     "--max-minutes", {}),
    ("recover-lr-nan", REC + ["--lr", "nan", "--out", "{T}/r"], "--lr", {}),
    ("recover-threads-negative", REC + ["--threads", "-1", "--out", "{T}/r"], "--threads", {}),
    ("recover-out-under-file", REC + ["--out", "{A}/afile/r"], "afile", {}),
    ("recover-out-readonly", REC + ["--out", "{RO}/r"], "r", {"ro": True}),
    ("recover-seq-len-over-context", REC[:-8] + ["--seq-len", "1000", "--batch-size", "2", "--heldout-windows",
                                                 "1", "--steps", "1", "--no-progress", "--out", "{T}/r"],
     "--seq-len", {}),
    ("recover-resume-nothing", REC + ["--resume", "--out", "{T}/r"], "r", {}),
    ("recover-resume-missing-weights", RESUME, "model.safetensors", {"tamper": ("run", "delete", "model.safetensors")}),
    ("recover-resume-corrupt-weights", RESUME, "model.safetensors",
     {"tamper": ("run", "model.safetensors", "garbage")}),
    ("recover-resume-weights-nan", RESUME, "layers.1",
     {"tamper": ("run", "nan", "layers.1.mlp.gate_proj.weight")}),
    ("recover-resume-broken-state", RESUME, "train_state.json", {"tamper": ("run", "train_state.json", "{")}),
    # plan / simulate / ipu-generate
    ("plan-kv-len-zero", PLAN + ["--kv-len", "0"], "--kv-len", {}),
    ("plan-kv-len-negative", PLAN + ["--kv-len", "-1"], "--kv-len", {}),
    ("plan-seq-len-zero", PLAN + ["--seq-len", "0"], "--seq-len", {}),
    ("plan-ipus-zero", PLAN[:-2] + ["--ipus", "0"], "--ipus", {}),
    ("plan-sparsity-nan", PLAN + ["--sparsity", "nan"], "nan", {}),
    ("plan-json-directory", PLAN + ["--json", "{T}/d", "--overwrite"], "d", {"dirs": ["d"]}),
    ("plan-unknown-model", ["plan", "--model", "nope-13b"], "nope-13b", {}),
    ("simulate-prompt-len-zero", SIM[:-2] + ["--prompt-len", "0"], "--prompt-len", {}),
    ("simulate-prompt-len-huge", SIM[:-2] + ["--prompt-len", "100000"], "--prompt-len", {}),
    ("simulate-json-under-file", SIM + ["--json", "{A}/afile/s.json"], "afile", {}),
    ("ipu-generate-no-poptorch", ["ipu-generate", "--model", "tiny-llama"], "poptorch", {}),
    ("ipu-check-ipus-zero", ["ipu-check", "--model", "tiny-llama", "--ipus", "0"], "--ipus", {}),
    ("ipu-check-missing-model", ["ipu-check", "--model", "{T}/nope"], "nope", {}),
    # serve (each fails before a socket is opened)
    ("serve-missing-model", ["serve", "--model", "{T}/nope"], "nope", {}),
    ("serve-port-out-of-range", ["serve", "--model", "tiny-llama", "--port", "70000"], "--port", {}),
    ("serve-max-queue-negative", ["serve", "--model", "tiny-llama", "--max-queue", "-1"], "--max-queue", {}),
    ("serve-compare-missing", ["serve", "--model", "tiny-llama", "--compare", "{T}/nope"], "nope", {}),
    # argparse-level mistakes are one line too
    ("argparse-unknown-option", ["generate", "--model", "tiny-llama", "--prompt", "x", "--nope"], "--nope", {}),
    ("argparse-bad-int", ["eval", "--model", "tiny-llama", "--seq-len", "abc"], "abc", {}),
    ("argparse-bad-choice", ["sparsify", "--model", "tiny-llama", "--format", "zip", "--out", "x"], "zip", {}),
    ("argparse-unknown-command", ["frobnicate"], "frobnicate", {}),
]


def _tamper(src, dst, how):
    """Copy checkpoint ``src`` to ``dst`` and apply one lie: ("nan", tensor) in the weights,
    ("delete", file), (file name, raw text), or (field path, value) in the metadata."""
    import json
    import shutil

    shutil.copytree(src, dst)
    what, arg = how[1], how[2]
    meta_path = dst / "ipu_sparse.json"
    if what == "nan":
        from safetensors.torch import load_file, save_file
        from safetensors import safe_open

        from ipu_sparse.fileio import sha256_file

        st = dst / "model.safetensors"
        with safe_open(str(st), framework="pt") as fh:
            header = fh.metadata()
        sd = load_file(str(st))
        t = sd[arg].clone()
        t.view(-1)[0] = float("nan")
        sd[arg] = t
        save_file(sd, str(st), metadata=header)
        meta = json.loads(meta_path.read_text())
        meta["files"]["model.safetensors"] = sha256_file(st)  # a consistent file: only the values lie
        meta_path.write_text(json.dumps(meta))
    elif what == "delete":
        (dst / arg).unlink()
    elif not (dst / what).is_file():  # a field of the metadata
        meta = json.loads(meta_path.read_text())
        keys = what.split(".", 1) if what.startswith("files.") else what.split(".")
        obj = meta
        for k in keys[:-1]:
            obj = obj[k]
        obj[keys[-1]] = arg
        meta_path.write_text(json.dumps(meta))
    else:
        (dst / what).write_text(arg)


@pytest.mark.parametrize("case_id,argv,needle,opts", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2(case_id, argv, needle, opts, assets, tmp_path, monkeypatch):
    if opts.get("ro") and not assets["RO"]:
        pytest.skip("no unwritable directory on this machine")
    if "tamper" in opts:
        _tamper(assets["root"] / opts["tamper"][0], tmp_path / "ck", opts["tamper"])
    for name, content in opts.get("files", {}).items():
        p = tmp_path / name
        p.write_bytes(content) if isinstance(content, bytes) else p.write_text(content)
    for name in opts.get("dirs", ()):
        (tmp_path / name).mkdir()
    monkeypatch.chdir(tmp_path)
    subs = {"A": assets["A"], "RO": assets["RO"] or "", "T": str(tmp_path)}
    argv = [a.format(**subs) if "{" in a and "}" in a and "{%" not in a else a for a in argv]
    before = listing(tmp_path, assets["root"])
    res = run_cli(argv, stdin=opts.get("stdin"), closed_stdin=opts.get("closed_stdin", False))
    assert res.rc == 2, (res.rc, res.err[-2000:])
    assert "Traceback" not in res.err
    lines = res.error_lines
    assert len(lines) == 1, lines
    needle = needle.format(**subs)
    assert needle in lines[0], (needle, lines[0])
    assert lines[0].startswith("ipu-sparse"), lines[0]
    assert listing(tmp_path, assets["root"]) == before


def test_every_subcommand_has_cases():
    from ipu_sparse.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    covered = {argv[0] for _, argv, _, _ in CASES}
    assert set(sub.choices) - covered == set()
