"""Hyperparameter search: an Optuna study (TPE, median pruning) whose trials are out-of-process SFT runs."""

import tempfile
from typing import Any

import dagster as dg

from assets._meta import image, mlflow_link
from assets._stage import RETRY
from resources.artifacts import ArtifactStore
from resources.launcher import TrainingLauncher
from resources.recipe import RecipeResource
from resources.tracking import MlflowResource, StudyStorage
from tuneline.params import Recipe, to_plain
from tuneline.refs import ModelRef, SplitsRef, StudyRef
from tuneline.specs import HpoWorkerSpec, MlflowTarget

GROUP = "training"


@dg.asset(group_name=GROUP, kinds={"optuna"}, retry_policy=RETRY)
def hpo_study(
    context: dg.AssetExecutionContext,
    recipe: RecipeResource,
    artifacts: ArtifactStore,
    mlflow: MlflowResource,
    launcher: TrainingLauncher,
    study_storage: StudyStorage,
    base_model: ModelRef,
    dataset_splits: SplitsRef,
) -> dg.Output:
    """Optuna search (TPE, median pruning on validation loss) over the recipe's space: ``hpo.workers`` workers
    run trials at once against this run's own study, each trial an out-of-process SFT run and a nested MLflow
    run. A retried run resumes its study; a dead worker's trial is run again (heartbeats)."""
    from tuneline.train.hpo import create_study, study_name, study_result

    r = recipe.load()
    if not r.hpo.enabled:
        ref = StudyRef(enabled=False, note="hpo.enabled is false: SFT uses the recipe's sft params")
        return dg.Output(ref, metadata={"enabled": False, "note": ref.note})
    root = context.run.root_run_id or context.run.run_id
    name = study_name(r.name, {"base": base_model.sha256, "data": dataset_splits.dataset_sha256,
                               "hpo": to_plain(r.hpo), "sft": to_plain(r.sft), "tokenizer": to_plain(r.tokenizer), "seed": r.seed,
                               "max_steps": r.max_steps}, root)
    storage_url = study_storage.resolve(r.hpo.storage, artifacts.local_shared_dir("optuna"))
    create_study(name, storage_url, r.hpo)  # once, here; the workers load it
    parent = mlflow.start_stage_run(context, r, dataset_sha256=dataset_splits.dataset_sha256,
                                    params={**r.flat_section("hpo", "sft"), "study_name": name},
                                    upstream={"base_model": base_model.mlflow_run_id,
                                              "dataset_splits": dataset_splits.mlflow_run_id})
    worker = HpoWorkerSpec(
        out_uri=artifacts.stage_uri("hpo_study", root), seed=r.seed, max_steps=r.max_steps,
        mlflow=MlflowTarget(tracking_uri=mlflow.tracking_uri, run_id=parent), study_name=name,
        storage_url=storage_url, hpo=r.hpo, params=r.sft, base=base_model, train_uri=dataset_splits.uri("train"),
        val_uri=dataset_splits.uri("validation"), worker=0, experiment=r.experiment_name(), tokenizer=r.tokenizer,
        compute=r.compute,
        tags={"tuneline.asset_key": "hpo_study", "tuneline.dagster_run_id": context.run.run_id},
    )
    errors = run_workers(context, launcher, worker, r)
    tracker = mlflow.tracker()
    try:
        study = study_result(name, storage_url, n_run_now=0, plots_dir=tempfile.mkdtemp(prefix="tuneline-hpo-"))
    except RuntimeError as exc:
        tracker.end_run(parent, status="FAILED")
        raise dg.Failure(description=f"{exc}; {'; '.join(errors)}") from exc
    if study.n_complete + study.n_pruned < study.n_trials_target:
        tracker.end_run(parent, status="FAILED")
        raise dg.Failure(description=f"study {name}: {study.n_complete + study.n_pruned} of {study.n_trials_target} "
                                     f"trials finished; {'; '.join(errors)} (a retry resumes the study)")
    return dg.Output(_study_ref(tracker, parent, study), metadata=_study_metadata(study, parent, mlflow, errors))


def run_workers(context: dg.AssetExecutionContext, launcher: TrainingLauncher, spec: HpoWorkerSpec,
                recipe: Recipe) -> list[str]:
    """Launch ``hpo.workers`` search workers at once (each its own process through the launcher, writing under
    ``spec.out_uri/worker-i``); the errors of those that failed (a failed worker's trials are retried by the
    others, or by a retry of the step)."""
    import dataclasses
    from concurrent.futures import ThreadPoolExecutor

    def one(i: int) -> None:
        launcher.launch(context, dataclasses.replace(spec, worker=i, out_uri=f"{spec.out_uri}/worker-{i}",
                                                     asset_key=context.asset_key.to_user_string()), k8s=recipe.k8s)

    errors = []
    with ThreadPoolExecutor(max_workers=recipe.hpo.workers) as pool:
        for i, future in enumerate([pool.submit(one, i) for i in range(recipe.hpo.workers)]):
            try:
                future.result()
            except Exception as exc:  # noqa: BLE001 - reported; the study decides whether the step fails
                errors.append(f"worker {i}: {getattr(exc, 'description', None) or exc}")
                context.log.warning(errors[-1])
    return errors


def _study_ref(tracker: Any, parent: str, study: Any) -> StudyRef:
    """Log the study to its MLflow run, close the run, and return the reference SFT reads."""
    for path in study.plots.values():
        tracker.log_artifact(parent, path, "plots")
    tracker.log_dict(parent, study.to_dict(), "study.json")
    tracker.log_metrics(parent, {"best_value": study.best_value, "n_complete": study.n_complete,
                                 "n_pruned": study.n_pruned, "n_failed": study.n_failed, "n_retried": study.n_retried})
    tracker.log_params(parent, {f"best.{k}": v for k, v in study.best_params.items()})
    tracker.end_run(parent)
    return StudyRef(enabled=True, best_params=study.best_params, study_name=study.study_name,
                    storage=study.storage_redacted, best_value=study.best_value, best_trial=study.best_trial_number,
                    n_complete=study.n_complete, n_pruned=study.n_pruned, n_failed=study.n_failed, mlflow_run_id=parent)


def _study_metadata(study: Any, parent: str, mlflow: MlflowResource, errors: list[str]) -> dict[str, Any]:
    return {
        "best_params": dg.MetadataValue.json(study.best_params), "best_value": study.best_value,
        "best_trial": study.best_trial_number, "trials_completed": study.n_complete, "trials_pruned": study.n_pruned,
        "trials_failed": study.n_failed, "trials_retried": study.n_retried, "study_name": study.study_name,
        "storage": study.storage_redacted, "worker_errors": dg.MetadataValue.json(errors),
        **{f"note_{k}": v for k, v in study.plot_notes.items()},
        **{n: image(path, n) for n, path in study.plots.items()}, **mlflow_link(parent, mlflow.tracking_uri),
    }
