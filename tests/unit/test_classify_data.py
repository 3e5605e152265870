"""Classification data: the recipes' CSV schema (delimiter, header, columns), quarantine reasons naming file,
line and field, label coverage across splits, stratified leak-free splits of the real samples."""

from __future__ import annotations

from pathlib import Path

import pytest

from tuneline.data.ingest import IngestError, read_source
from tuneline.data.split import find_leakage, label_coverage_problems, plan_splits
from tuneline.data.validate import validate_records
from tuneline.params import DataSource, RecipeError, SplitParams, ValidationParams, load_recipe
from tuneline.records import ChatRecord

ROOT = Path(__file__).resolve().parents[2]
BANKING = DataSource(path="", format="csv", schema="classification", fields={"text": "text", "label": "category"})


def _source(path: Path, **kw) -> DataSource:
    base = dict(format="csv", schema="classification", fields={"text": "text", "label": "label"})
    base.update(kw)
    return DataSource(path=str(path), **base)


def test_bad_banking_rows_are_quarantined_with_file_line_and_field(shared_data: Path) -> None:
    path = shared_data / "bad" / "classification_banking77_bad.csv"
    recipe = load_recipe(ROOT / "configs" / "banking77.yaml")
    result = read_source(DataSource(path=str(path), format="csv", schema="classification",
                                    fields={"text": "text", "label": "category"}))
    v = validate_records(result.records, recipe.validation, parse_rejections=result.rejected)
    assert len(v.accepted) + len(v.quarantined) == result.read == 20  # nothing lost
    by_line = {q.line: q for q in v.quarantined}
    assert {line: by_line[line].reason for line in (2, 4, 6, 8, 12, 14, 18)} == {
        2: "empty_field", 4: "missing_column", 6: "unknown_label", 8: "extra_columns", 12: "label_conflict",
        14: "empty_field", 18: "empty_field"}
    assert by_line[6].field == "category" and "not_a_real_intent" in by_line[6].detail
    assert by_line[4].field == "category" and by_line[2].field == "text"
    assert all(q.source == str(path) for q in v.quarantined)
    accepted = {r.line: r for r in v.accepted}
    assert accepted[10].label == "card_arrival"  # " CARD_ARRIVAL " normalized to the vocabulary's spelling
    assert "\n" in accepted[16].prompt_text()  # a quoted text with a newline loads


def test_bad_sst2_labels(shared_data: Path) -> None:
    recipe = load_recipe(ROOT / "configs" / "sst2.yaml")
    path = shared_data / "bad" / "classification_sst2_bad.csv"
    result = read_source(_source(path, fields={"text": "sentence", "label": "label"}))
    v = validate_records(result.records, recipe.validation, parse_rejections=result.rejected)
    by_line = {q.line: q.reason for q in v.quarantined}
    assert by_line[2] == by_line[4] == by_line[6] == by_line[10] == "unknown_label"
    assert by_line[8] == "empty_field" and by_line[12] == "missing_column"
    assert len(v.accepted) + len(v.quarantined) == result.read


def test_semicolon_file_without_header(tmp_path: Path) -> None:
    path = tmp_path / "semi.csv"
    path.write_text("my card never came;card_arrival\nhow do I top up;top_up\n", encoding="utf-8")
    with pytest.raises(IngestError, match=r"semi\.csv.*';'-separated"):
        read_source(_source(path, fields={}, schema="auto"))
    result = read_source(_source(path, fields={}, delimiter=";", header=False, columns=("text", "label")))
    assert [(r.line, r.label) for r in result.records] == [(1, "card_arrival"), (2, "top_up")]


def test_unknown_label_column_and_bad_options(tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    path.write_text("text,category\nhello there,a\n", encoding="utf-8")
    with pytest.raises(IngestError, match=r"x\.csv: fields label -> 'intent': no such column"):
        read_source(_source(path, fields={"text": "text", "label": "intent"}))
    with pytest.raises(RecipeError, match="columns"):
        DataSource(path="x.csv", header=False)
    with pytest.raises(RecipeError, match="delimiter"):
        DataSource(path="x.csv", delimiter=";;")


def _rec(text: str, label: str, line: int) -> ChatRecord:
    return ChatRecord(kind="classification", messages=[{"role": "user", "content": text}], source="f.csv",
                      line=line, label=label)


def test_a_label_only_in_test_is_an_error() -> None:
    splits = {"train": [_rec("a", "x", 1)], "validation": [], "test": [_rec("b", "y", 7)]}
    problems = label_coverage_problems(splits)
    assert len(problems) == 1 and "'y'" in problems[0] and "f.csv line 7" in problems[0]
    records = [_rec(f"text {i}", "common", i) for i in range(40)] + [_rec("lonely text", "rare", 99)]
    params = SplitParams(val_fraction=0.0, test_fraction=0.5)
    seed = next(s for s in range(200) if plan_splits_raises(records, params, s))
    with pytest.raises(ValueError, match="label 'rare' appears only in the test split"):
        plan_splits(records, params, seed, new_sources=set(), replay_ratio=0.0, reference_size=5)


def plan_splits_raises(records, params, seed) -> bool:
    try:
        plan_splits(records, params, seed, new_sources=set(), replay_ratio=0.0, reference_size=5)
    except ValueError:
        return True
    return False


def test_real_banking_splits_are_stratified_and_leak_free(shared_data: Path) -> None:
    recipe = load_recipe(ROOT / "configs" / "banking77.yaml")
    result = read_source(DataSource(path=str(shared_data / "classification" / "banking77.csv"), format="csv",
                                    schema="classification", fields={"text": "text", "label": "category"}))
    v = validate_records(result.records, ValidationParams(labels=recipe.validation.labels, min_tokens=1))
    plan = plan_splits(v.accepted, recipe.split, recipe.seed, new_sources=set(), replay_ratio=0.0,
                       reference_size=10)
    assert find_leakage(plan.result.splits).ok
    assert len({r.label for r in plan.result.splits["train"]}) == 77
    assert len(plan.result.strata) == 77  # one stratum per label
