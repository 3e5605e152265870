"""The data assets really materialize in memory, with their blocking checks."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pytest
import yaml

from tuneline import storage
from tuneline.models.loading import weights_sha256
from tuneline.records import ChatRecord, read_jsonl, sha256_file
from tuneline.refs import ModelRef, PreparedRef, SplitsRef
from tuneline.tracking import CONTENT_ARTIFACT, TAG_ASSET, TAG_DAGSTER_RUN, TAG_GIT, Tracker

DATA_ASSETS = ["raw_dataset", "base_model", "prepared_dataset", "dataset_splits"]


def materialize_data(recipe_path: Path):
    from pipelines import definitions
    from resources import build_resources
    from resources.recipe import RecipeResource

    resources = build_resources("local")
    resources["recipe"] = RecipeResource(path=str(recipe_path))
    return dg.materialize(
        [*definitions.ASSETS, *definitions.CHECKS], resources=resources, raise_on_error=False,
        selection=dg.AssetSelection.assets(*DATA_ASSETS),
    ), resources


@pytest.mark.slow
def test_data_assets_materialize_with_checks(state: Path, tiny_recipe: Path) -> None:
    # stratified by task (the split is then ordered by family) and a drift reference smaller than train
    recipe = yaml.safe_load(tiny_recipe.read_text())
    recipe["split"]["stratify_by"] = "task"
    recipe["drift"] = {"max_samples": 24}
    tiny_recipe.write_text(yaml.safe_dump(recipe))
    result, resources = materialize_data(tiny_recipe)
    assert result.success
    done = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert done == set(DATA_ASSETS)
    checks = {e.check_name: e.passed
              for e in result.get_asset_check_evaluations()}
    assert checks == {"prepared_dataset_passes_validation": True, "dataset_splits_have_no_leakage": True}

    prepared = result.output_for_node("prepared_dataset")
    assert isinstance(prepared, PreparedRef) and prepared.accepted + prepared.quarantined == prepared.read > 0
    splits = result.output_for_node("dataset_splits")
    assert isinstance(splits, SplitsRef)
    assert set(splits.counts) >= {"train", "validation", "test", "preference_train", "preference_test"}
    assert sum(splits.counts.values()) == prepared.accepted

    tracker: Tracker = resources["mlflow"].tracker()
    run = tracker.client().get_run(splits.mlflow_run_id)
    assert run.data.tags[TAG_DAGSTER_RUN] == result.run_id
    assert run.data.tags[TAG_ASSET] == "dataset_splits"
    assert run.data.tags[TAG_GIT]
    assert {d.dataset.digest for d in run.inputs.dataset_inputs} == {h[:36] for h in splits.sha256.values()}
    base = result.output_for_node("base_model")
    assert isinstance(base, ModelRef) and base.kind == "full" and base.method == "tiny"
    assert base.sha256 == weights_sha256(storage.local_path(base.uri))

    # the membership names every record of every split, and is logged content-addressed with the stage
    members = json.loads(storage.read_text(splits.membership_uri))
    assert {k: len(v) for k, v in members.items()} == splits.counts
    content = json.loads(Path(tracker.client().download_artifacts(splits.mlflow_run_id, CONTENT_ARTIFACT)).read_text())
    assert content["membership"]["sha256"] == sha256_file(storage.local_path(splits.membership_uri))

    # the drift reference samples the whole train split, not its first rows (the split is ordered by stratum)
    train_prompts = {ChatRecord.from_dict(r).prompt_text(): ChatRecord.from_dict(r).task
                     for r in read_jsonl(storage.local_path(splits.uri("train")))}
    reference = [json.loads(line)["prompt"] for line in storage.read_text(splits.drift_reference_uri).splitlines()]
    assert reference and set(reference) <= set(train_prompts)
    families = {train_prompts[p] for p in reference}
    assert families == set(train_prompts.values()), families


@pytest.mark.slow
def test_blocking_validation_check_stops_the_splits(state: Path, tmp_path: Path) -> None:
    data = tmp_path / "rows.jsonl"
    rows = [{"instruction": f"Say the number {i}.", "input": "", "output": str(i)} for i in range(40)]
    rows += [{"instruction": f"Say nothing {i}.", "input": "", "output": "   "} for i in range(20)]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"Paragraph {i} says the number {i} and some words." for i in range(200)))
    recipe = {
        "name": "ci-bad",
        "model": {"build": "tiny", "tiny": {"vocab_size": 400, "hidden_size": 64, "intermediate_size": 128,
                                            "num_layers": 1, "num_heads": 2, "num_kv_heads": 2,
                                            "max_position_embeddings": 128}},
        "pretrain": {"steps": 2, "batch_size": 2, "seq_len": 32, "warmup_steps": 1},
        "data": {"sources": [{"path": str(data)}], "corpus": [str(corpus)]},
        "validation": {"max_quarantined_fraction": 0.1, "min_accepted": 10},
        "gate": {"primary_metric": "exact_match"},  # these rows have no answer checker (task_accuracy needs one)
    }
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result, _ = materialize_data(path)
    done = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert "prepared_dataset" in done and "dataset_splits" not in done
    evaluation = {e.check_name: e
                  for e in result.get_asset_check_evaluations()}["prepared_dataset_passes_validation"]
    assert not evaluation.passed
    assert "quarantined" in (evaluation.description or "")
