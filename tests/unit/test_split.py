from __future__ import annotations

import random

import pytest

from tuneline.data.split import find_leakage, normalize_text, sample_records, split_records
from tuneline.params import SplitParams
from tuneline.records import ChatRecord


def sft(prompt: str, answer: str, task: str = "t", line: int = 1) -> ChatRecord:
    return ChatRecord(kind="sft", messages=[{"role": "user", "content": prompt},
                                            {"role": "assistant", "content": answer}],
                      source="mem", line=line, task=task)


def pref(prompt: str, good: str, bad: str, task: str = "t") -> ChatRecord:
    return ChatRecord(kind="preference", messages=[{"role": "user", "content": prompt}], chosen=good,
                      rejected=bad, source="mem", line=1, task=task)


def corpus(n: int, offset: int = 0) -> list[ChatRecord]:
    return [sft(f"question number {i}", f"answer {i}", task=f"task{i % 3}", line=i) for i in range(offset, offset + n)]


def side(result, rec_id: str) -> str:
    for name, rows in result.splits.items():
        if any(r.id == rec_id for r in rows):
            return name
    raise KeyError(rec_id)


def test_split_is_deterministic_and_complete() -> None:
    records = corpus(500)
    a = split_records(records, SplitParams(), seed=1)
    b = split_records(list(reversed(records)), SplitParams(), seed=1)
    assert a.sha256() == b.sha256()
    assert sum(a.counts().values()) == 500
    assert 25 <= a.counts()["test"] <= 75 and 25 <= a.counts()["validation"] <= 75
    c = split_records(records, SplitParams(), seed=2)
    assert a.sha256() != c.sha256()


@pytest.mark.parametrize("stratify_by", [None, "task"])
def test_adding_data_never_moves_existing_rows(stratify_by) -> None:
    old = corpus(500)
    params = SplitParams(stratify_by=stratify_by)
    before = split_records(old, params, seed=3)
    # 20% new rows, in the existing strata and in a new one
    new = corpus(60, offset=1000) + [sft(f"fresh question {i}", "x", task="new_task") for i in range(40)]
    after = split_records(old + new, params, seed=3)
    moved = [r.id for r in old if side(before, r.id) != side(after, r.id)]
    assert moved == []


def test_same_prompt_stays_on_one_side_across_kinds_and_whitespace() -> None:
    records = corpus(200)
    twins = [sft("  QUESTION   number 7 ", "another answer"), pref("question number 7", "a", "b")]
    result = split_records(records + twins, SplitParams(), seed=5)
    sides = {side(result, r.id).removeprefix("preference_") for r in [records[7], *twins]}
    assert len(sides) == 1
    assert find_leakage(result.splits).ok


def test_leakage_is_detected() -> None:
    a, b = sft("What is 2+2?", "4"), sft("what is  2+2?", "four")
    report = find_leakage({"train": [a], "test": [b]})
    assert not report.ok and report.normalized and not report.exact
    report = find_leakage({"train": [a], "validation": [sft("What is 2+2?", "4")]})
    assert report.exact


def test_stratified_split_reports_each_stratum_and_cuts_it_by_its_own_draw() -> None:
    rng = random.Random(0)
    records = [sft(f"q{i}", "a", task="rare" if i < 40 else "common") for i in range(2000)]
    rng.shuffle(records)
    params = SplitParams(val_fraction=0.1, test_fraction=0.2, stratify_by="task")
    result = split_records(records, params, seed=9)
    assert sum(result.strata["rare"].values()) == 40
    common = result.strata["common"]
    assert sum(common.values()) == 1960 and 0.16 < common["test"] / 1960 < 0.24
    plain = split_records(records, SplitParams(val_fraction=0.1, test_fraction=0.2), seed=9)
    assert plain.strata == {} and result.sha256() != plain.sha256()  # the stratum salts the draw


def test_sampling_is_stable_and_proportional() -> None:
    records = corpus(1000)
    half = sample_records(records, 0.5, seed=1)
    assert 430 < len(half) < 570
    assert [r.id for r in half] == [r.id for r in sample_records(records, 0.5, seed=1)]
    assert {r.id for r in sample_records(records, 0.25, seed=1)} <= {r.id for r in half}


def test_normalize_text() -> None:
    assert normalize_text("  Hello\tWORLD \n") == "hello world"


def test_membership_rebuilds_each_split_byte_for_byte(tmp_path) -> None:
    """A reproduction rebuilds the splits from the archived records and the membership alone: the ids must keep
    the split's order (the trainers' batches follow it), not a sorted one."""
    import json

    from tuneline.data.split import SplitPlan, write_splits
    from tuneline.records import write_jsonl

    result = split_records(corpus(300), SplitParams(stratify_by="task"), seed=4)
    files = write_splits(SplitPlan(result=result), tmp_path / "orig")
    members = json.loads(files.membership.read_text())
    by_id = {r.id: r for rows in result.splits.values() for r in rows}
    shuffled = dict(random.Random(0).sample(sorted(by_id.items()), len(by_id)))  # archive order is arbitrary
    for name, ids in members.items():
        rebuilt = tmp_path / "rebuilt" / f"{name}.jsonl"
        write_jsonl(rebuilt, (shuffled[i].to_dict() for i in ids))
        assert rebuilt.read_bytes() == files.splits[name].read_bytes(), name
    assert members["train"] != sorted(members["train"])  # the stratified order is not the sorted one
