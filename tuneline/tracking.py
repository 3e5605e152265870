"""MLflow 3 tracking, without global state: every call names its run id.

The asset that owns a run creates it and hands its id on; recipe processes and later
stages reopen the run by id. Tags on every run: the Dagster run id, the asset key,
the dataset sha256 and the git sha, so any run can be found from any of them.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

from tuneline.storage import redact

TAG_DAGSTER_RUN = "tuneline.dagster_run_id"
TAG_ROOT_RUN = "tuneline.dagster_root_run_id"  # the first run of a re-executed one (retries share it)
TAG_ASSET = "tuneline.asset_key"
TAG_DATASET = "tuneline.dataset_sha256"
TAG_GIT = "tuneline.git_sha"
TAG_RECIPE = "tuneline.recipe"
TAG_PARENT_PREFIX = "tuneline.upstream."  # + stage name -> MLflow run id it started from
CONTENT_ARTIFACT = "lineage/content.json"  # per stage run: the content-addressed files it logged

_MAX_PARAM_LEN = 6000


def git_sha(root: str | Path | None = None) -> str:
    """The checkout's commit, with ``+dirty`` when tracked files differ from it ("unknown" outside git)."""
    cwd = str(root or Path(__file__).resolve().parents[1])
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd, capture_output=True, text=True, check=True, timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{sha}+dirty" if dirty else sha


# MLflow's HTTP client retries a dead server with exponential backoff for minutes by default. Stages retry
# on their own terms (the trainers' metric sender keeps a backlog; a Dagster step is retried), so a call
# here gives up after two quick retries: a dead tracking server fails a stage in seconds, naming the URI.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


def fail_fast_defaults() -> None:
    """Set :data:`HTTP_DEFAULTS` in the environment where the user has not set them."""
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)


class TrackingUnavailable(RuntimeError):
    """The tracking server cannot be reached (or lost metrics); the message names the redacted URI."""


