"""Distillation out of process: ``python -m tuneline.recipes.distill --spec SPEC.json``.

The spec (JSON)::

    {"teacher_dir": "runs/dpo/model", "train_path": "train.jsonl", "val_path": "val.jsonl",
     "out_dir": "runs/distill", "cache_dir": ".tuneline/teacher_cache",
     "params": {...DistillParams...}, "seed": 42, "max_steps": null,
     "top_k": 64,                                                               # optional
     "mlflow": {"tracking_uri": "sqlite:////abs/mlflow.db", "run_id": "..."},   # optional
     "asset_key": "student_model"}                                              # optional

``teacher_dir`` is a full model directory (e.g. the ``merged_model_dir`` of the DPO recipe). Train and
val files hold SFT ``ChatRecord`` rows. The teacher's outputs are cached under ``cache_dir``, so a retry
reuses them (``teacher_cache_hit`` in the result). Under Dagster Pipes every log streams as
``pipes.log.info`` and the run ends with ``report_asset_materialization``; with ``mlflow`` set, per-step
metrics go to that run. ``out_dir/result.json`` holds ``DistillResult.to_dict()``. Any error exits
non-zero with the traceback on stderr.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

from tuneline.recipes import _runner

REQUIRED_KEYS = ("teacher_dir", "train_path", "val_path", "out_dir", "cache_dir", "params", "seed")
OPTIONAL_KEYS = ("max_steps", "top_k", "mlflow", "asset_key")


def load_spec(path: str | Path) -> dict[str, Any]:
    """Read and check the spec; ``params`` becomes a checked ``DistillParams``."""
    from tuneline.params import DistillParams, build

    spec = _runner.read_spec(path, REQUIRED_KEYS, OPTIONAL_KEYS)
    spec["params"] = build(DistillParams, spec["params"], "params")
    top_k = spec.get("top_k")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"{path}: top_k must be a positive integer, got {top_k!r}")
    return spec


def run(spec: dict[str, Any], pipes: Any = None) -> dict[str, Any]:
    """Distill as the spec says; stream logs; write result.json; report the materialization under Pipes."""
    from tuneline.records import read_records
    from tuneline.train.distill import TOP_K, distill_student

    log = _runner.StepLogger(pipes, spec.get("mlflow"))
    train, val = read_records(spec["train_path"]), read_records(spec["val_path"])
    params = spec["params"]
    log.emit(f"distill: teacher={spec['teacher_dir']} student_layers={params.student_layers} "
             f"hidden={params.student_hidden_size} T={params.temperature} train={len(train)} val={len(val)}")
    try:
        result = distill_student(
            spec["teacher_dir"], train, val, params, spec["out_dir"],
            seed=int(spec["seed"]), max_steps=spec.get("max_steps"), cache_dir=spec["cache_dir"],
            on_log=log, top_k=spec.get("top_k") or TOP_K,
        )
    finally:
        log.close()
    data = result.to_dict()
    result_path = _runner.write_result(spec["out_dir"], data)
    log.summary(result.steps, {
        "distill_val_kl_before": result.val_kl_before, "distill_val_kl_after": result.val_kl_after,
        "distill_val_ce_before": result.val_ce_before, "distill_val_ce_after": result.val_ce_after,
        "distill_param_ratio": result.param_ratio, "distill_seconds": result.seconds,
    })
    log.emit(
        f"distill done: {result.steps} steps, KL to teacher {result.val_kl_before:.4f} -> {result.val_kl_after:.4f}, "
        f"{result.student_params}/{result.teacher_params} params ({result.param_ratio:.2f}), teacher cache "
        f"{'hit' if result.teacher_cache_hit else 'miss'} -> {result.output_dir}"
    )
    if pipes is not None:
        values = {
            "steps": result.steps, "seconds": result.seconds,
            "teacher_params": result.teacher_params, "student_params": result.student_params,
            "param_ratio": result.param_ratio, "student_layers": str(result.student_layers),
            "val_kl_before": result.val_kl_before, "val_kl_after": result.val_kl_after,
            "val_ce_before": result.val_ce_before, "val_ce_after": result.val_ce_after,
            "teacher_cache_hit": result.teacher_cache_hit, "top_k": result.top_k, "temperature": result.temperature,
            "final_loss": result.kd_curve[-1]["loss"] if result.kd_curve else None,
        }
        paths = {"output_dir": result.output_dir, "teacher_dir": result.teacher_dir, "result_path": result_path,
                 "teacher_cache_train": result.teacher_cache["train"], "teacher_cache_val": result.teacher_cache["val"]}
        pipes.report_asset_materialization(metadata=_runner.metadata(values, paths), asset_key=spec.get("asset_key"))
    return data


def main(argv: Optional[list[str]] = None) -> int:
    return _runner.run_cli(argv, prog="python -m tuneline.recipes.distill", description=__doc__.split("\n")[0],
                           load_spec=load_spec, run=run)


if __name__ == "__main__":
    sys.exit(main())
