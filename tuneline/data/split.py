"""Deterministic, leak-free train/validation/test splits by content hash.

Every record is assigned through a *group key*: its normalized prompt. Records that share
a prompt (an SFT example and a preference pair on the same question, two answers to one
instruction) always land in the same split, so no prompt crosses a split boundary.

Default assignment is a fixed threshold on ``hash(seed, group)``: a group's split depends on
nothing but itself, so adding data never moves an existing row (in particular never a test row
into train). ``stratify_by`` instead ranks the groups of each stratum by that hash and cuts
exact shares per stratum; that balances small strata but a row can move when its stratum grows.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Optional

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


def _assign_stratified(groups: dict[str, float], params: SplitParams) -> dict[str, str]:
    ordered = sorted(groups, key=lambda g: (groups[g], g))
    n = len(ordered)
    n_test = round(n * params.test_fraction)
    n_val = round(n * params.val_fraction)
    out = {}
    for rank, g in enumerate(ordered):
        out[g] = "test" if rank < n_test else "validation" if rank < n_test + n_val else "train"
    return out


def split_records(records: list[ChatRecord], params: SplitParams, seed: int) -> SplitResult:
    """Assign each record (kinds sft, classification, preference) to a split."""
    keys = {r.id: group_key(r) for r in records}
    hashes = {k: unit_hash(seed, k) for k in set(keys.values())}

    if params.stratify_by is None:
        assignment = {k: _assign_threshold(u, params) for k, u in hashes.items()}
    else:
        stratum_of: dict[str, str] = {}
        for r in records:  # a group's stratum is that of its first record
            stratum_of.setdefault(keys[r.id], _stratum(r, params.stratify_by))
        by_stratum: dict[str, dict[str, float]] = defaultdict(dict)
        for k, s in stratum_of.items():
            by_stratum[s][k] = hashes[k]
        assignment = {}
        for groups in by_stratum.values():
            assignment.update(_assign_stratified(groups, params))

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


def _stratum(record: ChatRecord, by: str) -> str:
    value: Optional[str] = record.task if by == "task" else record.source
    return value or "(none)"


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
