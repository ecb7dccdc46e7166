"""Accounting: bytes and FLOPs from a config, a model and a checkpoint agree with the formats."""
import json

import pytest

from ipu_sparse.cli import main as cli_main
from ipu_sparse.config import get_preset
from ipu_sparse.prune import magnitude_prune_
from ipu_sparse.sparse.accounting import account, rows_from_config, rows_from_model
from ipu_sparse.sparse.formats import format_nbytes


def test_smollm2_80_percent_from_config():
    cfg = get_preset("smollm2-135m")
    res = account(cfg, rows_from_config(cfg, 0.8, "bitmap", "fp16"), context=512)
    s, w = res["sparse_layers"], res["whole_model"]
    assert s["count"] == 30 * 7
    assert s["ratio"] <= 0.30
    expect = sum(format_nbytes("bitmap", r["rows"], r["cols"], r["nnz"], "fp16") for r in res["layers"])
    assert s["bytes"] == expect
    # projections: 30 * (2*576*576 + 2*192*576 + 3*1536*576) weights
    assert s["elements"] == 30 * (2 * 576 * 576 + 2 * 192 * 576 + 3 * 1536 * 576)
    # the tied embedding/head stays dense: whole-model memory is well above the layer ratio
    assert s["ratio"] < w["memory_ratio"] < 1.0
    assert res["lm_head"]["kind"] == "tied to the embedding"
    # compute: head FLOPs dominate what remains
    assert 0.2 < w["compute_ratio"] < 0.6
    csr = account(cfg, rows_from_config(cfg, 0.8, "csr16", "fp16"))
    assert csr["sparse_layers"]["ratio"] > 0.40


def test_sparse_head_option_lowers_whole_model():
    cfg = get_preset("smollm2-135m")
    tied = account(cfg, rows_from_config(cfg, 0.8), context=256)
    head = account(cfg, rows_from_config(cfg, 0.8, include_head=True), context=256)
    assert head["whole_model"]["compute_ratio"] < tied["whole_model"]["compute_ratio"]
    assert head["lm_head"]["kind"].startswith("sparse")
    fp16 = account(cfg, rows_from_config(cfg, 0.8), head_dtype="fp16")
    assert fp16["lm_head"]["bytes"] == 2 * cfg.vocab_size * cfg.d_model


def test_model_rows_match_config_rows(tiny_llama):
    magnitude_prune_(tiny_llama, 0.75)
    a = rows_from_model(tiny_llama, "bitmap", "bf16")
    b = rows_from_config(tiny_llama.config, 0.75, "bitmap", "bf16")
    assert [(r.name, r.rows, r.cols, r.nnz) for r in a] == [(r.name, r.rows, r.cols, r.nnz) for r in b]


def test_cli_account_preset_without_weights(tmp_path, capsys):
    js = tmp_path / "lum.json"
    assert cli_main(["account", "--model", "luminous-base-13b", "--sparsity", "0.8", "--json", str(js)]) == 0
    text = capsys.readouterr().out
    assert "seed: 44%" in text
    res = json.loads(js.read_text())
    assert res["sparse_layers"]["ratio"] < 0.30
    assert cli_main(["account", "--model", "tiny-llama", "--layers"]) == 0
    assert "layers.0.attn.q_proj" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli_main(["account", "--model", "tiny-llama", "--format", "coo"])


def test_decode_weight_bytes_counts_what_a_step_reads(tiny_llama):
    import copy

    from ipu_sparse.sparse.accounting import decode_weight_bytes
    from ipu_sparse.sparse.linear import SparseConfig, sparsify_

    cfg = tiny_llama.config
    V, d = cfg.vocab_size, cfg.d_model
    proj = sum(m.weight.numel() for _, m in tiny_llama.linear_layers())
    dense = decode_weight_bytes(tiny_llama)  # fp32, head tied: the whole embedding is read as the head
    assert dense["lm_head"] == 4 * V * d and dense["embedding_row"] == 0
    assert dense["projections"] == 4 * proj and dense["norms"] == 4 * d * (2 * cfg.n_layers + 1)
    assert dense["total"] == sum(v for k, v in dense.items() if k != "total")
    pruned = copy.deepcopy(tiny_llama)
    magnitude_prune_(pruned, 0.8)
    sparse = sparsify_(pruned, SparseConfig(format="bitmap", dtype="bf16", head_dtype="fp16"))
    got = decode_weight_bytes(sparse)
    expect = sum(format_nbytes("bitmap", m.out_features, m.in_features, m.nnz, "bf16") + (
        4 * m.out_features if m.bias is not None else 0) for _, m in sparse.linear_layers())
    assert got["projections"] == expect < dense["projections"] // 4
    assert got["lm_head"] == 2 * V * d and got["embedding_row"] == 4 * d  # untied fp16 head; one fp32 row
    q = copy.deepcopy(tiny_llama)
    magnitude_prune_(q, 0.8)
    q = sparsify_(q, SparseConfig(format="bitmap", dtype="int8", head_dtype="int8"))
    got8 = decode_weight_bytes(q)
    assert got8["lm_head"] == V * d + 4 * V  # int8 head: one byte a weight + one fp32 scale a row
    assert got8["projections"] < got["projections"]
