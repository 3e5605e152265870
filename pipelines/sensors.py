"""Sensors: the drift signal over served traffic."""

import json
import time

import dagster as dg

from pipelines.jobs import retrain_job
from resources.recipe import RecipeResource


def drift_reference(instance: dg.DagsterInstance) -> list[str]:
    """The reference prompts stored by the latest dataset_splits materialization."""
    from tuneline.records import read_jsonl

    event = instance.get_latest_materialization_event(dg.AssetKey("dataset_splits"))
    if event is None or event.asset_materialization is None:
        return []
    entry = event.asset_materialization.metadata.get("drift_reference_path")
    return [row["prompt"] for row in read_jsonl(entry.value)] if entry is not None else []


@dg.sensor(job=retrain_job, minimum_interval_seconds=60, default_status=dg.DefaultSensorStatus.STOPPED)
def data_drift_sensor(context: dg.SensorEvaluationContext, recipe: RecipeResource) -> dg.SensorResult:
    """Tests each new window of served requests against the training reference; requests a retrain
    (run_key = window id, so a window never triggers twice) when the prompts drifted."""
    from tuneline.deploy.inference_log import InferenceLog
    from tuneline.monitoring.drift import compute_drift
    from tuneline.monitoring.windows import next_window

    r = recipe.load()
    cursor = json.loads(context.cursor) if context.cursor else {"last_id": 0}
    log = InferenceLog(r.serve.log_path)
    rows = log.read_since(cursor["last_id"], limit=r.drift.window_requests)
    window = next_window(rows, now=time.time(), window_requests=r.drift.window_requests,
                         window_minutes=r.drift.window_minutes)
    if window is None:
        return dg.SensorResult(skip_reason=f"{len(rows)} untested request(s): the window is not complete yet",
                               cursor=json.dumps(cursor))
    reference = drift_reference(context.instance)
    if not reference:
        return dg.SensorResult(skip_reason="no dataset_splits materialization holds a drift reference yet",
                               cursor=json.dumps(cursor))
    report = compute_drift(reference, list(window.prompts), r.drift).to_dict()
    new_cursor = json.dumps({"last_id": window.last_id, "last_window": window.id})
    observation = dg.AssetObservation(
        asset_key="served_traffic",
        metadata={"window": window.id, "requests": len(window.prompts), "drift": report["drift"],
                  "drift_score": report["score"], "p_value": report["p_value"], "threshold": report["threshold"],
                  "features": dg.MetadataValue.json(report["features"]),
                  "reasons": dg.MetadataValue.json(report["reasons"])},
    )
    context.log.info(f"window {window.id}: drift={report['drift']} p={report['p_value']:.4g} "
                     f"score={report['score']:.4g}")
    if not report["drift"]:
        return dg.SensorResult(skip_reason=f"window {window.id}: no drift (p={report['p_value']:.3g})",
                               cursor=new_cursor, asset_events=[observation])
    return dg.SensorResult(
        run_requests=[dg.RunRequest(run_key=f"drift-{window.id}",
                                    tags={"tuneline/trigger": "drift", "tuneline/window": window.id})],
        cursor=new_cursor,
        asset_events=[observation],
    )


ALL_SENSORS = [data_drift_sensor]