@dataclass(frozen=True)
class Tracker:
    """A handle on one MLflow tracking server (or SQLite file)."""

    tracking_uri: str
    registry_uri: Optional[str] = None
    artifact_root: Optional[str] = None  # artifact location for experiments this creates

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.registry_uri or self.tracking_uri)

    def require_run(self, run_id: str) -> None:
        """Fail fast, naming the (redacted) URI, when the server cannot be reached or the run does not exist."""
        try:
            self.client().get_run(run_id)
        except Exception as exc:  # noqa: BLE001 - connection errors come in many types
            raise TrackingUnavailable(f"MLflow at {redact(self.tracking_uri)}: cannot open run {run_id} "
                                      f"({redact(str(exc).splitlines()[0][:300])})") from None

    def experiment_id(self, name: str) -> str:
        """The experiment's id, created when missing; two processes creating it at once both get the one that
        won (get-or-create with a retry)."""
        from mlflow.exceptions import MlflowException

        client = self.client()
        try:
            experiment = client.get_experiment_by_name(name)
        except MlflowException:
            raise
        except Exception as exc:  # noqa: BLE001 - unreachable server: say which, without secrets
            raise TrackingUnavailable(f"MLflow at {redact(self.tracking_uri)} is unreachable "
                                      f"({redact(str(exc).splitlines()[0][:300])})") from None
        if experiment is not None:
            return experiment.experiment_id
        location = None
        if self.artifact_root:
            Path(self.artifact_root).mkdir(parents=True, exist_ok=True)
            location = Path(self.artifact_root).resolve().as_uri()
        try:
            return client.create_experiment(name, artifact_location=location)
        except MlflowException:
            existing = client.get_experiment_by_name(name)  # created by a concurrent run in between
            if existing is None:
                raise
            return existing.experiment_id

    def start_run(
        self,
        experiment: str,
        run_name: str,
        tags: Mapping[str, str],
        params: Optional[Mapping[str, Any]] = None,
        parent_run_id: Optional[str] = None,
    ) -> str:
        """Create a run (nested under ``parent_run_id`` when given), tag it, log params; returns its id."""
        client = self.client()
        all_tags = {k: redact(str(v)) for k, v in tags.items() if v is not None}
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = client.create_run(self.experiment_id(experiment), run_name=run_name, tags=all_tags)
        if params:
            self.log_params(run.info.run_id, params)
        return run.info.run_id

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, _param_value(v)) for k, v in params.items()]
        client = self.client()
        for i in range(0, len(items), 100):
            client.log_batch(run_id, params=items[i : i + 100])

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: Optional[int] = None) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        rows = [
            Metric(k, float(v), now, step or 0)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
        ]
        if rows:
            self.client().log_batch(run_id, metrics=rows)

    def log_series(self, run_id: str, name: str, points: Iterable[tuple[int, float]]) -> None:
        """A curve as one metric with steps (e.g. a loss curve)."""
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        rows = [Metric(name, float(v), now, int(s)) for s, v in points if math.isfinite(float(v))]
        client = self.client()
        for i in range(0, len(rows), 1000):
            client.log_batch(run_id, metrics=rows[i : i + 1000])

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        client = self.client()
        for k, v in tags.items():
            if v is not None:
                client.set_tag(run_id, k, redact(str(v)))

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: Optional[str] = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client().log_artifacts(run_id, str(path), artifact_path)
        else:
            self.client().log_artifact(run_id, str(path), artifact_path)

    def log_dict(self, run_id: str, data: Any, artifact_file: str) -> None:
        self.client().log_text(run_id, redact(json.dumps(data, indent=2, default=str)), artifact_file)

    def log_contents(self, run_id: str, files: Mapping[str, str | Path]) -> dict[str, dict[str, str]]:
        """Log each file under ``content/<sha256>/<file name>`` (content-addressed: the path names what it
        holds) and the index of them as ``lineage/content.json``; returns ``{name: {artifact, sha256, run_id}}``,
        what a lineage passport records and ``tuneline lineage --verify`` re-downloads and re-checks."""
        from tuneline.records import sha256_file

        entries: dict[str, dict[str, str]] = {}
        client = self.client()
        for name, path in files.items():
            path = Path(path)
            sha = sha256_file(path)
            client.log_artifact(run_id, str(path), f"content/{sha}")
            entries[name] = {"artifact": f"content/{sha}/{path.name}", "sha256": sha, "run_id": run_id}
        self.log_dict(run_id, entries, CONTENT_ARTIFACT)
        return entries

    def log_dataset(self, run_id: str, records: list[dict], name: str, digest: str, source: str, context: str) -> None:
        """Log a split as an MLflow dataset input (``log_inputs``), named and hashed."""
        import mlflow.data
        import pandas as pd
        from mlflow.entities import DatasetInput, InputTag

        from tuneline.compat.mlflow import dataset_entity

        columns = ["id", "kind", "task", "source", "line"]
        frame = pd.DataFrame([{c: r.get(c) for c in columns} for r in records], columns=columns)
        dataset = mlflow.data.from_pandas(frame, source=source, name=name, digest=digest[:36])
        entity = dataset_entity(dataset)
        self.client().log_inputs(
            run_id, datasets=[DatasetInput(dataset=entity, tags=[InputTag(key="mlflow.data.context", value=context)])]
        )

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client().set_terminated(run_id, status=status)

    def find_runs(self, experiment: str, filter_string: str) -> list:
        client = self.client()
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            return []
        return list(client.search_runs([exp.experiment_id], filter_string=filter_string))


def _param_value(value: Any) -> str:
    text = redact(value if isinstance(value, str) else json.dumps(value, default=str))
    return text if len(text) <= _MAX_PARAM_LEN else text[: _MAX_PARAM_LEN - 3] + "..."


SQLITE_TIMEOUT_S = 60  # a writer waits this long for another's lock on the SQLite tracking file


def sqlite_tracking_uri(path: str | Path) -> str:
    """``sqlite:////abs/path/mlflow.db?timeout=60``: four slashes for an absolute path, and a busy timeout, so
    concurrent writers (a trainer, the asset, the server) wait for each other's lock instead of failing."""
    return f"sqlite:///{Path(path).resolve()}?timeout={SQLITE_TIMEOUT_S}"


def default_tracking_uri(state_dir: str | Path) -> str:
    """The local tracking store under ``state_dir`` unless MLFLOW_TRACKING_URI is set."""
    return os.environ.get("MLFLOW_TRACKING_URI") or sqlite_tracking_uri(Path(state_dir) / "mlflow.db")
