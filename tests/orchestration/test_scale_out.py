"""The training graph scaled out on this CPU: two search workers on one study, and SFT, DPO and distillation each
as two gloo ranks (num_processes: 2), materialized in memory through the real launcher."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest
import yaml


pytestmark = pytest.mark.long  # a whole-graph drill: `make test-long`, not `make test` (see README, Tests)


SCALE_OUT = {  # on top of the orchestration tests' tiny recipe (conftest.TINY_RECIPE)
    "hpo": {"n_trials": 3, "workers": 2, "threads_per_worker": 1, "trial_max_steps": 4, "eval_steps": 2,
            "pruner_startup_trials": 1, "pruner_warmup_steps": 0, "heartbeat_interval": 5, "grace_period": 30,
            "space": {"learning_rate": [0.001, 0.006], "lora_r": [4], "lora_alpha": [8]}},
    "sft": {"method": "lora", "max_steps": 4, "batch_size": 4, "eval_steps": 2, "save_steps": 2, "max_length": 96,
            "bf16": False, "num_processes": 2},
    "dpo": {"max_steps": 2, "batch_size": 2, "max_length": 96, "bf16": False, "num_processes": 2},
    "distill": {"max_steps": 2, "batch_size": 4, "student_layers": 1, "max_length": 96, "bf16": False,
                "num_processes": 2},
}
STAGES = ["hpo_study", "sft_adapter", "dpo_adapter", "distilled_student"]


@pytest.mark.slow
def test_workers_and_two_rank_training_through_the_asset_graph(state: Path, tiny_recipe: Path) -> None:
    from optuna.trial import TrialState

    from pipelines import definitions
    from resources import build_resources
    from resources.recipe import RecipeResource
    from tuneline.specs import Outcome
    from tuneline.train.hpo import load_study

    tiny_recipe.write_text(yaml.safe_dump({**yaml.safe_load(tiny_recipe.read_text()), **SCALE_OUT}))
    resources = build_resources("local")
    resources["recipe"] = RecipeResource(path=str(tiny_recipe))
    selection = dg.AssetSelection.assets(*STAGES).upstream()
    result = dg.materialize([*definitions.ASSETS, *definitions.CHECKS], resources=resources, selection=selection)
    assert result.success

    study = result.output_for_node("hpo_study")
    storage = resources["study_storage"].resolve(None, resources["artifacts"].local_shared_dir("optuna"))
    trials = load_study(study.study_name, storage).trials
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 3 and study.n_complete + study.n_pruned == 3
    assert study.study_name.endswith(result.run_id)  # this run's own study
    root = resources["artifacts"].stage_uri("hpo_study", result.run_id)
    reports = [Outcome.load(f"{root}/worker-{i}/result.json").metrics for i in range(2)]
    assert {r["worker"] for r in reports} == {0, 1} and all(r["threads"] == 1 for r in reports)

    sft = result.output_for_node("sft_adapter")
    assert sft.metrics["examples_per_rank"] == [16, 16]  # 4 steps x global batch 8 (4 per rank): half on each rank
    assert all(loss == loss for _, loss in Outcome.load(storage_uri(sft) + "/result.json").curves["train"])
    dpo = result.output_for_node("dpo_adapter")
    assert dpo.metrics["steps"] == 2 and storage_exists(dpo.uri)
    assert dpo.metrics["shared_prompts"] is False  # two ranks: TRL's own rows through the DDP wrapper
    student = result.output_for_node("distilled_student")
    assert student.metrics["steps"] == 2 and storage_exists(student.uri + "/model.safetensors")


def storage_uri(ref) -> str:
    """The stage folder of a model reference (the model lives in its ``model/`` subfolder)."""
    return ref.uri.rsplit("/", 1)[0]


def storage_exists(uri: str) -> bool:
    from tuneline import storage

    return storage.exists(uri)
