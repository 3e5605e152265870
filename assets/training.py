"""Training stages. Each launches a recipe CLI out of process through the launcher (Dagster Pipes),
owns an MLflow run for it, and returns a reference to what the trainer wrote."""

import json
from pathlib import Path
from typing import Any, Optional

import dagster as dg

from assets._meta import image, mlflow_link, scalars
from resources.artifacts import ArtifactStore
from resources.launcher import LaunchResult, TrainingLauncher
from resources.recipe import RecipeResource
from resources.tracking import MlflowResource
from tuneline.params import Recipe, SftParams, to_plain
from tuneline.records import sha256_text

GROUP = "training"
# A killed or crashed trainer is retried in the same Dagster run; it resumes from its last checkpoint.
RETRY = dg.RetryPolicy(max_retries=1, delay=2)


def workdir(artifacts: ArtifactStore, stage: str, context: dg.AssetExecutionContext) -> Path:
    """Stable across retries and re-executions of one run (keyed by the root run id), so training resumes."""
    return artifacts.stage_dir(stage, context.run.root_run_id or context.run.run_id)


def run_stage(
    context: dg.AssetExecutionContext,
    *,
    recipe: Recipe,
    mlflow: MlflowResource,
    launcher: TrainingLauncher,
    module: str,
    spec: dict[str, Any],
    out: Path,
    params: dict[str, Any],
    dataset_sha256: str,
    upstream: dict[str, str],
    num_processes: int = 1,
) -> tuple[LaunchResult, str]:
    """Create the stage's MLflow run, launch the trainer with its id, and close the run with the outcome."""
    run_id = mlflow.start_stage_run(context, recipe, dataset_sha256=dataset_sha256, params=params, upstream=upstream)
    tracker = mlflow.tracker()
    tracker.log_dict(run_id, recipe.to_dict(), "recipe.json")
    spec = {**spec, "out_dir": str(out), "seed": recipe.seed, "max_steps": recipe.max_steps,
            "mlflow": {"tracking_uri": mlflow.tracking_uri, "run_id": run_id}}
    try:
        launched = launcher.launch(context, module, spec, out, num_processes=num_processes)
    except Exception:
        tracker.end_run(run_id, status="FAILED")
        raise
    return launched, run_id


def finish_stage(
    mlflow: MlflowResource,
    run_id: str,
    out: Path,
    result: dict[str, Any],
    *,
    curves: dict[str, list],
    title: str,
    model_artifact: str,
    resolved_params: Any,
    metrics: Optional[dict[str, float]] = None,
) -> dict[str, Any]:
    """Log the trainer's curves (PNG), model files and metrics to the stage's run, close it, and return
    the materialization metadata."""
    from tuneline.plots import plot_curves

    tracker = mlflow.tracker()
    metadata: dict[str, Any] = {}
    if any(curves.values()):
        plot = plot_curves(curves, out / f"{model_artifact}_{title.lower().replace(' ', '_')}.png", title=title)
        tracker.log_artifact(run_id, plot, "plots")
        metadata["loss_curves"] = image(plot, title)
    tracker.log_artifact(run_id, result["output_dir"], model_artifact)
    scalars_ = {k: v for k, v in result.items() if not isinstance(v, (list, dict))}
    tracker.log_metrics(run_id, {**{k: v for k, v in scalars_.items() if isinstance(v, (int, float))},
                                 **(metrics or {})})
    tracker.end_run(run_id)
    return {
        **scalars("", {**scalars_, **(metrics or {})}),
        "resolved_params": dg.MetadataValue.json(to_plain(resolved_params)),
        **metadata,
        **mlflow_link(run_id, mlflow.tracking_uri),
    }


def _points(rows: list[dict], key: str = "loss") -> list[tuple[int, float]]:
    return [(row["step"], row[key]) for row in rows if key in row]


