"""The drift sensor through its cursor states, the schedule, and retrain wiring."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pytest
import yaml

from tuneline.data.ingest import read_source
from tuneline.deploy.inference_log import InferenceLog
from tuneline.records import write_jsonl

WINDOW = 60


def prompts(path: Path, start: int, n: int) -> list[str]:
    records = read_source(path).records
    return [r.messages[0]["content"] for r in records[start:start + n]]


@pytest.fixture
def setup(tmp_path: Path, shared_data: Path):
    log_path = tmp_path / "inference.db"
    recipe = {"name": "sensor", "model": {"build": "tiny"}, "data": {"demo": {}},
              "serve": {"log_path": str(log_path)},
              "drift": {"window_requests": WINDOW, "max_samples": 200, "permutations": 199, "significance": 0.01}}
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe))
    reference = tmp_path / "drift_reference.jsonl"
    write_jsonl(reference, ({"prompt": p} for p in prompts(shared_data / "sft" / "alpaca.jsonl", 0, 200)))
    instance = dg.DagsterInstance.ephemeral()
    instance.report_runless_asset_event(dg.AssetMaterialization(
        "dataset_splits", metadata={"drift_reference_path": dg.MetadataValue.path(str(reference))}))
    return instance, InferenceLog(log_path), recipe_path, shared_data


def evaluate(instance, recipe_path: Path, cursor: str | None):
    from pipelines.sensors import data_drift_sensor
    from resources.recipe import RecipeResource

    context = dg.build_sensor_context(instance=instance, cursor=cursor,
                                      resources={"recipe": RecipeResource(path=str(recipe_path))})
    return data_drift_sensor(context)


@pytest.mark.slow
def test_sensor_cursor_states(setup) -> None:
    instance, log, recipe_path, shared = setup
    # 1. nothing logged: skip, cursor stays
    result = evaluate(instance, recipe_path, None)
    assert result.skip_reason is not None and json.loads(result.cursor) == {"last_id": 0}
    # 2. an incomplete window: still a skip
    in_dist = prompts(shared / "sft" / "alpaca.jsonl", 1000, WINDOW)
    for p in in_dist[:10]:
        log.append(model_name="m", model_version=1, prompt=p)
    assert evaluate(instance, recipe_path, result.cursor).skip_reason is not None
    # 3. a full in-distribution window: observed, no run, cursor moves past it
    for p in in_dist[10:]:
        log.append(model_name="m", model_version=1, prompt=p)
    result = evaluate(instance, recipe_path, result.cursor)
    assert not result.run_requests and result.skip_reason is not None
    assert json.loads(result.cursor)["last_id"] == WINDOW
    (obs,) = result.asset_events
    assert obs.asset_key == dg.AssetKey("served_traffic") and obs.metadata["drift"].value is False
    # 4. a drifted window (code instructions): a retrain run keyed by the window id
    cursor_before = result.cursor
    for p in prompts(shared / "drift" / "code_alpaca.jsonl", 0, WINDOW):
        log.append(model_name="m", model_version=1, prompt=p)
    drifted = evaluate(instance, recipe_path, cursor_before)
    (request,) = drifted.run_requests
    assert request.run_key == f"drift-{WINDOW + 1}-{2 * WINDOW}"
    assert request.tags["tuneline/trigger"] == "drift"
    assert drifted.asset_events[0].metadata["drift"].value is True
    # 5. the same window evaluated again (same cursor) asks for the same run key: it never triggers twice
    again = evaluate(instance, recipe_path, cursor_before)
    assert again.run_requests[0].run_key == request.run_key
    # 6. after it, nothing new: skip
    assert evaluate(instance, recipe_path, drifted.cursor).skip_reason is not None


def test_weekly_schedule_requests_a_retrain_in_utc() -> None:
    from pipelines.jobs import RETRAIN_CONFIG
    from pipelines.schedules import weekly_retrain_schedule

    assert weekly_retrain_schedule.execution_timezone == "UTC"
    context = dg.build_schedule_context(scheduled_execution_time=None)
    (request,) = weekly_retrain_schedule.evaluate_tick(context).run_requests
    assert weekly_retrain_schedule.job_name == "retrain_job"
    from pipelines.definitions import defs

    job = defs.resolve_job_def("retrain_job")
    assert job.tags["tuneline/gpu"] == "true" and "dagster/max_runtime" in job.tags
    assert RETRAIN_CONFIG["resources"]["recipe"]["config"]["retrain"] is True
