"""The production stack on one machine: ``tuneline prod up | run | down`` (``make prod-up``, ``prod-run``, ``prod-down``).

``up`` checks that PostgreSQL answers (``TUNELINE_PG_HOST``/``_PORT``/``_USER``, password only from
``PGPASSWORD``), creates the three databases (``<prefix>_dagster``, ``<prefix>_mlflow``, ``<prefix>_optuna``;
prefix ``TUNELINE_PG_PREFIX``, default ``tuneline``), and starts, each on a free port of 127.0.0.1 with its
PID recorded: an MLflow tracking server on the MLflow database serving artifacts, the Dagster daemon and the
Dagster webserver on the Dagster database (``deploy/dagster.production.yaml``). ``run`` submits the recipe's
``train_model_job`` through the instance's run queue (so the ``tuneline/gpu`` limit and
``dagster/max_runtime`` apply) and waits for it. ``down`` stops every recorded process by PID; the databases
stay (``tuneline prod down --drop`` drops them too).

Everything lives under ``$TUNELINE_HOME/prod``; ``env.sh`` there exports what a shell needs to talk to the
stack (no password is ever written to it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Optional

from tuneline.paths import project_root, state_dir

DATABASES = ("dagster", "mlflow", "optuna")


class ProdError(RuntimeError):
    """The stack cannot start or be reached; the message says what to set or do."""


def prod_dir() -> Path:
    return state_dir() / "prod"


def pg() -> dict[str, Any]:
    return {"host": os.environ.get("TUNELINE_PG_HOST", "127.0.0.1"),
            "port": int(os.environ.get("TUNELINE_PG_PORT", "5432")),
            "user": os.environ.get("TUNELINE_PG_USER", "postgres"),
            "prefix": os.environ.get("TUNELINE_PG_PREFIX", "tuneline")}


def pg_url(db: str) -> str:
    """A SQLAlchemy URL without a password (libpq takes it from PGPASSWORD)."""
    c = pg()
    return f"postgresql://{c['user']}@{c['host']}:{c['port']}/{c['prefix']}_{db}"


def _connect(dbname: str = "postgres") -> Any:
    import psycopg2

    c = pg()
    try:
        return psycopg2.connect(host=c["host"], port=c["port"], user=c["user"], dbname=dbname, connect_timeout=5)
    except psycopg2.OperationalError as exc:
        raise ProdError(
            f"PostgreSQL is not reachable at {c['user']}@{c['host']}:{c['port']} ({str(exc).strip().splitlines()[0]}). "
            "Start PostgreSQL, or set TUNELINE_PG_HOST, TUNELINE_PG_PORT, TUNELINE_PG_USER (and PGPASSWORD) to one "
            "that runs") from None


def create_databases() -> list[str]:
    """Create the stack's databases that do not exist yet; returns their names."""
    conn = _connect()
    conn.autocommit = True
    names = [f"{pg()['prefix']}_{db}" for db in DATABASES]
    with conn.cursor() as cur:
        for name in names:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if cur.fetchone() is None:
                cur.execute(f'CREATE DATABASE "{name}"')
    conn.close()
    return names


def drop_databases() -> None:
    conn = _connect()
    conn.autocommit = True
    with conn.cursor() as cur:
        for db in DATABASES:
            cur.execute(f'DROP DATABASE IF EXISTS "{pg()["prefix"]}_{db}" WITH (FORCE)')
    conn.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stack_env(state: dict[str, Any]) -> dict[str, str]:
    """The environment of every process of the stack (and of `tuneline prod run`)."""
    c = pg()
    env = {
        "TUNELINE_PROFILE": "production",
        "TUNELINE_HOME": str(state_dir()),
        "DAGSTER_HOME": str(prod_dir() / "dagster"),
        "TUNELINE_MLFLOW_URI": f"http://127.0.0.1:{state['mlflow_port']}",
        "TUNELINE_ARTIFACT_ROOT": state["artifact_root"],
        "TUNELINE_OPTUNA_STORAGE": pg_url("optuna"),
        "TUNELINE_RECIPE": state["recipe"],
        "DAGSTER_PG_USERNAME": c["user"], "DAGSTER_PG_HOST": c["host"], "DAGSTER_PG_PORT": str(c["port"]),
        "DAGSTER_PG_DB": f"{c['prefix']}_dagster",
        "DAGSTER_PG_PASSWORD": os.environ.get("PGPASSWORD", ""),
        "GX_ANALYTICS_ENABLED": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    }
    return env


