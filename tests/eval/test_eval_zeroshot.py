import json
import math

import pytest
import torch

from ipu_sparse.errors import UserError
from ipu_sparse.eval.zeroshot import TASKS, encode_pair, evaluate_task, load_task, loglikelihood, task_requests
from ipu_sparse.loading.tokenizer import ByteTokenizer


def test_encode_pair_moves_trailing_space():
    tok = ByteTokenizer(256)
    ctx, cont = encode_pair(tok, "abc  ", "d")
    assert ctx == tok.encode("abc") and cont == tok.encode("  d")


def reference_scores(model, tok, reqs):
    """One plain causal forward per request (lm-eval's input (context + continuation)[-(L + 1):][:-1])."""
    L = model.config.max_seq_len
    out = []
    for ctx, cont in reqs:
        c, k = encode_pair(tok, ctx, cont)
        whole = (c + k)[-(L + 1):]
        k = k[-L:]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([whole[:-1]]))[0, len(whole) - 1 - len(k):], -1)
        t = torch.tensor(k).view(-1, 1)
        out.append((float(logp.gather(1, t).sum()), bool((logp.argmax(-1) == t[:, 0]).all())))
    return out


@pytest.mark.parametrize("model_name", ["tiny_llama", "tiny_luminous"])
def test_packed_scores_equal_per_request(model_name, request):
    """Choices sharing a context are packed into one row; every score equals its own causal forward."""
    model = request.getfixturevalue(model_name)
    tok = ByteTokenizer(256)
    reqs = [("The cat sat on the", " mat"), ("A", " b c d e f"), ("Short ctx here, longer", " x"),
            ("The cat sat on the", " hat and then some more"), ("The cat sat on the", " m"),
            ("Question: two?\nAnswer:", " yes"), ("Question: two?\nAnswer:", " no, not at all"),
            ("trailing space ", "moves"), ("The cat sat on the", " mat"),
            ("x" * 100, " " + "y" * 60),  # context + continuation beyond the model's 128 tokens: truncated
            ("q", " " + "z" * 140)]  # a continuation longer than the context: its first tokens are not scored
    want = reference_scores(model, tok, reqs)
    for bs in (1, 3, 16):
        stats = {}
        got = loglikelihood(model, tok, reqs, batch_size=bs, progress=False, stats=stats)
        for (ll, greedy), (ll_ref, greedy_ref) in zip(got, want):
            assert math.isclose(ll, ll_ref, rel_tol=1e-5, abs_tol=1e-4), (ll, ll_ref)
            assert greedy == greedy_ref
        assert stats["requests"] == len(reqs) and stats["rows"] == 7  # 4 + 2 requests share two contexts
        assert stats["row_tokens"] < stats["request_tokens"]  # each shared context ran once
        assert stats["forward_tokens"] == stats["row_tokens"] if bs == 1 else stats["forward_tokens"] > stats["row_tokens"]


def test_rows_never_exceed_the_context(tiny_llama):
    tok = ByteTokenizer(256)
    reqs = [("shared context", " " + "w" * 40)] * 8  # 8 x 40 tokens cannot share one row of 128
    stats = {}
    got = loglikelihood(tiny_llama, tok, reqs, batch_size=4, progress=False, stats=stats)
    assert stats["rows"] == 4 and len({round(ll, 4) for ll, _ in got}) == 1
    assert math.isclose(got[0][0], reference_scores(tiny_llama, tok, reqs[:1])[0][0], rel_tol=1e-5, abs_tol=1e-4)


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


# HellaSwag validation records in their source form (activity_label, ctx_a, ctx_b, endings, label), items 0, 1,
# 2, 1673 (ActivityNet: ctx_b lower-case, quotes and "!" in ctx_a) and 3505, 4121 (WikiHow: ctx_b empty, a
# bracket in the context, a double space in an ending). The data file stores "label: ctx_a ctx_b" (WikiHow tags
# already turned into sentences), the gold index and the endings; the test checks that first.
HELLASWAG_SOURCE = {
    0: ("Roof shingle removal", "A man is sitting on a roof.", "he",
        ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.", "is holding a rubik's cube.",
         "starts pulling up roofing on a roof."], 3),
    1: ("Clean and jerk", "A lady walks to a barbell. She bends down and grabs the pole.", "the lady",
        ["swings and lands in her arms.", "pulls the barbell forward.", "pulls a rope attached to the barbell.",
         "stands and lifts the weight over her head."], 3),
    2: ("Canoeing", "Two women in a child are shown in a canoe while a man pulls the canoe while standing in the "
        "water, with other individuals visible in the background.", "the child and a different man",
        ["are then shown paddling down a river in a boat while a woman talks.",
         "are driving the canoe, they go down the river flowing side to side.",
         "sit in a canoe while the man paddles.",
         "walking go down the rapids, while the man in his helicopter almost falls and goes out of canoehood."], 2),
    1673: ("Cutting the grass", 'The words "the good works tour cuts the lawn with machetes!" appears on screen.',
           'a volunteer named " irene zimmerman "',
           ["walks up to the camera to tour the lawn.", "speaks to the camera in a field.",
            "is seen mowing the lawn and credits begin to flash on screen.",
            "walks up to the garden and removes the leaves from a red lawn."], 1),
    3505: ("Family Life", "How to entertain a toddler. Ask the toddler what he or she would like to do instead of "
           "doing what you would like to do.. Visit a site like [www.kiddio.org] to find loads of creative "
           "activities for toddlers and preschoolers.. Choose small, simple games like candy land or chutes and "
           "ladders.", "",
           ["Make sure you get a computer or tablet in case the toddler wants to do some general stuff. And maybe "
            "ask to go get a snack or an xbox or wii.",
            "Try some arts and crafts like washable paints, little foamies, crayons, and paper.. Watch the "
            "toddler's favorite movie, even if it's barney, and even if he or she has seen it 20 times before.",
            "Make sure the kid you are babysitting is old enough to handle various household chores or housework. "
            "Little kids will have a difficult time holding objects and will have precious time learning any new "
            "skill.",
            "If you discover that your toddler likes archery or fishing, create activities around these games as "
            "well. Alternatively, make small squares and place them around the toddler."], 1),
    4121: ("Health", "How to sleep comfortably on a hot night. Stop exercising a few hours before bedtime and drink "
           "plenty of water. When you exercise, you raise your body temperature and retain heat. Exercising "
           "several hours before you go to bed will give your body time to cool down.", "",
           ["Keep legs and feet as cool as possible during the day. This is often the case with people who live "
            "on hot days.",
            "Stop when you are not overly tired and give yourself a break before going to bed.  Do not be "
            "embarrassed by physical exertion.",
            "You should also drink lots of water throughout the day to stay hydrated. You may also want to keep "
            "water by your bedside.",
            "The best time for you to exercise is at night. By going to bed at a certain time and resting, you "
            "will either wake up feeling refreshed, or fall asleep feeling heavy."], 2),
}


