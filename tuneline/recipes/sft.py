"""Fine-tune out of process: ``python -m tuneline.recipes.sft --spec SPEC.json`` (a :class:`~tuneline.specs.SftSpec`).

The base model and the splits are read from their URIs (fetched when remote); the trainer works in the
spec's ``out_uri`` (a local scratch folder uploaded when remote). Launched under Dagster Pipes, every trainer
log (loss, eval_loss, learning rate, step) streams as ``pipes.log.info`` and the run ends with
``report_asset_materialization`` carrying the result figures; otherwise progress is printed. With ``mlflow``
set, per-step metrics go to that run (the asset that owns the run created it; we reopen it by id).
``<out_uri>/result.json`` holds the :class:`~tuneline.specs.Outcome`: the trained model's reference and
``SftResult``'s figures. A rerun of the same spec resumes from the last complete checkpoint. Any error exits
non-zero with the traceback on stderr.
"""

from __future__ import annotations

import sys
from typing import Any, Optional

from tuneline.recipes import _runner
from tuneline.specs import Outcome, SftSpec

SCALARS = (
    "method", "global_step", "max_steps", "best_step", "best_val_loss", "stopped_early", "resumed_from_step",
    "trainable_params", "total_params", "real_tokens", "tokens_per_second", "train_seconds", "bf16", "padding_free",
    "train_examples", "dropped_examples", "examples_per_rank",
)


def run(spec: SftSpec, pipes: Any = None) -> Outcome:
    """Train as the spec says; stream logs to ``pipes`` (or stdout) and MLflow; write the outcome."""
    from tuneline import storage
    from tuneline.models.loading import local_model_dir
    from tuneline.models.provision import model_ref
    from tuneline.records import read_records
    from tuneline.train.sft import MODEL_SUBDIR, train_sft

    log = _runner.StepLogger(pipes, spec.mlflow)
    train, val = read_records(storage.fetch(spec.train_uri)), read_records(storage.fetch(spec.val_uri))
    params = spec.params
    base = local_model_dir(spec.base)
    work = storage.Workspace(spec.out_uri)
    log.emit(f"sft: method={params.method} train={len(train)} val={len(val)} base={storage.redact(spec.base.uri)}")
    result = train_sft(base, train, val, params, work.path, seed=spec.seed, max_steps=spec.max_steps,
                       on_log=log, on_checkpoint=work.sync if work.remote else None, tokens=spec.tokenizer,
                       offload=spec.offload, gradient_checkpointing=spec.compute.trainer_checkpointing())
    if not _runner.is_main_process():  # rank 0 alone saves, writes and reports
        return None
    work.sync(MODEL_SUBDIR)
    model = model_ref(result.output_dir, work.uri_of(MODEL_SUBDIR), method=params.method,
                      stage=spec.asset_key or "sft_adapter",
                      base=spec.base if params.method not in ("full", "freeze") else None,
                      mlflow_run_id=spec.mlflow.run_id if spec.mlflow else None)
    data = result.to_dict()
    metrics = {key: data[key] for key in SCALARS}
    metrics["final_train_loss"] = result.train_losses[-1][1] if result.train_losses else None
    outcome = Outcome(model=model, metrics=metrics, details=data,
                      curves={"train": [list(x) for x in result.train_losses],
                              "validation": [list(x) for x in result.val_losses]})
    log.emit(
        f"sft done: step {result.global_step} (resumed from {result.resumed_from_step}), best step "
        f"{result.best_step} val loss {result.best_val_loss}, stopped early {result.stopped_early}, "
        f"{result.tokens_per_second:.0f} real tok/s -> {storage.redact(model.uri)}"
    )
    return _runner.finish(spec, outcome, pipes, log=log)


def main(argv: Optional[list[str]] = None) -> int:
    return _runner.run_cli(argv, spec_class=SftSpec, run=run)


if __name__ == "__main__":
    sys.exit(main())
