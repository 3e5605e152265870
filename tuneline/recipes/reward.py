"""Reward model out of process: ``python -m tuneline.recipes.reward --spec SPEC.json`` (a
:class:`~tuneline.specs.RewardSpec`).

The preference records (the split, plus feedback pairs when the spec names them) and the held-out pairs are read
from their URIs. With ``reward.base: sft`` the SFT model is the start (an adapter is merged into full weights first,
or its merge is reused from the shared cache under ``merge_cache_uri``, as DPO does); with ``encoder`` the MiniLM
encoder. TRL logs stream to Pipes (or stdout) and MLflow; the outcome's model is the reward model directory (full
weights, a 1-label sequence classifier), its figures the pairwise accuracy on the held-out pairs before and after.
A rerun of the same spec resumes from the last complete checkpoint. Any error exits non-zero with the traceback on stderr.
"""

from __future__ import annotations

import sys
from typing import Any, Optional

from tuneline.recipes import _runner
from tuneline.specs import Outcome, RewardSpec


def run(spec: RewardSpec, pipes: Any = None) -> Outcome:
    from tuneline import storage
    from tuneline.models.loading import local_model_dir
    from tuneline.models.provision import model_ref
    from tuneline.records import read_records
    from tuneline.train.dpo import merged_sft_base
    from tuneline.train.reward import MODEL_SUBDIR, train_reward_model

    log = _runner.StepLogger(pipes, spec.mlflow)
    params = spec.params
    train = [r for uri in spec.train_uris for r in read_records(storage.fetch(uri))]
    val = read_records(storage.fetch(spec.val_uri))
    test = read_records(storage.fetch(spec.test_uri)) if spec.test_uri else []
    work = storage.Workspace(spec.out_uri)
    sft_dir, merge_reused = None, False
    if params.base == "sft":
        if spec.sft is None:
            raise ValueError("reward.base: sft but the spec names no SFT model")
        base_dir = local_model_dir(spec.sft.base) if spec.sft.base is not None else None
        sft_dir = local_model_dir(spec.sft)
        merge, merge_reused = _runner.merge_workspace(spec.merge_cache_uri, spec.sft, sft_dir, work)
        sft_dir, merged = merged_sft_base(sft_dir, base_dir, spec.sft.method, merge.path)
        _runner.share_merge(merge)
        if (merged or {}).get("prompt_learning"):
            log.emit(f"reward: the SFT model is a {spec.sft.method} adapter (virtual tokens, no weights): the reward "
                     "model starts from the weights it shares with its base")
    log.emit(f"reward: base={params.base} method={params.method} lr={params.learning_rate} train={len(train)} "
             f"val={len(val)} test={len(test)}")
    result = train_reward_model(sft_dir, train, val, params, work.path, seed=spec.seed, max_steps=spec.max_steps,
                                test_pairs=test, on_log=log, on_checkpoint=work.sync if work.remote else None,
                                gradient_checkpointing=spec.compute.trainer_checkpointing())
    work.sync(MODEL_SUBDIR)
    model = model_ref(result.output_dir, work.uri_of(MODEL_SUBDIR), method=f"reward-{params.base}",
                      stage=spec.asset_key or "reward_model", mlflow_run_id=spec.mlflow.run_id if spec.mlflow else None)
    metrics = {
        "steps": result.steps, "seconds": result.seconds, "train_pairs": result.train_pairs,
        "val_pairs": result.val_pairs, "sft_merge_reused": merge_reused, "trainable_params": result.trainable_params,
        "total_params": result.total_params,
        "pairwise_accuracy_before": result.before["accuracy"], "pairwise_accuracy": result.after["accuracy"],
        "margin_before": result.before["margin_mean"], "margin": result.after["margin_mean"],
        "test_pairwise_accuracy": result.test["accuracy"] if result.test else None,
        "final_loss": result.losses[-1]["loss"] if result.losses else None,
    }
    outcome = Outcome(model=model, metrics=metrics, details=result.to_dict(),
                      curves={"train": [[c["step"], c["loss"]] for c in result.losses]})
    log.emit(f"reward done: {result.steps} steps, held-out pairwise accuracy {result.before['accuracy']:.3f} -> "
             f"{result.after['accuracy']:.3f} -> {storage.redact(model.uri)}")
    return _runner.finish(spec, outcome, pipes, log=log)


def main(argv: Optional[list[str]] = None) -> int:
    return _runner.run_cli(argv, spec_class=RewardSpec, run=run)


if __name__ == "__main__":
    sys.exit(main())
