"""The base model: a hub id or local path, or a tiny Llama the pipeline builds and pretrains offline."""

import dataclasses

import dagster as dg

from assets._stage import RETRY, finish_stage, launch_stage, stage_uri
from resources.artifacts import ArtifactStore
from resources.launcher import TrainingLauncher
from resources.recipe import RecipeResource
from resources.tracking import MlflowResource
from tuneline.deploy.lineage import TAG_STARTED_FROM
from tuneline.refs import RawDataRef
from tuneline.specs import PretrainSpec


@dg.asset(group_name="model", kinds={"pytorch"}, retry_policy=RETRY)
def base_model(
    context: dg.AssetExecutionContext,
    recipe: RecipeResource,
    artifacts: ArtifactStore,
    mlflow: MlflowResource,
    launcher: TrainingLauncher,
    raw_dataset: RawDataRef,
) -> dg.Output:
    """Provision the base model out of process: load it (from_pretrained, safetensors only, no remote code) or
    build the tiny one, then (continued-)pretrain it on the corpus files, with checkpoints a retry resumes
    from. A retrain (``drift.retrain_from: champion``) continues from the registered champion instead."""
    from tuneline.deploy.registry import current_champion

    r = recipe.load()
    champion = None
    if recipe.retrain and r.drift.retrain_from == "champion":
        champion = current_champion(mlflow.tracker(), r.registered_model_name())
    started_from = f"models:/{champion['name']}/{champion['version']}" if champion else None
    context.log.info(f"base model: {started_from or r.model.build or r.model.name_or_path}")
    spec = PretrainSpec(out_uri=stage_uri(artifacts, "base_model", context), seed=r.seed, model=r.model,
                        pretrain=r.pretrain, corpus_uris=tuple(f.uri for f in raw_dataset.by_role("corpus")),
                        steps=r.steps(r.pretrain.steps), started_from=started_from)
    outcome, run_id = launch_stage(context, recipe=r, mlflow=mlflow, launcher=launcher, spec=spec,
                                   params=r.flat_section("model", "pretrain", "seed", "max_steps"),
                                   dataset_sha256=raw_dataset.sha256, upstream={})
    if started_from:
        mlflow.tracker().set_tags(run_id, {TAG_STARTED_FROM: started_from})
    metadata = finish_stage(mlflow, run_id, outcome, title="Pretraining loss", resolved_params=r.pretrain)
    model = dataclasses.replace(outcome.model, metrics=dict(outcome.metrics))  # params, vocab, losses on the ref
    return dg.Output(model, metadata={**metadata, "source": model.source or "", "started_from": started_from
                                      or "recipe (no champion carried over)",
                                      "config": dg.MetadataValue.json(outcome.details.get("config", {}))})
