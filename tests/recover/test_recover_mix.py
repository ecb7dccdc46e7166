"""Training text mixed by fraction (--text-mix) and answer-only KD masks (--kd-answers-only)."""
import json

import pytest
import torch

from ipu_sparse.cli import main
from ipu_sparse.errors import UserError
from ipu_sparse.loading import load_model
from ipu_sparse.recover.data import CHAT_PROMPTS, SelfDistillConfig, build_windows
from ipu_sparse.recover.mix import build_mixed_windows, parse_text_mix, stream_of_documents, teacher_documents

from test_recover_cli import args as cli_args
from test_recover_cli import setup  # noqa: F401  (fixture)

SD = SelfDistillConfig(n_tokens=3500, max_new_tokens=4, samples_per_prompt=1, seed=1)  # reaches the plain prompts


def test_parse_text_mix():
    assert parse_text_mix(["a.txt=0.6", "teacher-chat=0.4"]) == [("a.txt", 0.6), ("teacher-chat", 0.4)]
    assert parse_text_mix(["dir=with=eq=1"]) == [("dir=with=eq", 1.0)]
    for bad, msg in ((["a.txt"], "SOURCE=FRACTION"), (["a=0"], "SOURCE=FRACTION"), (["a=x"], "SOURCE=FRACTION"),
                     (["a=0.5", "b=0.4"], "sum to 1"), (["a=0.5", "a=0.5"], "named twice"), ([], "at least one")):
        with pytest.raises(UserError, match=msg):
            parse_text_mix(bad)


def test_answer_only_mask_covers_exactly_the_answers_of_chat_samples():
    docs = [([1, 10, 11], [20, 21], True), ([1, 12], [22, 2], False), ([1, 13], [23], True)]
    ids, counts = stream_of_documents(docs, eos=2, answers_only=True)
    assert ids == [1, 10, 11, 20, 21, 2, 1, 12, 22, 2, 1, 13, 23, 2]
    # position j counts iff token j + 1 is a target: chat answers (+ EOS) and all of the plain document
    assert counts == [False, False, True, True, True, True, True, True, True, False, False, True, True, True]
    _, all_counts = stream_of_documents(docs, eos=2, answers_only=False)
    assert all(all_counts)


def test_mixed_windows_by_fraction_seeded_with_chat_masks(tmp_path):
    lm = load_model("tiny-llama")
    user = tmp_path / "a.txt"
    user.write_text("hello world. " * 200)
    plain = build_windows(lm.tokenizer, 32, 2, 2, texts=[user])
    kw = dict(teacher=lm.model, cache_dir=tmp_path / "c", selfdistill=SD, seed=3)
    mix = [(str(user), 0.5), ("teacher-chat", 0.3), ("teacher-plain", 0.2)]
    w = build_mixed_windows(lm.tokenizer, 32, 2, 2, mix, answers_only=True, **kw)
    n_user = plain.train.shape[0]
    total = round(n_user / 0.5)
    assert torch.equal(w.heldout, plain.heldout) and torch.equal(w.train[:n_user], plain.train)
    n_chat, n_plain = round(0.3 * total), round(0.2 * total)
    assert w.train.shape[0] == n_user + n_chat + n_plain and w.loss_mask.shape == w.train.shape
    assert bool(w.loss_mask[:n_user].all()) and bool(w.loss_mask[n_user + n_chat:].all())
    chat_mask = w.loss_mask[n_user:n_user + n_chat]
    assert 0.05 < chat_mask.float().mean() < 0.95  # prompts and templates are masked out, answers kept
    # the chat windows hold only chat documents; the mask is False exactly on positions predicting a prompt token
    docs, _ = teacher_documents(lm.model, lm.tokenizer, tmp_path / "c", SD)
    chat_ids, counts = stream_of_documents([d for d in docs if d[2]], lm.tokenizer.eos_id, True)
    n = len(chat_ids) // 32
    windows = torch.tensor(chat_ids[: n * 32]).view(n, 32)
    masks = torch.tensor(counts[: n * 32]).view(n, 32)
    for row, m in zip(w.train[n_user:n_user + n_chat], chat_mask):
        k = int((windows == row).all(1).nonzero()[0])
        assert torch.equal(masks[k], m)
    assert any(d[2] for d in docs) and any(not d[2] for d in docs)
    assert sum(d[2] for d in docs) <= len(docs) and len(CHAT_PROMPTS) > 0
    # same seed, same windows; another seed draws other teacher windows; without answers_only no mask
    again = build_mixed_windows(lm.tokenizer, 32, 2, 2, mix, answers_only=True, **kw)
    assert torch.equal(again.train, w.train) and torch.equal(again.loss_mask, w.loss_mask)
    other = build_mixed_windows(lm.tokenizer, 32, 2, 2, mix, **dict(kw, seed=4))
    assert not torch.equal(other.train, w.train) and other.loss_mask is None
    with pytest.raises(UserError, match="no chat samples"):
        build_mixed_windows(lm.tokenizer, 32, 2, 2, [(str(user), 0.5), ("teacher-plain", 0.5)], answers_only=True,
                            **kw)


def test_cli_text_mix_and_answers_only(setup, capsys, tmp_path, shared_data):  # noqa: F811
    tmp = setup
    base = ["recover", "--teacher", "tiny-llama", "--student", str(tmp / "student"), "--seq-len", "32",
            "--batch-size", "2", "--heldout-windows", "2", "--no-progress", "--steps", "2",
            "--data-cache", str(tmp / "dc"), "--selfdistill-tokens", "600", "--selfdistill-max-new", "8",
            "--unseen-passages", "0"]
    mix = ["--text-mix", f"{tmp / 'train.txt'}=0.7", "teacher-chat=0.3"]
    assert main(base + ["--out", str(tmp / "m")] + mix + ["--kd-answers-only"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["finished"] and "teacher-chat" in out["source"]
    # the data-free default with answers only
    assert main(base + ["--out", str(tmp / "d"), "--kd-answers-only"]) == 0
    assert json.loads(capsys.readouterr().out)["finished"]
    for bad, msg in ((mix + ["--text", str(tmp / "train.txt")], "do not combine"),
                     (["--text-mix", "teacher-chat=0.5"], "sum to 1"),
                     (["--text-mix", f"{shared_data / 'zeroshot' / 'lambada_openai.jsonl'}=1"], "evaluation set"),
                     (["--text", str(tmp / "train.txt"), "--kd-answers-only"], "mark no answer tokens")):
        assert main(base + ["--out", str(tmp / "bad")] + bad) == 2
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err and not (tmp / "bad").exists()
