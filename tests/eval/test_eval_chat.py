"""Chat probe: key-word scoring, the probe file, the probe on a tiny model, the CLI, and (slow) the dense SmolLM2."""
import json

import pytest

from ipu_sparse.cli import main
from ipu_sparse.errors import UserError
from ipu_sparse.eval.chat import (LONG_PROMPTS, PROBE_FILE, ProbeItem, answer_matches, chat_answers, key_variants,
                                  load_probe, number_words, run_probe)
from ipu_sparse.loading import load_model


def test_answer_matches_whole_words_ignoring_case():
    assert answer_matches("The capital of France is Paris.", ["Paris"])
    assert answer_matches("paris!", ["Paris"])
    assert not answer_matches("Parisian cafes are nice", ["Paris"])
    assert not answer_matches("a category", ["cat"])
    assert answer_matches("It is the blue   whale.", ["blue whale"])
    assert answer_matches("carbon dioxide (CO2)", ["CO2"]) and not answer_matches("CO22", ["CO2"])
    assert not answer_matches("", ["Paris"])
    assert answer_matches("Not Rome but Milan", ["Milan", "x"])


def test_answer_matches_numbers_as_digits_or_words():
    assert answer_matches("2 + 2 = 4.", ["4"]) and answer_matches("It is four.", ["4"])
    assert answer_matches("Four!", ["four"]) and answer_matches("it is 4", ["four"])
    assert not answer_matches("14 days", ["4"]) and not answer_matches("4.5 metres", ["4"])
    assert not answer_matches("41", ["4"]) and not answer_matches("0.4", ["4"])
    assert answer_matches("forty-two", ["42"]) and answer_matches("forty two", ["42"])
    assert answer_matches("There are 1,000 grams.", ["1000"]) and answer_matches("1000 g", ["1,000"])
    assert answer_matches("one hundred degrees", ["100"]) and answer_matches("a hundred", ["100"])
    assert not answer_matches("1,0000", ["1000"])


def test_number_words_and_variants():
    assert number_words(0) == ["zero"] and number_words(12) == ["twelve"] and number_words(60) == ["sixty"]
    assert number_words(21) == ["twenty-one", "twenty one"]
    assert "one hundred and five" in number_words(105) and number_words(1000) == ["one thousand", "a thousand"]
    assert number_words(5000) == [] and number_words(-1) == []
    assert key_variants("7") == ["7", "seven"] and key_variants("Seven") == ["Seven", "7"]
    assert key_variants("Paris") == ["Paris"]


def test_shipped_probe_file_loads():
    items = load_probe()
    assert PROBE_FILE.is_file() and len(items) >= 50
    assert len({it.question for it in items}) == len(items)
    assert all(it.keys and all(k.strip() for k in it.keys) for it in items)


def test_bad_probe_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_probe(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="bad.json"):
        load_probe(bad)
    bad.write_text(json.dumps({"questions": []}))
    with pytest.raises(UserError, match="non-empty list"):
        load_probe(bad)
    bad.write_text(json.dumps({"questions": [{"q": "Why?", "keys": []}]}))
    with pytest.raises(UserError, match="question 0"):
        load_probe(bad)


def test_probe_runs_on_tiny_preset_and_scores_relative_to_a_reference():
    lm = load_model("tiny-llama")
    items = [ProbeItem("What is 2 + 2?", ["4"]), ProbeItem("Colour of snow?", ["white"]),
             ProbeItem("Capital of Italy?", ["Rome"])]
    answers = chat_answers(lm.model, lm.tokenizer, [it.question for it in items], 8)
    # batched answers equal one-at-a-time answers
    assert answers == [chat_answers(lm.model, lm.tokenizer, [it.question], 8)[0] for it in items]
    r = run_probe(lm.model, lm.tokenizer, items, max_new_tokens=8)
    assert [row["answer"] for row in r["rows"]] == answers
    assert r["n"] == 3 and r["k"] == sum(answer_matches(a, it.keys) for a, it in zip(answers, items))
    # with a reference: n = questions the reference gets right, k = those both get right
    rel = run_probe(lm.model, lm.tokenizer, items, ["4", "black", "Rome"], max_new_tokens=8)
    assert rel["n"] == 2 and rel["k"] == sum(row["ok"] for row in rel["rows"] if row["reference_ok"])
    assert [row["reference_ok"] for row in rel["rows"]] == [True, False, True]


def test_chat_request_too_long_for_the_context():
    lm = load_model("tiny-llama")
    with pytest.raises(UserError, match="does not fit"):
        chat_answers(lm.model, lm.tokenizer, ["x" * 200])
    assert chat_answers(lm.model, lm.tokenizer, ["x" * 200], 4, skip_too_long=True) == [None]


def test_cli_chat_probe_table_json_and_side_by_side(tmp_path, capsys):
    probe = tmp_path / "probe.json"
    probe.write_text(json.dumps({"questions": [{"q": "What is 2 + 2?", "keys": ["4"]},
                                               {"q": "Say hi.", "keys": ["hi"]}]}))
    out_json, page = tmp_path / "r.json", tmp_path / "side.md"
    assert main(["eval", "--model", "tiny-llama", "--chat-probe", "--chat-probe-file", str(probe), "--verbose",
                 "--reference", "tiny-llama", "--chat-side-by-side", str(page), "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    r = json.loads(out_json.read_text())["chat_probe"]
    assert f"answers kept: {r['k']}/{r['n']}" in out and "What is 2 + 2?" in out
    assert r["questions"] == 2 and r["reference"] == "tiny-llama"
    assert all(row["answer"] == row["reference_answer"] for row in r["rows"])  # same model: same answers
    text = page.read_text()
    assert all(f"## {p}" in text for p in LONG_PROMPTS) and "wikitext2" not in out


def test_cli_chat_bad_input(tmp_path, capsys):
    assert main(["eval", "--model", "tiny-llama", "--chat-probe", "--chat-probe-file", str(tmp_path / "no.json")]) == 2
    err = capsys.readouterr().err
    assert "no.json" in err and "Traceback" not in err
    assert main(["eval", "--model", "tiny-llama", "--chat-side-by-side", str(tmp_path / "x.md")]) == 2
    assert "--reference" in capsys.readouterr().err and not (tmp_path / "x.md").exists()


@pytest.mark.slow
def test_dense_smollm2_answers_the_shipped_probe():
    """The shipped questions are ones the dense model answers right (greedy, chat template)."""
    lm = load_model("smollm2-135m")
    r = run_probe(lm.model, lm.tokenizer, load_probe())
    wrong = [row["q"] + " -> " + row["answer"] for row in r["rows"] if not row["ok"]]
    assert r["k"] >= 50 and r["k"] >= r["n"] - 3, wrong  # all 73 right when the file was made
