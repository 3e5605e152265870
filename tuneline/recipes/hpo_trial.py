"""One HPO trial out of process: ``python -m tuneline.recipes.hpo_trial --spec SPEC.json``.

The spec (JSON)::

    {"base_model": "path/to/base", "train_path": "train.jsonl", "val_path": "val.jsonl",
     "out_dir": "runs/hpo/trial-3", "params": {...SftParams (the recipe's sft)...},
     "trial_params": {"learning_rate": 1e-3, "lora_r": 8, ...},                # from run_study
     "study_name": "demo-hpo", "storage_url": "sqlite:////abs/optuna.db",
     "trial_id": 17,            # or "trial_number": 3 (resolved through the storage)
     "seed": 42, "max_steps": 60, "eval_steps": 10,                            # HpoParams.trial_max_steps/eval_steps
     "mlflow": {"tracking_uri": "...", "run_id": "..."},                       # optional
     "asset_key": "hpo_study"}                                                  # optional

The trial trains with ``train_sft`` and :class:`~tuneline.train.hpo.OptunaPruningCallback`, which rebuilds
the trial from the shared storage, reports every validation loss and stops training when the pruner says
so. ``out_dir/result.json`` holds ``{"state": "complete" | "pruned", "value": best val loss,
"pruned_at_step", "steps", "reported", "trial_id", "trial_number", "trial_params", "sft": {...}}``: what
``run_trial`` returns to :func:`~tuneline.train.hpo.run_study`, which tells the study the outcome (this
process never finishes the trial). Any error exits non-zero with the traceback on stderr.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

from tuneline.recipes import _runner

REQUIRED_KEYS = ("base_model", "train_path", "val_path", "out_dir", "params", "trial_params", "study_name",
                 "storage_url", "seed")
OPTIONAL_KEYS = ("trial_id", "trial_number", "max_steps", "eval_steps", "mlflow", "asset_key")


def load_spec(path: str | Path) -> dict[str, Any]:
    """Read and check the spec; ``params`` becomes the trial's ``SftParams`` (trial params applied)."""
    from tuneline.params import SftParams, build
    from tuneline.train.hpo import sft_params_from_trial

    spec = _runner.read_spec(path, REQUIRED_KEYS, OPTIONAL_KEYS)
    if ("trial_id" in spec) == ("trial_number" in spec):
        raise ValueError(f"{path}: give exactly one of trial_id and trial_number")
    if not isinstance(spec["trial_params"], dict):
        raise ValueError(f"{path}: trial_params must be an object")
    base = build(SftParams, spec["params"], "params")
    spec["params"] = sft_params_from_trial(
        base, spec["trial_params"], max_steps=spec.get("max_steps"), eval_steps=spec.get("eval_steps")
    )
    return spec


def run(spec: dict[str, Any], pipes: Any = None) -> dict[str, Any]:
    """Train the trial with the pruning callback; write result.json; report the materialization under Pipes."""
    from tuneline.records import read_records
    from tuneline.train.hpo import OptunaPruningCallback, resolve_trial_id
    from tuneline.train.sft import train_sft

    study_name, storage_url = spec["study_name"], spec["storage_url"]
    trial_id = spec.get("trial_id")
    if trial_id is None:
        trial_id = resolve_trial_id(study_name, storage_url, int(spec["trial_number"]))
    pruning = OptunaPruningCallback(study_name, storage_url, int(trial_id))
    trial_number = pruning.trial.number

    log = _runner.StepLogger(pipes, spec.get("mlflow"))
    train, val = read_records(spec["train_path"]), read_records(spec["val_path"])
    if not val:
        raise ValueError("an HPO trial needs validation records: the study minimizes validation loss")
    params = spec["params"]
    log.emit(f"hpo trial {trial_number} (id {trial_id}) of {study_name}: {spec['trial_params']}")
    try:
        result = train_sft(
            spec["base_model"], train, val, params, spec["out_dir"],
            seed=int(spec["seed"]), extra_callbacks=[pruning], on_log=log,
        )
    finally:
        log.close()
    if not result.val_losses:
        raise RuntimeError("the trial finished without a single evaluation: lower eval_steps or raise max_steps")
    value = min(loss for _, loss in result.val_losses)
    data = {
        "state": "pruned" if pruning.pruned else "complete",
        "value": value,
        "pruned_at_step": pruning.pruned_at_step,
        "steps": result.global_step,
        "reported": [list(x) for x in pruning.reported],
        "trial_id": int(trial_id),
        "trial_number": trial_number,
        "trial_params": spec["trial_params"],
        "sft": result.to_dict(),
    }
    result_path = _runner.write_result(spec["out_dir"], data)
    log.summary(result.global_step, {"hpo_trial_value": value, "hpo_trial_pruned": float(pruning.pruned)})
    log.emit(f"hpo trial {trial_number} {data['state']}: best val loss {value:.4f} after {result.global_step} steps"
             + (f" (pruned at step {pruning.pruned_at_step})" if pruning.pruned else ""))
    if pipes is not None:
        values = {"state": data["state"], "value": value, "pruned_at_step": pruning.pruned_at_step,
                  "steps": result.global_step, "trial_number": trial_number, "trial_id": int(trial_id),
                  "study_name": study_name,
                  **{f"param_{k}": v for k, v in spec["trial_params"].items()}}
        paths = {"output_dir": result.output_dir, "result_path": result_path}
        pipes.report_asset_materialization(metadata=_runner.metadata(values, paths), asset_key=spec.get("asset_key"))
    return data


def main(argv: Optional[list[str]] = None) -> int:
    return _runner.run_cli(argv, prog="python -m tuneline.recipes.hpo_trial", description=__doc__.split("\n")[0],
                           load_spec=load_spec, run=run)


if __name__ == "__main__":
    sys.exit(main())
