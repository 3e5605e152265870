"""An MLflow outage is survived: the tracking server stopped for 30 s in the middle of SFT and restarted loses
no metric and does not fail the step; a dead server at start fails fast, naming the URI without its secrets."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tuneline.params import TinyModelParams
from tuneline.records import ChatRecord, write_jsonl

ROOT = Path(__file__).resolve().parents[2]
OUTAGE_S = 30
STEPS = 60


def _records(n: int) -> list[ChatRecord]:
    words = "red green blue cat dog sun moon tree fish bird".split()
    return [ChatRecord(kind="sft", source="t", line=i, messages=[
        {"role": "user", "content": f"repeat {words[i % 10]} {words[(i * 3) % 10]}"},
        {"role": "assistant", "content": f"{words[i % 10]} {words[(i * 3) % 10]}"}]) for i in range(n)]


def _spec(tmp_path: Path, tracking_uri: str, run_id: str) -> Path:
    from tuneline.models.provision import model_ref
    from tuneline.models.tiny import init_tiny_model, save_model, train_tokenizer

    tiny = TinyModelParams(vocab_size=320, hidden_size=64, intermediate_size=128, num_layers=1, num_heads=2,
                           num_kv_heads=2, max_position_embeddings=128, tokenizer_min_frequency=1)
    train = _records(64)
    tokenizer = train_tokenizer([m["content"] for r in train for m in r.messages], tiny)
    base = save_model(init_tiny_model(tokenizer, tiny, seed=0), tokenizer, tmp_path / "base")
    write_jsonl(tmp_path / "train.jsonl", (r.to_dict() for r in train))
    spec = {"base": model_ref(base, base.as_uri(), method="tiny", stage="test").to_dict(),
            "train_uri": (tmp_path / "train.jsonl").as_uri(), "val_uri": (tmp_path / "train.jsonl").as_uri(),
            "out_uri": (tmp_path / "out").as_uri(), "seed": 0,
            "params": {"method": "full", "batch_size": 8, "max_steps": STEPS, "epochs": 100, "eval_steps": 20,
                       "save_steps": 20,
                       "bf16": False, "max_length": 32},
            "mlflow": {"tracking_uri": tracking_uri, "run_id": run_id}}
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    return path


@pytest.mark.slow
def test_sft_survives_a_30_second_tracking_outage(mlflow_server, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server.uri)
    run_id = client.create_run(client.create_experiment(f"outage-{time.time_ns()}")).info.run_id
    spec = _spec(tmp_path, mlflow_server.uri, run_id)
    proc = subprocess.Popen([sys.executable, "-m", "tuneline.recipes.sft", "--spec", str(spec)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # wait for the first metrics to land, then take the server away for OUTAGE_S seconds
    deadline = time.time() + 180
    while not client.get_metric_history(run_id, "loss"):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() < deadline, "no metric reached the server"
        time.sleep(0.5)
    mlflow_server.stop()
    stopped_at = time.time()
    time.sleep(OUTAGE_S)
    trained_during_outage = proc.poll() is None or proc.returncode == 0
    mlflow_server.start()
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    assert trained_during_outage and time.time() - stopped_at >= OUTAGE_S
    steps = sorted(m.step for m in client.get_metric_history(run_id, "loss"))
    assert steps == list(range(1, STEPS + 1)), f"lost metrics: {sorted(set(range(1, STEPS + 1)) - set(steps))}"
    assert len(client.get_metric_history(run_id, "eval_loss")) >= STEPS // 20


@pytest.mark.slow
def test_a_dead_tracking_server_fails_fast_with_the_uri_redacted(tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dead = f"http://tuner:hunter2@127.0.0.1:{port}"
    spec = _spec(tmp_path, dead, "0" * 32)
    started = time.time()
    proc = subprocess.run([sys.executable, "-m", "tuneline.recipes.sft", "--spec", str(spec)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and time.time() - started < 120
    assert "127.0.0.1" in proc.stderr and "tuner:***@" in proc.stderr and "hunter2" not in proc.stderr
    assert not (tmp_path / "out" / "checkpoints").exists()  # no training happened
