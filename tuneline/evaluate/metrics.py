"""Text metrics and bootstrap confidence intervals: pure Python (numpy imported inside, for resampling).

- :func:`exact_match`: equality after normalization (case, whitespace, trailing punctuation).
- :func:`rouge_l`: ROUGE-L F1 from the longest common subsequence of word tokens.
- :func:`bootstrap_ci`: mean of a list with a percentile-bootstrap confidence interval.
- :func:`paired_bootstrap_diff`: mean of ``a - b`` over the same examples with its interval: the
  comparison a promotion gate makes between a candidate (``a``) and a baseline (``b``).
- :func:`percentile`: linear-interpolation percentile (numpy's default method).
"""

from __future__ import annotations

import math
import re
import string
from typing import Sequence

_TRAILING_PUNCT = string.punctuation + "\u2026\u3002\uff01\uff1f"  # ascii + ellipsis and CJK stops
_WORD = re.compile(r"\w+", re.UNICODE)
_CHUNK_CELLS = 2_000_000  # resample indices drawn per chunk (memory bound: 16 MB of int64)


def normalize_answer(text: str) -> str:
    """Lower case, whitespace collapsed to single spaces, trailing punctuation and spaces removed."""
    text = " ".join(str(text).lower().split())
    return text.rstrip(_TRAILING_PUNCT + " ").strip()


def exact_match(pred: str, ref: str) -> bool:
    """Whether ``pred`` equals ``ref`` once both are normalized (:func:`normalize_answer`)."""
    return normalize_answer(pred) == normalize_answer(ref)


def tokens(text: str) -> list[str]:
    """Lower-cased word tokens (runs of letters, digits and underscores); punctuation is dropped."""
    return _WORD.findall(str(text).lower())


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token sequences (O(len(a) * len(b)))."""
    if len(a) < len(b):
        a, b = b, a
    if not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0] * (len(b) + 1)
        for j, y in enumerate(b, start=1):
            cur[j] = prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1])
        prev = cur
    return prev[-1]


def rouge_l(pred: str, ref: str) -> float:
    """ROUGE-L F1 (beta = 1) over word tokens: 2PR / (P + R) with P = LCS/|pred|, R = LCS/|ref|.

    Two empty texts score 1.0; one empty text scores 0.0.
    """
    p, r = tokens(pred), tokens(ref)
    if not p and not r:
        return 1.0
    if not p or not r:
        return 0.0
    lcs = lcs_length(p, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation between closest ranks."""
    if not values:
        raise ValueError("percentile of an empty list")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"q must be within [0, 100], got {q}")
    ordered = sorted(float(v) for v in values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _bootstrap_means(values: Sequence[float], samples: int, seed: int) -> list[float]:
    """Means of ``samples`` resamples (with replacement, same size) of ``values``."""
    import numpy as np

    data = np.asarray(values, dtype=np.float64)
    n = data.shape[0]
    rng = np.random.default_rng(seed)
    per_chunk = max(1, _CHUNK_CELLS // n)
    means: list[float] = []
    done = 0
    while done < samples:
        k = min(per_chunk, samples - done)
        idx = rng.integers(0, n, size=(k, n))
        means.extend(data[idx].mean(axis=1).tolist())
        done += k
    return means


def _check(samples: int, confidence: float) -> None:
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def bootstrap_ci(
    values: Sequence[float], *, samples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """(mean, low, high): the sample mean and a percentile-bootstrap interval at ``confidence``.

    Deterministic for the same values and seed. The interval is clamped to contain the mean (it can
    fall just outside with few resamples of a skewed sample). Raises ValueError on an empty list.
    """
    _check(samples, confidence)
    if not values:
        raise ValueError("bootstrap_ci of an empty list")
    mean = math.fsum(float(v) for v in values) / len(values)
    if len(values) == 1:
        return mean, mean, mean
    means = _bootstrap_means(values, samples, seed)
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = percentile(means, tail), percentile(means, 100.0 - tail)
    return mean, min(low, mean), max(high, mean)


def paired_bootstrap_diff(
    a: Sequence[float], b: Sequence[float], *, samples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """(mean_diff, low, high) of ``a[i] - b[i]``, resampling examples (pairs stay together).

    ``a`` and ``b`` are per-example scores of two models on the same examples in the same order
    (e.g. candidate and baseline correctness). A low bound above 0 means ``a`` is better at
    ``confidence``; a high bound below 0 means it is worse.
    """
    if len(a) != len(b):
        raise ValueError(f"paired lists differ in length: {len(a)} vs {len(b)}")
    return bootstrap_ci([float(x) - float(y) for x, y in zip(a, b)], samples=samples, confidence=confidence, seed=seed)
