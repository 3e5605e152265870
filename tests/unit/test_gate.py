from __future__ import annotations

from tuneline.evaluate.gate import decide, promotion
from tuneline.params import GateParams


def report(name: str, correct: list[int], p50: float = 10.0, pref: float = 0.8) -> dict:
    return {
        "name": name,
        "per_example": {"ids": [f"x{i}" for i in range(len(correct))], "correct": correct,
                        "exact_match": correct, "rouge_l": [float(c) for c in correct],
                        "loss": [2.0 - c for c in correct]},
        "latency_ms": {"p50": p50},
        "preference_accuracy": {"mean": pref},
    }


GOOD = [1] * 80 + [0] * 20
BASE = [1] * 30 + [0] * 70


def test_clear_winner_without_champion_passes_and_says_so() -> None:
    d = decide(report("dpo", GOOD), {"base": report("base", BASE), "champion": None}, GateParams())
    assert d.passed, d.reasons
    assert d.baselines == ["base"] and d.evidence["missing_baselines"] == ["champion"]
    assert d.evidence["base"]["gain"] > 0.4 and d.evidence["base"]["ci_low"] > 0


def test_tie_fails() -> None:
    d = decide(report("dpo", GOOD), {"base": report("base", BASE), "champion": report("champ", GOOD)}, GateParams())
    assert not d.passed
    assert any("gain over champion is +0.0000" in r for r in d.reasons)


def test_gain_below_margin_fails_even_if_positive() -> None:
    champ = GOOD[:]
    champ[0] = 0  # the candidate is better on one example out of 100
    d = decide(report("dpo", GOOD), {"champion": report("champ", champ)}, GateParams(min_margin=0.05))
    assert not d.passed and any("below the margin" in r for r in d.reasons)


def test_ci_crossing_zero_fails() -> None:
    noisy_candidate = [1, 0] * 10
    noisy_base = [0, 1] * 9 + [0, 0]  # candidate +0.05 on average, but the pairs disagree everywhere
    d = decide(report("dpo", noisy_candidate), {"base": report("base", noisy_base)},
               GateParams(min_margin=0.0))
    assert d.evidence["base"]["gain"] > 0 and d.evidence["base"]["ci_low"] <= 0
    assert not d.passed and any("does not clear zero" in r for r in d.reasons)


def test_secondary_metric_regressions_fail() -> None:
    slow = decide(report("dpo", GOOD, p50=30.0), {"base": report("base", BASE, p50=10.0)}, GateParams())
    assert not slow.passed and any("latency" in r for r in slow.reasons)
    worse_pref = decide(report("dpo", GOOD, pref=0.5), {"base": report("base", BASE, pref=0.8)}, GateParams())
    assert not worse_pref.passed and any("preference accuracy" in r for r in worse_pref.reasons)


def test_no_baseline_at_all_fails() -> None:
    d = decide(report("dpo", GOOD), {"base": None}, GateParams())
    assert not d.passed and d.reasons == ["no baseline to compare with"]


def test_loss_as_primary_metric_rewards_lower_loss() -> None:
    params = GateParams(primary_metric="loss", min_margin=0.1)
    better = decide(report("dpo", GOOD), {"base": report("base", BASE)}, params)
    assert better.passed and better.evidence["base"]["gain"] > 0.4
    worse = decide(report("dpo", BASE), {"base": report("base", GOOD)}, params)
    assert not worse.passed and worse.evidence["base"]["gain"] < 0


def test_candidate_worse_than_its_parent_is_refused() -> None:
    parent = [1] * 82 + [0] * 18  # the SFT parent scores 0.82, the DPO candidate 0.80
    d = decide(report("dpo", GOOD), {"base": report("base", BASE)}, GateParams(), parent=report("sft", parent))
    assert not d.passed and any("worse than its parent sft" in r for r in d.reasons)
    assert d.evidence["parent"]["gain"] < 0 and d.evidence["parent"]["trails"] is True
    tolerant = decide(report("dpo", GOOD), {"base": report("base", BASE)}, GateParams(max_parent_regression=0.05),
                      parent=report("sft", parent))
    assert tolerant.passed, tolerant.reasons


def test_examples_without_a_value_are_skipped_and_counted() -> None:
    candidate = report("dpo", GOOD)
    candidate["per_example"]["correct"] = [None] * 10 + GOOD[10:]
    d = decide(candidate, {"base": report("base", BASE)}, GateParams())
    assert d.evidence["base"]["n"] == 90 and d.evidence["base"]["skipped_missing"] == 10


STAGES = {"base": "base_model", "sft": "sft_adapter", "dpo": "dpo_adapter", "student": "distilled_student"}


def test_a_candidate_trailing_its_parent_hands_over_to_the_parent() -> None:
    sft = [1] * 82 + [0] * 18  # DPO (GOOD, 0.80) trails its SFT parent by 2 examples, as the demo's did
    models = {"base": report("base", BASE), "sft": report("sft", sft), "dpo": report("dpo", GOOD)}
    gate = promotion({"models": models}, GateParams(), seed=0, champion_version=None, stages=STAGES)
    assert gate.passed and gate.candidate == "sft" and gate.candidate_stage == "sft_adapter", gate.summary()
    [refused] = gate.evidence["refused_candidates"]
    assert refused["candidate"] == "dpo" and "worse than its parent sft" in refused["reasons"][0]
    assert gate.evidence["base"]["candidate_mean"] == 0.82 and "parent" not in gate.evidence  # SFT's own evidence
    assert "PROMOTE sft vs base (in place of dpo, refused: task_accuracy is 0.0200 worse" in gate.summary()

    strict = promotion({"models": models}, GateParams(fall_back_to_parent=False), seed=0, champion_version=None,
                       stages=STAGES)
    assert not strict.passed and strict.candidate == "dpo" and "refused_candidates" not in strict.evidence
    # RLOO as the teacher (alignment.method: rloo) hands over to SFT the same way
    rloo = promotion({"models": {**models, "rloo": report("rloo", GOOD)}}, GateParams(), seed=0,
                     champion_version=None, stages={**STAGES, "rloo": "rl_policy"}, teacher="rloo")
    assert rloo.passed and rloo.candidate == "sft" and rloo.evidence["refused_candidates"][0]["candidate"] == "rloo"


def test_the_parent_that_stands_in_is_judged_by_every_rule() -> None:
    # a student trailing DPO, which trails SFT, which is no better than the base: down the chain, and nothing passes
    models = {"base": report("base", GOOD), "sft": report("sft", GOOD), "dpo": report("dpo", [1] * 79 + [0] * 21),
              "student": report("student", BASE)}
    gate = promotion({"models": models}, GateParams(candidate="student"), seed=0, champion_version=None,
                     stages=STAGES)
    assert not gate.passed and gate.candidate == "sft"
    assert [r["candidate"] for r in gate.evidence["refused_candidates"]] == ["student", "dpo"]
    assert any("gain over base is +0.0000" in r for r in gate.reasons)
    # refused for another reason than its parent (the margin over the base), the candidate keeps the decision
    models["sft"] = report("sft", [1] * 60 + [0] * 40)
    models["dpo"] = report("dpo", [1] * 61 + [0] * 39)
    gate = promotion({"models": models}, GateParams(), seed=0, champion_version=None, stages=STAGES)
    assert not gate.passed and gate.candidate == "dpo" and "refused_candidates" not in gate.evidence
