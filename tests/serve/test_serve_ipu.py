"""`serve --ipu`'s backend: the ipu-generate compile path (here with the PopTorch TEST DOUBLE, which
runs the graph on CPU) behind the same API; greedy answers equal CPU generation."""
import sys
from pathlib import Path

import openai
import pytest
import torch

from ipu_sparse.config import get_preset
from ipu_sparse.generate import generate
from ipu_sparse.ipu.generate import compile_for_ipu, release
from ipu_sparse.ipu.planner import PlanConfig, make_plan
from ipu_sparse.loading import LoadedModel
from ipu_sparse.loading.tokenizer import ByteTokenizer
from ipu_sparse.model import build_model
from ipu_sparse.prune import magnitude_prune_
from ipu_sparse.serve.engine import Engine, model_figures
from ipu_sparse.serve.ipu_backend import IpuBackend

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ipu"))
from ipu_poptorch_double import PoptorchDouble  # noqa: E402


def test_ipu_backend_serves_the_compiled_step(monkeypatch, tmp_path, make_server):
    double = PoptorchDouble()
    monkeypatch.setitem(sys.modules, "poptorch", double)
    cfg = get_preset("tiny-llama-4l")
    model = build_model(cfg, seed=0)
    magnitude_prune_(model, 0.8, scope="row")
    tok = ByteTokenizer(cfg.vocab_size)
    prompt = "Lumi?"
    ids = tok.encode(prompt)
    want = generate(model, ids, 8, stop_ids=tok.stop_ids)
    figures = model_figures(model)
    plan = make_plan(PlanConfig(cfg, n_ipus=2, sparsity=0.8, kv_len=32, seq_len=1))
    executor, _, rows = compile_for_ipu(model, plan, tmp_path, dtype=torch.float32, load_op=False, poptorch=double)
    try:
        engine = Engine("tiny-ipu", LoadedModel(model, tok, "tiny-llama-4l"), backend=IpuBackend(executor, 32, rows),
                        figures=figures)
        assert engine.context == 32 and engine.describe()["ipu_sparse"]["backend"] == "ipu"
        srv = make_server([engine])
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        r = c.completions.create(model="tiny-ipu", prompt=prompt, max_tokens=8, temperature=0)
        assert r.choices[0].text == tok.decode([t for t in want if t not in tok.stop_ids])
        assert r.usage.completion_tokens == len(want)
        with pytest.raises(openai.BadRequestError) as e:  # the static KV cache bounds the context
            c.completions.create(model="tiny-ipu", prompt=prompt, max_tokens=30)
        assert e.value.body["code"] == "context_length_exceeded"
    finally:
        release(executor, model, poptorch=double)
