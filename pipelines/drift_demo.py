"""`make drift-demo`: serve the champion, send in-distribution traffic (no retrain), then drifted traffic
(the held-back demo task family, plus ../shared/data/drift when present) and show the drift sensor
requesting a retrain, with its drift report."""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import dagster as dg

from pipelines.cli import setup_environment
from tuneline import storage
from tuneline.paths import project_root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port: int, prompt: str) -> int:
    body = json.dumps({"prompt": prompt, "max_new_tokens": 16}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/generate", data=body,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def wait_healthy(port: int, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise TimeoutError("the server did not become healthy")


def latest_value(instance: dg.DagsterInstance, asset: str, key: str) -> str:
    event = instance.get_latest_materialization_event(dg.AssetKey(asset))
    if event is None:
        raise SystemExit(f"drift-demo: no {asset} materialization yet: run `make run` first")
    return event.asset_materialization.metadata[key].value


def prompts_from(path: Path, n: int) -> list[str]:
    from tuneline.monitoring.drift import texts_from_file

    return texts_from_file(path)[:n]


def evaluate_sensor(instance: dg.DagsterInstance, recipe_path: str, cursor: str) -> dg.SensorResult:
    from pipelines.sensors import data_drift_sensor
    from resources.recipe import RecipeResource
    from resources.tracking import MlflowResource
    from tuneline.settings import load_settings

    context = dg.build_sensor_context(instance=instance, cursor=cursor, resources={
        "recipe": RecipeResource(path=recipe_path), "mlflow": MlflowResource(tracking_uri=load_settings().tracking_uri)})
    return data_drift_sensor(context)


def show(result: dg.SensorResult) -> None:
    for event in result.asset_events or []:
        meta = {k: v.value for k, v in event.metadata.items()}
        print(f"  drift report for window {meta['window']}: drift={meta['drift']} p={meta['p_value']:.4g} "
              f"score={meta['drift_score']:.4g} (threshold {meta['threshold']})")
        for name, feature in meta["features"].items():
            print(f"    {name}: statistic {feature.get('statistic'):.4g}, drift={feature.get('drift')}")
    if result.run_requests:
        for request in result.run_requests:
            print(f"  -> RunRequest for retrain_job, run_key={request.run_key}, tags={dict(request.tags)}")
    else:
        print(f"  -> no retrain: {result.skip_reason.skip_message if result.skip_reason else ''}")


def main() -> int:
    setup_environment()
    from tuneline.data.raw import incoming_dir
    from tuneline.deploy.inference_log import InferenceLog
    from tuneline.params import load_recipe
    from tuneline.paths import resolve
    from tuneline.settings import load_settings

    recipe_path = os.environ.get("RECIPE", "configs/demo.yaml")
    recipe = load_recipe(resolve(recipe_path))
    n = recipe.drift.window_requests
    instance = dg.DagsterInstance.get()
    reference_dir = storage.fetch(latest_value(instance, "dataset_splits", "drift_reference")).parent
    in_dist = [json.loads(line)["messages"][0]["content"]
               for line in (reference_dir / "test.jsonl").read_text().splitlines() if line.strip()]
    drift_file = storage.fetch(latest_value(instance, "raw_dataset", "drift_file"))
    drifted = prompts_from(drift_file, n)
    shared = project_root().parent / "shared" / "data" / "drift"
    if shared.is_dir():
        for path in sorted(shared.glob("*.jsonl")):
            drifted += prompts_from(path, n // 2)
    # split files are ordered by stratum (task family): shuffle so each window mixes what it samples
    rng = random.Random(recipe.seed)
    rng.shuffle(in_dist)
    rng.shuffle(drifted)
    log = InferenceLog(load_settings().log_path(recipe))
    cursor = json.dumps({"last_id": log.last_id()})  # this demo's traffic only

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "serve", "--recipe", recipe_path,
                               "--port", str(port)], cwd=project_root(), start_new_session=True)
    try:
        print(f"serving {recipe.registered_model_name()}@champion on http://127.0.0.1:{port}")
        wait_healthy(port, server)
        print(f"\n1. sending {n} in-distribution requests (the demo test split)")
        for prompt in (in_dist * (n // max(1, len(in_dist)) + 1))[:n]:
            post(port, prompt)
        first = evaluate_sensor(instance, recipe_path, cursor)
        show(first)
        print(f"\n2. sending {n} drifted requests (held-back family '{recipe.data.demo.drift_family if recipe.data.demo else '-'}'"
              f"{' + shared drift files' if shared.is_dir() else ''})")
        for prompt in drifted[:n]:
            post(port, prompt)
        second = evaluate_sensor(instance, recipe_path, first.cursor)
        show(second)
        print(f"\n3. the drifted rows get labelled: {drift_file.name} dropped into {incoming_dir(recipe)}")
        incoming_dir(recipe).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(drift_file, incoming_dir(recipe) / f"labelled-{drift_file.name}")
        third = evaluate_sensor(instance, recipe_path, first.cursor)  # the same window, now with rows to learn from
        show(third)
        ok = not first.run_requests and not second.run_requests and bool(third.run_requests)
        print("\nresult:", "no retrain on in-distribution traffic; drift alone reported; a retrain once labelled "
              "rows arrived" if ok else "UNEXPECTED: see the reports above")
        return 0 if ok else 1
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


if __name__ == "__main__":
    sys.exit(main())
