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

import sys
from pathlib import Path
from typing import Any, Optional

from tuneline.recipes import _runner

REQUIRED_KEYS = ("base_model", "train_path", "val_path", "out_dir", "params", "seed")
OPTIONAL_KEYS = ("max_steps", "mlflow", "asset_key")
RESULT_KEYS = (
    "method", "global_step", "max_steps", "best_step", "best_val_loss", "stopped_early", "resumed_from_step",
    "trainable_params", "total_params", "real_tokens", "tokens_per_second", "train_seconds", "bf16", "padding_free",
    "train_examples", "dropped_examples",
)


def load_spec(path: str | Path) -> dict[str, Any]:
    """Read and check the spec: required keys present, no unknown keys, params a valid SftParams."""
    from tuneline.params import SftParams, build

    spec = _runner.read_spec(path, REQUIRED_KEYS, OPTIONAL_KEYS)
    spec["params"] = build(SftParams, spec["params"], "params")
    return spec


def run(spec: dict[str, Any], pipes: Any = None) -> Any:
    """Train as the spec says; stream logs to ``pipes`` (or stdout) and MLflow; write result.json."""
    from tuneline.records import read_records
    from tuneline.train.sft import train_sft

    log = _runner.StepLogger(pipes, spec.get("mlflow"))
    train, val = read_records(spec["train_path"]), read_records(spec["val_path"])
    params = spec["params"]
    log.emit(f"sft: method={params.method} train={len(train)} val={len(val)} base={spec['base_model']}")
    try:
        result = train_sft(
            spec["base_model"], train, val, params, spec["out_dir"],
            seed=int(spec["seed"]), max_steps=spec.get("max_steps"), on_log=log,
        )
    finally:
        log.close()
    data = result.to_dict()
    result_path = _runner.write_result(spec["out_dir"], data)
    log.summary(result.global_step, {
        "sft_tokens_per_second": result.tokens_per_second,
        "sft_train_seconds": result.train_seconds,
        "sft_global_step": result.global_step,
        "sft_best_val_loss": result.best_val_loss,
    })
    log.emit(
        f"sft done: step {result.global_step} (resumed from {result.resumed_from_step}), best step "
        f"{result.best_step} val loss {result.best_val_loss}, stopped early {result.stopped_early}, "
        f"{result.tokens_per_second:.0f} real tok/s -> {result.output_dir}"
    )
    if pipes is not None:
        values = {key: data.get(key) for key in RESULT_KEYS}
        values["final_train_loss"] = result.train_losses[-1][1] if result.train_losses else None
        paths = {"output_dir": data["output_dir"], "result_path": result_path}
        pipes.report_asset_materialization(metadata=_runner.metadata(values, paths), asset_key=spec.get("asset_key"))
    return result


def main(argv: Optional[list[str]] = None) -> int:
    return _runner.run_cli(argv, prog="python -m tuneline.recipes.sft", description=__doc__.split("\n")[0],
                           load_spec=load_spec, run=run)


if __name__ == "__main__":
    sys.exit(main())
