"""Fine-tune out of process: ``python -m tuneline.recipes.sft --spec SPEC.json``.

The spec (JSON) names everything the run needs::

    {"base_model": "path/to/base", "train_path": "train.jsonl", "val_path": "val.jsonl",
     "out_dir": "runs/sft", "params": {...SftParams...}, "seed": 42, "max_steps": null,
     "mlflow": {"tracking_uri": "sqlite:////abs/mlflow.db", "run_id": "..."},   # optional
     "asset_key": "sft_adapter"}                                                # optional

Launched under Dagster Pipes, every trainer log (loss, eval_loss, learning rate, step) streams as
``pipes.log.info`` and the run ends with ``report_asset_materialization`` carrying the result
figures; otherwise progress is printed. With ``mlflow`` set, per-step metrics go to that run (the
asset that owns the run created it; we reopen it by id). ``out_dir/result.json`` holds
``SftResult.to_dict()``. A rerun of the same spec resumes from the last complete checkpoint. Any
error exits non-zero with the traceback on stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

REQUIRED_KEYS = ("base_model", "train_path", "val_path", "out_dir", "params", "seed")
OPTIONAL_KEYS = ("max_steps", "mlflow", "asset_key", "error_file")
RESULT_FILE = "result.json"


def load_spec(path: str | Path) -> dict[str, Any]:
    """Read and check the spec: required keys present, no unknown keys, params a valid SftParams."""
    from tuneline.params import SftParams, build

    spec = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: the spec must be a JSON object")
    missing = [k for k in REQUIRED_KEYS if k not in spec]
    unknown = sorted(set(spec) - set(REQUIRED_KEYS) - set(OPTIONAL_KEYS))
    if missing or unknown:
        raise ValueError(f"{path}: missing keys {missing}, unknown keys {unknown}")
    mlflow = spec.get("mlflow")
    if mlflow is not None and (not isinstance(mlflow, dict) or not {"tracking_uri", "run_id"} <= set(mlflow)):
        raise ValueError(f"{path}: mlflow must be an object with tracking_uri and run_id")
    spec = dict(spec)
    spec["params"] = build(SftParams, spec["params"], "params")
    return spec


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
        self.pending.extend(Metric(key=k, value=v, timestamp=now, step=step) for k, v in metrics.items())
        if len(self.pending) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        while self.pending:
            batch, self.pending = self.pending[:1000], self.pending[1000:]
            self.client.log_batch(self.run_id, metrics=batch)


def numeric(logs: dict[str, Any]) -> dict[str, float]:
    """The numeric entries of a trainer log (what metric stores accept); flags and strings are dropped."""
    return {k: float(v) for k, v in logs.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def result_metadata(result: Any, result_path: Path) -> dict[str, Any]:
    """Materialization metadata: the result's figures (lists summarized, None dropped)."""
    data = result.to_dict()
    meta: dict[str, Any] = {}
    for key in (
        "method", "global_step", "max_steps", "best_step", "best_val_loss", "stopped_early", "resumed_from_step",
        "trainable_params", "total_params", "real_tokens", "tokens_per_second", "train_seconds", "bf16",
        "train_examples", "dropped_examples",
    ):
        value = data.get(key)
        if isinstance(value, float) and not math.isfinite(value):
            value = str(value)
        if value is not None:
            meta[key] = value
    if result.train_losses:
        meta["final_train_loss"] = result.train_losses[-1][1]
    meta["output_dir"] = {"raw_value": data["output_dir"], "type": "path"}
    meta["result_path"] = {"raw_value": str(result_path), "type": "path"}
    return meta


def run(spec: dict[str, Any], pipes: Any = None) -> Any:
    """Train as the spec says; stream logs to ``pipes`` (or stdout) and MLflow; write result.json."""
    from tuneline.records import read_records
    from tuneline.train.sft import train_sft

    emit: Callable[[str], None] = pipes.log.info if pipes is not None else (lambda msg: print(msg, flush=True))
    mlflow_cfg = spec.get("mlflow")
    sink: Optional[MlflowSink] = MlflowSink(mlflow_cfg["tracking_uri"], mlflow_cfg["run_id"]) if mlflow_cfg else None

    def on_log(step: int, logs: dict[str, Any]) -> None:
        metrics = numeric(logs)
        emit(json.dumps({"step": step, **metrics}, sort_keys=True))
        if sink is not None:
            sink(step, metrics)

    train = read_records(spec["train_path"])
    val = read_records(spec["val_path"])
    params = spec["params"]
    emit(f"sft: method={params.method} train={len(train)} val={len(val)} base={spec['base_model']}")
    try:
        result = train_sft(
            spec["base_model"], train, val, params, spec["out_dir"],
            seed=int(spec["seed"]), max_steps=spec.get("max_steps"), on_log=on_log,
        )
    finally:
        if sink is not None:
            sink.flush()
    out_dir = Path(spec["out_dir"])
    result_path = out_dir / RESULT_FILE
    tmp = result_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")
    tmp.replace(result_path)
    if sink is not None:
        summary = {
            "sft_tokens_per_second": result.tokens_per_second,
            "sft_train_seconds": result.train_seconds,
            "sft_global_step": float(result.global_step),
        }
        if result.best_val_loss is not None:
            summary["sft_best_val_loss"] = result.best_val_loss
        sink(result.global_step, summary)
        sink.flush()
    emit(
        f"sft done: step {result.global_step} (resumed from {result.resumed_from_step}), best step "
        f"{result.best_step} val loss {result.best_val_loss}, stopped early {result.stopped_early}, "
        f"{result.tokens_per_second:.0f} real tok/s -> {result.output_dir}"
    )
    if pipes is not None:
        pipes.report_asset_materialization(metadata=result_metadata(result, result_path), asset_key=spec.get("asset_key"))
    return result


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tuneline.recipes.sft", description=__doc__.split("\n")[0])
    parser.add_argument("--spec", required=True, help="JSON spec (see the module docstring)")
    args = parser.parse_args(argv)
    try:
        spec = load_spec(args.spec)
        from dagster_pipes import PipesEnvVarParamsLoader, open_dagster_pipes

        if PipesEnvVarParamsLoader().is_dagster_pipes_process():
            with open_dagster_pipes() as pipes:  # an exception is reported to Dagster, then re-raised
                run(spec, pipes)
        else:
            run(spec)
    except Exception:  # noqa: BLE001 - the launcher shows the trainer's own traceback
        traceback.print_exc(file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
