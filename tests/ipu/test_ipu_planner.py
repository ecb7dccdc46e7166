"""Memory planner: the headline numbers, placement rules and errors that name the bad value."""
import json

import pytest

from ipu_sparse.config import get_preset
from ipu_sparse.errors import UserError
from ipu_sparse.ipu import hardware as hw
from ipu_sparse.ipu.memory import csr16_nbytes, shard_ranges
from ipu_sparse.ipu.planner import PlanConfig, PlanError, check_fits, expand_layers_per_ipu, make_plan, plan_or_raise
from ipu_sparse.ipu.report import compare_dense_sparse, format_table


def luminous(**kw):
    return PlanConfig(get_preset("luminous-base-13b"), **kw)


def test_gc200_sram_is_tiles_times_624_kib():
    assert hw.get_ipu_type("gc200").sram_bytes == 1472 * 624 * 1024
    assert hw.get_ipu_type("bow").sram_bytes == hw.get_ipu_type("gc200").sram_bytes


def test_luminous_dense_does_not_fit_pod16_and_sparse_does():
    pc = luminous(n_ipus=16, sparsity=0.8, sparse_head=True, kv_len=512)
    cmp = compare_dense_sparse(pc)
    assert cmp["dense_weight_bytes"] > 14.4e9          # 13.9B params in fp16 = 27.8 GB
    assert not cmp["dense_fits"]
    assert cmp["sparse_fits"]
    assert 0.40 < cmp["weight_ratio"] < 0.48           # the seed says 44 %
    check_fits(cmp["sparse_plan"])                      # no error
    with pytest.raises(PlanError):
        check_fits(cmp["dense_plan"])


def test_luminous_embedding_is_split_explicitly():
    plan = make_plan(luminous(n_ipus=16, sparsity=0.8, sparse_head=True, kv_len=512))
    embeds = [u for u in plan.units if u.kind == "embed"]
    emb_bytes = 128000 * 5120 * 2
    assert emb_bytes > hw.get_ipu_type("gc200").sram_bytes     # larger than one IPU
    assert len(embeds) > 1 and sum(u.weight_bytes for u in embeds) == emb_bytes
    assert all(u.weight_bytes < 0.5 * hw.get_ipu_type("gc200").sram_bytes for u in embeds)
    assert len({plan.placement[u.name] for u in embeds}) >= 2
    assert any("vocabulary-sharded" in n for n in plan.notes)


def test_smollm2_fits_one_ipu_dense_and_sparse():
    pc = PlanConfig(get_preset("smollm2-135m"), n_ipus=1, sparsity=0.8, kv_len=2048)
    cmp = compare_dense_sparse(pc)
    assert cmp["dense_fits"] and cmp["sparse_fits"]
    assert cmp["sparse_weight_bytes"] < cmp["dense_weight_bytes"]
    plan = cmp["sparse_plan"]
    assert plan.layers_per_ipu == [30]
    # tied head: no second copy of the embedding
    assert sum(u.weight_bytes for u in plan.units if u.kind == "head") == 576 * 2


def test_csr16_bytes():
    b = csr16_nbytes(rows=4, cols=8, nnz=5, value_bytes=2)
    assert b == {"values": 10, "indices": 10, "row_ptr": 20}
    assert csr16_nbytes(2, 70000, 3, 2)["indices"] == 12  # > 65536 columns need 4 bytes


def test_planner_bytes_match_sparse_formats_module():
    formats = pytest.importorskip("ipu_sparse.sparse.formats")

    for rows, cols, nnz in [(576, 576, 66355), (1536, 576, 176947), (5120, 20480, 20971520)]:
        parts = csr16_nbytes(rows, cols, nnz, 2)
        assert parts == {"values": 2 * nnz, "indices": 2 * nnz, "row_ptr": 4 * (rows + 1)}
        assert sum(parts.values()) == formats.format_nbytes("csr16", rows, cols, nnz, 2)


def test_auto_layers_balanced_and_cover_all():
    plan = make_plan(PlanConfig(get_preset("smollm2-135m"), n_ipus=4, sparsity=0.8, kv_len=2048))
    lpi = plan.layers_per_ipu
    assert sum(lpi) == 30 and len(lpi) == 4
    loads = [a.weight_bytes + a.kv_bytes for a in plan.ipus]
    biggest_unit = max(u.weight_bytes + u.kv_bytes for u in plan.units)
    assert max(loads) <= sum(loads) / 4 + biggest_unit  # the linear-partition bound
    # contiguous, in execution order
    order = [plan.placement[u.name] for u in plan.units if u.pinned_to is None]
    assert order == sorted(order)


def test_wildcards_follow_optimum_semantics():
    assert expand_layers_per_ipu([-1, -1], 30, 2) == [15, 15]
    assert expand_layers_per_ipu([2, -1, -1, 3], 10, 4) == [2, 3, 2, 3]
    assert expand_layers_per_ipu([0, -1], 4, 2) == [0, 4]
    assert expand_layers_per_ipu([1, 2, 1], 4, 3) == [1, 2, 1]


