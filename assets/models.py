"""The base model: a hub id or local path, or a tiny Llama the pipeline builds and pretrains offline."""

import dataclasses

import dagster as dg

from assets._meta import image, mlflow_link, scalars
from resources.artifacts import ArtifactStore
from resources.recipe import RecipeResource
from resources.tracking import MlflowResource
from tuneline.deploy.lineage import TAG_STARTED_FROM


@dg.asset(group_name="model", kinds={"pytorch"})
def base_model(
    context: dg.AssetExecutionContext,
    recipe: RecipeResource,
    artifacts: ArtifactStore,
    mlflow: MlflowResource,
    raw_dataset: dict,
) -> dg.Output[dict]:
    """Provision the base model: load it (from_pretrained, safetensors only, no remote code) or build the
    tiny one, then (continued-)pretrain it on the corpus files of ``raw_dataset``."""
    from tuneline.data.ingest import read_source
    from tuneline.models.provision import provision_base_model
    from tuneline.plots import plot_curves

    r = recipe.load()
    out = artifacts.stage_dir("base_model", context.run.run_id)
    tracker = mlflow.tracker()
    model_params, pretrain_params, started_from = r.model, r.pretrain, None
    if recipe.retrain and r.drift.retrain_from == "champion":
        # a retrain continues from the model in service (new rows + replay keep its skills), not from scratch
        from tuneline.deploy.registry import current_champion, download_version

        champion = current_champion(tracker, r.registered_model_name())
        if champion is not None:
            started_from = f"models:/{champion['name']}/{champion['version']}"
            model_params = dataclasses.replace(r.model, build=None, name_or_path=str(download_version(
                tracker, champion)), revision=None)
            pretrain_params = dataclasses.replace(r.pretrain, enabled=False)
            context.log.info(f"retrain: starting from the champion {started_from}")
        else:
            context.log.info("retrain: no champion yet, so the base model is provisioned as the recipe says")
    corpus_files = [f for f in raw_dataset["files"] if f["role"] == "corpus"]
    texts = [rec.messages[0]["content"] for f in corpus_files for rec in read_source(f["path"]).records]
    steps = r.steps(pretrain_params.steps)
    context.log.info(f"base model: {started_from or r.model.build or r.model.name_or_path}; corpus {len(texts)} "
                     f"passages; pretraining {steps if pretrain_params.enabled else 0} steps")

    def progress(step: int, total: int, loss: float) -> None:
        if step == 1 or step % max(1, total // 10) == 0 or step == total:
            context.log.info(f"pretraining step {step}/{total}: loss {loss:.4f}")

    info = provision_base_model(
        model_params, pretrain_params, texts, out / "model", seed=r.seed, steps=steps, progress=progress
    )
    run_id = mlflow.start_stage_run(
        context, r, dataset_sha256=raw_dataset["sha256"],
        params={k: v for k, v in r.flat().items() if k.startswith(("model.", "pretrain.", "seed", "max_steps"))},
    )
    details = info.to_dict()
    tracker.log_series(run_id, "pretrain_loss", info.loss_curve)
    tracker.log_metrics(run_id, {"n_params": info.n_params, "vocab_size": info.vocab_size,
                                 **{k: v for k, v in (details.get("pretrain") or {}).items()
                                    if isinstance(v, (int, float))}})
    tracker.set_tags(run_id, {"tuneline.weights_sha256": info.weights_sha256,
                              **({TAG_STARTED_FROM: started_from} if started_from else {})})
    metadata = {}
    if info.loss_curve:
        plot = plot_curves({"pretrain loss": info.loss_curve}, out / "pretrain_loss.png",
                           title="Pretraining loss", xlabel="step", ylabel="loss")
        tracker.log_artifact(run_id, plot, "plots")
        metadata["pretrain_loss_curve"] = image(plot, "pretraining loss")
    tracker.log_artifact(run_id, info.path, "model")
    tracker.end_run(run_id)
    value = {**details, "started_from": started_from, "mlflow_run_id": run_id}
    return dg.Output(
        value,
        metadata={
            "path": dg.MetadataValue.path(str(info.path)),
            "source": info.source,
            "started_from": started_from or "recipe (no champion carried over)",
            "weights_sha256": info.weights_sha256,
            "n_params": info.n_params,
            "vocab_size": info.vocab_size,
            "config": dg.MetadataValue.json(info.config),
            **scalars("pretrain_", {k: v for k, v in (details.get("pretrain") or {}).items()
                                    if not isinstance(v, (list, dict))}),
            **metadata,
            **mlflow_link(run_id, mlflow.tracking_uri),
        },
    )
