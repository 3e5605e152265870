"""The promotion gate: does the candidate beat the base model and the current champion, and not fall
behind the stage it came from?

The candidate must beat each baseline on the primary per-example metric by at least
``min_margin`` (mean paired difference), with the paired bootstrap interval of that difference
clear of zero, and must stay within the tolerances on secondary metrics (p50 latency,
preference accuracy). A tie fails; a missing champion leaves the base as the only baseline. Against
its *parent* (the SFT model a DPO candidate came from, the DPO teacher of a student) the candidate only
has to hold its ground: its mean may trail the parent's by at most ``max_parent_regression``.
Examples with no per-example value on either side (an answer no checker could score, a record whose
answer tokens were all cut) are left out of the comparison and counted.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Optional

from tuneline.evaluate.metrics import paired_bootstrap_diff
from tuneline.params import GateParams

if TYPE_CHECKING:
    from tuneline.refs import GateRef

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


def _scores(report: dict[str, Any], metric: str) -> tuple[list[str], list[Optional[float]]]:
    per = report["per_example"]
    values = per.get(PER_EXAMPLE[metric])
    if values is None:
        raise ValueError(f"report {report.get('name')!r} has no per-example {metric} (no task checker was used)")
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0  # scores are "higher is better" from here on
    return list(per["ids"]), [None if v is None else sign * float(v) for v in values]


def _paired(candidate: dict, baseline: dict, metric: str) -> tuple[list[float], list[float], int]:
    """Scores of both models on the examples both have a value for, in the same order; and how many of
    the shared examples were skipped for a missing value."""
    c_ids, c_vals = _scores(candidate, metric)
    b_ids, b_vals = _scores(baseline, metric)
    b_map = dict(zip(b_ids, b_vals))
    shared = [(c, b_map[i]) for i, c in zip(c_ids, c_vals) if i in b_map]
    pairs = [(c, b) for c, b in shared if c is not None and b is not None]
    if not pairs:
        raise ValueError(f"{candidate.get('name')} and {baseline.get('name')} share no example with a "
                         f"{metric} value on both sides")
    return [c for c, _ in pairs], [b for _, b in pairs], len(shared) - len(pairs)


def decide(
    candidate: dict[str, Any],
    baselines: dict[str, Optional[dict[str, Any]]],
    params: GateParams,
    *,
    seed: int = 0,
    parent: Optional[dict[str, Any]] = None,
) -> GateDecision:
    """Compare ``candidate`` (an evaluation report) with each non-None baseline report, and with ``parent``."""
    present = {name: rep for name, rep in baselines.items() if rep is not None}
    reasons: list[str] = []
    evidence: dict[str, Any] = {"primary_metric": params.primary_metric, "min_margin": params.min_margin,
                                "missing_baselines": sorted(set(baselines) - set(present))}
    if not present:
        return GateDecision(False, candidate.get("name", "candidate"), [], ["no baseline to compare with"], evidence)
    for name, base in present.items():
        a, b, skipped = _paired(candidate, base, params.primary_metric)
        gain, low, high = paired_bootstrap_diff(a, b, samples=params.bootstrap_samples,
                                                confidence=params.confidence, seed=seed)
        item: dict[str, Any] = {"n": len(a), "skipped_missing": skipped, "candidate_mean": sum(a) / len(a),
                                "baseline_mean": sum(b) / len(b), "gain": gain, "ci_low": low, "ci_high": high,
                                "confidence": params.confidence}
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
    if parent is not None:
        a, b, skipped = _paired(candidate, parent, params.primary_metric)
        gain = sum(a) / len(a) - sum(b) / len(b)
        trails = gain < -params.max_parent_regression  # promotion() hands such a candidate's place to its parent
        evidence["parent"] = {"name": parent.get("name"), "n": len(a), "skipped_missing": skipped,
                              "candidate_mean": sum(a) / len(a), "parent_mean": sum(b) / len(b), "gain": gain,
                              "max_regression": params.max_parent_regression, "trails": trails}
        if trails:
            reasons.append(f"{params.primary_metric} is {-gain:.4f} worse than its parent {parent.get('name')} "
                           f"(at most {params.max_parent_regression:.4f} allowed): the last stage made it worse")
    return GateDecision(not reasons, candidate.get("name", "candidate"), list(present), reasons, evidence)


# report name of a model -> report name of its parent stage; the aligned model that alignment.method names (dpo,
# rloo or grpo: the gate's "teacher") has the SFT model as its parent
PARENTS = {"student": "dpo", "dpo": "sft", "sft": None}


def promotion(report: dict[str, Any], params: GateParams, *, seed: int, champion_version: Optional[int],
              stages: dict[str, str], teacher: str = "dpo") -> "GateRef":
    """The gate's decision on an evaluation report (``tuneline.recipes.evaluate``): the recipe's candidate
    against the base model, the champion (when evaluated) and its parent stage. ``teacher`` is the report name of
    the aligned model a ``teacher`` candidate means (``alignment.method``: dpo, rloo or grpo).

    A candidate that trails its parent beyond ``max_parent_regression`` is refused, and with
    ``fall_back_to_parent`` (the default) its parent stands in: judged by the same rules against the same
    baselines (and its own parent), so the chain's best stage that passes is registered, never a worse one. The
    refused candidates, with their reasons and evidence, stay in ``evidence["refused_candidates"]``."""
    from tuneline.params import to_plain
    from tuneline.refs import GateRef

    parents = {**PARENTS, teacher: "sft"}
    name = teacher if params.candidate == "teacher" else params.candidate
    parent = parents[name]
    models = report["models"]
    if name not in models:
        raise ValueError(f"gate.candidate {params.candidate!r} needs the {name!r} model, which was not evaluated")
    baselines = {"base": models.get("base"), "champion": models.get("champion")}
    refused: list[dict[str, Any]] = []
    while True:
        decision = decide(models[name], baselines, params, seed=seed, parent=models.get(parent) if parent else None)
        trails = decision.evidence.get("parent", {}).get("trails", False)
        if decision.passed or not (params.fall_back_to_parent and trails):
            break
        refused.append({"candidate": name, "reasons": decision.reasons, "evidence": decision.evidence})
        name, parent = parent, parents[parent]
    evidence = {**decision.evidence, **({"refused_candidates": refused} if refused else {})}
    return GateRef(passed=decision.passed, candidate=name, candidate_stage=stages[name],
                   baselines=tuple(decision.baselines), reasons=tuple(decision.reasons), evidence=evidence,
                   policy=to_plain(params), champion_version=champion_version)


def classifier_promotion(y_true: list[int], candidate: dict[str, Any], params: GateParams, *, k: int, seed: int,
                         champion: Optional[dict[str, Any]] = None, floor: Optional[dict[str, Any]] = None,
                         champion_version: Optional[int] = None, stage: str = "classifier_model") -> "GateRef":
    """The gate for classifiers, on test macro-F1: the candidate must beat the champion (when there is one) by
    ``min_margin`` with the paired-bootstrap CI of the macro-F1 difference clear of zero (both scored on the
    same resamples), within the latency tolerance (p50 at batch 1); and it may trail the ``floor`` (the linear
    probe, the way a stage may trail its parent) by at most ``max_parent_regression``. Each report holds
    ``name``, ``predictions`` (class indices in the same test order), ``macro_f1`` and optionally ``latency``."""
    from tuneline.classify.metrics import paired_macro_f1_diff
    from tuneline.params import to_plain
    from tuneline.refs import GateRef

    reasons: list[str] = []
    evidence: dict[str, Any] = {"primary_metric": "macro_f1", "min_margin": params.min_margin,
                                "candidate_macro_f1": candidate["macro_f1"], "n": len(y_true)}
    baselines: list[str] = []
    if champion is not None:
        baselines.append("champion")
        gain, low, high = paired_macro_f1_diff(y_true, candidate["predictions"], champion["predictions"], k,
                                               samples=params.bootstrap_samples, confidence=params.confidence,
                                               seed=seed)
        item: dict[str, Any] = {"candidate_mean": candidate["macro_f1"], "baseline_mean": champion["macro_f1"],
                                "gain": gain, "ci_low": low, "ci_high": high, "confidence": params.confidence}
        if gain < params.min_margin or gain <= 0:
            reasons.append(f"macro_f1 gain over champion is {gain:+.4f}, below the margin {params.min_margin:.4f}")
        if params.require_ci_above_zero and low <= 0:
            reasons.append(f"the {params.confidence:.0%} CI of the macro_f1 gain over champion [{low:+.4f}, "
                           f"{high:+.4f}] does not clear zero")
        c_lat = (candidate.get("latency") or {}).get("batch_1", {}).get("p50_ms")
        b_lat = (champion.get("latency") or {}).get("batch_1", {}).get("p50_ms")
        if c_lat is not None and b_lat:
            item["latency_p50_ms"] = {"candidate": c_lat, "baseline": b_lat}
            if c_lat > b_lat * (1 + params.max_latency_increase):
                reasons.append(f"p50 latency {c_lat:.1f} ms exceeds champion's {b_lat:.1f} ms by more than "
                               f"{params.max_latency_increase:.0%}")
        evidence["champion"] = item
    else:
        evidence["missing_baselines"] = ["champion"]
    if floor is not None:
        gain = candidate["macro_f1"] - floor["macro_f1"]
        evidence["parent"] = {"name": floor.get("name", "probe"), "candidate_mean": candidate["macro_f1"],
                              "parent_mean": floor["macro_f1"], "gain": gain,
                              "max_regression": params.max_parent_regression}
        if gain < -params.max_parent_regression:
            reasons.append(f"macro_f1 is {-gain:.4f} below the {floor.get('name', 'probe')} floor "
                           f"(at most {params.max_parent_regression:.4f} allowed)")
    return GateRef(passed=not reasons, candidate=candidate.get("name", "classifier"), candidate_stage=stage,
                   baselines=tuple(baselines), reasons=tuple(reasons), evidence=evidence, policy=to_plain(params),
                   champion_version=champion_version)
