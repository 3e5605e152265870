"""``alignment.method: rloo`` through the asset graph on tiny settings: a reward model, an RLOO policy against it,
both in the evaluation table (reward, KL to the SFT model), and the RLOO policy as the gate's candidate."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from test_chain import CHAIN, materialized, run_chain  # noqa: E402 - same folder


pytestmark = pytest.mark.long  # a whole-graph drill: `make test-long`, not `make test` (see README, Tests)


@pytest.mark.slow
def test_rloo_is_the_gate_candidate_when_the_recipe_says_so(state: Path, tmp_path: Path) -> None:
    recipe = copy.deepcopy(CHAIN)
    # the candidate stays RLOO whatever it scores (no hand-over to its SFT parent): this test is about choosing it
    recipe.update(name="ci-rlhf", alignment={"method": "rloo"}, hpo={**CHAIN["hpo"], "enabled": False},
                  gate={**CHAIN["gate"], "fall_back_to_parent": False})
    result, _ = run_chain(recipe, tmp_path / "rlhf.yaml")
    done = materialized(result)
    assert {"reward_model", "rl_policy", "dpo_adapter", "evaluation_report"} <= done, done

    rm = result.output_for_node("reward_model")
    assert rm.stage == "reward_model" and rm.kind == "full" and rm.method == "reward-sft"
    assert 0.0 <= rm.metrics["pairwise_accuracy"] <= 1.0 and rm.metrics["steps"] == 20
    policy = result.output_for_node("rl_policy")
    assert policy.method == "rloo" and policy.kind == "full" and policy.metrics["steps"] == 4
    assert policy.metrics["kl_before"] == 0.0  # the fresh adapter is the reference at step 0

    evaluation = result.output_for_node("evaluation_report")
    assert "rloo" in evaluation.summary and "dpo" in evaluation.summary, evaluation.table
    assert "| reward | KL to SFT |" in evaluation.table and "| rloo |" in evaluation.table
    assert evaluation.gate.candidate == "rloo" and evaluation.gate.candidate_stage == "rl_policy"
    assert evaluation.candidate.uri == policy.uri
    assert evaluation.gate.evidence["parent"]["name"] == "sft"