def lm_eval_hellaswag_requests(label, ctx_a, ctx_b, endings):
    """lm-eval 0.4's hellaswag task: process_docs builds query = preprocess(activity_label + ": " + ctx_a + " " +
    ctx_b.capitalize()) and choices = [preprocess(ending)]; doc_to_text is the query, each request's continuation
    is the target delimiter " " + choice; preprocess strips, turns " [title]" into ". ", deletes [...] and
    halves double spaces."""
    def preprocess(text):
        text = text.strip().replace(" [title]", ". ")
        while "[" in text and "]" in text[text.index("["):]:
            i = text.index("[")
            text = text[:i] + text[text.index("]", i) + 1:]
        return text.replace("  ", " ")

    query = preprocess(label + ": " + ctx_a + " " + ctx_b.capitalize())
    return [(query, " " + preprocess(e)) for e in endings]


def test_hellaswag_requests_match_lm_eval(shared_data):
    import bz2

    lines = bz2.open(shared_data / "zeroshot" / "hellaswag_val.txt.bz2", "rt", encoding="utf-8").read().split("\n")
    items = load_task("hellaswag", limit=max(HELLASWAG_SOURCE) + 1)
    for i, (label, ctx_a, ctx_b, endings, gold) in HELLASWAG_SOURCE.items():
        stored = lines[6 * i: 6 * i + 6]
        assert stored[0] == label + ": " + ctx_a + (" " + ctx_b if ctx_b else "")
        assert stored[1:] == [str(gold)] + endings
        want = lm_eval_hellaswag_requests(label, ctx_a, ctx_b, endings)
        got, spans = task_requests("hellaswag", [items[i]])
        assert got == want and spans == [(0, 4)] and items[i]["gold"] == gold
        for ctx, cont in got:  # no trailing space to move; exactly one space before the continuation
            assert ctx == ctx.rstrip() and cont.startswith(" ") and not cont.startswith("  ")
    assert items[0]["query"] == "Roof shingle removal: A man is sitting on a roof. He"
    assert "[" not in items[3505]["query"] and "  " not in items[4121]["choices"][1]


def test_hellaswag_capitalizes_only_the_last_sentence_fragment():
    items = load_task("hellaswag", limit=200)
    for it in items:  # ActivityNet items: ctx_b (after the last sentence end) starts lower-case in the file
        assert it["query"].split(". ")[-1][:1].isupper() or not it["query"].split(". ")[-1][:1].isalpha()


@pytest.mark.slow
def test_smollm2_packed_scores_equal_per_request(smollm2):
    """The real model and tokenizer: a few items of every task, packed and batched as in an evaluation, score as
    one causal forward per request (fp32 noise), and the shared contexts ran once."""
    model, tok = smollm2.model, smollm2.tokenizer
    for task in TASKS:
        reqs, spans = task_requests(task, load_task(task, limit=3))
        stats = {}
        got = loglikelihood(model, tok, reqs, batch_size=2, progress=False, stats=stats)
        want = reference_scores(model, tok, reqs)
        for (ll, greedy), (ll_ref, greedy_ref) in zip(got, want):
            assert math.isclose(ll, ll_ref, rel_tol=1e-5, abs_tol=2e-4), (task, ll, ll_ref)
            assert greedy == greedy_ref
        if task in ("hellaswag", "piqa", "arc_easy"):  # one row per item: its choices share the query
            assert stats["rows"] == len(spans)
        elif task == "winogrande":  # twin sentences repeat a filled-in context (items 0 and 1)
            assert len(spans) < stats["rows"] < len(reqs)
