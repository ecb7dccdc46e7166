"""ipu_sparse.fileio (atomic writes, hashes, safetensors reading) and the loaders built on it:
the checkpoint-format table, the one strict state-dict copy, ``set_module``."""
import hashlib
import json

import pytest
import torch
import torch.nn as nn

from ipu_sparse.checkpoint import META_FILE, load_state_dict_strict, save_dense_checkpoint
from ipu_sparse.errors import UserError
from ipu_sparse.fileio import (atomic_directory, atomic_file, atomic_write_bytes, atomic_write_text, read_safetensors,
                               sha256_file)
from ipu_sparse.loading import CHECKPOINT_LOADERS, load_checkpoint
from ipu_sparse.loading.tokenizer import ByteTokenizer
from ipu_sparse.model import set_module


def _siblings(path):
    return sorted(p.name for p in path.parent.iterdir())


def test_atomic_file_renames_on_success_and_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.bin"
    with atomic_file(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target
        tmp.write_bytes(b"abc")
        assert not target.exists()  # nothing visible before the rename
    assert target.read_bytes() == b"abc"
    with pytest.raises(RuntimeError):
        with atomic_file(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("writer failed")
    assert target.read_bytes() == b"abc" and _siblings(target) == ["out.bin"]
    with pytest.raises(UserError, match="already exists"):
        atomic_write_bytes(target, b"x", overwrite=False)
    assert atomic_write_text(tmp_path / "sub" / "t.txt", "h\u00e9").read_text(encoding="utf-8") == "h\u00e9"


def test_atomic_directory_replaces_only_on_success(tmp_path):
    out = tmp_path / "ck"
    with atomic_directory(out) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(UserError, match="already exists"):
        with atomic_directory(out):
            pass
    with pytest.raises(RuntimeError):
        with atomic_directory(out, overwrite=True) as tmp:
            (tmp / "a").write_text("2")
            raise RuntimeError("interrupted")
    assert (out / "a").read_text() == "1" and _siblings(out) == ["ck"]
    with atomic_directory(out, overwrite=True) as tmp:
        (tmp / "b").write_text("3")
    assert sorted(p.name for p in out.iterdir()) == ["b"] and _siblings(out) == ["ck"]


def test_sha256_and_read_safetensors(tmp_path):
    from safetensors.torch import save_file

    p = tmp_path / "w.safetensors"
    save_file({"x": torch.arange(6.0).view(2, 3)}, str(p))
    assert sha256_file(p, chunk=7) == hashlib.sha256(p.read_bytes()).hexdigest()
    assert torch.equal(read_safetensors(p)["x"], torch.arange(6.0).view(2, 3))
    p.write_bytes(p.read_bytes()[:20])
    with pytest.raises(UserError, match="w.safetensors: corrupt or truncated"):
        read_safetensors(p)


def test_checkpoint_format_table_and_unknown_format(tiny_llama, tmp_path):
    assert set(CHECKPOINT_LOADERS) == {"dense", "sparse"}
    out = save_dense_checkpoint(tiny_llama, ByteTokenizer(256), tmp_path / "ck")
    lm = load_checkpoint(out)
    assert isinstance(lm.tokenizer, ByteTokenizer) and lm.meta["format"] == "dense"
    for name, t in tiny_llama.state_dict().items():
        assert torch.equal(lm.model.state_dict()[name], t)
    meta = json.loads((out / META_FILE).read_text())
    meta["format"] = "coo-v7"
    (out / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(UserError, match="unknown checkpoint format 'coo-v7'"):
        load_checkpoint(out)


def test_strict_state_dict_copy_names_every_problem_and_copies_nothing_on_error(tiny_llama):
    sd = {k: v.clone() + 1 for k, v in tiny_llama.state_dict().items() if k != "lm_head.weight"}  # tied head
    before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    bad_shape = dict(sd, **{"norm.weight": torch.ones(3)})
    for tensors, match in ((dict(sd, stray=torch.ones(1)), r"does not know.*stray"),
                           ({k: v for k, v in sd.items() if k != "embed.weight"}, r"lacks.*embed\.weight"),
                           (bad_shape, r"norm\.weight has shape \(3,\)"),
                           (dict(sd, **{"norm.weight": torch.ones(64, dtype=torch.int32)}), "norm.weight.*dtype")):
        with pytest.raises(UserError, match=match):
            load_state_dict_strict(tiny_llama, tensors, "src")
        assert all(torch.equal(tiny_llama.state_dict()[k], v) for k, v in before.items())
    skip = ("layers.0.",)
    partial = {k: v for k, v in sd.items() if not k.startswith(skip)}
    load_state_dict_strict(tiny_llama, partial, "src", skip=skip)
    assert torch.equal(tiny_llama.norm.weight, sd["norm.weight"])
    assert torch.equal(tiny_llama.layers[0].attn.q_proj.weight, before["layers.0.attn.q_proj.weight"])


def test_set_module_replaces_nested_and_top_level(tiny_llama):
    new = nn.Linear(tiny_llama.config.d_model, tiny_llama.config.d_model, bias=False)
    set_module(tiny_llama, "layers.1.attn.q_proj", new)
    assert tiny_llama.layers[1].attn.q_proj is new
    head = nn.Identity()
    set_module(tiny_llama, "lm_head", head)
    assert tiny_llama.lm_head is head


def test_untie_records_head_untied(tiny_llama):
    assert tiny_llama.config.tie_embeddings and tiny_llama.head_untied is False
    tiny_llama.untie_lm_head_()
    assert tiny_llama.head_untied and tiny_llama.lm_head.weight is not tiny_llama.embed.weight
