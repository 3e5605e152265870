"""Every deliberately defective file in shared/data/bad behaves as bad/defects.json says, line by line.

The expectations are derived from the JSON: each listed line's defect text says whether the line must
be quarantined (and for which reason), may be skipped (blank lines), or is acceptable (an optional
field, valid CSV, a label that only differs in case and spaces); unlisted lines are valid real rows
and must be accepted.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from tuneline.data.ingest import read_source
from tuneline.data.validate import validate_records
from tuneline.params import ValidationParams

ROOT = Path(__file__).resolve().parents[2]
SHARED_DATA = Path(os.environ.get("TUNELINE_SHARED_DATA", ROOT.parent / "shared" / "data")).resolve()
DEFECTS = SHARED_DATA / "bad" / "defects.json"

# Defect text -> what must happen to the line, first match wins.
SKIPPED = re.compile(r"\bblank line\b|whitespace-only line")
ACCEPTED = re.compile(r"optional|\(valid CSV|different case")  # coerced, valid, or normalized labels
REASONS = [
    (r"lone surrogate", "invalid_unicode"),
    (r"Latin-1|raw 0x[0-9A-F]{2}|truncated .*UTF-8", "invalid_utf8"),
    (r"trailing comma|repr|two JSON objects|raw \(unescaped\) newline|continuation of|comment line|truncated JSON",
     "malformed_json"),
    (r"row is (a )?JSON|bare JSON", "not_an_object"),
    (r"is an? (integer|list|object|float)|boolean", "wrong_type"),
    (r"missing \w+ column|single column", "missing_column"),
    (r"extra \w+ column", "extra_columns"),
    (r"missing key|empty object|only '\w+' present", "missing_field"),
    (r"is null|all fields null", "null_field"),
    (r"different prompts", "prompt_mismatch"),
    (r"identical to chosen", "chosen_equals_rejected"),
    (r"conflicting label", "label_conflict"),
    (r"duplicate", "duplicate"),
    (r"character", "too_long"),
    (r"unknown label|out of range|label -1|string name|as float", "unknown_label"),
    (r"empty|whitespace|newline\+tab", "empty_field"),
]


def _entries():
    if not DEFECTS.is_file():  # the shared_data fixture skips (or fails) with the reason
        return [pytest.param(None, None, id="shared-data-missing")]
    return sorted(json.loads(DEFECTS.read_text(encoding="utf-8")).items())


def _expected(defect: str) -> str:
    if SKIPPED.search(defect):
        return "skipped"
    if ACCEPTED.search(defect):
        return "accepted"
    return next((reason for pattern, reason in REASONS if re.search(pattern, defect)), "quarantined")


def _vocabulary(shared_data: Path, name: str) -> tuple[str, ...]:
    """Label vocabulary of the REAL file a classification defect file was made from."""
    for real in sorted((shared_data / "classification").glob("*.csv")):
        if real.stem in name:
            return tuple(sorted({r.label for r in read_source(real).records}))
    return ()


@pytest.mark.parametrize("name, spec", _entries())
def test_bad_file_behaves_as_documented(shared_data, name, spec):
    path = shared_data / "bad" / name
    source = read_source(path)
    params = ValidationParams(max_tokens=20000, labels=_vocabulary(shared_data, name), min_accepted=0)
    result = validate_records(source.records, params, parse_rejections=source.rejected, read=source.read)

    accepted = {r.line for r in result.accepted}
    quarantined = {r.line: r for r in result.quarantined}
    assert len(result.accepted) + len(result.quarantined) == result.read == source.read
    assert len(quarantined) == len(result.quarantined) and not accepted & set(quarantined)

    expected = {int(line): _expected(defect) for line, defect in spec["defects_by_line"].items()}
    for line in range(1, spec["physical_lines"] + 1):
        outcome = expected.get(line, "accepted")
        defect = spec["defects_by_line"].get(str(line), "valid row")
        if outcome == "skipped":
            assert line not in accepted and line not in quarantined, f"line {line} ({defect}) should be skipped"
        elif outcome == "accepted":
            assert line in accepted, f"line {line} ({defect}) was lost: {quarantined.get(line)}"
        else:
            assert line in quarantined, f"line {line} ({defect}) should be quarantined"
            rejection = quarantined[line]
            if outcome != "quarantined":
                assert rejection.reason == outcome, f"line {line} ({defect}): {rejection}"
            assert rejection.detail and rejection.source == str(path)
            rejection.raw.encode("utf-8")  # stored safely, whatever the bytes were
    skipped = sum(outcome == "skipped" for outcome in expected.values())
    assert result.read == spec["physical_lines"] - skipped


def test_wrong_types_are_never_coerced(shared_data):
    result = read_source(shared_data / "bad" / "sft_wrong_types.jsonl")
    assert {(r.line, r.field) for r in result.rejected if r.reason == "wrong_type"} == {
        (2, "instruction"), (4, "output"), (6, "input"), (8, "output"), (10, "output"), (18, "instruction")}
    assert all(isinstance(m["content"], str) for r in result.records for m in r.messages)


def test_missing_or_null_optional_input_defaults_to_empty(shared_data):
    for name, line in (("sft_missing_fields.jsonl", 8), ("sft_null_values.jsonl", 9)):
        (record,) = [r for r in read_source(shared_data / "bad" / name).records if r.line == line]
        assert "None" not in record.messages[0]["content"] and record.messages[0]["content"].strip()


def test_dedup_modes_on_the_duplicates_file(shared_data):
    source = read_source(shared_data / "bad" / "sft_duplicates.jsonl")

    def quarantined(dedup: str) -> dict[int, str]:
        result = validate_records(source.records, ValidationParams(max_tokens=20000, dedup=dedup, min_accepted=0))
        return {r.line: r.detail for r in result.quarantined}

    exact = quarantined("exact")
    assert sorted(exact) == [21, 22, 23, 24]  # 24 is the same object with keys reordered: equal content
    assert exact[21] == "exact duplicate of line 1" and exact[23] == "exact duplicate of line 5"
    normalized = quarantined("normalized")
    assert sorted(normalized) == [21, 22, 23, 24, 25] and normalized[25].endswith("of line 12")


def test_banking77_label_rules(shared_data):
    path = shared_data / "bad" / "classification_banking77_bad.csv"
    source = read_source(path)
    result = validate_records(source.records, ValidationParams(labels=_vocabulary(shared_data, path.name), min_accepted=0))
    by_line = {r.line: r for r in result.accepted}
    assert by_line[10].label == "card_arrival"  # " CARD_ARRIVAL " normalized to the vocabulary's spelling
    assert by_line[16].messages[0]["content"] == "Will I see the transfer in my account within the week?\nsecond line"
    (conflict,) = [r for r in result.quarantined if r.reason == "label_conflict"]
    assert (conflict.line, conflict.field) == (12, "category") and "line 1" in conflict.detail  # the file's own column name
    assert 1 in by_line  # the first labelling is kept
    without_vocabulary = validate_records(source.records, ValidationParams(min_accepted=0))
    assert {r.line for r in without_vocabulary.accepted} >= {6, 10}  # any non-empty label is fine then


def test_extremely_long_rows_are_dropped_quickly_even_with_a_tokenizer(shared_data):
    class Spy:  # a tokenizer that must never see a text above max_chars
        chat_template = None

        def encode(self, text):
            assert len(text) <= 20000
            return text.split()

    source = read_source(shared_data / "bad" / "sft_extremely_long.jsonl")
    result = validate_records(source.records, ValidationParams(max_tokens=20000, min_accepted=0), tokenizer=Spy())
    assert {r.line: r.reason for r in result.quarantined} == {2: "too_long", 4: "too_long", 5: "too_long"}
    assert all("not tokenized" in r.detail for r in result.quarantined)
