"""The new SFT methods through the real chain (Dagster in memory, trainers out of process): bottleneck adapters
and multitask prompt tuning train in ``sft_adapter`` from the pipeline's own base model and splits; the
adapter reference they hand on is then evaluated the way ``evaluation_report`` loads models, and published:
an adapter candidate is registered as a bundle (base + adapters) and served from the registry, a
multitask-prompt candidate (virtual tokens: nothing a from_pretrained directory can hold) is refused.

(``evaluation_report`` itself takes the DPO and student models as inputs, and both stages are off for these
methods, whose SFT result cannot be merged for DPO: so the graph is materialized up to ``sft_adapter``.)"""

from __future__ import annotations

import math
from pathlib import Path

import dagster as dg
import pytest
import yaml

from tests.integration.test_chain import CHAIN, materialized


def recipe(method: str) -> dict:
    return {
        **CHAIN, "name": f"ci-{method.replace('_', '-')}",
        "pretrain": {**CHAIN["pretrain"], "steps": 40},
        "hpo": {"enabled": False}, "dpo": {"enabled": False}, "distill": {"enabled": False},
        "sft": {"method": method, "learning_rate": 0.01, "max_steps": 30, "batch_size": 16, "eval_steps": 15,
                "save_steps": 15, "max_length": 128, "num_virtual_tokens": 8,
                "adapter": {"reduction_factor": 4, "placement": "houlsby"},
                "multitask_prompt": {"source_steps": 15}},
        "evaluation": {"max_examples": 30, "bootstrap_samples": 200, "max_new_tokens": 8},
        "gate": {**CHAIN["gate"], "candidate": "sft"},
    }


@pytest.mark.slow
@pytest.mark.parametrize("method", ["adapter", "multitask_prompt"])
def test_new_sft_method_runs_through_the_sft_stage_and_loads_everywhere(method: str, state: Path,
                                                                         tmp_path: Path) -> None:
    from pipelines import definitions
    from resources import build_resources
    from resources.recipe import RecipeResource
    from tuneline import storage
    from tuneline.deploy.bundle import servable_model_dir
    from tuneline.deploy.registry import chat_generate, load_registered, register_model
    from tuneline.evaluate.report import evaluate_model
    from tuneline.models.provision import load_model_ref
    from tuneline.params import EvaluationParams
    from tuneline.records import read_records

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe(method)))
    resources = build_resources("local")
    resources["recipe"] = RecipeResource(path=str(path))
    result = dg.materialize([*definitions.ASSETS, *definitions.CHECKS], resources=resources,
                            selection=dg.AssetSelection.assets("sft_adapter").upstream())
    assert result.success and "sft_adapter" in materialized(result)
    sft = result.output_for_node("sft_adapter")
    assert sft.kind == "adapter" and sft.method == method and sft.base is not None

    # evaluated as evaluation_report loads models: base vs the SFT adapter on the test split
    splits = result.output_for_node("dataset_splits")
    test = read_records(storage.fetch(splits.uri("test")))
    params = EvaluationParams(max_examples=30, bootstrap_samples=100, max_new_tokens=6)
    reports = {name: evaluate_model(load_model_ref(ref), test, [], params, name=name)
               for name, ref in (("base", sft.base), ("sft", sft))}
    assert math.isfinite(reports["sft"]["loss"]) and reports["sft"]["loss"] < reports["base"]["loss"]

    # published: a bundle for bottleneck adapters, a refusal for multitask prompts
    if method == "multitask_prompt":
        with pytest.raises(ValueError, match="virtual tokens"):
            servable_model_dir(sft, tmp_path / "publish")
        return
    model_dir, made = servable_model_dir(sft, tmp_path / "publish")
    assert made == "bundle"
    tracker = resources["mlflow"].tracker()
    run_id = tracker.start_run("tuneline/ci-adapter", run_name="register", tags={})
    register_model(tracker, "tuneline-ci-adapter", model_dir, run_id=run_id, aliases=("champion",))
    model, tokenizer, _ = load_registered(tracker, "tuneline-ci-adapter@champion")
    assert any(n.endswith(".bottleneck.up.weight") for n, _ in model.named_parameters())
    out = chat_generate(model, tokenizer, [{"role": "user", "content": "What is 2 plus 3?"}], max_new_tokens=4)
    assert isinstance(out["text"], str)
