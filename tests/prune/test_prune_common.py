import pytest
import torch

from ipu_sparse.errors import UserError
from ipu_sparse.prune.common import (allocate_counts, check_nm_width, check_sparsity, is_nm, lowest_k,
                                     lowest_k_per_row, nm_lowest, parse_nm, split_evenly, split_proportional)


def test_split_helpers_sum_exactly():
    assert split_evenly(10, 4) == [3, 3, 2, 2]
    assert sum(split_proportional(1001, [128, 128, 64])) == 1001
    assert split_proportional(5, [1, 1, 1, 1, 1]) == [1] * 5


def test_allocate_counts_exact_total_with_uneven_ratios():
    sizes = [100, 333, 77, 1000]
    counts = allocate_counts(sizes, [0.5, 0.9, 0.1, 0.8], total_sparsity=0.7)
    assert sum(counts) == round(0.7 * sum(sizes))
    assert all(0 <= c <= s for c, s in zip(counts, sizes))


def test_lowest_k_breaks_ties_by_position():
    score = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    mask = lowest_k(score, 3)
    assert mask.sum() == 3
    assert mask.view(-1).tolist() == [False, True, True, True, False, False, False, False]
    per_row = lowest_k_per_row(torch.zeros(2, 4), [1, 3])
    assert per_row.tolist() == [[True, False, False, False], [True, True, True, False]]


def test_nm_mask_keeps_n_of_every_m():
    torch.manual_seed(0)
    score = torch.rand(8, 16)
    for n, m in ((2, 4), (4, 8), (1, 4)):
        mask = nm_lowest(score, n, m)
        kept = (~mask).view(8, 16 // m, m).sum(-1)
        assert (kept == n).all()
        w = score.masked_fill(mask, 0)
        assert is_nm(w, n, m)
        # the kept entries are the n largest of each group
        top = score.view(8, -1, m).topk(n, dim=-1).values.sum()
        assert torch.isclose(w.sum(), top)


@pytest.mark.parametrize("bad", ["4:4", "5:4", "0:4", "2-4", "a:b", "2:4:8"])
def test_parse_nm_rejects(bad):
    with pytest.raises(UserError):
        parse_nm(bad)


def test_parse_nm_and_width():
    assert parse_nm("2:4") == (2, 4) and parse_nm((4, 8)) == (4, 8)
    with pytest.raises(UserError, match="not divisible"):
        check_nm_width("layers.0.attn.q_proj", 36, 8)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, "x"])
def test_check_sparsity_rejects(bad):
    with pytest.raises(UserError):
        check_sparsity(bad)