def _wait_http(url: str, proc: subprocess.Popen, name: str, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise ProdError(f"{name} exited with code {proc.returncode}; see {prod_dir() / 'logs'}")
        try:
            with urllib.request.urlopen(url, timeout=3) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise ProdError(f"{name} did not answer at {url} within {timeout:.0f} s; see {prod_dir() / 'logs'}")


def _start(cmd: list[str], env: dict[str, str], log: str) -> subprocess.Popen:
    logs = prod_dir() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    out = open(logs / log, "ab")
    return subprocess.Popen(cmd, env={**os.environ, **env}, cwd=project_root(), stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)


def read_state() -> dict[str, Any]:
    path = prod_dir() / "state.json"
    if not path.is_file():
        raise ProdError("the production stack is not up: run `make prod-up` first")
    return json.loads(path.read_text(encoding="utf-8"))


def up(recipe: str) -> dict[str, Any]:
    """Start the stack (databases, MLflow server, Dagster daemon and webserver); returns its state."""
    if (prod_dir() / "state.json").is_file() and _alive(read_state()):
        return read_state()
    databases = create_databases()
    root = prod_dir()
    (root / "dagster").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(project_root() / "deploy" / "dagster.production.yaml", root / "dagster" / "dagster.yaml")
    artifact_root = os.environ.get("TUNELINE_ARTIFACT_ROOT") or (root / "artifacts").as_uri()
    state: dict[str, Any] = {"mlflow_port": free_port(), "webserver_port": free_port(), "recipe": recipe,
                             "artifact_root": artifact_root, "databases": databases, "pids": {}}
    env = stack_env(state)
    bin_dir = Path(sys.executable).parent
    mlflow = _start([str(bin_dir / "mlflow"), "server", "--backend-store-uri", pg_url("mlflow"),
                     "--artifacts-destination", (root / "mlartifacts").as_uri(), "--host", "127.0.0.1",
                     "--port", str(state["mlflow_port"]), "--workers", "1"], env, "mlflow.log")
    state["pids"]["mlflow"] = mlflow.pid
    _save(state)
    _wait_http(f"http://127.0.0.1:{state['mlflow_port']}/health", mlflow, "the MLflow server")
    workspace = str(project_root() / "workspace.yaml")
    daemon = _start([str(bin_dir / "dagster-daemon"), "run", "-w", workspace], env, "dagster-daemon.log")
    state["pids"]["dagster-daemon"] = daemon.pid
    web = _start([str(bin_dir / "dagster-webserver"), "-h", "127.0.0.1", "-p", str(state["webserver_port"]),
                  "-w", workspace], env, "dagster-webserver.log")
    state["pids"]["dagster-webserver"] = web.pid
    _save(state)
    _wait_http(f"http://127.0.0.1:{state['webserver_port']}/server_info", web, "the Dagster webserver")
    return state


def _save(state: dict[str, Any]) -> None:
    root = prod_dir()
    root.mkdir(parents=True, exist_ok=True)
    (root / "state.json").write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
    env = {k: v for k, v in stack_env(state).items() if k != "DAGSTER_PG_PASSWORD"}
    lines = [f"export {k}={json.dumps(v)}" for k, v in env.items()]
    lines.append('export DAGSTER_PG_PASSWORD="${PGPASSWORD:-}"')
    (root / "env.sh").write_text("# source me: the production stack's environment (no password in it)\n"
                                 + "\n".join(lines) + "\n", encoding="utf-8")


def _alive(state: dict[str, Any]) -> bool:
    return bool(state.get("pids")) and all(_running(pid) for pid in state["pids"].values())


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def down(drop: bool = False) -> list[str]:
    """Stop every recorded process (its whole process group) by PID; optionally drop the databases."""
    path = prod_dir() / "state.json"
    stopped = []
    if path.is_file():
        state = json.loads(path.read_text(encoding="utf-8"))
        for name, pid in state.get("pids", {}).items():
            if _running(pid):
                os.killpg(pid, signal.SIGTERM)
                stopped.append(name)
        deadline = time.time() + 30
        for pid in state.get("pids", {}).values():
            while _running(pid) and time.time() < deadline:
                time.sleep(0.5)
            if _running(pid):
                os.killpg(pid, signal.SIGKILL)
        path.unlink()
    if drop:
        drop_databases()
    return stopped


def submit(job: str, *, recipe: Optional[str], run_config: dict[str, Any], timeout: float) -> tuple[str, str]:
    """Submit ``job`` through the queue of the production instance; wait for it. Returns (run id, status)."""
    import dagster as dg

    state = read_state() if (prod_dir() / "state.json").is_file() else None
    env = stack_env(state) if state else {}  # the stack's instance, or the one DAGSTER_HOME names
    if recipe:
        env["TUNELINE_RECIPE"] = recipe
    os.environ.update(env)
    run_id = str(uuid.uuid4())
    cmd = [str(Path(sys.executable).parent / "dagster"), "job", "launch", "-w", str(project_root() / "workspace.yaml"),
           "-j", job, "--run-id", run_id, "--config-json", json.dumps(run_config),
           "--tags", json.dumps({"tuneline/submitted_by": "tuneline run --submit"})]
    launched = subprocess.run(cmd, env={**os.environ, **env}, cwd=project_root(), capture_output=True, text=True,
                              timeout=300)
    if launched.returncode != 0:
        raise ProdError(f"dagster job launch failed: {(launched.stderr or launched.stdout).strip()[-800:]}")
    instance = dg.DagsterInstance.get()
    deadline = time.time() + timeout
    terminal = {dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED}
    status = None
    while time.time() < deadline:
        run = instance.get_run_by_id(run_id)
        status = run.status if run else None
        if status in terminal:
            return run_id, status.value
        time.sleep(5)
    raise ProdError(f"run {run_id} did not finish within {timeout:.0f} s (status {status}): is a Dagster daemon "
                    "running for this instance (make prod-up)?")


def stored_value(asset: str, run_id: str) -> Any:
    """The typed reference ``asset`` stored for ``run_id`` by the IO manager (None when it has none)."""
    from resources.io import TYPES
    from tuneline import storage
    from tuneline.settings import load_settings

    uri = storage.join(load_settings().artifact_root, "_refs", asset, f"{run_id}.json")
    if not storage.exists(uri):
        return None
    stored = json.loads(storage.read_text(uri))
    return TYPES[stored["type"]].from_dict(stored["value"])


def urls(state: dict[str, Any]) -> str:
    return (f"Dagster UI:  http://127.0.0.1:{state['webserver_port']}\n"
            f"MLflow UI:   http://127.0.0.1:{state['mlflow_port']}\n"
            f"PostgreSQL:  {', '.join(state['databases'])} on {pg()['host']}:{pg()['port']}\n"
            f"artifacts:   {state['artifact_root']}\n"
            f"environment: source {prod_dir() / 'env.sh'}")


def add_parser(subparsers: Any) -> None:
    prod = subparsers.add_parser("prod", help="the production stack on this machine: up, run, down")
    sub = prod.add_subparsers(dest="action", required=True)
    p_up = sub.add_parser("up", help="create the databases, start MLflow, the Dagster daemon and webserver")
    p_up.add_argument("--recipe", default=None, help="recipe the stack trains (default: $TUNELINE_RECIPE or demo)")
    p_run = sub.add_parser("run", help="submit the recipe's train_model_job through the queue and wait")
    p_run.add_argument("--recipe", default=None, help="recipe (default: the stack's)")
    p_run.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the run")
    p_down = sub.add_parser("down", help="stop the stack's processes by PID")
    p_down.add_argument("--drop", action="store_true", help="also drop the databases")
    prod.set_defaults(func=cmd_prod)


def cmd_prod(args: argparse.Namespace) -> int:
    from tuneline.settings import DEFAULT_RECIPE

    if args.action == "up":
        state = up(args.recipe or os.environ.get("TUNELINE_RECIPE") or DEFAULT_RECIPE)
        print(urls(state))
        return 0
    if args.action == "down":
        stopped = down(drop=args.drop)
        print(f"stopped: {', '.join(stopped) or 'nothing was running'}" + ("; databases dropped" if args.drop else ""))
        return 0
    from pipelines.cli import main as tuneline_main

    state = read_state()
    os.environ.update(stack_env(state))
    return tuneline_main(["run", "--submit", "--recipe", args.recipe or state["recipe"], "--timeout", str(args.timeout)])
