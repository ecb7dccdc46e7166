"""Fuzzing the readers of untrusted files (GGUF, checkpoint directories): random bytes and mutated
valid files either load or raise ``UserError`` -- never another exception -- and never make the
process allocate far beyond the file's own size."""
from __future__ import annotations

import json
import resource
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ipu_sparse.errors import UserError

SETTINGS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                          HealthCheck.too_slow])
RSS_BOUND_MB = 400  # growth of the process's peak memory over a whole fuzz run


def _max_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _load(path):
    """``load_model`` on ``path``: True if it loaded, False on ``UserError``; anything else escapes."""
    from ipu_sparse.loading import load_model

    try:
        load_model(str(path))
    except UserError:
        return False
    return True


mutations = st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=8)


def _mutate(data: bytes, muts, cut) -> bytes:
    buf = bytearray(data)
    for frac, value in muts:
        buf[int(frac * len(buf))] = value
    if cut is not None:
        buf = buf[: int(cut * len(buf))]
    return bytes(buf)


@pytest.fixture(scope="module")
def scratch():
    d = Path(tempfile.mkdtemp(prefix="ipu-sparse-fuzz-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@SETTINGS
@given(data=st.binary(min_size=0, max_size=512), magic=st.booleans())
def test_gguf_random_bytes(data, magic, scratch):
    path = scratch / "random.gguf"
    path.write_bytes((b"GGUF" if magic else b"") + data)
    rss0 = _max_rss_mb()
    assert _load(path) is False
    assert _max_rss_mb() - rss0 < RSS_BOUND_MB


@SETTINGS
@given(muts=mutations, cut=st.one_of(st.none(), st.floats(0, 1)), header_only=st.booleans())
@example(muts=[(0.0234375, 0)], cut=None, header_only=True)  # found: a metadata string that is not UTF-8
def test_gguf_mutated(muts, cut, header_only, assets, scratch):
    data = (assets["root"] / "tiny.gguf").read_bytes()
    if header_only:  # the metadata and tensor infos (where sizes and counts are claimed)
        muts = [(f * 0.2, v) for f, v in muts]
    path = scratch / "mutated.gguf"
    path.write_bytes(_mutate(data, muts, cut))
    rss0 = _max_rss_mb()
    _load(path)
    assert _max_rss_mb() - rss0 < RSS_BOUND_MB


@SETTINGS
@given(kind=st.sampled_from(["dense", "bitmap", "csr16"]), muts=mutations,
       cut=st.one_of(st.none(), st.floats(0, 1)), header_only=st.booleans())
def test_checkpoint_weights_mutated(kind, muts, cut, header_only, assets, scratch):
    """Mutated weights with a matching hash in the metadata, so the parsers themselves are exercised."""
    from ipu_sparse.fileio import sha256_file

    ck = scratch / "ck"
    shutil.rmtree(ck, ignore_errors=True)
    shutil.copytree(assets["root"] / kind, ck)
    st_path = ck / "model.safetensors"
    data = st_path.read_bytes()
    if header_only:
        n = int.from_bytes(data[:8], "little")
        muts = [(f * (8 + n) / len(data), v) for f, v in muts]
    st_path.write_bytes(_mutate(data, muts, cut))
    meta = json.loads((ck / "ipu_sparse.json").read_text())
    meta["files"]["model.safetensors"] = sha256_file(st_path)
    (ck / "ipu_sparse.json").write_text(json.dumps(meta))
    rss0 = _max_rss_mb()
    _load(ck)
    assert _max_rss_mb() - rss0 < RSS_BOUND_MB


json_values = st.recursive(st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                           max_leaves=6)


def _paths(obj, prefix=()):
    """Every key path of a JSON document."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield prefix + (k,)
            yield from _paths(v, prefix + (k,))


@SETTINGS
@given(kind=st.sampled_from(["dense", "bitmap", "csr16"]), pick=st.integers(0, 10 ** 6), value=json_values,
       delete=st.booleans())
def test_checkpoint_metadata_mutated(kind, pick, value, delete, assets, scratch):
    """One field of ipu_sparse.json replaced by an arbitrary JSON value (or removed)."""
    ck = scratch / "ckm"
    shutil.rmtree(ck, ignore_errors=True)
    shutil.copytree(assets["root"] / kind, ck)
    meta = json.loads((ck / "ipu_sparse.json").read_text())
    paths = list(_paths(meta))
    path = paths[pick % len(paths)]
    obj = meta
    for k in path[:-1]:
        obj = obj[k]
    if delete:
        del obj[path[-1]]
    else:
        obj[path[-1]] = value
    (ck / "ipu_sparse.json").write_text(json.dumps(meta))
    _load(ck)


@SETTINGS
@given(text=st.binary(max_size=64))
def test_checkpoint_metadata_random_bytes(text, assets, scratch):
    ck = scratch / "ckr"
    shutil.rmtree(ck, ignore_errors=True)
    shutil.copytree(assets["root"] / "dense", ck)
    (ck / "ipu_sparse.json").write_bytes(text)
    assert _load(ck) is False


@SETTINGS
@given(pick=st.integers(0, 10 ** 6), value=json_values, delete=st.booleans())
def test_hf_config_mutated(pick, value, delete, assets, scratch):
    """One field of a Hugging Face directory's config.json replaced by an arbitrary JSON value (or removed)."""
    d = scratch / "hf"
    shutil.rmtree(d, ignore_errors=True)
    shutil.copytree(assets["root"] / "hf", d)
    cfg = json.loads((d / "config.json").read_text())
    key = sorted(cfg)[pick % len(cfg)]
    if delete:
        del cfg[key]
    else:
        cfg[key] = value
    (d / "config.json").write_text(json.dumps(cfg))
    _load(d)
