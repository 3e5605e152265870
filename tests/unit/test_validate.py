"""Row rules of the GX suite on small hand-made records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tuneline.data import validate
from tuneline.data.validate import SUITE_PATH, ingest_file, load_suite, validate_records
from tuneline.params import ValidationParams
from tuneline.records import ChatRecord, Rejection

LOOSE = ValidationParams(min_tokens=1, max_tokens=1000, min_accepted=0, max_quarantined_fraction=1.0)


def sft(line: int, instruction: str, output: str, **meta) -> ChatRecord:
    return ChatRecord(kind="sft", source="t.jsonl", line=line, meta=meta,
                      messages=[{"role": "user", "content": instruction}, {"role": "assistant", "content": output}])


def pair(line: int, chosen: str, rejected: str, prompt: str = "Which?") -> ChatRecord:
    return ChatRecord(kind="preference", source="t.jsonl", line=line, chosen=chosen, rejected=rejected,
                      messages=[{"role": "user", "content": prompt}])


def labelled(line: int, text: str, label: str) -> ChatRecord:
    return ChatRecord(kind="classification", source="t.csv", line=line, label=label,
                      messages=[{"role": "user", "content": text}])


def verdicts(records, params=LOOSE, **kwargs) -> dict[int, tuple[str, str | None]]:
    result = validate_records(records, params, **kwargs)
    assert len(result.accepted) + len(result.quarantined) == result.read
    return {r.line: (r.reason, r.field) for r in result.quarantined}


def test_suite_json_gives_every_expectation_a_reason():
    suite = load_suite()
    reasons = [e["meta"]["reason"] for e in suite["expectations"]]
    assert reasons == ["empty_field", "control_characters", "too_long", "tokenizer_error", "too_short", "too_long",
                       "unknown_label", "chosen_equals_rejected", "duplicate", "label_conflict"]
    assert json.loads(SUITE_PATH.read_text())["name"] == "prepared_dataset"


def test_exact_dedup_keeps_the_first_and_ignores_whitespace_variants():
    records = [sft(1, "Say hi.", "Hi!"), sft(2, "Say hi.", "Hi!"), sft(3, "say  HI.", "Hi!  \n"), sft(4, "Other", "x y")]
    result = validate_records(records, ValidationParams(dedup="exact", min_tokens=1, min_accepted=0))
    assert [(r.line, r.reason, r.detail) for r in result.quarantined] == [(2, "duplicate", "exact duplicate of line 1")]


def test_normalized_dedup_also_catches_whitespace_and_case_variants():
    records = [sft(1, "Say hi.", "Hi!"), sft(2, "Say hi.", "Hi!"), sft(3, "say  HI.", "Hi!  \n"), sft(4, "Other", "x y")]
    result = validate_records(records, ValidationParams(dedup="normalized", min_tokens=1, min_accepted=0))
    assert [(r.line, r.detail) for r in result.quarantined] == [
        (2, "exact duplicate of line 1"), (3, "duplicate (after whitespace/case normalization) of line 1")]
    assert [r.line for r in result.accepted] == [1, 4]


def test_a_duplicate_only_points_at_a_kept_row():
    records = [sft(1, "Say hi.", "Hi!\x07"), sft(2, "say hi.", "hi!\x07 "), sft(3, "Say hi.", "Hi!"), sft(4, "say hi", "HI!")]
    assert verdicts(records) == {1: ("control_characters", "messages[1].content"),
                                 2: ("control_characters", "messages[1].content")}
    assert verdicts([labelled(1, "Hello", "nope"), labelled(2, "Hello", "greeting")],
                    ValidationParams(labels=("greeting",), min_accepted=0)) == {1: ("unknown_label", "label")}


def test_chosen_equals_rejected_after_normalization():
    records = [pair(1, "Yes, sure.", "  yes,   SURE. "), pair(2, "Yes.", "No."), pair(3, "Same", "Same")]
    result = validate_records(records, LOOSE)
    assert {r.line: r.reason for r in result.quarantined} == {1: "chosen_equals_rejected", 3: "chosen_equals_rejected"}


def test_control_characters_but_not_tab_newline_return():
    records = [sft(1, "a\tb\nc\r\n", "ok"), sft(2, "bell\x07", "ok"), sft(3, "c1", "next\x85line"),
               sft(4, "nul", "x\x00"), pair(5, "fine", "del\x7f")]
    result = validate_records(records, LOOSE)
    assert {r.line: r.field for r in result.quarantined} == {
        2: "messages[0].content", 3: "messages[1].content", 4: "messages[1].content", 5: "rejected"}
    assert next(r.detail for r in result.quarantined if r.line == 3) == "control character U+0085 in messages[1].content"


def test_empty_fields_of_every_kind():
    records = [
        sft(1, "Say hi.", " \n\t"),
        sft(2, "", "Hi", blank_fields=["instruction"]),  # ingest names the blank source field
        pair(3, "", "No."),
        labelled(4, "   ", "x"),
        labelled(5, "text", " "),
        ChatRecord(kind="text", source="c.txt", line=6, messages=[{"role": "user", "content": "\n"}]),
        sft(7, "Fine", "Fine too"),
    ]
    assert verdicts(records) == {1: ("empty_field", "messages[1].content"), 2: ("empty_field", "instruction"),
                                 3: ("empty_field", "chosen"), 4: ("empty_field", "messages[0].content"),
                                 5: ("empty_field", "label"), 6: ("empty_field", "messages[0].content")}


def test_length_bounds_in_characters_without_a_tokenizer():
    params = ValidationParams(min_tokens=5, max_tokens=20, max_chars=100, min_accepted=0)
    records = [sft(1, "a", "b"), sft(2, "What is 2+2?", "4"), sft(3, "x" * 30, "y"), sft(4, "x" * 200, "y")]
    result = validate_records(records, params)
    assert {r.line: (r.reason, r.detail) for r in result.quarantined} == {
        1: ("too_short", "3 characters, below min_tokens 5"),
        3: ("too_long", "32 characters, above max_tokens 20"),
        4: ("too_long", "202 characters, above max_chars 100 (not tokenized)"),
    }


@pytest.fixture(scope="module")
def tokenizer():
    """A tiny byte-level BPE tokenizer trained here (no network), without a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    raw.train_from_iterator(["what is the capital of france? paris is the capital."] * 50, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def templated(tokenizer):
    import copy

    with_template = copy.deepcopy(tokenizer)
    with_template.chat_template = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
    return with_template


def test_token_bounds_with_a_tokenizer_and_its_chat_template(tokenizer, templated):
    record = sft(1, "what is the capital of france?", "paris is the capital.")
    plain = len(tokenizer.encode("what is the capital of france?\nparis is the capital."))
    framed = len(templated.apply_chat_template(record.messages, tokenize=True)["input_ids"])
    assert plain < framed < 51  # far fewer tokens than the 51 characters
    params = ValidationParams(min_tokens=1, max_tokens=framed - 1, min_accepted=0)
    assert verdicts([record], params, tokenizer=tokenizer) == {}
    result = validate_records([record], params, tokenizer=templated)
    assert [(r.reason, r.detail) for r in result.quarantined] == [
        ("too_long", f"{framed} tokens, above max_tokens {framed - 1}")]
    short = ValidationParams(min_tokens=plain + 1, max_tokens=1000, min_accepted=0)
    assert verdicts([record], short, tokenizer=tokenizer) == {1: ("too_short", None)}


def test_huge_rows_are_too_long_without_tokenizing():
    class Refuses:
        chat_template = "{{ messages }}"

        def apply_chat_template(self, *args, **kwargs):
            raise AssertionError("a row above max_chars was tokenized")

        encode = apply_chat_template

    records = [sft(1, "q", "x" * 1_000_000), sft(2, "q" * 200_000, "a"), pair(3, "y" * 30_000, "n")]
    result = validate_records(records, ValidationParams(min_accepted=0), tokenizer=Refuses())
    assert {r.line: r.reason for r in result.quarantined} == {1: "too_long", 2: "too_long", 3: "too_long"}


def test_a_tokenizer_failure_quarantines_the_row():
    class Strict:
        chat_template = "strict"

        def apply_chat_template(self, conversation, tokenize=True):
            if any(m["role"] == "system" for m in conversation):
                raise ValueError("system role not supported")
            return list(range(10))

    system = ChatRecord(kind="sft", source="t", line=2, messages=[
        {"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}])
    result = validate_records([sft(1, "u", "a"), system], LOOSE, tokenizer=Strict())
    assert [(r.line, r.reason, r.detail) for r in result.quarantined] == [
        (2, "tokenizer_error", "ValueError: system role not supported")]


def test_thresholds_fail_with_a_message():
    records = [sft(i, f"question {i}", f"answer {i}") for i in range(1, 8)]
    parse = [Rejection(source="t.jsonl", line=8 + i, reason="malformed_json", detail="x") for i in range(3)]
    result = validate_records(records, ValidationParams(min_accepted=10), parse_rejections=parse)
    assert result.read == 10 and result.quarantined_fraction() == pytest.approx(0.3)
    assert not result.success
    assert result.failures == ["quarantined 30.0% of 10 rows, above max_quarantined_fraction 20%",
                               "accepted 7 rows, below min_accepted 10"]
    assert result.reasons == {"malformed_json": 3}
    ok = validate_records(records, ValidationParams(min_accepted=7, max_quarantined_fraction=0.3), parse_rejections=parse)
    assert ok.success and ok.failures == []


def test_no_candidate_rows_at_all():
    result = validate_records([], ValidationParams(), parse_rejections=[Rejection("t", 1, "malformed_json")])
    assert (result.read, result.accepted, result.reasons) == (1, [], {"malformed_json": 1})
    assert result.failures == ["quarantined 100.0% of 1 rows, above max_quarantined_fraction 20%",
                               "accepted 0 rows, below min_accepted 20"]


def test_read_defaults_and_can_be_given():
    records = [sft(1, "question", "answer")]
    assert validate_records(records, LOOSE).read == 1
    assert validate_records(records, LOOSE, parse_rejections=[Rejection("t", 2, "x")]).read == 2


def test_labels_are_normalized_to_the_vocabulary_and_conflicts_flagged():
    params = ValidationParams(labels=("card_arrival", "Refund_not_showing_up"), min_accepted=0)
    records = [labelled(1, "Where is my card?", " CARD_ARRIVAL "), labelled(2, "refund?", "refund_NOT_showing_up"),
               labelled(3, "Where is my card?", "refund_not_showing_up"), labelled(4, "where is my  card?", "card_arrival"),
               labelled(5, "What?", "not_a_label")]
    result = validate_records(records, params)
    assert [(r.line, r.label) for r in result.accepted] == [(1, "card_arrival"), (2, "Refund_not_showing_up")]
    assert result.accepted[0].id == result.accepted[0].content_id() != records[0].id
    assert {r.line: (r.reason, r.detail) for r in result.quarantined} == {
        3: ("label_conflict", "same text as line 1 with another label ('Refund_not_showing_up' vs 'card_arrival')"),
        4: ("duplicate", "duplicate (after whitespace/case normalization) of line 1"),
        5: ("unknown_label", "label 'not_a_label' is not in the label vocabulary"),
    }


def test_without_a_vocabulary_any_non_empty_label_is_kept():
    records = [labelled(1, "a", "x"), labelled(2, "b", " Y "), labelled(3, "a", "z")]
    result = validate_records(records, LOOSE)
    assert [(r.line, r.label) for r in result.accepted] == [(1, "x"), (2, "Y")]
    assert [r.reason for r in result.quarantined] == ["label_conflict"]


def test_expectation_summary_and_gx_statistics():
    result = validate_records([sft(1, "question", "answer"), sft(2, "question", "answer")], LOOSE)
    assert result.gx_statistics["evaluated_expectations"] == len(load_suite()["expectations"])
    duplicate = next(e for e in result.expectations if e["reason"] == "duplicate")
    assert duplicate == {"expectation": "expect_column_values_to_be_null", "column": "dup_of", "reason": "duplicate",
                         "success": False, "unexpected_count": 1, "unexpected_percent": 50.0, "quarantined": 1}
    json.dumps(result.summary())


def test_data_docs_are_built_in_docs_dir(tmp_path):
    result = validate_records([sft(1, "question", "answer"), sft(2, "q", "")], LOOSE, docs_dir=tmp_path / "docs")
    assert result.docs_kind == "gx_data_docs" and Path(result.docs_path) == tmp_path / "docs" / "index.html"
    pages = list((tmp_path / "docs" / "validations").rglob("*.html"))
    assert len(pages) == 1 and "empty_field" in pages[0].read_text()


def test_standalone_report_when_data_docs_cannot_be_built(tmp_path, monkeypatch):
    monkeypatch.setattr(validate, "_build_data_docs", lambda context, docs_dir: None)
    result = validate_records([sft(1, "question", "answer"), sft(2, "q", "")], LOOSE, docs_dir=tmp_path)
    assert result.docs_kind == "html_report"
    page = Path(result.docs_path).read_text()
    assert "empty_field" in page and "messages[1].content" in page


def test_ingest_file_report(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"instruction": "Say hi.", "output": "Hi!"}\nnot json\n{"instruction": "Say hi.", "output": ""}\n')
    report = ingest_file(path, params=LOOSE)
    assert list(report) == ["format", "container", "read", "accepted", "quarantined", "reasons", "quarantined_rows"]
    assert (report["format"], report["container"], report["read"], report["accepted"], report["quarantined"]) == (
        "alpaca", "jsonl", 3, 1, 2)
    assert report["quarantined_rows"] == [
        {"line": 2, "reason": "malformed_json", "field": None, "detail": "Expecting value (column 1)"},
        {"line": 3, "reason": "empty_field", "field": "output", "detail": "output is empty or whitespace-only"},
    ]
    json.dumps(report)
