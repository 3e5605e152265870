"""The promotion gate: does the candidate beat the base model and the current champion?

The candidate must beat each baseline on the primary per-example metric by at least
``min_margin`` (mean paired difference), with the paired bootstrap interval of that difference
clear of zero, and must stay within the tolerances on secondary metrics (p50 latency,
preference accuracy). A tie fails; a missing champion leaves the base as the only baseline.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from tuneline.evaluate.metrics import paired_bootstrap_diff
from tuneline.params import GateParams

PER_EXAMPLE = {"task_accuracy": "correct", "exact_match": "exact_match", "rouge_l": "rouge_l", "loss": "loss"}
LOWER_IS_BETTER = {"loss"}


@dataclass
class GateDecision:
    passed: bool
    candidate: str
    baselines: list[str]
    reasons: list[str]  # why it failed (empty when it passed)
    evidence: dict[str, Any] = field(default_factory=dict)  # per baseline: gain, CI, secondary metrics

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        verdict = "PROMOTE" if self.passed else "REJECT"
        return f"{verdict} {self.candidate} vs {', '.join(self.baselines)}" + (
            f": {'; '.join(self.reasons)}" if self.reasons else ""
        )


def _scores(report: dict[str, Any], metric: str) -> tuple[list[str], list[float]]:
    per = report["per_example"]
    values = per.get(PER_EXAMPLE[metric])
    if values is None:
        raise ValueError(f"report {report.get('name')!r} has no per-example {metric} (no task checker was used)")
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0  # scores are "higher is better" from here on
    return list(per["ids"]), [sign * float(v) for v in values]


def _paired(candidate: dict, baseline: dict, metric: str) -> tuple[list[float], list[float]]:
    """Scores of both models on the examples both were evaluated on, in the same order."""
    c_ids, c_vals = _scores(candidate, metric)
    b_ids, b_vals = _scores(baseline, metric)
    b_map = dict(zip(b_ids, b_vals))
    pairs = [(c, b_map[i]) for i, c in zip(c_ids, c_vals) if i in b_map]
    if not pairs:
        raise ValueError(f"{candidate.get('name')} and {baseline.get('name')} share no evaluated example")
    return [c for c, _ in pairs], [b for _, b in pairs]


def decide(
    candidate: dict[str, Any],
    baselines: dict[str, Optional[dict[str, Any]]],
    params: GateParams,
    *,
    seed: int = 0,
) -> GateDecision:
    """Compare ``candidate`` (an evaluation report) with each non-None baseline report."""
    present = {name: rep for name, rep in baselines.items() if rep is not None}
    reasons: list[str] = []
    evidence: dict[str, Any] = {"primary_metric": params.primary_metric, "min_margin": params.min_margin,
                                "missing_baselines": sorted(set(baselines) - set(present))}
    if not present:
        return GateDecision(False, candidate.get("name", "candidate"), [], ["no baseline to compare with"], evidence)
    for name, base in present.items():
        a, b = _paired(candidate, base, params.primary_metric)
        gain, low, high = paired_bootstrap_diff(a, b, samples=params.bootstrap_samples,
                                                confidence=params.confidence, seed=seed)
        item: dict[str, Any] = {"n": len(a), "candidate_mean": sum(a) / len(a), "baseline_mean": sum(b) / len(b),
                                "gain": gain, "ci_low": low, "ci_high": high, "confidence": params.confidence}
        if gain < params.min_margin or gain <= 0:
            reasons.append(f"{params.primary_metric} gain over {name} is {gain:+.4f}, below the margin "
                           f"{params.min_margin:.4f}")
        if params.require_ci_above_zero and low <= 0:
            reasons.append(f"the {params.confidence:.0%} CI of the gain over {name} [{low:+.4f}, {high:+.4f}] "
                           "does not clear zero")
        c_lat, b_lat = candidate["latency_ms"]["p50"], base["latency_ms"]["p50"]
        item["latency_p50_ms"] = {"candidate": c_lat, "baseline": b_lat}
        if b_lat > 0 and c_lat > b_lat * (1 + params.max_latency_increase):
            reasons.append(f"p50 latency {c_lat:.1f} ms exceeds {name}'s {b_lat:.1f} ms by more than "
                           f"{params.max_latency_increase:.0%}")
        c_pref, b_pref = candidate.get("preference_accuracy"), base.get("preference_accuracy")
        if c_pref and b_pref:
            item["preference_accuracy"] = {"candidate": c_pref["mean"], "baseline": b_pref["mean"]}
            if c_pref["mean"] < b_pref["mean"] - params.max_preference_accuracy_drop:
                reasons.append(f"preference accuracy {c_pref['mean']:.3f} is more than "
                               f"{params.max_preference_accuracy_drop:.3f} below {name}'s {b_pref['mean']:.3f}")
        evidence[name] = item
    return GateDecision(not reasons, candidate.get("name", "candidate"), list(present), reasons, evidence)