@dg.asset(group_name=GROUP, kinds={"optuna"}, retry_policy=RETRY)
def hpo_study(
    context: dg.AssetExecutionContext,
    recipe: RecipeResource,
    artifacts: ArtifactStore,
    mlflow: MlflowResource,
    launcher: TrainingLauncher,
    base_model: dict,
    dataset_splits: dict,
) -> dg.Output[dict]:
    """Optuna search (TPE, median pruning on validation loss) over the recipe's space; each trial is an
    out-of-process SFT run and a nested MLflow run. A retried run resumes the same study."""
    from tuneline.train.hpo import run_study

    r = recipe.load()
    out = workdir(artifacts, "hpo_study", context)
    inputs = {"base": base_model["weights_sha256"], "data": dataset_splits["dataset_sha256"],
              "hpo": to_plain(r.hpo), "sft": to_plain(r.sft), "seed": r.seed, "max_steps": r.max_steps}
    study_name = f"{r.name}-{sha256_text(json.dumps(inputs, sort_keys=True))[:12]}"
    storage = r.hpo.storage or "sqlite:///" + str(artifacts.shared_dir("optuna") / "optuna.db")
    if not r.hpo.enabled:
        value = {"enabled": False, "best_params": {}, "study_name": None, "mlflow_run_id": None,
                 "note": "hpo.enabled is false: SFT uses the recipe's sft params"}
        return dg.Output(value, metadata={"enabled": False, "note": value["note"]})

    parent = mlflow.start_stage_run(
        context, r, dataset_sha256=dataset_splits["dataset_sha256"],
        params={k: v for k, v in r.flat().items() if k.startswith(("hpo.", "sft."))},
        upstream={"base_model": base_model["mlflow_run_id"], "dataset_splits": dataset_splits["mlflow_run_id"]},
    )
    tracker = mlflow.tracker()
    trial_steps = r.steps(r.hpo.trial_max_steps)

    def run_trial(number: int, trial_params: dict) -> dict:
        child = tracker.start_run(
            r.experiment_name(), run_name=f"trial-{number}", parent_run_id=parent,
            tags={"tuneline.asset_key": "hpo_study", "tuneline.trial": str(number),
                  "tuneline.dagster_run_id": context.run.run_id},
            params={f"trial.{k}": v for k, v in trial_params.items()},
        )
        context.log.info(f"trial {number}: {trial_params}")
        spec = {"base_model": base_model["path"], "train_path": dataset_splits["paths"]["train"],
                "val_path": dataset_splits["paths"]["validation"], "params": to_plain(r.sft),
                "trial_params": trial_params, "out_dir": str(out / f"trial-{number}"), "seed": r.seed,
                "max_steps": trial_steps, "eval_steps": r.hpo.eval_steps, "study_name": study_name,
                "storage_url": storage, "trial_number": number,
                "mlflow": {"tracking_uri": mlflow.tracking_uri, "run_id": child}}
        try:
            launched = launcher.launch(context, "tuneline.recipes.hpo_trial", spec, out / f"trial-{number}")
        except Exception:
            tracker.end_run(child, status="FAILED")
            raise
        result = launched.result
        tracker.log_metrics(child, {"best_val_loss": result.get("value") or float("nan")})
        tracker.end_run(child, status="KILLED" if result.get("state") == "pruned" else "FINISHED")
        context.log.info(f"trial {number}: {result.get('state')} value={result.get('value')}")
        return {**result, "mlflow_run_id": child}

    study = run_study(study_name, storage, r.hpo.space.for_method(r.sft.method), r.hpo, seed=r.seed, run_trial=run_trial,
                      plots_dir=out / "plots")
    metadata: dict[str, Any] = {}
    for name, path in study.plots.items():
        tracker.log_artifact(parent, path, "plots")
        metadata[name] = image(path, name)
    tracker.log_dict(parent, study.to_dict(), "study.json")
    tracker.log_metrics(parent, {"best_value": study.best_value, "n_complete": study.n_complete,
                                 "n_pruned": study.n_pruned, "n_failed": study.n_failed})
    tracker.log_params(parent, {f"best.{k}": v for k, v in study.best_params.items()})
    tracker.end_run(parent)
    value = {"enabled": True, **study.to_dict(), "mlflow_run_id": parent}
    return dg.Output(
        value,
        metadata={
            "best_params": dg.MetadataValue.json(study.best_params),
            "best_value": study.best_value,
            "best_trial": study.best_trial_number,
            "trials_completed": study.n_complete,
            "trials_pruned": study.n_pruned,
            "trials_failed": study.n_failed,
            "trials_run_now": study.n_run_now,
            "study_name": study_name,
            "storage": storage.split("@")[-1],
            **{f"note_{k}": v for k, v in study.plot_notes.items()},
            **metadata,
            **mlflow_link(parent, mlflow.tracking_uri),
        },
    )


def resolved_sft_params(r: Recipe, hpo: dict) -> SftParams:
    from tuneline.train.hpo import sft_params_from_trial

    return sft_params_from_trial(r.sft, hpo["best_params"]) if hpo.get("enabled") else r.sft


@dg.asset(group_name=GROUP, kinds={"pytorch"}, retry_policy=RETRY)
def sft_adapter(
    context: dg.AssetExecutionContext,
    recipe: RecipeResource,
    artifacts: ArtifactStore,
    mlflow: MlflowResource,
    launcher: TrainingLauncher,
    base_model: dict,
    dataset_splits: dict,
    hpo_study: dict,
) -> dg.Output[dict]:
    """Supervised fine-tuning with the search's best params (method from the recipe), early stopping on
    validation loss, checkpoints that a retry resumes from."""
    r = recipe.load()
    params = resolved_sft_params(r, hpo_study)
    out = workdir(artifacts, "sft_adapter", context)
    upstream = {"base_model": base_model["mlflow_run_id"], "dataset_splits": dataset_splits["mlflow_run_id"]}
    if hpo_study.get("mlflow_run_id"):
        upstream["hpo_study"] = hpo_study["mlflow_run_id"]
    launched, run_id = run_stage(
        context, recipe=r, mlflow=mlflow, launcher=launcher, module="tuneline.recipes.sft",
        spec={"base_model": base_model["path"], "train_path": dataset_splits["paths"]["train"],
              "val_path": dataset_splits["paths"]["validation"], "params": to_plain(params)},
        out=out, params={f"sft.{k}": v for k, v in _flat(params).items()},
        dataset_sha256=dataset_splits["dataset_sha256"], upstream=upstream, num_processes=params.num_processes,
    )
    result = launched.result
    metadata = finish_stage(
        mlflow, run_id, out, result, curves={"train": result["train_losses"], "validation": result["val_losses"]},
        title="SFT loss", model_artifact="adapter" if params.method not in ("full", "freeze") else "model",
        resolved_params=params,
    )
    value = {**result, "params": to_plain(params), "base_model_path": base_model["path"], "mlflow_run_id": run_id}
    return dg.Output(value, metadata=metadata)


