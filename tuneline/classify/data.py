"""Texts and labels of classification records, the label set, and class weights."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence


class LabelError(ValueError):
    """Labels a model does not know, or a split without classification rows; the message names them."""


@dataclass(frozen=True)
class Examples:
    """Parallel texts and labels (the label as the data spells it)."""

    texts: tuple[str, ...]
    labels: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: Sequence[int]) -> "Examples":
        return Examples(tuple(self.texts[i] for i in indices), tuple(self.labels[i] for i in indices))


def examples_from_records(records: Iterable[Any], where: str = "split") -> Examples:
    """The classification records' texts and labels (other kinds are an error: a classifier needs labels)."""
    texts, labels = [], []
    for r in records:
        if r.kind != "classification" or r.label is None:
            raise LabelError(f"{where}: {r.source} line {r.line} is a {r.kind!r} record, not a labelled text")
        texts.append(r.prompt_text())
        labels.append(r.label)
    if not texts:
        raise LabelError(f"{where}: no classification rows")
    return Examples(tuple(texts), tuple(labels))


@dataclass(frozen=True)
class LabelSet:
    """The classes, in a fixed (sorted) order: index i is the model's output i."""

    names: tuple[str, ...]

    @classmethod
    def from_labels(cls, labels: Iterable[str]) -> "LabelSet":
        return cls(tuple(sorted(set(labels))))

    def __len__(self) -> int:
        return len(self.names)

    def encode(self, labels: Sequence[str], where: str = "data") -> list[int]:
        """Class indices; labels outside the set are an error naming them (first few) and their count."""
        index = {name: i for i, name in enumerate(self.names)}
        unknown = Counter(label for label in labels if label not in index)
        if unknown:
            shown = ", ".join(repr(k) for k, _ in unknown.most_common(5))
            raise LabelError(f"{where}: {sum(unknown.values())} rows have labels the model does not know ({shown}); "
                             f"it knows {len(self.names)}: {', '.join(self.names[:8])}{' ...' if len(self) > 8 else ''}")
        return [index[label] for label in labels]


def label_counts(labels: Iterable[str]) -> dict[str, int]:
    return dict(sorted(Counter(labels).items()))


def imbalance_ratio(counts: dict[str, int]) -> float:
    """Largest class count over the smallest (1.0 when balanced)."""
    values = [v for v in counts.values() if v > 0]
    return max(values) / min(values) if values else 1.0


IMBALANCED_RATIO = 1.5  # class_weights "auto": weighted loss when max/min class count exceeds this


def class_weights(counts: dict[str, int], labels: LabelSet, mode: str) -> Optional[list[float]]:
    """Per-class loss weights n / (K * n_c) ("balanced"), or None for an unweighted loss.

    ``auto`` weighs only when the largest class is more than ``IMBALANCED_RATIO`` times the smallest."""
    if mode == "none" or (mode == "auto" and imbalance_ratio(counts) <= IMBALANCED_RATIO):
        return None
    total = sum(counts.values())
    return [total / (len(labels) * max(1, counts.get(name, 0))) for name in labels.names]
