"""DPO out of process: ``python -m tuneline.recipes.dpo --spec SPEC.json``.

The spec (JSON)::

    {"sft_model_dir": "runs/sft/model", "base_model": "path/to/base", "sft_method": "lora",
     "train_path": "pref_train.jsonl", "val_path": "pref_val.jsonl", "out_dir": "runs/dpo",
     "params": {...DpoParams...}, "seed": 42, "max_steps": null,
     "merge": true,                                                             # optional, default true
     "mlflow": {"tracking_uri": "sqlite:////abs/mlflow.db", "run_id": "..."},   # optional
     "asset_key": "dpo_adapter"}                                                # optional

Train and val files hold preference ``ChatRecord`` rows. Under Dagster Pipes every TRL log streams as
``pipes.log.info`` and the run ends with ``report_asset_materialization``; otherwise progress is printed.
With ``mlflow`` set, per-step metrics go to that run. With ``merge`` (the default) the DPO adapter is also
merged onto the merged SFT base (``load_dpo_model``), ready to be the distillation teacher; its directory
is ``merged_model_dir`` in ``out_dir/result.json`` (``DpoResult.to_dict()`` plus that key). Any error exits
non-zero with the traceback on stderr.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

from tuneline.recipes import _runner

REQUIRED_KEYS = ("sft_model_dir", "base_model", "sft_method", "train_path", "val_path", "out_dir", "params", "seed")
OPTIONAL_KEYS = ("max_steps", "merge", "mlflow", "asset_key")


def load_spec(path: str | Path) -> dict[str, Any]:
    """Read and check the spec; ``params`` becomes a checked ``DpoParams``."""
    from tuneline.params import PEFT_METHODS, DpoParams, build

    spec = _runner.read_spec(path, REQUIRED_KEYS, OPTIONAL_KEYS)
    if spec["sft_method"] not in PEFT_METHODS:
        raise ValueError(f"{path}: sft_method {spec['sft_method']!r} is not one of {', '.join(PEFT_METHODS)}")
    spec["params"] = build(DpoParams, spec["params"], "params")
    return spec


def run(spec: dict[str, Any], pipes: Any = None) -> dict[str, Any]:
    """Train as the spec says; stream logs; write result.json; report the materialization under Pipes."""
    from tuneline.records import read_records
    from tuneline.train.dpo import load_dpo_model, train_dpo

    log = _runner.StepLogger(pipes, spec.get("mlflow"))
    train, val = read_records(spec["train_path"]), read_records(spec["val_path"])
    params = spec["params"]
    log.emit(f"dpo: beta={params.beta} lr={params.learning_rate} train={len(train)} val={len(val)} "
             f"sft={spec['sft_model_dir']} ({spec['sft_method']})")
    try:
        result = train_dpo(
            spec["sft_model_dir"], spec["base_model"], spec["sft_method"], train, val, params, spec["out_dir"],
            seed=int(spec["seed"]), max_steps=spec.get("max_steps"), on_log=log,
        )
    finally:
        log.close()
    data = result.to_dict()
    data["merged_model_dir"] = str(load_dpo_model(spec["out_dir"])) if spec.get("merge", True) else None
    result_path = _runner.write_result(spec["out_dir"], data)

    before, after = result.before, result.after
    log.summary(result.steps, {
        **{f"dpo_{k}_before": before[k] for k in ("reward_accuracy", "reward_margin", "logprob_accuracy")},
        **{f"dpo_{k}_after": after[k] for k in ("reward_accuracy", "reward_margin", "logprob_accuracy")},
        "dpo_seconds": result.seconds,
    })
    log.emit(
        f"dpo done: {result.steps} steps, reward accuracy {before['reward_accuracy']:.3f} -> "
        f"{after['reward_accuracy']:.3f}, margin {after['reward_margin']:.4f}, log-prob accuracy "
        f"{before['logprob_accuracy']:.3f} -> {after['logprob_accuracy']:.3f} -> {result.output_dir}"
    )
    if pipes is not None:
        values = {
            "steps": result.steps, "seconds": result.seconds, "beta": params.beta,
            "train_pairs": result.train_pairs, "val_pairs": result.val_pairs,
            "trainable_params": result.trainable_params, "total_params": result.total_params,
            "ref_model_is_none": result.ref_model_is_none, "fresh_adapter": result.fresh_adapter,
            "final_loss": result.losses[-1]["loss"] if result.losses else None,
            **{f"{k}_before": before[k] for k in ("reward_accuracy", "reward_margin", "logprob_accuracy")},
            **{f"{k}_after": after[k] for k in ("reward_accuracy", "reward_margin", "logprob_accuracy")},
        }
        paths = {"output_dir": result.output_dir, "merged_base_dir": result.merged_base_dir,
                 "merged_model_dir": data["merged_model_dir"], "result_path": result_path}
        pipes.report_asset_materialization(metadata=_runner.metadata(values, paths), asset_key=spec.get("asset_key"))
    return data


def main(argv: Optional[list[str]] = None) -> int:
    return _runner.run_cli(argv, prog="python -m tuneline.recipes.dpo", description=__doc__.split("\n")[0],
                           load_spec=load_spec, run=run)


if __name__ == "__main__":
    sys.exit(main())
