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

TAG_DAGSTER_RUN = "tuneline.dagster_run_id"
TAG_ASSET = "tuneline.asset_key"
TAG_DATASET = "tuneline.dataset_sha256"
TAG_GIT = "tuneline.git_sha"
TAG_RECIPE = "tuneline.recipe"
TAG_PARENT_PREFIX = "tuneline.upstream."  # + stage name -> MLflow run id it started from

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


@dataclass(frozen=True)
class Tracker:
    """A handle on one MLflow tracking server (or SQLite file)."""

    tracking_uri: str
    registry_uri: Optional[str] = None
    artifact_root: Optional[str] = None  # artifact location for experiments this creates

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.registry_uri or self.tracking_uri)

    def experiment_id(self, name: str) -> str:
        client = self.client()
        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        location = None
        if self.artifact_root:
            Path(self.artifact_root).mkdir(parents=True, exist_ok=True)
            location = Path(self.artifact_root).resolve().as_uri()
        return client.create_experiment(name, artifact_location=location)

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
        all_tags = {k: str(v) for k, v in tags.items() if v is not None}
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
        from mlflow.entities import Metric
        import time

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
        from mlflow.entities import Metric
        import time

        now = int(time.time() * 1000)
        rows = [Metric(name, float(v), now, int(s)) for s, v in points if math.isfinite(float(v))]
        client = self.client()
        for i in range(0, len(rows), 1000):
            client.log_batch(run_id, metrics=rows[i : i + 1000])

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        client = self.client()
        for k, v in tags.items():
            if v is not None:
                client.set_tag(run_id, k, str(v))

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: Optional[str] = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client().log_artifacts(run_id, str(path), artifact_path)
        else:
            self.client().log_artifact(run_id, str(path), artifact_path)

    def log_dict(self, run_id: str, data: Any, artifact_file: str) -> None:
        self.client().log_text(run_id, json.dumps(data, indent=2, default=str), artifact_file)

    def log_dataset(self, run_id: str, records: list[dict], name: str, digest: str, source: str, context: str) -> None:
        """Log a split as an MLflow dataset input (``log_inputs``), named and hashed."""
        import mlflow.data
        import pandas as pd
        from mlflow.entities import DatasetInput, InputTag

        columns = ["id", "kind", "task", "source", "line"]
        frame = pd.DataFrame([{c: r.get(c) for c in columns} for r in records], columns=columns)
        dataset = mlflow.data.from_pandas(frame, source=source, name=name, digest=digest[:36])
        entity = dataset._to_mlflow_entity()
        self.client().log_inputs(
            run_id, datasets=[DatasetInput(dataset=entity, tags=[InputTag(key="mlflow.data.context", value=context)])]
        )

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client().set_terminated(run_id, status=status)

    def run_url(self, run_id: str) -> str:
        run = self.client().get_run(run_id)
        return f"#/experiments/{run.info.experiment_id}/runs/{run_id}"

    def find_runs(self, experiment: str, filter_string: str) -> list:
        client = self.client()
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            return []
        return list(client.search_runs([exp.experiment_id], filter_string=filter_string))


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= _MAX_PARAM_LEN else text[: _MAX_PARAM_LEN - 3] + "..."


def default_tracking_uri(state_dir: str | Path) -> str:
    """``sqlite:////abs/path/mlflow.db`` (four slashes for an absolute path) unless MLFLOW_TRACKING_URI is set."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return "sqlite:///" + str(Path(state_dir).resolve() / "mlflow.db")
