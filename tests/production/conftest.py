"""The production tier: the machine's real PostgreSQL, a real MLflow tracking server process on it, and a real
S3-compatible object store (moto in server mode), each started and stopped here by PID on free loopback ports.
Every test run gets its own uniquely named databases, dropped at the end.

Where PostgreSQL is unreachable the tier skips with the reason; under ``TUNELINE_REQUIRE_SERVICES=1`` (set by
``.ci/run``) it fails instead.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

PG_HOST = os.environ.get("TUNELINE_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("TUNELINE_PG_PORT", "5432"))
PG_USER = os.environ.get("TUNELINE_PG_USER", "postgres")
# a password the tests put into every URL: with trust auth PostgreSQL accepts it, and no artifact, param or
# metadata value may ever show it
SECRET = "s3cr3t-" + uuid.uuid4().hex[:12]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _connect(dbname: str = "postgres"):
    import psycopg2

    return psycopg2.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname=dbname, connect_timeout=5)


@pytest.fixture(scope="session")
def postgres() -> Iterator[str]:
    """A unique database prefix on the real PostgreSQL; the databases made under it are dropped at the end."""
    try:
        _connect().close()
    except Exception as exc:  # noqa: BLE001 - any connection failure means no service
        reason = f"PostgreSQL not reachable at {PG_USER}@{PG_HOST}:{PG_PORT} ({str(exc).strip().splitlines()[0]})"
        if os.environ.get("TUNELINE_REQUIRE_SERVICES") == "1":
            pytest.fail(reason + "; TUNELINE_REQUIRE_SERVICES=1 requires it")
        pytest.skip(reason)
    prefix = f"tuneline_test_{uuid.uuid4().hex[:10]}"
    yield prefix
    conn = _connect()
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("SELECT datname FROM pg_database WHERE datname LIKE %s", (prefix + "%",))
        for (name,) in cur.fetchall():
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    conn.close()


@pytest.fixture(scope="session")
def secret() -> str:
    return SECRET


@pytest.fixture(scope="session")
def make_database(postgres: str):
    """``make_database(name)``: a new database under the run's prefix; its URL holds the test password."""
    return lambda name: create_database(postgres, name)


def create_database(prefix: str, name: str) -> str:
    """Create ``<prefix>_<name>``; returns a SQLAlchemy URL holding the test password (trust auth ignores it)."""
    db = f"{prefix}_{name}"
    conn = _connect()
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{db}"')
    conn.close()
    return f"postgresql://{PG_USER}:{SECRET}@{PG_HOST}:{PG_PORT}/{db}"


def _wait(url: str, proc: subprocess.Popen, timeout: float = 120, log: Path | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log is not None and log.is_file() else ""
            raise RuntimeError(f"{url}: the server exited with {proc.returncode}\n{tail}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


@dataclass
class MlflowServer:
    """A real ``mlflow server`` on PostgreSQL, serving artifacts; restartable on the same port."""

    backend: str
    artifacts: Path
    port: int
    log: Path
    proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", self.backend,
               "--artifacts-destination", self.artifacts.as_uri(), "--host", "127.0.0.1", "--port", str(self.port),
               "--workers", "1"]
        self.proc = subprocess.Popen(cmd, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        _wait(self.uri + "/health", self.proc, log=self.log)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.proc = None


@pytest.fixture(scope="session")
def mlflow_server(postgres: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    root = tmp_path_factory.mktemp("mlflow-server")
    server = MlflowServer(backend=create_database(postgres, "mlflow"), artifacts=root / "artifacts",
                          port=free_port(), log=root / "server.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A moto S3 server process with a bucket; yields the environment that reaches it."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    env = {"TUNELINE_S3_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "tuneline",
           "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1"}
    try:
        _wait(endpoint + "/moto-api/", proc, timeout=60)
        import boto3

        boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="tuneline", aws_secret_access_key=SECRET,
                     region_name="us-east-1").create_bucket(Bucket="tuneline-prod")
        yield env
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
