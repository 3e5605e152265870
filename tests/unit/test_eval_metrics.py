"""Evaluation metrics on fixed inputs with hand-computed answers."""

from __future__ import annotations

import math
import random

import pytest

from tuneline.evaluate.metrics import (
    bootstrap_ci,
    exact_match,
    lcs_length,
    normalize_answer,
    paired_bootstrap_diff,
    percentile,
    rouge_l,
)


@pytest.mark.parametrize(
    ("pred", "ref", "expected"),
    [
        ("Paris.", "paris", True),  # case and trailing punctuation
        ("  The   cat\n", "the cat!", True),  # whitespace collapsed
        ("11", "11", True),
        ("Tuesday?!", "tuesday", True),
        ("cat", "cats", False),
        ("1 2", "12", False),  # spaces inside are kept (collapsed, not removed)
        ("a.b", "ab", False),  # only trailing punctuation goes
        ("", "", True),
        ("", "x", False),
    ],
)
def test_exact_match(pred: str, ref: str, expected: bool) -> None:
    assert exact_match(pred, ref) is expected


def test_normalize_answer() -> None:
    assert normalize_answer("  Hello,   World...  ") == "hello, world"


def test_lcs_length() -> None:
    assert lcs_length("ABCBDAB", "BDCABA") == 4  # the textbook example (BCBA)
    assert lcs_length([], ["a"]) == 0


@pytest.mark.parametrize(
    ("pred", "ref", "expected"),
    [
        # LCS "the cat on the mat" = 5 of 6 and 6 tokens: P = R = 5/6
        ("the cat sat on the mat", "the cat is on the mat", 5 / 6),
        # LCS "a c" = 2: P = 2/4, R = 2/2 -> F = 2 * .5 * 1 / 1.5
        ("a b c d", "a c", 2 / 3),
        # order matters: LCS 1 of 2 and 2
        ("cat sat", "sat cat", 0.5),
        ("Cat, sat!", "cat sat", 1.0),  # case and punctuation ignored
        ("dog", "cat", 0.0),
        ("", "", 1.0),
        ("", "cat", 0.0),
        ("cat", "", 0.0),
    ],
)
def test_rouge_l(pred: str, ref: str, expected: float) -> None:
    assert rouge_l(pred, ref) == pytest.approx(expected)


def test_percentile_matches_linear_interpolation() -> None:
    assert percentile([4, 1, 3, 2], 50) == pytest.approx(2.5)
    assert percentile([1, 2, 3, 4], 0) == 1
    assert percentile([1, 2, 3, 4], 100) == 4
    assert percentile(list(range(1, 101)), 95) == pytest.approx(95.05)  # numpy's default gives the same
    assert percentile([7.0], 95) == 7.0
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1], 101)


def test_bootstrap_ci_contains_mean_and_narrows_with_more_data() -> None:
    small = [0.0, 1.0] * 10  # n = 20, mean 0.5
    big = [0.0, 1.0] * 200  # n = 400, mean 0.5
    mean_s, low_s, high_s = bootstrap_ci(small, samples=2000, seed=1)
    mean_b, low_b, high_b = bootstrap_ci(big, samples=2000, seed=1)
    assert mean_s == mean_b == 0.5
    assert low_s < 0.5 < high_s and low_b < 0.5 < high_b
    assert high_b - low_b < (high_s - low_s) / 2  # width shrinks like 1/sqrt(n): sqrt(20) ~ 4.5x narrower
    # binomial standard error at n = 20 is 0.112: a 95% interval is about +-0.22
    assert 0.3 < high_s - low_s < 0.6
    assert bootstrap_ci(small, samples=2000, seed=1) == (mean_s, low_s, high_s)  # deterministic


def test_bootstrap_ci_edge_cases() -> None:
    assert bootstrap_ci([1.0] * 30) == (1.0, 1.0, 1.0)
    assert bootstrap_ci([0.25]) == (0.25, 0.25, 0.25)
    mean, low, high = bootstrap_ci([0.0, 1.0] * 20, confidence=0.5)
    _, low95, high95 = bootstrap_ci([0.0, 1.0] * 20, confidence=0.95)
    assert low95 <= low <= mean <= high <= high95
    with pytest.raises(ValueError):
        bootstrap_ci([])
    with pytest.raises(ValueError):
        bootstrap_ci([1.0, 0.0], confidence=1.0)


def test_paired_bootstrap_diff_sign() -> None:
    rng = random.Random(0)
    baseline = [1.0 if rng.random() < 0.4 else 0.0 for _ in range(200)]
    # the candidate fixes about half of the baseline's misses and keeps every hit
    candidate = [1.0 if b or rng.random() < 0.5 else 0.0 for b in baseline]
    diff, low, high = paired_bootstrap_diff(candidate, baseline, seed=3)
    assert diff == pytest.approx(sum(candidate) / 200 - sum(baseline) / 200)
    assert 0 < low <= diff <= high
    neg, low_n, high_n = paired_bootstrap_diff(baseline, candidate, seed=3)
    assert neg == pytest.approx(-diff) and high_n < 0
    same = paired_bootstrap_diff(baseline, baseline)
    assert same == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError):
        paired_bootstrap_diff([1.0], [1.0, 0.0])


def test_pairing_is_tighter_than_independent_intervals() -> None:
    # two models that agree on most examples: the paired interval is much narrower than the
    # difference of two independent intervals would suggest
    rng = random.Random(5)
    a = [1.0 if rng.random() < 0.6 else 0.0 for _ in range(300)]
    b = [x if rng.random() < 0.95 else 1.0 - x for x in a]
    _, low, high = paired_bootstrap_diff(a, b, seed=0)
    _, la, ha = bootstrap_ci(a, seed=0)
    assert high - low < ha - la
    assert all(math.isfinite(v) for v in (low, high))
