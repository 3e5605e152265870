"""Short/mid/long ensembles: members that read the text cut at different lengths, their probabilities averaged
with weights from the validation split (each member's validation macro-F1, normalized), reported against the
best single member."""

from __future__ import annotations

from typing import Any, Sequence


def validation_weights(scores: Sequence[float]) -> list[float]:
    """Weights proportional to each member's validation score (equal weights when every score is 0)."""
    clipped = [max(0.0, float(s)) for s in scores]
    total = sum(clipped)
    if not clipped:
        raise ValueError("an ensemble needs at least one member")
    return [1.0 / len(clipped)] * len(clipped) if total == 0 else [s / total for s in clipped]


def combine(member_probs: Sequence[Any], weights: Sequence[float]) -> Any:
    """The weighted mean of the members' (n, K) probabilities: every row sums to 1 again."""
    import numpy as np

    if len(member_probs) != len(weights) or not member_probs:
        raise ValueError(f"{len(member_probs)} members but {len(weights)} weights")
    shapes = {np.shape(p) for p in member_probs}
    if len(shapes) != 1:
        raise ValueError(f"members disagree on the shape of their probabilities: {sorted(shapes)}")
    w = np.asarray(weights, dtype=np.float64)
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError("ensemble weights must be >= 0 with a positive sum")
    stacked = np.stack([np.asarray(p, dtype=np.float64) for p in member_probs])
    mixed = np.tensordot(w / w.sum(), stacked, axes=1)
    return mixed / mixed.sum(axis=1, keepdims=True)
