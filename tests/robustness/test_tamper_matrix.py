"""Checkpoint tampering matrix: every checkpoint kind x every lie x {inspect, inspect --verify, generate, eval}.

``inspect`` reads the metadata only, so it may succeed (exit 0) on a lie inside the weights; every
other command must refuse with exit code 2 and one error line naming the file, and nothing may
raise (a traceback fails the test).
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from .conftest import run_cli

KINDS = ("dense", "bitmap", "csr16")


def _meta(ck):
    return json.loads((ck / "ipu_sparse.json").read_text())


def _write_meta(ck, meta):
    (ck / "ipu_sparse.json").write_text(json.dumps(meta))


def _rehash(ck):
    from ipu_sparse.fileio import sha256_file

    meta = _meta(ck)
    meta["files"]["model.safetensors"] = sha256_file(ck / "model.safetensors")
    _write_meta(ck, meta)


def _rewrite(ck, fn):
    """Apply ``fn`` to the weights (name -> tensor) and save them consistently (header metadata kept,
    hash updated): only the content lies."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    st = ck / "model.safetensors"
    with safe_open(str(st), framework="pt") as fh:
        header = fh.metadata()
    sd = dict(load_file(str(st)))
    fn(sd)
    save_file(sd, str(st), metadata=header)
    _rehash(ck)


def _first(sd, suffix):
    return sorted(k for k in sd if k.endswith(suffix))[0]


def t_flip(ck):
    st = ck / "model.safetensors"
    data = bytearray(st.read_bytes())
    data[len(data) // 2] ^= 0x40
    st.write_bytes(bytes(data))


def t_truncate(ck):
    st = ck / "model.safetensors"
    st.write_bytes(st.read_bytes()[: int(st.stat().st_size * 0.6)])
    _rehash(ck)


def t_header_length(ck):
    st = ck / "model.safetensors"
    data = bytearray(st.read_bytes())
    data[:8] = (2 ** 40).to_bytes(8, "little")
    st.write_bytes(bytes(data))
    _rehash(ck)


def t_header_shape(ck):
    st = ck / "model.safetensors"
    data = st.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    name = sorted(k for k in header if k != "__metadata__")[0]
    header[name]["shape"] = [s * 2 for s in header[name]["shape"]]
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    st.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n:])
    _rehash(ck)


def _set_config(ck, **fields):
    meta = _meta(ck)
    meta["config"].update(fields)
    _write_meta(ck, meta)


def t_config_width(ck):
    _set_config(ck, d_model=_meta(ck)["config"]["d_model"] * 2)


def t_config_layers(ck):
    _set_config(ck, n_layers=4000)


def t_version(ck):
    meta = _meta(ck)
    meta["version"] = 99
    _write_meta(ck, meta)


def t_layer_meta(ck):
    meta = _meta(ck)
    if "layers" in meta:
        first = sorted(meta["layers"])[0]
        meta["layers"][first]["nnz"] += 7
    else:
        meta["dtype"] = ["not", "a", "dtype"]
        meta["config"]["vocab_size"] = "many"
    _write_meta(ck, meta)


def t_index(ck):
    def lie(sd):
        if any(k.endswith(".row_ptr") for k in sd):
            name = _first(sd, ".row_ptr")
            rp = sd[name].clone()
            rp[1], rp[2] = rp[2] + 5, rp[1]  # not monotone
            sd[name] = rp
        else:  # dense: a tensor goes missing
            del sd[_first(sd, "mlp.down_proj.weight")]
    _rewrite(ck, lie)


def t_col_index(ck):
    def lie(sd):
        if any(k.endswith(".col_idx") for k in sd):
            name = _first(sd, ".col_idx")
            ci = sd[name].clone()
            ci[0] = 30000
            sd[name] = ci
        elif any(k.endswith(".mask") for k in sd):
            name = _first(sd, ".mask")
            m = sd[name].clone()
            m.view(-1)[:8] = ~m.view(-1)[:8] if m.dtype == torch.bool else 255 - m.view(-1)[:8]
            sd[name] = m
        else:  # dense: a tensor of the wrong dtype
            name = _first(sd, "attn.q_proj.weight")
            sd[name] = sd[name].to(torch.int32)
    _rewrite(ck, lie)


def t_nan(ck):
    def lie(sd):
        name = _first(sd, ".values") if any(k.endswith(".values") for k in sd) else _first(sd, "attn.q_proj.weight")
        t = sd[name].clone()
        t.view(-1)[1] = float("nan")
        sd[name] = t
    _rewrite(ck, lie)


def t_inf_norm(ck):
    def lie(sd):
        t = sd["norm.weight"].clone()
        t[0] = float("inf")
        sd["norm.weight"] = t
    _rewrite(ck, lie)


def t_tokenizer(ck):
    (ck / "tokenizer_config.json").write_text('{"byte_tokenizer": "lots"')


def t_missing_weights(ck):
    (ck / "model.safetensors").unlink()


TAMPERS = {f.__name__[2:]: f for f in (t_flip, t_truncate, t_header_length, t_header_shape, t_config_width,
                                       t_config_layers, t_version, t_layer_meta, t_index, t_col_index, t_nan,
                                       t_inf_norm, t_tokenizer, t_missing_weights)}
COMMANDS = {
    "inspect": lambda ck, a: ["inspect", ck],
    "verify": lambda ck, a: ["inspect", "--verify", ck],
    "generate": lambda ck, a: ["generate", "--model", ck, "--prompt", "hi", "--max-new-tokens", "2"],
    "eval": lambda ck, a: ["eval", "--model", ck, "--text", f"{a}/text.txt", "--seq-len", "32", "--max-windows", "1"],
}


@pytest.fixture(scope="module")
def tampered(assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("tampered")
    made = {}

    def get(kind, tamper):
        if (kind, tamper) not in made:
            ck = root / f"{kind}-{tamper}"
            shutil.copytree(assets["root"] / kind, ck)
            TAMPERS[tamper](ck)
            made[(kind, tamper)] = ck
        return made[(kind, tamper)]

    return get


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("tamper", list(TAMPERS))
@pytest.mark.parametrize("kind", KINDS)
def test_tampered_checkpoint(kind, tamper, command, tampered, assets):
    ck = tampered(kind, tamper)
    before = sorted(p.name for p in ck.parent.iterdir())
    res = run_cli(COMMANDS[command](str(ck), assets["A"]))
    assert "Traceback" not in res.err
    lines = res.error_lines
    if command == "inspect" and res.rc == 0:
        assert not lines, lines
    else:
        assert res.rc == 2, (res.rc, res.err[-1500:])
        assert len(lines) == 1 and lines[0].startswith("ipu-sparse"), lines
        assert ck.name in lines[0], lines[0]
    assert sorted(p.name for p in ck.parent.iterdir()) == before
