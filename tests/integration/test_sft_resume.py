"""The SFT recipe CLI survives a SIGKILL: the rerun resumes from the last complete checkpoint.

The first run is a plain subprocess killed right after its first checkpoint is marked complete;
the rerun goes through Dagster Pipes (as the pipeline launches it) and also logs to an MLflow run
reopened by id. A fake checkpoint without the completion marker must be ignored.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tuneline import storage
from tuneline.models.provision import model_ref
from tuneline.params import TinyModelParams
from tuneline.refs import ModelRef
from tuneline.records import ChatRecord, write_jsonl

ROOT = Path(__file__).resolve().parents[2]
WORDS = "apple banana cherry grape lemon mango peach plum berry melon kiwi lime".split()
TINY = TinyModelParams(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2, num_kv_heads=2,
    max_position_embeddings=256, tokenizer_min_frequency=1,
)
MAX_STEPS = 30


def records(n: int, offset: int = 0) -> list[ChatRecord]:
    out = []
    for i in range(n):
        words = " ".join(WORDS[(i * 7 + j * 3 + offset) % len(WORDS)] for j in range(1 + i % 4))
        out.append(
            ChatRecord(
                kind="sft",
                messages=[{"role": "user", "content": f"reverse: {words}"}, {"role": "assistant", "content": words[::-1]}],
                source="test", line=i,
            )
        )
    return out


@pytest.fixture(scope="module")
def spec_path(tmp_path_factory) -> Path:
    from tuneline.models.tiny import init_tiny_model, save_model, train_tokenizer

    root = tmp_path_factory.mktemp("sft-resume")
    train, val = records(48), records(8, offset=5)
    tokenizer = train_tokenizer([m["content"] for r in train + val for m in r.messages], TINY)
    base = save_model(init_tiny_model(tokenizer, TINY, seed=0), tokenizer, root / "base")
    write_jsonl(root / "train.jsonl", (r.to_dict() for r in train))
    write_jsonl(root / "val.jsonl", (r.to_dict() for r in val))
    spec = {
        "base": model_ref(base, base.as_uri(), method="tiny", stage="test").to_dict(),
        "train_uri": (root / "train.jsonl").as_uri(),
        "val_uri": (root / "val.jsonl").as_uri(),
        "out_uri": (root / "out").as_uri(),
        "params": {
            "method": "lora", "batch_size": 4, "eval_steps": 2, "save_steps": 2, "max_steps": MAX_STEPS,
            "lora": {"r": 4, "alpha": 8}, "early_stopping": {"patience": 1000},
        },
        "seed": 0,
        "max_steps": None,
    }
    path = root / "spec.json"
    path.write_text(json.dumps(spec), encoding="utf-8")
    return path


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


@pytest.mark.slow
def test_killed_recipe_resumes_from_last_complete_checkpoint(spec_path, tmp_path):
    import dagster as dg
    from mlflow.tracking import MlflowClient

    from tuneline.train.checkpoints import COMPLETE_MARKER, checkpoint_step, last_valid_checkpoint

    spec = json.loads(spec_path.read_text())
    out = storage.local_path(spec["out_uri"])
    checkpoints = out / "checkpoints"

    # 1. run the CLI and SIGKILL it as soon as a checkpoint is marked complete
    stderr = open(tmp_path / "first.stderr", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tuneline.recipes.sft", "--spec", str(spec_path)],
        cwd=ROOT, env=child_env(), stdout=subprocess.DEVNULL, stderr=stderr,
    )
    deadline = time.monotonic() + 180
    try:
        while not list(checkpoints.glob(f"checkpoint-*/{COMPLETE_MARKER}")):
            assert proc.poll() is None, (tmp_path / "first.stderr").read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 180 s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
        stderr.close()
    assert proc.returncode == -signal.SIGKILL
    valid = last_valid_checkpoint(checkpoints, delete_incomplete=False)
    assert valid is not None
    killed_at = checkpoint_step(valid)
    assert killed_at < MAX_STEPS, "the run finished before it was killed"
    assert not (out / "result.json").exists()

    # a checkpoint whose save never finished (no marker) must be ignored, though its step is higher
    fake = checkpoints / "checkpoint-9999"
    fake.mkdir()
    (fake / "adapter_model.safetensors").write_bytes(b"truncated")

    # 2. rerun the same spec through Dagster Pipes, logging to an MLflow run reopened by id
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=tracking_uri)
    run_id = client.create_run(client.create_experiment("sft-resume-test")).info.run_id
    spec["mlflow"] = {"tracking_uri": tracking_uri, "run_id": run_id}
    spec_path.write_text(json.dumps(spec), encoding="utf-8")

    @dg.asset
    def sft_adapter(context: dg.AssetExecutionContext, pipes: dg.PipesSubprocessClient):
        return pipes.run(
            command=[sys.executable, "-m", "tuneline.recipes.sft", "--spec", str(spec_path)],
            context=context, env=child_env(),
        ).get_materialize_result()

    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize(
        [sft_adapter], resources={"pipes": dg.PipesSubprocessClient(cwd=str(ROOT))}, instance=instance
    )
    assert result.success
    [materialization] = result.asset_materializations_for_node("sft_adapter")
    meta = {k: v.value for k, v in materialization.metadata.items()}
    assert meta["resumed_from_step"] == killed_at
    assert meta["global_step"] == MAX_STEPS
    assert meta["real_tokens"] > 0 and meta["tokens_per_second"] > 0

    saved = json.loads((out / "result.json").read_text())
    details = saved["details"]
    assert details["resumed_from_step"] == killed_at and details["global_step"] == MAX_STEPS
    assert [s for s, _ in details["train_losses"]] == list(range(1, MAX_STEPS + 1))  # history survives the kill
    assert not fake.exists()
    model = ModelRef.from_dict(saved["model"])
    assert model.kind == "adapter" and model.base is not None and model.method == "lora"
    assert (storage.local_path(model.uri) / "adapter_model.safetensors").is_file()

    # every trainer log streamed over Pipes, per-step metrics landed in the MLflow run
    messages = [entry.user_message for entry in instance.all_logs(result.run_id)]
    assert any('"eval_loss"' in m for m in messages) and any('"learning_rate"' in m for m in messages)
    losses = client.get_metric_history(run_id, "loss")
    assert sorted(m.step for m in losses) == list(range(killed_at + 1, MAX_STEPS + 1))
    assert client.get_metric_history(run_id, "eval_loss")


@pytest.mark.slow
def test_recipe_error_exits_nonzero_with_traceback(tmp_path):
    bad = tmp_path / "spec.json"
    base = {"uri": "file:///x", "sha256": "0", "kind": "full", "method": "tiny", "stage": "test"}
    bad.write_text(json.dumps({"base": base, "train_uri": "x", "val_uri": "x", "out_uri": tmp_path.as_uri(),
                               "params": {"method": "lora", "lr": 1}, "seed": 0}))
    proc = subprocess.run(
        [sys.executable, "-m", "tuneline.recipes.sft", "--spec", str(bad)],
        cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "unknown key params.lr" in proc.stderr
