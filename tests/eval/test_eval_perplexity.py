import math

import pytest
import torch
import torch.nn.functional as F

from ipu_sparse.errors import UserError
from ipu_sparse.eval.data import read_rows
from ipu_sparse.eval.perplexity import text_ppl, token_logprobs, wikitext2_ids, wikitext2_ppl, windows_ppl
from ipu_sparse.loading.tokenizer import ByteTokenizer


def test_rows_protocol(tmp_path):
    p = tmp_path / "t.raw"
    p.write_text(" \n = A = \n \n b c\n")
    rows = read_rows(p)
    assert rows == ["", " = A = \n", "", " b c\n"]
    tok = ByteTokenizer(256)
    assert wikitext2_ids(tok, str(p)) == tok.encode("\n\n".join(rows))


def test_windows_ppl_matches_full_forward(tiny_llama):
    torch.manual_seed(0)
    ids = torch.randint(3, 256, (3 * 16 + 5,)).tolist()
    r = windows_ppl(tiny_llama, ids, seq_len=16, batch_size=2, progress=False)
    assert r.windows == 3 and r.tokens == 3 * 15
    data = torch.tensor(ids[:48]).view(3, 16)
    with torch.no_grad():
        logits = tiny_llama(data)
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), data[:, 1:].reshape(-1))
    assert math.isclose(r.ppl, math.exp(float(nll)), rel_tol=1e-5)
    r2 = windows_ppl(tiny_llama, ids, seq_len=16, max_windows=1, progress=False)
    assert r2.windows == 1
    with torch.no_grad():
        lp = token_logprobs(tiny_llama, data[:1], head_chunk=5)
    assert math.isclose(r2.nll, -float(lp.mean()), rel_tol=1e-5)


def test_ppl_errors(tiny_llama, tmp_path):
    tok = ByteTokenizer(256)
    with pytest.raises(UserError, match="shorter than one window"):
        windows_ppl(tiny_llama, [5] * 10, seq_len=16, progress=False)
    with pytest.raises(UserError, match="not found"):
        text_ppl(tiny_llama, tok, tmp_path / "missing.txt")
    with pytest.raises(UserError, match="not found"):
        wikitext2_ppl(tiny_llama, tok, path=str(tmp_path / "missing.raw"))
    with pytest.raises(UserError, match="max_windows"):
        windows_ppl(tiny_llama, [5] * 100, seq_len=16, max_windows=0, progress=False)


def test_text_ppl(tiny_llama, tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("hello world " * 20)
    r = text_ppl(tiny_llama, ByteTokenizer(256), p, seq_len=32, progress=False)
    assert r.windows == 240 // 32 and r.ppl > 1.0


@pytest.mark.slow
def test_smollm2_wikitext2_quick(smollm2):
    r = wikitext2_ppl(smollm2.model, smollm2.tokenizer, seq_len=512, max_windows=2, progress=False)
    assert r.windows == 2 and r.tokens == 2 * 511
    assert 15 < r.ppl < 40  # dense SmolLM2-135M: 29.19 over 40 windows
