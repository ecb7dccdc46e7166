"""ModelConfig: its one table of projection shapes is what the model builds, and what accounting,
the IPU planner and the parameter count read."""
import pytest

from ipu_sparse.config import PRESETS, get_preset
from ipu_sparse.model import param_names


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_layer_projections_are_the_models_linear_layers(name):
    cfg = get_preset(name)
    shapes = param_names(cfg)  # built on the meta device: no memory, any size
    want = {}
    for key, shape in shapes.items():
        if key.startswith("layers.0.") and key.endswith(".weight") and len(shape) == 2:
            want[key[len("layers.0."):-len(".weight")]] = (shape[0], shape[1], key[:-len("weight")] + "bias" in shapes)
    got = {n: (rows, cols, bias) for n, rows, cols, bias in cfg.layer_projections()}
    assert got == want
    assert [n for n, *_ in cfg.layer_projections()] == [k for k in want]  # the model's order


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_consumers_read_the_one_table(name):
    from ipu_sparse.ipu.memory import build_units
    from ipu_sparse.ipu.planner import PlanConfig
    from ipu_sparse.sparse.accounting import rows_from_config

    cfg = get_preset(name)
    shapes = param_names(cfg)
    rows = rows_from_config(cfg, 0.5)
    assert {r.name: (r.rows, r.cols, r.bias) for r in rows} == {
        k[:-len(".weight")]: (s[0], s[1], k[:-len("weight")] + "bias" in shapes)
        for k, s in shapes.items() if k.startswith("layers.") and k.endswith("_proj.weight")}
    layer0 = {k: s for k, s in shapes.items() if k.startswith("layers.0.")}
    small = sum(s[0] if len(s) == 1 else 0 for s in layer0.values())  # norms and biases of one layer
    unit = next(u for u in build_units(PlanConfig(cfg, n_ipus=1, fmt="dense")) if u.name == "layers.0")
    assert unit.matrix_params == sum(_numel(s) for s in layer0.values() if len(s) == 2)
    assert unit.dense_params == unit.matrix_params + small
    assert cfg.num_params() == sum(_numel(s) for s in shapes.values())


def _numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n
