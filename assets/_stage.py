"""What every out-of-process stage asset does around its trainer: own an MLflow run, launch the recipe CLI with
the run's id in the spec, then log the outcome's curves and figures, close the run and build the metadata."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional

import dagster as dg

from assets._meta import image, mlflow_link, scalars
from resources.artifacts import ArtifactStore
from resources.launcher import TrainingLauncher
from resources.tracking import MlflowResource
from tuneline.deploy.lineage import SPEC_ARTIFACT
from tuneline.params import Recipe, flatten, to_plain
from tuneline.refs import SplitsRef
from tuneline.specs import MlflowTarget, Outcome, Spec

# A killed or crashed trainer is retried in the same Dagster run; it resumes from its last checkpoint.
RETRY = dg.RetryPolicy(max_retries=1, delay=2)


def stage_uri(artifacts: ArtifactStore, stage: str, context: dg.AssetExecutionContext) -> str:
    """Stable across retries and re-executions of one run (keyed by the root run id), so training resumes."""
    return artifacts.stage_uri(stage, context.run.root_run_id or context.run.run_id)


def launch_stage(
    context: dg.AssetExecutionContext,
    *,
    recipe: Recipe,
    mlflow: MlflowResource,
    launcher: TrainingLauncher,
    spec: Spec,
    params: dict[str, Any],
    dataset_sha256: Optional[str],
    upstream: dict[str, Optional[str]],
    num_processes: int = 1,
) -> tuple[Outcome, str]:
    """Create the stage's MLflow run (before any expensive work: a dead tracking server fails fast), launch
    the trainer with the run's id, and mark the run FAILED when the trainer fails."""
    # what the launch needs starts meanwhile (the subprocess launcher's server of preloaded imports)
    launcher.prepare(dataclasses.replace(spec, compute=recipe.compute), num_processes=num_processes)
    run_id = mlflow.start_stage_run(context, recipe, dataset_sha256=dataset_sha256, params=params,
                                    upstream={k: v for k, v in upstream.items() if v})
    tracker = mlflow.tracker()
    tracker.log_dict(run_id, recipe.to_dict(), "recipe.json")
    spec = dataclasses.replace(spec, asset_key=context.asset_key.to_user_string(), compute=recipe.compute,
                               mlflow=MlflowTarget(tracking_uri=mlflow.tracking_uri, run_id=run_id))
    tracker.log_dict(run_id, {"type": type(spec).__name__, "spec": spec.to_dict()}, SPEC_ARTIFACT)
    try:
        launched = launcher.launch(context, spec, num_processes=num_processes, k8s=recipe.k8s)
    except Exception:
        tracker.end_run(run_id, status="FAILED")
        raise
    return launched.outcome, run_id


def finish_stage(mlflow: MlflowResource, run_id: str, outcome: Outcome, *, title: str,
                 resolved_params: Any = None) -> dict[str, Any]:
    """Log the outcome's curves (a PNG), figures and model reference to the stage's run, close it, and return
    the materialization metadata."""
    import tempfile

    from tuneline.plots import plot_curves

    tracker = mlflow.tracker()
    metadata: dict[str, Any] = {}
    curves = {name: points for name, points in outcome.curves.items() if points}
    if curves:
        folder = Path(tempfile.mkdtemp(prefix="tuneline-plots-"))
        plot = plot_curves(curves, folder / f"{title.lower().replace(' ', '_')}.png", title=title)
        tracker.log_artifact(run_id, plot, "plots")
        metadata["loss_curves"] = image(plot, title)
    if outcome.model is not None:
        tracker.log_dict(run_id, outcome.model.to_dict(), "lineage/model.json")
        tracker.set_tags(run_id, {"tuneline.weights_sha256": outcome.model.sha256})
        metadata.update(model_uri=dg.MetadataValue.url(outcome.model.uri), weights_sha256=outcome.model.sha256,
                        model_kind=outcome.model.kind)
    tracker.log_dict(run_id, outcome.details, "result.json")
    tracker.log_metrics(run_id, outcome.metrics)
    tracker.end_run(run_id)
    if resolved_params is not None:
        metadata["resolved_params"] = dg.MetadataValue.json(to_plain(resolved_params))
    return {**scalars("", outcome.metrics), **metadata, **mlflow_link(run_id, mlflow.tracking_uri)}


def train_stage(
    context: dg.AssetExecutionContext,
    *,
    recipe: Recipe,
    mlflow: MlflowResource,
    launcher: TrainingLauncher,
    spec: Spec,
    section: str,
    params: Any,
    splits: SplitsRef,
    upstream: dict[str, Any],
    title: str,
    extra_params: Optional[dict[str, Any]] = None,
) -> dg.Output:
    """A model-making stage end to end: launch its trainer (``params``: the recipe section ``section``, logged
    with that prefix, plus ``extra_params``; ``upstream``: the input refs whose MLflow runs it came from), log and
    close its run, and
    return its :class:`ModelRef` carrying the stage's figures and resolved params."""
    outcome, run_id = launch_stage(
        context, recipe=recipe, mlflow=mlflow, launcher=launcher, spec=spec,
        params={**{f"{section}.{k}": v for k, v in flatten(to_plain(params)).items()}, **(extra_params or {})},
        dataset_sha256=splits.dataset_sha256, num_processes=getattr(params, "num_processes", 1),
        upstream={**{name: ref.mlflow_run_id for name, ref in upstream.items()}, "dataset_splits": splits.mlflow_run_id},
    )
    metadata = finish_stage(mlflow, run_id, outcome, title=title, resolved_params=params)
    model = dataclasses.replace(outcome.model, metrics=dict(outcome.metrics), params=to_plain(params))
    return dg.Output(model, metadata=metadata)


def skip_stage(upstream: Any, note: str) -> dg.Output:
    """A stage the recipe turned off: the graph runs on (``evaluation_report`` leaves out any model whose
    reference was not made by its own stage), and the materialization says why nothing was trained."""
    return dg.Output(upstream, metadata={"skipped": True, "note": note, "passed_through": upstream.stage})