@pytest.mark.parametrize("lst, match", [
    ([1, 2], "2 entries for 3 IPUs"),
    ([5, -1, 0], "places 5 layers but the model has 4"),
    ([1, 1, 1], "places 3 layers but the model has 4"),
    ([1, -2, 3], r"layers_per_ipu\[1\] = -2"),
    ([1, 1.5, 2], r"layers_per_ipu\[1\] = 1.5"),
])
def test_bad_layers_per_ipu_named(lst, match):
    with pytest.raises(UserError, match=match):
        expand_layers_per_ipu(lst, 4, 3)


def test_user_layers_per_ipu_places_layers():
    pc = PlanConfig(get_preset("tiny-llama-4l"), n_ipus=2, layers_per_ipu=[1, -1], kv_len=128)
    plan = make_plan(pc)
    assert plan.layers_per_ipu == [1, 3]
    assert plan.placement["embed"] == 0 and plan.placement["lm_head"] == 1


def test_zero_layers_on_an_ipu():
    plan = make_plan(PlanConfig(get_preset("tiny-llama-4l"), n_ipus=2, layers_per_ipu=[0, 4], kv_len=128))
    assert plan.ipus[0].layers == [] and plan.ipus[0].units == ["embed"]


@pytest.mark.parametrize("kw, match", [
    (dict(n_ipus=0), "--ipus must be an integer from 1 to 64, got 0"),
    (dict(n_ipus=65), "got 65"),
    (dict(sparsity=1.0), "sparsity of layer 0 must be in \\[0, 1\\), got 1.0"),
    (dict(sparsity=[0.5] * 3), "3 values for 4 layers"),
    (dict(fmt="coo"), "unknown storage format 'coo'"),
    (dict(kv_len=0), "--kv-len must be a positive integer, got 0"),
    (dict(batch=-1), "--batch must be a positive integer, got -1"),
    (dict(matmul_proportion=1.5, n_ipus=2), "IPU0 must be in \\(0, 1\\], got 1.5"),
    (dict(matmul_proportion=[0.2, 0.2, 0.2], n_ipus=2), "3 values for 2 IPUs"),
    (dict(ipu_type="mk3"), "unknown IPU type 'mk3'"),
    (dict(embed_shards=0), "--embed-shards must be a positive integer"),
])
def test_bad_values_are_named(kw, match):
    with pytest.raises(UserError, match=match):
        PlanConfig(get_preset("tiny-llama-4l"), **kw)


def test_too_many_ipus_for_the_units():
    with pytest.raises(UserError, match="6 placeable units .* 8 IPUs were requested; use at most 6"):
        make_plan(PlanConfig(get_preset("tiny-llama-4l"), n_ipus=8, kv_len=128))


def test_too_few_ipus_names_ipu_bytes_and_fix():
    pc = luminous(n_ipus=8, sparsity=0.8, sparse_head=True, kv_len=512)
    with pytest.raises(PlanError) as e:
        plan_or_raise(pc)
    msg = str(e.value)
    assert "does not fit 8 x gc200" in msg and "IPU" in msg and "over" in msg
    assert "--ipus 16" in msg  # the smallest power of two that fits


def test_context_too_long_suggests_kv_len():
    pc = luminous(n_ipus=16, sparsity=0.8, sparse_head=True, kv_len=2048)
    with pytest.raises(PlanError, match=r"--kv-len \d+"):
        plan_or_raise(pc)


def test_layer_larger_than_one_ipu():
    cfg = get_preset("luminous-base-13b").replace(name="huge", d_ff=4 * 20480, n_layers=4, assumed={})
    with pytest.raises(PlanError, match="layers.0 alone needs .* cannot be placed on any IPU"):
        plan_or_raise(PlanConfig(cfg, n_ipus=16, fmt="dense", sparsity=0.0, kv_len=512, layers_per_ipu=[1] * 4 + [0] * 12))


def test_matmul_proportion_auto_and_user():
    plan = make_plan(PlanConfig(get_preset("tiny-llama-4l"), n_ipus=2, kv_len=128))
    assert all(0.05 <= a.matmul_proportion <= 0.6 for a in plan.ipus)
    plan = make_plan(PlanConfig(get_preset("tiny-llama-4l"), n_ipus=2, kv_len=128, matmul_proportion=[0.1, 0.3]))
    assert [a.matmul_proportion for a in plan.ipus] == [0.1, 0.3]


def test_per_layer_sparsity_changes_bytes():
    cfg = get_preset("tiny-llama-4l")
    plan = make_plan(PlanConfig(cfg, n_ipus=1, sparsity=[0.0, 0.5, 0.8, 0.9], kv_len=128))
    nnz = [u.nnz for u in plan.units if u.kind == "layer"]
    assert nnz[0] > nnz[1] > nnz[2] > nnz[3] > 0


def test_json_and_table(tmp_path):
    plan = make_plan(luminous(n_ipus=16, sparsity=0.8, sparse_head=True, kv_len=512))
    d = json.loads(json.dumps(plan.to_dict(), default=str))
    assert d["fits"] and len(d["ipus"]) == 16 and d["layers_per_ipu"] == plan.layers_per_ipu
    assert "assumed" in json.dumps(d["model_assumed_fields"])
    assert "reserve_fraction" in d["constants"]
    table = format_table(plan)
    assert "FITS" in table and table.count("\n") >= 17


def test_shard_ranges_cover():
    assert shard_ranges(10, 3) == [(0, 4), (4, 7), (7, 10)]
