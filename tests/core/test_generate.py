"""Generation: greedy/sampling semantics, seeds, stop tokens, streaming, chat history, CLI."""
import io

import pytest
import torch

from ipu_sparse.cli import main
from ipu_sparse.errors import UserError
from ipu_sparse.generate import (ChatSession, SamplingConfig, TextStreamer, generate, generate_batch, generate_many,
                                 sample_next)
from ipu_sparse.loading.tokenizer import ByteTokenizer


def test_greedy_equals_argmax_loop(tiny_llama):
    prompt = [5, 9, 33, 7]
    out = generate(tiny_llama, prompt, 10)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(10):
            ids.append(int(tiny_llama(torch.tensor([ids]))[0, -1].argmax()))
    assert out == ids[len(prompt):]


def test_sampling_is_seeded_and_top_k1_is_greedy(tiny_llama):
    prompt = [5, 9, 33, 7]
    a = generate(tiny_llama, prompt, 12, SamplingConfig(temperature=1.5, seed=7))
    b = generate(tiny_llama, prompt, 12, SamplingConfig(temperature=1.5, seed=7))
    c = generate(tiny_llama, prompt, 12, SamplingConfig(temperature=1.5, seed=8))
    assert a == b and a != c
    assert generate(tiny_llama, prompt, 8, SamplingConfig(temperature=1.0, top_k=1, seed=1)) == generate(tiny_llama, prompt, 8)


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    g = torch.Generator().manual_seed(0)
    seen = {sample_next(logits, SamplingConfig(temperature=1.0, top_p=0.7), g) for _ in range(300)}
    assert seen == {0, 1}
    seen = {sample_next(logits, SamplingConfig(temperature=1.0, top_k=3), g) for _ in range(300)}
    assert seen == {0, 1, 2}


def test_stops_at_stop_token(tiny_llama):
    prompt = [5, 9, 33, 7]
    free = generate(tiny_llama, prompt, 10)
    stop = free[3]
    out = generate(tiny_llama, prompt, 10, stop_ids={stop})
    assert out == free[:free.index(stop) + 1]


def test_batch_of_samples_matches_single_decoding_and_stops_per_row(tiny_llama):
    prompt = [5, 9, 33, 7]
    greedy = generate(tiny_llama, prompt, 10)
    assert generate_batch(tiny_llama, prompt, 3, 10) == [greedy] * 3  # greedy: every row is the single decode
    cfg = SamplingConfig(temperature=1.5, top_p=0.9)
    rows = generate_batch(tiny_llama, prompt, 6, 12, cfg, generator=torch.Generator().manual_seed(3))
    again = generate_batch(tiny_llama, prompt, 6, 12, cfg, generator=torch.Generator().manual_seed(3))
    assert rows == again and len({tuple(r) for r in rows}) > 1  # seeded, and the rows are different samples
    stop = {rows[0][2], rows[1][1]}
    cut = generate_batch(tiny_llama, prompt, 6, 12, cfg, stop, generator=torch.Generator().manual_seed(3))
    for full, row in zip(rows, cut):  # each row ends after its own first stop token; the draws are the same
        first = next((i + 1 for i, t in enumerate(full) if t in stop), len(full))
        assert row == full[:first]
    assert len(cut[0]) <= 3 and len(cut[1]) <= 2 and any(len(r) < 12 for r in cut)


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0.0), dict(top_k=-2)])
def test_bad_sampling_values(bad):
    with pytest.raises(UserError):
        SamplingConfig(**bad)


def test_context_overflow_is_an_error(tiny_llama):
    with pytest.raises(UserError, match="exceeds the model's context"):
        generate(tiny_llama, [1] * 100, 100)


def test_streamer_holds_back_partial_utf8():
    tok = ByteTokenizer()
    pieces = []
    s = TextStreamer(tok, pieces.append)
    for t in tok.encode("aé€b"):
        s(t)
    assert "".join(pieces) == "aé€b" and all("\ufffd" not in p for p in pieces)


def test_chat_session_keeps_history(tiny_llama):
    chat = ChatSession(tiny_llama, ByteTokenizer(), SamplingConfig(), max_new_tokens=4)
    chat.ask("hi")
    chat.ask("again")
    assert [m["role"] for m in chat.messages] == ["user", "assistant", "user", "assistant"]
    chat.reset()
    assert chat.messages == []


