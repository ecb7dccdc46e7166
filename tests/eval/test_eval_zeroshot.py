import json
import math

import pytest
import torch

from ipu_sparse.errors import UserError
from ipu_sparse.eval.zeroshot import TASKS, encode_pair, evaluate_task, load_task, loglikelihood
from ipu_sparse.loading.tokenizer import ByteTokenizer


def test_encode_pair_moves_trailing_space():
    tok = ByteTokenizer(256)
    ctx, cont = encode_pair(tok, "abc  ", "d")
    assert ctx == tok.encode("abc") and cont == tok.encode("  d")


def test_batched_scores_equal_single(tiny_llama):
    tok = ByteTokenizer(256)
    reqs = [("The cat sat on the", " mat"), ("A", " b c d e f"), ("Short ctx here, longer", " x")]
    batched = loglikelihood(tiny_llama, tok, reqs, batch_size=3, progress=False)
    for (ctx, cont), (ll, greedy) in zip(reqs, batched):
        c, k = encode_pair(tok, ctx, cont)
        idx = torch.tensor([c + k])
        with torch.no_grad():
            logp = torch.log_softmax(tiny_llama(idx)[0, len(c) - 1:-1], -1)
        want = float(logp.gather(1, torch.tensor(k).view(-1, 1)).sum())
        assert math.isclose(ll, want, rel_tol=1e-4, abs_tol=1e-4)
        assert greedy == bool((logp.argmax(-1) == torch.tensor(k)).all())


@pytest.mark.parametrize("task, n_total", [("lambada", 5153), ("hellaswag", 10042), ("piqa", 1838),
                                           ("arc_easy", 2376), ("winogrande", 1267)])
def test_task_files_parse(task, n_total):
    items = load_task(task, limit=3)
    assert len(items) == 3
    if task == "lambada":
        assert items[0]["continuation"] == " signs"
    elif task == "winogrande":
        assert len(items[0]["contexts"]) == 2 and items[0]["continuation"].startswith(" ")
    else:
        assert 0 <= items[0]["gold"] < len(items[0]["choices"])
        if task in ("piqa", "arc_easy"):
            assert items[0]["query"].startswith("Question: ") and items[0]["query"].endswith("\nAnswer:")
        else:
            assert items[0]["query"].startswith("Roof shingle removal: A man is sitting on a roof.")
    if task in ("hellaswag", "winogrande"):
        assert len(load_task(task)) == n_total


def test_unknown_task():
    with pytest.raises(UserError, match="unknown task"):
        load_task("mmlu")


@pytest.mark.parametrize("task", TASKS)
def test_evaluate_tiny(tiny_llama, task):
    r = evaluate_task(tiny_llama, ByteTokenizer(256), task, limit=4, batch_size=8, progress=False)
    assert r["n"] == 4 and 0.0 <= r["acc"] <= 1.0


@pytest.mark.slow
def test_smollm2_lambada_first_items(smollm2):
    r = evaluate_task(smollm2.model, smollm2.tokenizer, "lambada", limit=40, progress=False)
    assert r["n"] == 40 and 0.1 <= r["acc"] <= 0.6
