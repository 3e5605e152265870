"""URIs through fsspec: local files, and a real S3-compatible server (moto) on loopback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tuneline import storage


def test_local_uris_round_trip(tmp_path: Path) -> None:
    uri = storage.to_uri(tmp_path / "a" / "b.txt")
    assert uri.startswith("file:///") and storage.is_local(uri)
    storage.write_text(uri, "hello")
    assert storage.read_text(uri) == "hello" and storage.fetch(uri) == tmp_path / "a" / "b.txt"
    assert storage.join("s3://bucket/x/", "y", "/z") == "s3://bucket/x/y/z"
    with pytest.raises(storage.StorageError, match="does not exist"):
        storage.fetch(storage.to_uri(tmp_path / "missing"))


def test_redact_masks_passwords_everywhere() -> None:
    text = "storage postgresql://tuner:s3cret@127.0.0.1:5432/optuna and http://u:p%40ss@h/x; s3://bucket/k"
    out = storage.redact(text)
    assert "s3cret" not in out and "p%40ss" not in out
    assert "postgresql://tuner:***@127.0.0.1:5432/optuna" in out and "s3://bucket/k" in out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_server():
    """A moto S3 server process on a free loopback port, stopped by PID at the end."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("moto server did not start")
    env = {"TUNELINE_S3_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="tuneline")
    try:
        yield endpoint
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        proc.terminate()
        proc.wait(timeout=10)


def test_object_store_round_trip(s3_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNELINE_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "model"
    (folder / "sub").mkdir(parents=True)
    (folder / "weights.safetensors").write_bytes(b"\x00\x01" * 1000)
    (folder / "sub" / "config.json").write_text("{}")
    uri = "s3://tuneline/runs/r1/model"
    storage.publish(folder, uri)
    assert storage.exists(uri + "/sub/config.json")
    fetched = storage.fetch(uri)
    assert (fetched / "weights.safetensors").read_bytes() == (folder / "weights.safetensors").read_bytes()
    assert (fetched / "sub" / "config.json").read_text() == "{}"
    assert storage.fetch(uri) == fetched  # cached once complete
    storage.write_text("s3://tuneline/runs/r1/result.json", '{"ok": true}')
    assert storage.read_text("s3://tuneline/runs/r1/result.json") == '{"ok": true}'
    with pytest.raises(storage.StorageError, match="does not exist"):
        storage.fetch("s3://tuneline/runs/none")


def test_remote_workspace_resumes_from_what_was_uploaded(s3_server: str, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNELINE_CACHE", str(tmp_path / "cache"))
    uri = "s3://tuneline/runs/r2/sft"
    first = storage.Workspace(uri, scratch=tmp_path / "machine-a")
    assert first.remote and first.path.is_dir()
    (first.path / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    (first.path / "checkpoints" / "checkpoint-2" / "state.json").write_text('{"step": 2}')
    first.sync("checkpoints/checkpoint-2")
    assert first.uri_of("checkpoints/checkpoint-2") == uri + "/checkpoints/checkpoint-2"
    # a retried trainer on another machine starts from what the first one uploaded
    second = storage.Workspace(uri, scratch=tmp_path / "machine-b")
    assert (second.path / "checkpoints" / "checkpoint-2" / "state.json").read_text() == '{"step": 2}'
