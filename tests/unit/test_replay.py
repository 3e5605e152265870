"""Replay on retrain: exact counts (nearest, halves up), deterministic choice, origins tagged, inputs untouched."""

from __future__ import annotations

import pytest

from tuneline.monitoring.replay import ids_sha256, mix_with_replay, replay_count
from tuneline.records import ChatRecord


def make(prefix: str, count: int) -> list[ChatRecord]:
    return [ChatRecord(kind="sft", source=f"{prefix}.jsonl", line=i + 1, meta={"k": i},
                       messages=[{"role": "user", "content": f"{prefix} question {i}"},
                                 {"role": "assistant", "content": f"{prefix} answer {i}"}])
            for i in range(count)]


NEW, OLD = make("new", 100), make("old", 1000)


@pytest.mark.parametrize("n_new, ratio, expected", [
    (100, 0.2, 25),  # 0.2 * 100 / 0.8 = 25 exactly (no float drift: 0.2 is read as 1/5)
    (100, 0.5, 100),
    (10, 0.3, 4),  # 4.2857 -> 4
    (7, 0.2, 2),  # 1.75 -> 2
    (3, 0.2, 1),  # 0.75 -> 1
    (2, 0.2, 1),  # 0.5 -> 1 (halves up)
    (1, 0.2, 0),  # 0.25 -> 0
    (100, 0.0, 0),
    (0, 0.5, 0),  # nothing new: nothing replayed
])
def test_replay_count_rounds_to_nearest_halves_up(n_new, ratio, expected):
    assert replay_count(n_new, ratio) == expected


@pytest.mark.parametrize("ratio", [0.1, 0.2, 0.25, 1 / 3, 0.5, 0.75])
def test_mix_hits_the_ratio_within_rounding(ratio):
    records, stats = mix_with_replay(NEW, OLD, ratio, seed=0)
    assert stats["new"] == len(NEW) and stats["replayed"] == replay_count(len(NEW), ratio)
    assert stats["total"] == len(records) == stats["new"] + stats["replayed"]
    achieved = stats["replayed"] / stats["total"]
    assert achieved == stats["ratio_actual"]
    assert abs(achieved - ratio) <= 0.5 / stats["total"] + 1e-12  # at most half a record off
    assert not stats["capped"]


def test_exact_ratio_when_it_divides():
    records, stats = mix_with_replay(NEW, OLD, 0.2, seed=1)
    assert (stats["new"], stats["replayed"], stats["total"]) == (100, 25, 125)
    assert stats["ratio_actual"] == 0.2


def test_origins_tagged_ids_kept_inputs_untouched():
    records, stats = mix_with_replay(NEW, OLD, 0.2, seed=0)
    origins = [r.meta["origin"] for r in records]
    assert origins == ["new"] * 100 + ["replay"] * 25
    assert [r.id for r in records[:100]] == [r.id for r in NEW]  # new rows first, in order
    assert {r.id for r in records[100:]} <= {r.id for r in OLD}
    assert all(r.meta["k"] is not None for r in records)  # other meta kept
    assert all("origin" not in r.meta for r in NEW + OLD)  # copies were tagged, not the inputs
    assert stats["ids_sha256"] == ids_sha256(records)
    records[0].messages[0]["content"] = "changed"
    assert NEW[0].messages[0]["content"] == "new question 0"


def test_deterministic_order_independent_and_seeded():
    first, stats = mix_with_replay(NEW, OLD, 0.2, seed=7)
    again, stats_again = mix_with_replay(NEW, OLD, 0.2, seed=7)
    shuffled, stats_shuffled = mix_with_replay(NEW, list(reversed(OLD)), 0.2, seed=7)
    other, stats_other = mix_with_replay(NEW, OLD, 0.2, seed=8)
    assert [r.to_dict() for r in first] == [r.to_dict() for r in again] and stats == stats_again
    assert stats_shuffled["replayed_ids_sha256"] == stats["replayed_ids_sha256"]  # order of old rows irrelevant
    assert stats_other["replayed_ids_sha256"] != stats["replayed_ids_sha256"]
    assert stats["ids_sha256"] == ids_sha256(first) and len(stats["ids_sha256"]) == 64
    assert stats["new_ids_sha256"] == ids_sha256(NEW)
    more, _ = mix_with_replay(NEW, OLD, 0.5, seed=7)  # a larger ratio replays a superset
    assert {r.id for r in first[100:]} <= {r.id for r in more[100:]}


def test_capped_and_no_self_replay():
    relabelled = NEW[:10]
    records, stats = mix_with_replay(NEW, OLD[:20] + relabelled + OLD[:5], 0.5, seed=0)
    assert stats["replay_wanted"] == 100 and stats["previous_candidates"] == 20  # duplicates and new ids left out
    assert stats["capped"] and stats["replayed"] == 20
    replayed_ids = [r.id for r in records if r.meta["origin"] == "replay"]
    assert len(set(replayed_ids)) == 20 and not set(replayed_ids) & {r.id for r in NEW}


def test_bad_ratio_is_refused():
    for ratio in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="ratio"):
            mix_with_replay(NEW, OLD, ratio, seed=0)
