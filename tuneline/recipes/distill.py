"""Distillation out of process: ``python -m tuneline.recipes.distill --spec SPEC.json``
(a :class:`~tuneline.specs.DistillSpec`).

The teacher (full weights, e.g. the DPO stage's merged model, or a prompt-learning adapter run on its base) and
the splits are read from their URIs.
The teacher's outputs are cached under ``cache_uri``, so a retry reuses them (``teacher_cache_hit``). Under
Dagster Pipes every log streams as ``pipes.log.info`` and the run ends with ``report_asset_materialization``;
with ``mlflow`` set, per-step metrics go to that run. ``<out_uri>/result.json`` holds the
:class:`~tuneline.specs.Outcome`. Any error exits non-zero with the traceback on stderr.
"""

from __future__ import annotations

import sys
from typing import Any, Optional

from tuneline.recipes import _runner
from tuneline.specs import DistillSpec, Outcome


def run(spec: DistillSpec, pipes: Any = None) -> Outcome:
    """Distill as the spec says; stream logs; write the outcome; report the materialization under Pipes."""
    from tuneline import storage
    from tuneline.models.loading import local_model_dir
    from tuneline.models.provision import model_ref
    from tuneline.params import PROMPT_LEARNING
    from tuneline.records import read_records
    from tuneline.train.distill import STUDENT_SUBDIR, TOP_K, distill_student
    from tuneline.train.methods import read_method_file

    teacher_base = None
    if spec.teacher.kind != "full":  # a prompt-learning adapter runs with its base; others must be merged first
        if read_method_file(local_model_dir(spec.teacher)).get("method") not in PROMPT_LEARNING:
            raise ValueError(f"distillation needs a full-weights teacher; {spec.teacher.stage} gave an adapter "
                             "(set the DPO stage to merge its adapter)")
        teacher_base = local_model_dir(spec.teacher.base)
    log = _runner.StepLogger(pipes, spec.mlflow)
    train, val = read_records(storage.fetch(spec.train_uri)), read_records(storage.fetch(spec.val_uri))
    params = spec.params
    work, cache = storage.Workspace(spec.out_uri), storage.Workspace(spec.cache_uri)
    log.emit(f"distill: teacher={storage.redact(spec.teacher.uri)} student_layers={params.student_layers} "
             f"hidden={params.student_hidden_size} T={params.temperature} train={len(train)} val={len(val)}")
    result = distill_student(
        local_model_dir(spec.teacher), train, val, params, work.path, seed=spec.seed,
        max_steps=spec.max_steps, cache_dir=cache.path, on_log=log, top_k=spec.top_k or TOP_K,
        on_checkpoint=work.sync if work.remote else None, teacher_base_dir=teacher_base,
    )
    if not _runner.is_main_process():  # rank 0 alone writes and reports
        return None
    cache.sync()
    work.sync(STUDENT_SUBDIR)
    model = model_ref(result.output_dir, work.uri_of(STUDENT_SUBDIR), method="distilled",
                      stage=spec.asset_key or "distilled_student",
                      mlflow_run_id=spec.mlflow.run_id if spec.mlflow else None)
    metrics = {
        "steps": result.steps, "seconds": result.seconds, "resumed_from_step": result.resumed_from_step,
        "teacher_params": result.teacher_params, "student_params": result.student_params,
        "param_ratio": result.param_ratio, "student_layers": str(result.student_layers),
        "val_kl_before": result.val_kl_before, "val_kl_after": result.val_kl_after,
        "val_ce_before": result.val_ce_before, "val_ce_after": result.val_ce_after,
        "teacher_cache_hit": result.teacher_cache_hit, "top_k": result.top_k, "temperature": result.temperature,
        "final_loss": result.kd_curve[-1]["loss"] if result.kd_curve else None,
    }
    outcome = Outcome(model=model, metrics=metrics, details=result.to_dict(),
                      curves={"kd loss": [[c["step"], c["loss"]] for c in result.kd_curve if "loss" in c]})
    log.emit(
        f"distill done: {result.steps} steps, KL to teacher {result.val_kl_before:.4f} -> {result.val_kl_after:.4f}, "
        f"{result.student_params}/{result.teacher_params} params ({result.param_ratio:.2f}), teacher cache "
        f"{'hit' if result.teacher_cache_hit else 'miss'} -> {storage.redact(model.uri)}"
    )
    return _runner.finish(spec, outcome, pipes, log=log)


def main(argv: Optional[list[str]] = None) -> int:
    return _runner.run_cli(argv, spec_class=DistillSpec, run=run)


if __name__ == "__main__":
    sys.exit(main())
