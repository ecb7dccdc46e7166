"""Fixtures of the sparse tests: the compiled kernel's code paths."""
import pytest

from ipu_sparse.sparse import kernels


@pytest.fixture
def isas():
    """The code paths this CPU runs (``[]`` without the compiled kernel); the one in use is restored after."""
    ext = kernels.load_extension()
    if ext is None:
        yield []
        return
    before = ext.isa()
    order = ["scalar", "avx2", "avx512"]
    yield order[: order.index(ext.best_isa()) + 1]
    ext.set_isa(before)
