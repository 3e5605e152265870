"""Deterministic, leak-free train/validation/test splits by content hash.

Every record is assigned through a *group key*: its normalized prompt. Records that share
a prompt (an SFT example and a preference pair on the same question, two answers to one
instruction) always land in the same split, so no prompt crosses a split boundary.

Assignment is a fixed threshold on ``hash(seed, group)``: a group's split depends on nothing but
itself, so adding data never moves an existing row (in particular never a test row into train).
``stratify_by`` keeps that rule and salts the hash with the group's stratum (its task or source), so
each stratum is cut by its own independent draw and the per-stratum shares are reported; it does not
force exact shares (ranking groups within a stratum would move rows as the stratum grows).
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

from tuneline.params import SplitParams
from tuneline.records import ChatRecord, canonical_json, sha256_text

SPLITS = ("train", "validation", "test")
_WS = re.compile(r"\s+")


def normalize_text(text: str) -> str:
    """Unicode-normalized, case-folded, whitespace-collapsed text (the near-duplicate key)."""
    return _WS.sub(" ", unicodedata.normalize("NFKC", text)).strip().casefold()


def group_key(record: ChatRecord) -> str:
    return normalize_text(record.prompt_text())


def unit_hash(seed: int, key: str, salt: str = "split") -> float:
    """A stable number in [0, 1) for (seed, key)."""
    digest = hashlib.sha256(f"{salt}:{seed}:{key}".encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def sample_records(records: list[ChatRecord], fraction: float, seed: int) -> list[ChatRecord]:
    """Keep a deterministic ``fraction`` of records (by id), stable as data is added."""
    if fraction >= 1.0:
        return list(records)
    return [r for r in records if unit_hash(seed, r.id, salt="sample") < fraction]


def _split_name(kind: str, split: str) -> str:
    return split if kind != "preference" else f"preference_{split}"


@dataclass
class SplitResult:
    """Records per split name (train/validation/test and preference_train/...)."""

    splits: dict[str, list[ChatRecord]]
    strata: dict[str, dict[str, int]] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        return {name: len(rows) for name, rows in self.splits.items()}

    def sha256(self) -> dict[str, str]:
        """Content hash per split: sha256 over the sorted record ids and contents."""
        return {name: split_sha256(rows) for name, rows in self.splits.items()}


def split_sha256(rows: Iterable[ChatRecord]) -> str:
    lines = sorted(canonical_json(r.content()) for r in rows)
    return sha256_text("\n".join(lines))


def _assign_threshold(u: float, params: SplitParams) -> str:
    if u < params.test_fraction:
        return "test"
    if u < params.test_fraction + params.val_fraction:
        return "validation"
    return "train"


def split_records(records: list[ChatRecord], params: SplitParams, seed: int) -> SplitResult:
    """Assign each record (kinds sft, classification, preference) to a split by its group's hash alone."""
    keys = {r.id: group_key(r) for r in records}
    stratum_of: dict[str, str] = {}
    if params.stratify_by is not None:
        for r in records:  # a group's stratum is that of its first record
            stratum_of.setdefault(keys[r.id], _stratum(r, params.stratify_by))
    assignment = {
        k: _assign_threshold(unit_hash(seed, k, salt=f"split:{stratum_of[k]}" if stratum_of else "split"), params)
        for k in set(keys.values())
    }

    splits: dict[str, list[ChatRecord]] = {}
    for kind in ("sft", "classification", "preference"):
        if any(r.kind == kind for r in records):
            for s in SPLITS:
                splits.setdefault(_split_name(kind, s), [])
    strata: dict[str, Counter] = defaultdict(Counter)
    for r in records:
        if r.kind == "text":
            continue
        split = assignment[keys[r.id]]
        splits[_split_name(r.kind, split)].append(r)
        if params.stratify_by is not None:
            strata[_stratum(r, params.stratify_by)][split] += 1
    for rows in splits.values():
        rows.sort(key=lambda r: (r.source, r.line, r.id))
    return SplitResult(splits=splits, strata={s: dict(c) for s, c in strata.items()})


def membership(splits: dict[str, list[ChatRecord]]) -> dict[str, list[str]]:
    """Record ids per split, in the split's order (the order the trainers read them, so a reproduction rebuilt
    from the ids sees the same batches): what an auditor checks a model's training data against."""
    return {name: [r.id for r in rows] for name, rows in splits.items()}


@dataclass
class SplitPlan:
    """The splits of a run, with a retrain's replay mix and the drift sensor's reference prompts."""

    result: SplitResult
    replay: Optional[dict] = None
    reference: list[str] = field(default_factory=list)

    def dataset_sha256(self) -> str:
        """One hash over every split's content hash."""
        hashes = self.result.sha256()
        return sha256_text("\n".join(f"{k}:{hashes[k]}" for k in sorted(hashes)))


@dataclass
class SplitFiles:
    """Where :func:`write_splits` put a plan."""

    splits: dict[str, Path]  # split name -> JSONL of records
    membership: Path  # JSON: split name -> record ids
    reference: Path  # JSONL of {"prompt": ...}: the drift reference


MEMBERSHIP_FILE = "membership.json"
REFERENCE_FILE = "drift_reference.jsonl"


