import pickle

import pytest
import torch

from ipu_sparse.errors import UserError
from ipu_sparse.loading.tokenizer import ByteTokenizer
from ipu_sparse.prune.calib import calibration_windows


def _text(tmp_path):
    p = tmp_path / "calib.txt"
    p.write_text("\n".join(f"line {i} of some calibration text, with words" for i in range(200)) + "\n")
    return p


def test_cache_round_trip_is_safetensors(tmp_path):
    text, cache = _text(tmp_path), tmp_path / "cache"
    fresh = calibration_windows(ByteTokenizer(), str(text), 5, 40, seed=3)
    first = calibration_windows(ByteTokenizer(), str(text), 5, 40, seed=3, cache_dir=str(cache))
    files = list(cache.iterdir())
    assert [f.suffix for f in files] == [".safetensors"]
    cached = calibration_windows(ByteTokenizer(), str(text), 5, 40, seed=3, cache_dir=str(cache))
    assert torch.equal(fresh, first) and torch.equal(first, cached) and cached.dtype == torch.long
    assert cached.shape == (5, 40)


class _Payload:
    """Unpickling this runs code (creates a file): what a tampered cache could do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("kind", ["pickle", "torch.save"])
def test_crafted_pickle_in_cache_is_refused(tmp_path, kind):
    text, cache = _text(tmp_path), tmp_path / "cache"
    calibration_windows(ByteTokenizer(), str(text), 4, 32, seed=0, cache_dir=str(cache))
    (cache_file,) = cache.iterdir()
    marker = tmp_path / "pwned"
    if kind == "pickle":
        cache_file.write_bytes(pickle.dumps(_Payload(marker)))
    else:
        torch.save({"tokens": torch.zeros(4, 32, dtype=torch.long), "x": _Payload(marker)}, str(cache_file))
    with pytest.raises(UserError, match="safetensors file"):
        calibration_windows(ByteTokenizer(), str(text), 4, 32, seed=0, cache_dir=str(cache))
    assert not marker.exists()


def test_cache_with_wrong_content_is_refused(tmp_path):
    from safetensors.torch import save_file

    text, cache = _text(tmp_path), tmp_path / "cache"
    calibration_windows(ByteTokenizer(), str(text), 4, 32, seed=0, cache_dir=str(cache))
    (cache_file,) = cache.iterdir()
    save_file({"tokens": torch.zeros(4, 31, dtype=torch.long)}, str(cache_file))
    with pytest.raises(UserError, match="does not hold"):
        calibration_windows(ByteTokenizer(), str(text), 4, 32, seed=0, cache_dir=str(cache))
