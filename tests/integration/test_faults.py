"""Faults a long-running pipeline meets: a disk that fills while a checkpoint is written, a checkpoint damaged
on disk, and SQLite files locked by a concurrent writer."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tuneline.params import TinyModelParams

ROOT = Path(__file__).resolve().parents[2]
TINY = TinyModelParams(vocab_size=320, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2,
                       num_kv_heads=2, max_position_embeddings=128, tokenizer_min_frequency=1)


def pretrain_spec(root: Path, out: Path, steps: int = 30) -> Path:
    from tuneline.data.demo import generate_corpus
    from tuneline.params import DemoDataParams

    corpus = root / "corpus.txt"
    if not corpus.exists():
        corpus.write_text("\n\n".join(generate_corpus(DemoDataParams(seed=2, corpus_paragraphs=300))) + "\n")
    spec = {"out_uri": out.as_uri(), "seed": 1, "steps": steps, "corpus_uris": [corpus.as_uri()],
            "model": {"build": "tiny", "tiny": {k: getattr(TINY, k) for k in (
                "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                "max_position_embeddings")}},
            "pretrain": {"steps": steps, "batch_size": 4, "seq_len": 32, "warmup_steps": 2, "log_every": 5,
                         "checkpoint_every": 10}}
    path = root / f"{out.name}.json"
    path.write_text(json.dumps(spec))
    return path


def run_pretrain(spec: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tuneline.recipes.pretrain", "--spec", str(spec)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture
def small_disk(tmp_path: Path):
    """A tmpfs mount with room for about one checkpoint of the tiny model (needs mount rights: root here)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({made.stderr.decode().strip()}): the disk-full drill needs it")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


@pytest.mark.slow
def test_disk_full_during_a_checkpoint_fails_clearly_and_keeps_the_previous_one(small_disk: Path,
                                                                                 tmp_path: Path) -> None:
    from tuneline.train.checkpoints import COMPLETE_MARKER, checkpoint_is_intact, last_valid_checkpoint

    out = small_disk / "base"
    full = run_pretrain(pretrain_spec(tmp_path, out))
    assert full.returncode == 1
    # a clear error, not a silent hang, a half-written file taken for a checkpoint, or torch's "unexpected pos"
    assert "No space left on device: the disk holding" in full.stderr
    assert "a rerun resumes from checkpoint-10" in full.stderr
    checkpoints = out / "checkpoints"
    valid = last_valid_checkpoint(checkpoints, delete_incomplete=False)
    assert valid is not None and valid.name == "checkpoint-10" and checkpoint_is_intact(valid)
    assert not (checkpoints / "checkpoint-20" / COMPLETE_MARKER).exists()
    # space is freed (the volume grows): the rerun resumes from the checkpoint that survived and finishes
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    resumed = run_pretrain(pretrain_spec(tmp_path, out))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    metrics = json.loads((out / "result.json").read_text())["metrics"]
    assert metrics["pretrain_resumed_from_step"] == 10


@pytest.mark.slow
def test_a_damaged_checkpoint_is_skipped_for_the_one_before(tmp_path: Path) -> None:
    from tuneline.train.checkpoints import checkpoint_is_intact, last_valid_checkpoint

    straight = run_pretrain(pretrain_spec(tmp_path, tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr[-3000:]
    # a run stopped after its step-20 checkpoint, whose newest checkpoint is then damaged on disk
    out = tmp_path / "damaged"
    first = run_pretrain(pretrain_spec(tmp_path, out, steps=30))
    assert first.returncode == 0
    (out / "result.json").unlink()
    (out / "model").rename(tmp_path / "first-model")
    newest = out / "checkpoints" / "checkpoint-20"
    weights = newest / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: still a complete checkpoint, no longer the one written
    weights.write_bytes(bytes(data))
    assert not checkpoint_is_intact(newest)
    assert last_valid_checkpoint(out / "checkpoints").name == "checkpoint-10"
    rerun = run_pretrain(pretrain_spec(tmp_path, out, steps=30))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    a = json.loads((tmp_path / "straight" / "result.json").read_text())
    b = json.loads((out / "result.json").read_text())
    assert b["metrics"]["pretrain_resumed_from_step"] == 10
    assert b["model"]["sha256"] == a["model"]["sha256"]  # resumed from step 10: the same weights, bitwise


def hold_lock(path: Path, seconds: float, ready: threading.Event) -> None:
    conn = sqlite3.connect(str(path), isolation_level=None)
    conn.execute("BEGIN EXCLUSIVE")
    ready.set()
    time.sleep(seconds)
    conn.execute("COMMIT")
    conn.close()


@pytest.mark.slow
def test_sqlite_files_locked_by_a_concurrent_writer_are_waited_for(tmp_path: Path) -> None:
    from tuneline.deploy.inference_log import InferenceLog
    from tuneline.tracking import Tracker, sqlite_tracking_uri

    log = InferenceLog(tmp_path / "inference.db")
    tracker = Tracker(sqlite_tracking_uri(tmp_path / "mlflow.db"))
    run_id = tracker.start_run("locks", "r", tags={})
    for path, write in ((tmp_path / "inference.db", lambda: log.append(model_name="m", model_version=1, prompt="p")),
                        (tmp_path / "mlflow.db", lambda: tracker.log_metrics(run_id, {"m": 1.0}, step=1))):
        ready = threading.Event()
        holder = threading.Thread(target=hold_lock, args=(path, 7.0, ready))
        holder.start()
        ready.wait(10)
        started = time.monotonic()
        write()  # SQLite's own default would give up after 5 s with "database is locked"
        waited = time.monotonic() - started
        holder.join()
        assert waited >= 5.0, f"{path.name}: the writer did not wait for the lock ({waited:.1f} s)"
    assert log.count() == 1
    assert [m.value for m in tracker.client().get_metric_history(run_id, "m")] == [1.0]
