"""The drift sensor through its cursor states (against the serving champion's own reference), the schedule,
and retrain wiring."""

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


def register_champion(tracker, name: str, reference: Path, root: Path) -> None:
    """A tiny model registered as champion, with the drift reference attached as registration does."""
    from tuneline.data.demo import generate_corpus
    from tuneline.deploy.registry import promote, register_model
    from tuneline.models.tiny import init_tiny_model, save_model, train_tokenizer
    from tuneline.monitoring.reference import attach_reference
    from tuneline.params import DemoDataParams, TinyModelParams

    tiny = TinyModelParams(vocab_size=400, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                           num_kv_heads=2, max_position_embeddings=64)
    tokenizer = train_tokenizer(generate_corpus(DemoDataParams(seed=1, corpus_paragraphs=100)), tiny)
    model_dir = save_model(init_tiny_model(tokenizer, tiny, seed=0), tokenizer, root / "champion")
    run_id = tracker.start_run(f"tuneline/{name}", "registered_model", tags={})
    version = register_model(tracker, f"tuneline-{name}", model_dir, run_id=run_id)["version"]
    attach_reference(tracker, f"tuneline-{name}", version, run_id, reference, model_dir)
    promote(tracker, f"tuneline-{name}", version)


@pytest.fixture
def setup(state: Path, tmp_path: Path, shared_data: Path, monkeypatch: pytest.MonkeyPatch):
    from tuneline.tracking import Tracker

    log_path = tmp_path / "inference.db"
    incoming = tmp_path / "incoming"
    recipe = {"name": "sensor", "model": {"build": "tiny"}, "data": {"demo": {}},
              "serve": {"log_path": str(log_path)},
              "drift": {"window_requests": WINDOW, "max_samples": 200, "permutations": 199, "significance": 0.01,
                        "incoming_dir": str(incoming)}}
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe))
    reference = tmp_path / "drift_reference.jsonl"
    write_jsonl(reference, ({"prompt": p} for p in prompts(shared_data / "sft" / "alpaca.jsonl", 0, 200)))
    tracker = Tracker("sqlite:///" + str(state / "mlflow.db"), artifact_root=str(state / "mlartifacts"))
    register_champion(tracker, "sensor", reference, tmp_path)
    return dg.DagsterInstance.ephemeral(), InferenceLog(log_path), recipe_path, shared_data, tracker, incoming


def evaluate(instance, recipe_path: Path, tracker, cursor: str | None):
    from pipelines.sensors import data_drift_sensor
    from resources.recipe import RecipeResource
    from resources.tracking import MlflowResource

    context = dg.build_sensor_context(instance=instance, cursor=cursor, resources={
        "recipe": RecipeResource(path=str(recipe_path)), "mlflow": MlflowResource(tracking_uri=tracker.tracking_uri)})
    return data_drift_sensor(context)


@pytest.mark.slow
def test_sensor_cursor_states(setup) -> None:
    instance, log, recipe_path, shared, tracker, incoming = setup
    # 1. nothing logged: skip, cursor stays
    result = evaluate(instance, recipe_path, tracker, None)
    assert result.skip_reason is not None and json.loads(result.cursor) == {"last_id": 0}
    # 2. failed requests only: skipped with the reason, and the cursor moves past them (no re-reading forever)
    for i in range(3 * WINDOW):
        log.append(model_name="m", model_version=1, prompt=f"broken {i}", status=500, error="boom")
    result = evaluate(instance, recipe_path, tracker, result.cursor)
    assert "failed request(s) passed over" in str(result.skip_reason)
    assert json.loads(result.cursor) == {"last_id": 3 * WINDOW}
    # 3. an incomplete window: still a skip, the cursor stays before the first usable request
    in_dist = prompts(shared / "sft" / "alpaca.jsonl", 1000, WINDOW)
    for p in in_dist[:10]:
        log.append(model_name="m", model_version=1, prompt=p)
    assert evaluate(instance, recipe_path, tracker, result.cursor).skip_reason is not None
    # 4. a full in-distribution window: observed against the champion's reference, no run, cursor past it
    for p in in_dist[10:]:
        log.append(model_name="m", model_version=1, prompt=p)
    result = evaluate(instance, recipe_path, tracker, result.cursor)
    assert not result.run_requests and result.skip_reason is not None
    assert json.loads(result.cursor)["last_id"] == 4 * WINDOW
    (obs,) = result.asset_events
    assert obs.asset_key == dg.AssetKey("served_traffic") and obs.metadata["drift"].value is False
    assert obs.metadata["champion_version"].value == 1
    assert "length_tokens" in obs.metadata["features"].value  # the champion's tokenizer was used
    # 5. a drifted window with nothing newly labelled: reported, not retrained on
    cursor_before = result.cursor
    for p in prompts(shared / "drift" / "code_alpaca.jsonl", 0, WINDOW):
        log.append(model_name="m", model_version=1, prompt=p)
    reported = evaluate(instance, recipe_path, tracker, cursor_before)
    assert not reported.run_requests and "not retrained on" in str(reported.skip_reason)
    assert reported.asset_events[0].metadata["drift"].value is True
    # 6. the same window once labelled rows wait: a retrain run keyed by the window id, never twice
    incoming.mkdir()
    (incoming / "labelled.jsonl").write_text('{"instruction": "x", "input": "", "output": "y"}\n')
    drifted = evaluate(instance, recipe_path, tracker, cursor_before)
    (request,) = drifted.run_requests
    assert request.run_key == f"drift-{4 * WINDOW + 1}-{5 * WINDOW}"
    assert request.tags["tuneline/trigger"] == "drift"
    again = evaluate(instance, recipe_path, tracker, cursor_before)
    assert again.run_requests[0].run_key == request.run_key
    # 7. after it, nothing new: skip
    assert evaluate(instance, recipe_path, tracker, drifted.cursor).skip_reason is not None


def test_weekly_schedule_retrains_only_when_something_new_was_labelled(tmp_path: Path) -> None:
    import datetime

    from pipelines.jobs import RETRAIN_CONFIG
    from pipelines.schedules import weekly_retrain_schedule
    from resources.recipe import RecipeResource

    incoming = tmp_path / "incoming"
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump({"name": "sched", "model": {"build": "tiny"}, "data": {"demo": {}},
                                           "drift": {"incoming_dir": str(incoming)}}))
    assert weekly_retrain_schedule.execution_timezone == "UTC"
    when = datetime.datetime(2026, 11, 30, 3, 0, tzinfo=datetime.timezone.utc)

    def tick():
        context = dg.build_schedule_context(scheduled_execution_time=when,
                                            resources={"recipe": RecipeResource(path=str(recipe_path))})
        return weekly_retrain_schedule.evaluate_tick(context)

    skipped = tick()
    assert not skipped.run_requests and "no newly labelled rows" in skipped.skip_message
    incoming.mkdir()
    (incoming / "week.jsonl").write_text('{"instruction": "x", "input": "", "output": "y"}\n')
    (request,) = tick().run_requests
    assert request.run_key == "weekly-2026-11-30" and request.tags["tuneline/trigger"] == "schedule"
    assert weekly_retrain_schedule.job_name == "retrain_job"
    from pipelines.definitions import defs

    job = defs.resolve_job_def("retrain_job")
    assert job.tags["tuneline/gpu"] == "true" and "dagster/max_runtime" in job.tags
    assert RETRAIN_CONFIG["resources"]["recipe"]["config"]["retrain"] is True
