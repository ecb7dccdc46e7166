"""Training text for recovery: user files, the data-free self-distillation source, bad sources."""
import json

import pytest
import torch

from ipu_sparse.errors import UserError
from ipu_sparse.loading import load_model
from ipu_sparse.recover.data import (CHAT_PROMPTS, TEXT_PROMPTS, SelfDistillConfig, build_windows, prompt_ids_list,
                                     self_distill_ids)


def test_self_distill_source_is_cached_deterministic_and_extendable(tmp_path):
    lm = load_model("tiny-llama")
    cfg = SelfDistillConfig(n_tokens=600, max_new_tokens=12, samples_per_prompt=2, seed=3)
    ids, cache = self_distill_ids(lm.model, lm.tokenizer, tmp_path / "a", cfg)
    assert len(ids) >= 600 and cache.is_file()
    prompts = prompt_ids_list(lm.tokenizer)
    assert len(prompts) == len(CHAT_PROMPTS) + len(TEXT_PROMPTS)
    # the stream starts with the first prompt, followed by teacher samples
    records = [json.loads(line) for line in cache.read_text().splitlines()]
    usable = [i for i, p in enumerate(prompts) if len(p) + 8 <= lm.model.config.max_seq_len]
    assert len(usable) > 10  # tiny context (128 bytes): the longest chat prompts are skipped
    assert [r["p"] for r in records] == usable[: len(records)]
    p0 = prompts[records[0]["p"]]
    assert ids[: len(p0)] == p0 and ids[len(p0): len(p0) + len(records[0]["samples"][0])] == records[0]["samples"][0]
    assert all(len(s) <= 12 for r in records for s in r["samples"])
    assert records[0]["samples"][0] != records[0]["samples"][1]  # sampled, not greedy
    # same settings in a fresh cache: identical text; the cache is reused (nothing regenerated)
    again, _ = self_distill_ids(lm.model, lm.tokenizer, tmp_path / "b", cfg)
    assert again == ids
    mtime = cache.stat().st_mtime_ns
    reused, _ = self_distill_ids(lm.model, lm.tokenizer, tmp_path / "a", cfg)
    assert reused == ids and cache.stat().st_mtime_ns == mtime
    # asking for more extends the cache: the old stream is a prefix of the new one
    more, _ = self_distill_ids(lm.model, lm.tokenizer, tmp_path / "a", SelfDistillConfig(**dict(cfg.__dict__, n_tokens=1200)))
    assert len(more) >= 1200 and more[: len(ids)] == ids
    # a torn last line (interrupted write) is dropped and regenerated identically
    lines = cache.read_text().splitlines(keepends=True)
    cache.write_text("".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])
    fixed, _ = self_distill_ids(lm.model, lm.tokenizer, tmp_path / "a", SelfDistillConfig(**dict(cfg.__dict__, n_tokens=1200)))
    assert fixed == more
    # a different teacher gets its own cache
    other = load_model("tiny-llama")
    with torch.no_grad():
        other.model.embed.weight.mul_(1.5)
    self_distill_ids(other.model, other.tokenizer, tmp_path / "a", cfg)
    assert len(list((tmp_path / "a").iterdir())) == 2


