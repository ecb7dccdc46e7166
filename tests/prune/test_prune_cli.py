import json

import pytest
import torch

from ipu_sparse.cli import main
from ipu_sparse.loading import load_model


def _calib_file(tmp_path, chars=4000):
    p = tmp_path / "calib.txt"
    p.write_text(("the quick brown fox jumps over the lazy dog " * (chars // 44 + 1))[:chars] + "\n")
    return p


BASE = ["prune", "--model", "tiny-llama", "--nsamples", "4", "--seq-len", "32"]


def test_prune_cli_writes_checkpoint_and_report(tmp_path, capsys):
    out = tmp_path / "ckpt"
    rc = main(BASE + ["--method", "wanda", "--sparsity", "0.8", "--calib", str(_calib_file(tmp_path)), "--out", str(out)])
    assert rc == 0
    stdout = capsys.readouterr().out
    assert "layers.0" in stdout and "decoder Linears" in stdout
    lm = load_model(str(out))
    zeros = sum(int((m.weight == 0).sum()) for _, m in lm.model.linear_layers())
    numel = sum(m.weight.numel() for _, m in lm.model.linear_layers())
    assert zeros == round(0.8 * numel)
    report = json.loads((out / "pruning_report.json").read_text())
    assert report["settings"]["method"] == "wanda" and report["settings"]["nsamples"] == 4
    assert lm.meta["pruning"]["per_layer_sparsity"]["layers.1"] == pytest.approx(0.8, abs=1e-3)
    # refuses to overwrite
    rc = main(BASE + ["--method", "magnitude", "--sparsity", "0.5", "--out", str(out)])
    assert rc == 2
    assert "already exists" in capsys.readouterr().err


@pytest.mark.parametrize("extra, match", [
    (["--method", "nope", "--sparsity", "0.5"], "unknown pruning method"),
    (["--method", "wanda", "--sparsity", "1.2"], "outside"),
    (["--method", "wanda", "--nm", "4:2"], "smaller"),
    (["--method", "sparsegpt", "--nm", "3:6"], "not divisible"),
    (["--method", "wanda", "--sparsity", "0.5", "--calib", "/nonexistent/file.txt"], "not found"),
    (["--method", "wanda", "--sparsity", "0.5", "--calib", "SHORT"], "too short"),
    (["--method", "wanda", "--sparsity", "0.5", "--format", "no-such-format"], "format"),
    (["--method", "wanda"], "give --sparsity"),
])
def test_prune_cli_bad_input(tmp_path, capsys, extra, match):
    out = tmp_path / "ckpt"
    extra = [str(_calib_file(tmp_path, chars=20)) if e == "SHORT" else e for e in extra]
    try:
        rc = main(BASE + extra + ["--out", str(out)])
    except SystemExit as exc:  # argparse (--format takes its choices from the format registry)
        rc = exc.code
    err = capsys.readouterr().err
    assert rc == 2
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and match in errors[0] and "Traceback" not in err
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".ckpt")] == []


def test_eval_cli_json(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("some text for perplexity " * 30)
    js = tmp_path / "r.json"
    rc = main(["eval", "--model", "tiny-llama", "--text", str(text), "--seq-len", "64", "--tasks", "piqa,lambada",
               "--limit", "3", "--json", str(js)])
    assert rc == 0
    stdout = capsys.readouterr().out
    assert "ppl" in stdout and "L=64" in stdout and "piqa" in stdout
    res = json.loads(js.read_text())
    assert res["text"]["seq_len"] == 64 and res["tasks"]["piqa"]["n"] == 3 and res["settings"]["limit"] == 3
    rc = main(["eval", "--model", "tiny-llama", "--tasks", "mmlu"])
    assert rc == 2 and "unknown task" in capsys.readouterr().err


def test_prune_cli_sparse_format(tmp_path):
    pytest.importorskip("ipu_sparse.sparse.checkpoint")
    out = tmp_path / "sp"
    rc = main(BASE + ["--method", "magnitude", "--sparsity", "0.75", "--format", "bitmap", "--sparse-dtype", "fp32",
                      "--out", str(out)])
    assert rc == 0
    lm = load_model(str(out))
    assert lm.meta["format"] != "dense" and lm.meta["pruning"]["method"] == "magnitude"
    zeros = numel = 0
    for _, m in lm.model.linear_layers():
        w = m.to_dense() if hasattr(m, "to_dense") else m.weight
        zeros += int((w == 0).sum())
        numel += w.numel()
    assert zeros == round(0.75 * numel)
