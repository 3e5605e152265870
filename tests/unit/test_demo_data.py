"""The demo dataset: deterministic, held-back drift family, checkable answers."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from tuneline.data.demo import (
    TASK_FAMILIES,
    alpaca_prompt,
    check_answer,
    normalize,
    read_corpus,
    write_demo_data,
)
from tuneline.params import DemoDataParams

PARAMS = DemoDataParams(seed=11, examples_per_task=60, preference_pairs=90, corpus_paragraphs=200, drift_examples=40)


def _rows(path):
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, write_demo_data(PARAMS, out)


def test_same_seed_same_bytes_other_seed_differs(written, tmp_path):
    _, manifest = written
    again = write_demo_data(PARAMS, tmp_path / "again")
    other = write_demo_data(DemoDataParams(**{**PARAMS.__dict__, "seed": 12}), tmp_path / "other")
    for name in ("sft.jsonl", "preference.jsonl", "corpus.txt", "drift.jsonl"):
        assert again["files"][name]["sha256"] == manifest["files"][name]["sha256"], name
        assert other["files"][name]["sha256"] != manifest["files"][name]["sha256"], name


def test_manifest_and_counts(written):
    out, manifest = written
    families = [f for f in TASK_FAMILIES if f != "word_reverse"]
    assert manifest["families"] == families and manifest["drift_family"] == "word_reverse"
    files = manifest["files"]
    assert files["sft.jsonl"]["rows"] == 60 * len(families) == len(_rows(out / "sft.jsonl"))
    assert files["preference.jsonl"]["rows"] == 90 == len(_rows(out / "preference.jsonl"))
    assert files["drift.jsonl"]["rows"] == 40 == len(_rows(out / "drift.jsonl"))
    assert files["corpus.txt"]["rows"] == 200 == len(read_corpus(out / "corpus.txt"))


def test_families_present_and_drift_held_back(written):
    out, _ = written
    sft, pref, drift = _rows(out / "sft.jsonl"), _rows(out / "preference.jsonl"), _rows(out / "drift.jsonl")
    assert Counter(r["task"] for r in sft) == {f: 60 for f in TASK_FAMILIES if f != "word_reverse"}
    assert set(r["task"] for r in pref) == set(TASK_FAMILIES) - {"word_reverse"}
    assert {r["task"] for r in drift} == {"word_reverse"}
    assert all(set(r) == {"instruction", "input", "output", "task"} for r in sft + drift)
    assert all(set(r) == {"prompt", "chosen", "rejected", "task"} for r in pref)
    text = " ".join(alpaca_prompt(r["instruction"], r["input"]) for r in sft) + " ".join(r["prompt"] for r in pref)
    assert "reverse" not in text.lower() and "backwards" not in text.lower()
    # prompts are unique across all files, so content-hash splits cannot leak
    keys = [normalize(alpaca_prompt(r["instruction"], r["input"])) for r in sft + drift]
    keys += [normalize(r["prompt"]) for r in pref]
    assert len(keys) == len(set(keys))


def test_sft_and_drift_answers_pass_their_checker(written):
    out, _ = written
    for row in _rows(out / "sft.jsonl") + _rows(out / "drift.jsonl"):
        prompt = alpaca_prompt(row["instruction"], row["input"])
        assert check_answer(row["task"], prompt, row["output"], row["output"]), row
        assert check_answer(row["task"], prompt, row["output"], f"  {row['output'].upper()}. "), row


def test_preference_chosen_passes_and_rejected_fails(written):
    out, _ = written
    for row in _rows(out / "preference.jsonl"):
        assert row["chosen"] != row["rejected"]
        assert check_answer(row["task"], row["prompt"], row["chosen"], row["chosen"]), row
        assert not check_answer(row["task"], row["prompt"], row["chosen"], row["rejected"]), row


def test_corpus_covers_task_vocabulary(written):
    out, _ = written
    text = (out / "corpus.txt").read_text(encoding="utf-8")
    assert "\n\n" in text
    for word in ("Monday", "Sunday", "January", "December", "plus", "larger", "words", "sort", "repeat"):
        assert word in text, word


@pytest.mark.parametrize(
    "task, expected, response, ok",
    [
        ("addition", "11", "11", True),
        ("addition", "11", "The answer is 11.", True),
        ("addition", "11", "eleven", True),
        ("addition", "11", "12", False),
        ("addition", "11", "", False),
        ("compare", "71", "71", True),
        ("compare", "71", "34", False),
        ("next_item", "Wednesday", "wednesday.", True),
        ("next_item", "Wednesday", "Wednesday Thursday", False),
        ("next_item", "h", "H", True),
        ("repeat_word", "cat cat cat", "cat, cat, cat", True),
        ("repeat_word", "cat cat cat", "cat cat", False),
        ("count_words", "4", "4 words", True),
        ("sort_numbers", "2, 7, 9", "2 7 9", True),
        ("sort_numbers", "2, 7, 9", "2, 9, 7", False),
        ("word_reverse", "fox red", "Fox, red.", True),
        ("word_reverse", "fox red", "red fox", False),
    ],
)
def test_check_answer_cases(task, expected, response, ok):
    assert check_answer(task, "prompt", expected, response) is ok


def test_unknown_family_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="unknown task family"):
        check_answer("poetry", "p", "a", "a")
    with pytest.raises(ValueError, match="drift_family"):
        write_demo_data(DemoDataParams(drift_family="poetry"), tmp_path)


def test_other_drift_family_moves_word_reverse_into_training(tmp_path):
    params = DemoDataParams(seed=1, examples_per_task=10, preference_pairs=12, corpus_paragraphs=5,
                            drift_family="sort_numbers", drift_examples=5)
    manifest = write_demo_data(params, tmp_path)
    assert "word_reverse" in manifest["families"] and "sort_numbers" not in manifest["families"]
    assert {r["task"] for r in _rows(tmp_path / "drift.jsonl")} == {"sort_numbers"}


def test_default_params_build_with_unique_prompts():
    from tuneline.data.demo import build_rows

    rows = build_rows(DemoDataParams())
    assert len(rows["sft"]) == 300 * 6 and len(rows["preference"]) == 400 and len(rows["drift"]) == 200
