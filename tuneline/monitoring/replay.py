"""Replay on retrain: mix newly labelled rows with a sample of the previous training data.

Fine-tuning only on the drifted traffic makes a model forget what it could do before; replaying a
share of the old training set keeps it. :func:`mix_with_replay` returns the new records plus a
deterministic sample of the previous ones such that ``replayed / (new + replayed) ≈ ratio``.

**How many.** The exact solution is ``r* = ratio * new / (1 - ratio)`` (``ratio`` read as the decimal
it is written as, so 0.2 is exactly 1/5); the count replayed is ``r*`` rounded to the nearest integer,
halves up, then capped at the number of previous records available (``stats["capped"]`` says so).
Without new rows nothing is replayed.

**Which ones.** Candidates are the previous records whose id is not among the new records' ids (a
row that is labelled again is not replayed on top of itself), one per id. They are ranked by
``sha256(f"{seed}:{id}")`` and the first ``r`` are taken: the choice depends only on the seed and the
set of ids, not on their order, and a larger ratio replays a superset of a smaller one.

Each output record is a copy whose ``meta["origin"]`` is ``"new"`` or ``"replay"`` (ids do not
change: they hash content, not meta). The output is the new records in their order, then the
replayed ones in rank order.
"""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction
from typing import Any, Sequence

from tuneline.records import ChatRecord, sha256_text


def replay_count(n_new: int, ratio: float) -> int:
    """``ratio * n_new / (1 - ratio)`` rounded to the nearest integer (halves up), uncapped."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"replay ratio must be in [0, 1), got {ratio!r}")
    exact = Fraction(repr(float(ratio)))
    return math.floor(exact * n_new / (1 - exact) + Fraction(1, 2))


def ids_sha256(records: Sequence[ChatRecord]) -> str:
    """sha256 of the records' ids, one per line, in order."""
    return sha256_text("\n".join(r.id for r in records))


def mix_with_replay(
    new_records: Sequence[ChatRecord],
    previous_train_records: Sequence[ChatRecord],
    ratio: float,
    seed: int,
) -> tuple[list[ChatRecord], dict[str, Any]]:
    """(new + replayed records, stats); see the module docstring for the count, choice and tags."""
    wanted = replay_count(len(new_records), ratio)
    new_ids = {r.id for r in new_records}
    candidates: dict[str, ChatRecord] = {}
    for record in previous_train_records:
        if record.id not in new_ids:
            candidates.setdefault(record.id, record)
    ranked = sorted(candidates.values(), key=lambda r: sha256_text(f"{seed}:{r.id}"))
    replayed = ranked[:wanted]

    new_out = [_tagged(r, "new") for r in new_records]
    replay_out = [_tagged(r, "replay") for r in replayed]
    records = new_out + replay_out
    total = len(records)
    stats = {
        "new": len(new_out),
        "replayed": len(replay_out),
        "total": total,
        "ratio_target": ratio,
        "ratio_actual": len(replay_out) / total if total else 0.0,
        "replay_wanted": wanted,
        "previous": len(previous_train_records),
        "previous_candidates": len(candidates),
        "capped": wanted > len(candidates),
        "rounding": "nearest, halves up; capped at the candidates",
        "seed": seed,
        "new_ids_sha256": ids_sha256(new_out),
        "replayed_ids_sha256": ids_sha256(replay_out),
        "ids_sha256": ids_sha256(records),
    }
    return records, stats


def _tagged(record: ChatRecord, origin: str) -> ChatRecord:
    return dataclasses.replace(record, messages=[dict(m) for m in record.messages],
                               meta={**record.meta, "origin": origin})
