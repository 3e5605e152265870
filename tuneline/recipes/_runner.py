"""What every recipe CLI shares: spec checks, log streaming (Dagster Pipes or stdout, plus MLflow),
an atomic ``result.json``, materialization metadata and the ``main`` wrapper (non-zero exit + traceback).

Only the light ``dagster_pipes`` package is used, and only inside :func:`run_cli`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

RESULT_FILE = "result.json"


# Keys the launcher adds to every spec: where the trainer writes its traceback when it fails.
LAUNCH_KEYS = ("error_file",)


def read_spec(path: str | Path, required: Iterable[str], optional: Iterable[str]) -> dict[str, Any]:
    """The spec JSON object, with required keys present, no unknown keys and a well-formed ``mlflow``."""
    required, optional = tuple(required), tuple(optional)
    spec = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: the spec must be a JSON object")
    missing = [k for k in required if k not in spec]
    unknown = sorted(set(spec) - set(required) - set(optional) - set(LAUNCH_KEYS))
    if missing or unknown:
        raise ValueError(f"{path}: missing keys {missing}, unknown keys {unknown}")
    mlflow = spec.get("mlflow")
    if mlflow is not None and (not isinstance(mlflow, dict) or not {"tracking_uri", "run_id"} <= set(mlflow)):
        raise ValueError(f"{path}: mlflow must be an object with tracking_uri and run_id")
    return dict(spec)


def numeric(logs: dict[str, Any]) -> dict[str, float]:
    """The numbers of a trainer log (what metric stores accept); nested keys like ``rewards/margins`` kept."""
    return {k: float(v) for k, v in logs.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class MlflowSink:
    """Per-step metrics to an existing MLflow run (reopened by id), sent in batches."""

    def __init__(self, tracking_uri: str, run_id: str, flush_every: int = 50) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.run_id = run_id
        self.client.get_run(run_id)  # fail now, not after training, when the run does not exist
        self.flush_every = flush_every
        self.pending: list[Any] = []

    def __call__(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending.extend(
            Metric(key=_mlflow_key(k), value=v, timestamp=now, step=int(step)) for k, v in metrics.items()
        )
        if len(self.pending) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        while self.pending:
            batch, self.pending = self.pending[:1000], self.pending[1000:]
            self.client.log_batch(self.run_id, metrics=batch)


def _mlflow_key(key: str) -> str:
    # MLflow keys allow letters, digits, '_', '-', '.', ' ', '/'; anything else becomes '_'
    return "".join(c if c.isalnum() or c in "_-. /" else "_" for c in key)


class StepLogger:
    """``on_log(step, logs)`` for the trainers: a JSON line to Pipes (or stdout) and the metrics to MLflow."""

    def __init__(self, pipes: Any = None, mlflow: Optional[dict[str, str]] = None, prefix: str = "") -> None:
        self.emit: Callable[[str], None] = pipes.log.info if pipes is not None else (lambda m: print(m, flush=True))
        self.sink = MlflowSink(mlflow["tracking_uri"], mlflow["run_id"]) if mlflow else None
        self.prefix = prefix

    def __call__(self, step: int, logs: dict[str, Any]) -> None:
        metrics = numeric(logs)
        self.emit(json.dumps({"step": step, **metrics}, sort_keys=True))
        if self.sink is not None:
            self.sink(step, {f"{self.prefix}{k}": v for k, v in metrics.items()})

    def summary(self, step: int, metrics: dict[str, Any]) -> None:
        """Final figures to MLflow (non-finite and None values skipped)."""
        if self.sink is not None:
            clean = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
            self.sink(step, clean)
            self.sink.flush()

    def close(self) -> None:
        if self.sink is not None:
            self.sink.flush()


def write_result(out_dir: str | Path, data: dict[str, Any]) -> Path:
    """``out_dir/result.json`` written atomically (temp file + rename)."""
    path = Path(out_dir) / RESULT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def metadata(values: dict[str, Any], paths: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Materialization metadata: scalars as they are (None dropped, NaN/inf as text), paths typed as paths."""
    meta: dict[str, Any] = {}
    for key, value in values.items():
        if value is None:
            continue
        if isinstance(value, float) and not math.isfinite(value):
            value = str(value)
        meta[key] = value
    for key, value in (paths or {}).items():
        if value is not None:
            meta[key] = {"raw_value": str(value), "type": "path"}
    return meta


def run_cli(
    argv: Optional[list[str]],
    *,
    prog: str,
    description: str,
    load_spec: Callable[[str], dict[str, Any]],
    run: Callable[[dict[str, Any], Any], Any],
) -> int:
    """Parse ``--spec``, load it, run under Dagster Pipes when launched by it; 1 with the traceback on error."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--spec", required=True, help="JSON spec (see the module docstring)")
    args = parser.parse_args(argv)
    try:
        spec = load_spec(args.spec)
        from dagster_pipes import PipesEnvVarParamsLoader, open_dagster_pipes

        if PipesEnvVarParamsLoader().is_dagster_pipes_process():
            with open_dagster_pipes() as pipes:  # an exception is reported to Dagster, then re-raised
                run(spec, pipes)
        else:
            run(spec, None)
    except Exception:  # noqa: BLE001 - the launcher shows the trainer's own traceback
        text = traceback.format_exc()
        sys.stderr.write(text)
        write_error(args.spec, text)
        return 1
    return 0


def write_error(spec_path: str | Path, text: str) -> None:
    """Leave the traceback where the launcher looks for it (the spec's ``error_file``), when it can."""
    try:
        error_file = json.loads(Path(spec_path).read_text(encoding="utf-8")).get("error_file")
    except (OSError, ValueError, AttributeError):
        return
    if error_file:
        Path(error_file).parent.mkdir(parents=True, exist_ok=True)
        Path(error_file).write_text(text, encoding="utf-8")