def test_build_windows_from_data_free_source(tmp_path):
    lm = load_model("tiny-llama")
    w = build_windows(lm.tokenizer, seq_len=32, batch_size=2, heldout_windows=2, teacher=lm.model, cache_dir=tmp_path,
                      selfdistill=SelfDistillConfig(n_tokens=400, max_new_tokens=8, samples_per_prompt=2))
    assert w.train.shape[1] == 32 and w.heldout.shape == (2, 32) and w.train.shape[0] >= 2
    assert "self-distillation" in w.source
    # the batch of a step depends only on (step, seed): epochs are permutations
    n = w.train.shape[0]
    rows = torch.cat([w.batch(s, 2, seed=0) for s in range(n // 2)])
    assert sorted(map(tuple, rows.tolist())) == sorted(map(tuple, w.train[: (n // 2) * 2].tolist())) or n % 2
    assert torch.equal(w.batch(5, 2, seed=0), w.batch(5, 2, seed=0))
    assert not torch.equal(w.batch(0, 2, seed=0), w.batch(0, 2, seed=1))


def test_user_text_files_and_directories(tmp_path):
    lm = load_model("tiny-llama")
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("hello world. " * 100)
    (d / "sub" / "b.md").write_text("more text here. " * 100)
    (d / "image.bin").write_bytes(b"\x00" * 5000)  # not a text suffix: ignored
    w = build_windows(lm.tokenizer, 64, 2, 2, texts=[d])
    assert w.n_tokens == 1300 + 1600 + 2  # two files, each followed by EOS
    assert w.train.shape == (w.n_tokens // 64 - 2, 64)


def test_user_text_mixed_with_data_free_text(tmp_path):
    lm = load_model("tiny-llama")
    user = tmp_path / "a.txt"
    user.write_text("hello world. " * 200)
    sd = SelfDistillConfig(n_tokens=300, max_new_tokens=8, samples_per_prompt=2, prompts_per_batch=1)
    plain = build_windows(lm.tokenizer, 32, 2, 2, texts=[user])
    mixed = build_windows(lm.tokenizer, 32, 2, 2, texts=[user], teacher=lm.model, cache_dir=tmp_path / "c",
                          selfdistill=sd, mix_selfdistill=0.25)
    n_user = plain.train.shape[0]
    assert torch.equal(mixed.heldout, plain.heldout)  # held out: the user text only
    assert torch.equal(mixed.train[:n_user], plain.train)
    extra = mixed.train[n_user:]
    assert extra.shape[0] == round(n_user / 3)  # a quarter of all training windows
    sd_ids, _ = self_distill_ids(lm.model, lm.tokenizer, tmp_path / "c", sd)
    sd_windows = torch.tensor(sd_ids[: len(sd_ids) // 32 * 32]).view(-1, 32)
    assert sd_windows.shape[0] < extra.shape[0]  # repeated to reach the fraction
    assert torch.equal(extra, sd_windows[torch.arange(extra.shape[0]) % sd_windows.shape[0]])
    assert "self-distillation" in mixed.source and "25%" in mixed.source
    with pytest.raises(UserError, match="mix-selfdistill must be in"):
        build_windows(lm.tokenizer, 32, 2, 2, texts=[user], teacher=lm.model, cache_dir=tmp_path / "c",
                      selfdistill=sd, mix_selfdistill=1.0)
    with pytest.raises(UserError, match="give --text too"):
        build_windows(lm.tokenizer, 32, 2, 2, teacher=lm.model, cache_dir=tmp_path / "c", selfdistill=sd,
                      mix_selfdistill=0.2)


def test_bad_text_sources(tmp_path, shared_data):
    lm = load_model("tiny-llama")
    small = tmp_path / "small.txt"
    small.write_text("too short")
    with pytest.raises(UserError, match="too little text"):
        build_windows(lm.tokenizer, 32, 2, 2, texts=[small])
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    with pytest.raises(UserError, match="too little text"):
        build_windows(lm.tokenizer, 32, 2, 2, texts=[empty])
    (tmp_path / "nothing").mkdir()
    with pytest.raises(UserError, match="no text files"):
        build_windows(lm.tokenizer, 32, 2, 2, texts=[tmp_path / "nothing"])
    with pytest.raises(UserError, match="no such file"):
        build_windows(lm.tokenizer, 32, 2, 2, texts=[tmp_path / "missing.txt"])
    with pytest.raises(UserError, match="evaluation set"):
        build_windows(lm.tokenizer, 32, 2, 2, texts=[shared_data / "wikitext-2" / "wiki.test.raw"])
    with pytest.raises(UserError, match="evaluation set"):
        build_windows(lm.tokenizer, 32, 2, 2, texts=[shared_data / "zeroshot"])


def test_self_distill_prompts_batched_together_write_the_same_text(tmp_path):
    """Several prompts (different lengths, left-padded) in one batch: in fp32 the samples equal those
    of one prompt per batch (each prompt draws from its own generator); the cache key tells them apart."""
    lm = load_model("tiny-llama")
    one = SelfDistillConfig(n_tokens=500, max_new_tokens=10, samples_per_prompt=2, prompts_per_batch=1,
                            dtype="float32", seed=5)
    ids1, cache1 = self_distill_ids(lm.model, lm.tokenizer, tmp_path, one)
    ids3, cache3 = self_distill_ids(lm.model, lm.tokenizer, tmp_path,
                                    SelfDistillConfig(**dict(one.__dict__, prompts_per_batch=3)))
    assert cache1 != cache3
    n = min(len(ids1), len(ids3))
    assert ids1[:n] == ids3[:n]
    assert len(cache3.read_text().splitlines()) % 3 == 0  # whole batches only
    with pytest.raises(UserError, match="not a torch dtype"):
        self_distill_ids(lm.model, lm.tokenizer, tmp_path, SelfDistillConfig(**dict(one.__dict__, dtype="float99")))