def test_cli_generate_tiny(capsys):
    assert main(["generate", "--model", "tiny-llama", "--prompt", "abc", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.endswith("\n")


def test_cli_user_errors_exit_2_without_traceback(capsys, tmp_path):
    assert main(["generate", "--model", str(tmp_path / "x.gguf"), "--prompt", "a"]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err
    assert main(["generate", "--model", "tiny-llama", "--prompt", "a", "--temperature", "-1"]) == 2
    assert main(["generate", "--model", "luminous-base-13b", "--prompt", "a"]) == 2
    assert "no public weights" in capsys.readouterr().err


@pytest.mark.slow
def test_smollm2_tokenizer(smollm2):
    tok = smollm2.tokenizer
    for text in ["Hello world", "  spaces\tand\nnewlines ", "digits 12345 and ünïcødé ✓", "<|im_start|>user\nhi<|im_end|>"]:
        assert tok.decode(tok.encode(text), skip_special=False) == text
    assert tok.encode("<|im_end|>") == [2]
    assert tok.encode("2024") == [tok.encode(d)[0] for d in "2024"]  # digits are split one by one
    assert tok.encode("The capital of France") == [504, 3575, 282, 4649]
    assert {0, 2} <= tok.stop_ids


@pytest.mark.slow
def test_smollm2_chat_answers_paris(smollm2, monkeypatch, capsys):
    chat = ChatSession(smollm2.model, smollm2.tokenizer, SamplingConfig(), max_new_tokens=32)
    assert "Paris" in chat.ask("What is the capital of France?")
    assert "Berlin" in chat.ask("And of Germany?")
    assert len(chat.messages) == 4


def test_generate_many_greedy_equals_one_prompt_at_a_time(tiny_llama, tiny_luminous):
    prompts = [[5, 9, 33, 7], list(range(1, 12)), [200], [17, 18, 19, 20, 21, 22]]
    limits = [12, 20, 5, 16]
    for model in (tiny_llama, tiny_luminous):
        many = generate_many(model, prompts, limits)
        assert [len(o[0]) for o in many] == limits
        assert [o[0] for o in many] == [generate_batch(model, p, 1, m)[0] for p, m in zip(prompts, limits)]
        # a stop token ends a row (kept) and its prompt leaves the batch; the others go on unchanged
        stop = {many[1][0][3]}
        stopped = generate_many(model, prompts, limits, stop_ids=stop)
        assert stopped == [[generate_batch(model, p, 1, m, stop_ids=stop)[0]] for p, m in zip(prompts, limits)]
        assert len(stopped[1][0]) <= 4 and stopped[1][0][-1] in stop


def test_generate_many_samples_draw_from_each_prompts_generator(tiny_llama):
    prompts = [[5, 9, 33, 7], list(range(1, 12)), [200]]
    s = SamplingConfig(temperature=1.0, top_p=0.9)
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    many = generate_many(tiny_llama, prompts, [10, 14, 6], s, samples_per_prompt=3, generators=gens)
    for i, (p, m) in enumerate(zip(prompts, [10, 14, 6])):
        alone = generate_batch(tiny_llama, p, 3, m, s, generator=torch.Generator().manual_seed(i))
        assert many[i] == alone and len({tuple(x) for x in alone}) > 1


def test_left_padded_rows_give_the_logits_of_the_prompt_alone(tiny_llama):
    a, b = [5, 9, 33, 7, 8, 1], [40, 41]
    pad = torch.tensor([0, 4])
    idx = torch.tensor([a, [0] * 4 + b])  # (2, 6)
    with torch.no_grad():
        tiny_llama.setup_cache(2, 8)
        both = tiny_llama(idx, input_pos=torch.arange(6), left_pad=pad)  # (2, 6, V)
        step = tiny_llama(torch.tensor([[3], [4]]), input_pos=torch.tensor([6]), left_pad=pad)  # (2, 1, V)
        tiny_llama.clear_cache()
        ref_a, ref_b = tiny_llama(torch.tensor([a + [3]])), tiny_llama(torch.tensor([b + [4]]))
    torch.testing.assert_close(both[0], ref_a[0, :6])
    torch.testing.assert_close(both[1, 4:], ref_b[0, :2])
    torch.testing.assert_close(step[:, 0], torch.stack([ref_a[0, 6], ref_b[0, 2]]))
    assert torch.isfinite(both).all()


def test_generate_many_bad_input(tiny_llama):
    with pytest.raises(UserError, match="empty prompt"):
        generate_many(tiny_llama, [[1, 2], []], 4)
    with pytest.raises(UserError, match="exceeds the model's context"):
        generate_many(tiny_llama, [[1] * 120], 10)
    assert generate_many(tiny_llama, [[1, 2], [3]], 0, samples_per_prompt=2) == [[[], []], [[], []]]