@dg.asset(group_name=GROUP, kinds={"pytorch"}, retry_policy=RETRY)
def dpo_adapter(
    context: dg.AssetExecutionContext,
    recipe: RecipeResource,
    artifacts: ArtifactStore,
    mlflow: MlflowResource,
    launcher: TrainingLauncher,
    dataset_splits: dict,
    sft_adapter: dict,
) -> dg.Output[dict]:
    """DPO on the preference split, starting from the SFT model (merged) with a fresh adapter, so the
    adapter disabled is the reference: no second full copy in memory."""
    r = recipe.load()
    if not r.dpo.enabled:
        raise dg.Failure("dpo.enabled is false in this recipe: deselect dpo_adapter and what follows it")
    out = workdir(artifacts, "dpo_adapter", context)
    launched, run_id = run_stage(
        context, recipe=r, mlflow=mlflow, launcher=launcher, module="tuneline.recipes.dpo",
        spec={"base_model": sft_adapter["base_model_path"], "sft_model_dir": sft_adapter["output_dir"],
              "sft_method": sft_adapter["method"], "train_path": dataset_splits["paths"]["preference_train"],
              "val_path": dataset_splits["paths"]["preference_validation"], "params": to_plain(r.dpo)},
        out=out, params={f"dpo.{k}": v for k, v in _flat(r.dpo).items()},
        dataset_sha256=dataset_splits["dataset_sha256"],
        upstream={"sft_adapter": sft_adapter["mlflow_run_id"], "dataset_splits": dataset_splits["mlflow_run_id"]},
    )
    result = launched.result
    before_after = {f"{when}_{k}": v for when in ("before", "after")
                    for k, v in (result.get(when) or {}).items() if isinstance(v, (int, float))}
    metadata = finish_stage(mlflow, run_id, out, result, curves={"train": _points(result.get("losses", []))},
                            title="DPO loss", model_artifact="adapter", resolved_params=r.dpo, metrics=before_after)
    return dg.Output({**result, "mlflow_run_id": run_id}, metadata=metadata)


@dg.asset(group_name=GROUP, kinds={"pytorch"}, retry_policy=RETRY)
def distilled_student(
    context: dg.AssetExecutionContext,
    recipe: RecipeResource,
    artifacts: ArtifactStore,
    mlflow: MlflowResource,
    launcher: TrainingLauncher,
    dataset_splits: dict,
    dpo_adapter: dict,
) -> dg.Output[dict]:
    """A smaller student trained on the DPO model's token distributions (KL at a temperature + CE);
    the teacher's outputs are cached under their inputs' hash, so a retry reuses them."""
    r = recipe.load()
    if not r.distill.enabled:
        raise dg.Failure("distill.enabled is false in this recipe: deselect distilled_student")
    out = workdir(artifacts, "distilled_student", context)
    launched, run_id = run_stage(
        context, recipe=r, mlflow=mlflow, launcher=launcher, module="tuneline.recipes.distill",
        spec={"teacher_dir": dpo_adapter["merged_model_dir"], "train_path": dataset_splits["paths"]["train"],
              "val_path": dataset_splits["paths"]["validation"], "params": to_plain(r.distill),
              "cache_dir": str(artifacts.shared_dir("teacher_cache"))},
        out=out, params={f"distill.{k}": v for k, v in _flat(r.distill).items()},
        dataset_sha256=dataset_splits["dataset_sha256"],
        upstream={"dpo_adapter": dpo_adapter["mlflow_run_id"], "dataset_splits": dataset_splits["mlflow_run_id"]},
    )
    result = launched.result
    metadata = finish_stage(mlflow, run_id, out, result, curves={"kd loss": _points(result.get("kd_curve", []))},
                            title="Distillation loss", model_artifact="model", resolved_params=r.distill)
    return dg.Output({**result, "mlflow_run_id": run_id}, metadata=metadata)


def _flat(params: Any) -> dict[str, Any]:
    from tuneline.params import flatten

    return flatten(to_plain(params))
