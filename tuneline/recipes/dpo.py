"""DPO out of process: ``python -m tuneline.recipes.dpo --spec SPEC.json`` (a :class:`~tuneline.specs.DpoSpec`).

The SFT model (full weights, or an adapter on its base) and the preference splits are read from their URIs.
Under Dagster Pipes every TRL log streams as ``pipes.log.info`` and the run ends with
``report_asset_materialization``; otherwise progress is printed. With ``mlflow`` set, per-step metrics go to
that run. With ``merge`` (the default) the DPO adapter is also merged onto the merged SFT base
(``load_dpo_model``), ready to be the distillation teacher and the gate's candidate: the outcome's model is
then that full-weights directory, else the DPO adapter on the merged SFT base. After prompt learning the
outcome is the continued prompt adapter on the SFT's own base (virtual tokens: nothing to merge). An adapter SFT
model is merged once, into the shared cache entry under ``merge_cache_uri`` named by its content hash, which the
reward model and RL reuse (without it, under ``out_uri``). Any error exits non-zero with the traceback on stderr.
"""

from __future__ import annotations

import sys
from typing import Any, Optional

from tuneline.recipes import _runner
from tuneline.specs import DpoSpec, Outcome

PAIR_METRICS = ("reward_accuracy", "reward_margin", "logprob_accuracy")


def run(spec: DpoSpec, pipes: Any = None) -> Outcome:
    """Train as the spec says; stream logs; write the outcome; report the materialization under Pipes."""
    from pathlib import Path

    from tuneline import storage
    from tuneline.models.loading import local_model_dir
    from tuneline.models.provision import model_ref
    from tuneline.records import read_records
    from tuneline.train.dpo import ADAPTER_SUBDIR, MODEL_SUBDIR, load_dpo_model, train_dpo

    log = _runner.StepLogger(pipes, spec.mlflow)
    train, val = read_records(storage.fetch(spec.train_uri)), read_records(storage.fetch(spec.val_uri))
    train += [r for uri in spec.extra_train_uris for r in read_records(storage.fetch(uri))]  # feedback pairs
    params = spec.params
    sft_dir = local_model_dir(spec.sft)
    base_dir = local_model_dir(spec.sft.base) if spec.sft.base is not None else sft_dir
    work = storage.Workspace(spec.out_uri)
    log.emit(f"dpo: beta={params.beta} lr={params.learning_rate} train={len(train)} val={len(val)} "
             f"sft={storage.redact(spec.sft.uri)} ({spec.sft.method})")
    merge, merge_reused = _runner.merge_workspace(spec.merge_cache_uri, spec.sft, sft_dir, work)
    result = train_dpo(sft_dir, base_dir, spec.sft.method, train, val, params, work.path,
                       seed=spec.seed, max_steps=spec.max_steps, on_log=log,
                       on_checkpoint=work.sync if work.remote else None,
                       gradient_checkpointing=spec.compute.trainer_checkpointing(), merge_dir=merge.path)
    if not _runner.is_main_process():  # rank 0 alone merges, writes and reports
        return None
    run_id = spec.mlflow.run_id if spec.mlflow else None
    stage = spec.asset_key or "dpo_adapter"
    merged_base = Path(result.merged_base_dir)
    if result.continued_adapter:  # the prompt adapter trained on sits on the SFT adapter's base
        base_ref = spec.sft.base
    elif merged_base == sft_dir:
        base_ref = spec.sft
    else:
        base_ref = model_ref(merged_base, _runner.share_merge(merge), method=f"{spec.sft.method}-merged",
                             stage=stage, mlflow_run_id=run_id)
    if spec.merge and not result.continued_adapter:
        merged = load_dpo_model(work.path)
        work.sync(MODEL_SUBDIR)
        model = model_ref(merged, work.uri_of(MODEL_SUBDIR), method="dpo", stage=stage, mlflow_run_id=run_id)
    else:
        work.sync(ADAPTER_SUBDIR)
        model = model_ref(result.output_dir, work.uri_of(ADAPTER_SUBDIR), method="dpo", stage=stage,
                          base=base_ref, mlflow_run_id=run_id)
    before, after = result.before, result.after
    metrics = {
        "steps": result.steps, "seconds": result.seconds, "resumed_from_step": result.resumed_from_step,
        "beta": params.beta,
        "train_pairs": result.train_pairs, "val_pairs": result.val_pairs,
        "trainable_params": result.trainable_params, "total_params": result.total_params,
        "ref_model_is_none": result.ref_model_is_none, "fresh_adapter": result.fresh_adapter,
        "continued_adapter": result.continued_adapter,
        "shared_prompts": result.shared_prompts,  # one row a pair (dpo_shared), or TRL's two-row step
        "reference_once": result.reference_once,  # the reference pass once per pair (steps cover them all)
        "trained_in_4bit": bool((result.merge or {}).get("quantization")),  # QLoRA SFT: DPO on the 4-bit merge
        "sft_merge_reused": merge_reused,  # the SFT adapter's merge came from the shared cache
        "final_loss": result.losses[-1]["loss"] if result.losses else None,
        **{f"{k}_before": before[k] for k in PAIR_METRICS},
        **{f"{k}_after": after[k] for k in PAIR_METRICS},
    }
    outcome = Outcome(model=model, metrics=metrics, details=result.to_dict(),
                      curves={"train": [[c["step"], c["loss"]] for c in result.losses if "loss" in c]})
    log.emit(
        f"dpo done: {result.steps} steps, reward accuracy {before['reward_accuracy']:.3f} -> "
        f"{after['reward_accuracy']:.3f}, margin {after['reward_margin']:.4f}, log-prob accuracy "
        f"{before['logprob_accuracy']:.3f} -> {after['logprob_accuracy']:.3f} -> {storage.redact(model.uri)}"
    )
    return _runner.finish(spec, outcome, pipes, log=log)


def main(argv: Optional[list[str]] = None) -> int:
    return _runner.run_cli(argv, spec_class=DpoSpec, run=run)


if __name__ == "__main__":
    sys.exit(main())