def write_splits(plan: SplitPlan, out_dir: Path) -> SplitFiles:
    """Write each split, the membership (ids per split) and the drift reference under ``out_dir``."""
    import json

    from tuneline.records import write_jsonl

    paths = {}
    for name, rows in plan.result.splits.items():
        paths[name] = out_dir / f"{name}.jsonl"
        write_jsonl(paths[name], (row.to_dict() for row in rows))
    members = out_dir / MEMBERSHIP_FILE
    members.write_text(json.dumps(membership(plan.result.splits), indent=1) + "\n", encoding="utf-8")
    write_jsonl(out_dir / REFERENCE_FILE, ({"prompt": p} for p in plan.reference))
    return SplitFiles(splits=paths, membership=members, reference=out_dir / REFERENCE_FILE)


def log_splits(tracker: Any, run_id: str, plan: SplitPlan, files: SplitFiles, *, recipe_name: str) -> None:
    """Log the splits to the stage's MLflow run as named, hashed datasets, the membership as a
    content-addressed artifact, the counts and a retrain's replay mix; then close the run."""
    hashes = plan.result.sha256()
    for name, rows in plan.result.splits.items():
        tracker.log_dataset(run_id, [row.to_dict() for row in rows], name=f"{recipe_name}-{name}",
                            digest=hashes[name], source=str(files.splits[name]), context=name)
    tracker.log_metrics(run_id, {f"rows_{k}": v for k, v in plan.result.counts().items()})
    tracker.log_contents(run_id, {"membership": files.membership})
    if plan.replay is not None:
        tracker.log_dict(run_id, plan.replay, REPLAY_ARTIFACT)
    tracker.end_run(run_id)


REPLAY_ARTIFACT = "lineage/replay.json"  # logged on a retrain: new vs replayed train rows


def read_splits(ref: Any) -> dict[str, list[ChatRecord]]:
    """Every split of a :class:`~tuneline.refs.SplitsRef`, read back as records."""
    from tuneline import storage
    from tuneline.records import read_records

    return {name: read_records(storage.fetch(uri)) for name, uri in ref.uris.items()}


def plan_splits(records: list[ChatRecord], params: SplitParams, seed: int, *, new_sources: set[str],
                replay_ratio: float, reference_size: int) -> SplitPlan:
    """Split; on a retrain (records from ``new_sources``) train on the new rows plus a replay sample of the
    previous train rows; sample the drift reference from the train prompts (seeded: the split is ordered by
    source and line, so its first rows would hold one file or task family only)."""
    import random

    result = split_records(records, params, seed)
    problems = label_coverage_problems(result.splits)
    if problems:
        raise ValueError("dataset_splits: " + "; ".join(problems))
    replay = None
    if new_sources:
        from tuneline.monitoring.replay import mix_with_replay

        train = result.splits["train"]
        new = [rec for rec in train if rec.source in new_sources]
        previous = [rec for rec in train if rec.source not in new_sources]
        result.splits["train"], replay = mix_with_replay(new, previous, replay_ratio, seed)
    prompts = [rec.prompt_text() for rec in result.splits.get("train", [])]
    reference = random.Random(seed).sample(prompts, min(len(prompts), reference_size))
    return SplitPlan(result=result, replay=replay, reference=reference)


def _stratum(record: ChatRecord, by: str) -> str:
    value: Optional[str] = {"task": record.task, "source": record.source, "label": record.label}[by]
    return value or "(none)"


def label_coverage_problems(splits: dict[str, list[ChatRecord]], limit: int = 10) -> list[str]:
    """Classification labels that the train split never shows but validation or test does: a classifier
    cannot learn them, so each is an error naming the label and the file and line of its rows."""
    train = {r.label for r in splits.get("train", []) if r.kind == "classification"}
    problems = []
    for name in ("validation", "test"):
        unseen: dict[str, list[ChatRecord]] = defaultdict(list)
        for r in splits.get(name, []):
            if r.kind == "classification" and r.label not in train:
                unseen[str(r.label)].append(r)
        for label, rows in sorted(unseen.items()):
            where = ", ".join(f"{r.source} line {r.line}" for r in rows[:3])
            problems.append(f"label {label!r} appears only in the {name} split ({len(rows)} rows: {where}), never in "
                            "train: add training rows for it or drop it from the data and validation.labels")
    return problems[:limit]


@dataclass
class LeakageReport:
    exact: list[dict]  # same record content in two splits
    normalized: list[dict]  # same normalized prompt in two splits

    @property
    def ok(self) -> bool:
        return not self.exact and not self.normalized


def find_leakage(splits: dict[str, list[ChatRecord]], limit: int = 20) -> LeakageReport:
    """Exact and normalized-prompt overlap between the train, validation and test sides.

    Preference and SFT splits of the same side (e.g. ``train`` and ``preference_train``) may
    share prompts; any overlap between different sides is leakage.
    """
    side_of = {name: name.removeprefix("preference_") for name in splits}
    seen_exact: dict[str, str] = {}
    seen_norm: dict[str, str] = {}
    exact, normalized = [], []
    for name, rows in splits.items():
        side = side_of[name]
        for r in rows:
            e = canonical_json(r.content())
            n = group_key(r)
            if seen_exact.setdefault(e, side) != side and len(exact) < limit:
                exact.append({"id": r.id, "split": name, "also_in": seen_exact[e]})
            if seen_norm.setdefault(n, side) != side and len(normalized) < limit:
                normalized.append({"id": r.id, "split": name, "also_in": seen_norm[n], "prompt": n[:120]})
    return LeakageReport(exact=exact, normalized=normalized)
