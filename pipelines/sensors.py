"""Sensors: the drift signal over served traffic, and enough new feedback on served answers."""

import json
import time

import dagster as dg

from pipelines.jobs import retrain_job, train_model_job
from resources.recipe import RecipeResource
from resources.tracking import MlflowResource


@dg.sensor(job=retrain_job, minimum_interval_seconds=60, default_status=dg.DefaultSensorStatus.STOPPED)
def data_drift_sensor(context: dg.SensorEvaluationContext, recipe: RecipeResource,
                      mlflow: MlflowResource) -> dg.SensorResult:
    """Tests each new window of served requests against the serving champion's own training reference, with
    its tokenizer; requests a retrain (run_key = window id, so a window never triggers twice) when the prompts
    drifted and newly labelled rows wait in the incoming folder. Drift with nothing new to learn from is
    reported (an observation of ``served_traffic``), not retrained on. The cursor moves past failed requests."""
    from tuneline.data.raw import incoming_dir, incoming_files
    from tuneline.deploy.inference_log import InferenceLog
    from tuneline.models.loading import load_tokenizer
    from tuneline.monitoring.drift import compute_drift
    from tuneline.monitoring.reference import champion_reference
    from tuneline.monitoring.windows import plan_window
    from tuneline.settings import load_settings

    r = recipe.load()
    settings = load_settings()
    last_id = json.loads(context.cursor)["last_id"] if context.cursor else 0
    rows = InferenceLog(settings.log_path(r)).read_since(last_id, limit=max(5 * r.drift.window_requests, 500))
    plan = plan_window(rows, last_id=last_id, now=time.time(), window_requests=r.drift.window_requests,
                       window_minutes=r.drift.window_minutes)
    if plan.window is None:
        return dg.SensorResult(skip_reason=plan.reason, cursor=json.dumps({"last_id": plan.cursor}))
    window = plan.window
    reference = champion_reference(mlflow.tracker(), r.registered_model_name(), settings.home / "monitoring")
    if reference is None:
        return dg.SensorResult(skip_reason=f"{r.registered_model_name()} has no champion registered with a drift "
                                           "reference yet", cursor=json.dumps({"last_id": last_id}))
    report = compute_drift(reference.prompts, list(window.prompts), r.drift,
                           tokenizer=load_tokenizer(reference.tokenizer_dir)).to_dict()
    new_cursor = json.dumps({"last_id": plan.cursor, "last_window": window.id})
    waiting = incoming_files(r)
    observation = dg.AssetObservation(
        asset_key="served_traffic",
        metadata={"window": window.id, "requests": len(window.prompts), "failed_skipped": plan.skipped,
                  "champion_version": reference.version, "drift": report["drift"], "drift_score": report["score"],
                  "p_value": report["p_value"], "threshold": report["threshold"],
                  "incoming_files": len(waiting), "features": dg.MetadataValue.json(report["features"]),
                  "reasons": dg.MetadataValue.json(report["reasons"])},
    )
    context.log.info(f"window {window.id} vs champion v{reference.version}: drift={report['drift']} "
                     f"p={report['p_value']:.4g} score={report['score']:.4g}")
    if not report["drift"]:
        return dg.SensorResult(skip_reason=f"window {window.id}: no drift (p={report['p_value']:.3g})",
                               cursor=new_cursor, asset_events=[observation])
    if not waiting:
        return dg.SensorResult(
            skip_reason=f"window {window.id}: drift (p={report['p_value']:.3g}) but no newly labelled rows in "
                        f"{incoming_dir(r)}: reported, not retrained on (label some and drop them there)",
            cursor=new_cursor, asset_events=[observation])
    return dg.SensorResult(
        run_requests=[dg.RunRequest(run_key=f"drift-{window.id}",
                                    tags={"tuneline/trigger": "drift", "tuneline/window": window.id})],
        cursor=new_cursor,
        asset_events=[observation],
    )


@dg.sensor(job=train_model_job, minimum_interval_seconds=300, default_status=dg.DefaultSensorStatus.STOPPED)
def feedback_sensor(context: dg.SensorEvaluationContext, recipe: RecipeResource) -> dg.SensorResult:
    """Requests a training run (``feedback_preferences`` turns the feedback into pairs the reward model and DPO
    train on) once ``feedback.min_new`` feedback rows arrived after the last request; run_key = the newest
    feedback id, so the same feedback never triggers twice."""
    from tuneline.deploy.inference_log import InferenceLog
    from tuneline.settings import load_settings

    r = recipe.load()
    last_id = json.loads(context.cursor)["last_feedback_id"] if context.cursor else 0
    log = InferenceLog(load_settings().log_path(r))
    new = log.read_feedback_since(last_id)
    if len(new) < r.feedback.min_new:
        return dg.SensorResult(skip_reason=f"{len(new)} new feedback rows since #{last_id}; a run needs "
                                           f"{r.feedback.min_new} (feedback.min_new)")
    newest = new[-1]["id"]
    return dg.SensorResult(
        run_requests=[dg.RunRequest(run_key=f"feedback-{newest}",
                                    tags={"tuneline/trigger": "feedback", "tuneline/feedback_rows": str(len(new))})],
        cursor=json.dumps({"last_feedback_id": newest}),
    )


ALL_SENSORS = [data_drift_sensor, feedback_sensor]
