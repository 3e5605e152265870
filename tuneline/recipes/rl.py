"""Online RL out of process: ``python -m tuneline.recipes.rl --spec SPEC.json`` (an :class:`~tuneline.specs.RlSpec`).

The SFT model (full weights, or an adapter on its base), the reward model and the prompt records are read from
their URIs. ``spec.algorithm`` (rloo or grpo) picks TRL's trainer; the reward model, loaded as a
:class:`~tuneline.train.reward.RewardScorer`, is its reward function; the KL reference is the SFT model (the fresh
policy adapter disabled). TRL logs (loss, reward, kl, completion length) stream to Pipes (or stdout) and MLflow.
The outcome's model is the policy adapter merged onto the SFT base (full weights: the gate's candidate when
``alignment.method`` is rloo/grpo; after prompt learning, the continued prompt adapter on the SFT's base); its
figures are the held-out mean reward, KL to the reference and generated tokens/s before and after. A rerun of
the same spec resumes from the last complete checkpoint. An adapter SFT model's merge is taken from (or written to)
the shared cache under ``merge_cache_uri``, as DPO does. Any error exits non-zero with the traceback on stderr.
"""

from __future__ import annotations

import sys
from typing import Any, Optional

from tuneline.recipes import _runner
from tuneline.specs import Outcome, RlSpec


def run(spec: RlSpec, pipes: Any = None) -> Outcome:
    from tuneline import storage
    from tuneline.models.loading import local_model_dir
    from tuneline.models.provision import model_ref
    from tuneline.records import read_records
    from tuneline.train.reward import RewardScorer
    from tuneline.train.rl import ADAPTER_SUBDIR, MODEL_SUBDIR, load_rl_model, train_rl

    log = _runner.StepLogger(pipes, spec.mlflow)
    params = spec.params
    train, val = read_records(storage.fetch(spec.train_uri)), read_records(storage.fetch(spec.val_uri))
    sft_dir = local_model_dir(spec.sft)
    base_dir = local_model_dir(spec.sft.base) if spec.sft.base is not None else None
    scorer = RewardScorer(local_model_dir(spec.reward_model))
    work = storage.Workspace(spec.out_uri)
    steps = min(params.max_steps, spec.max_steps) if spec.max_steps else params.max_steps
    log.emit(f"rl: {spec.algorithm} beta={params.beta} lr={params.learning_rate} steps={steps} "
             f"generations={params.num_generations} completion<={params.max_completion_length} tokens, "
             f"reward model {storage.redact(spec.reward_model.uri)}")
    merge, merge_reused = _runner.merge_workspace(spec.merge_cache_uri, spec.sft, sft_dir, work)
    result = train_rl(spec.algorithm, sft_dir, base_dir, spec.sft.method, train, val, scorer, params, work.path,
                      seed=spec.seed, max_steps=spec.max_steps, on_log=log,
                      on_checkpoint=work.sync if work.remote else None,
                      gradient_checkpointing=spec.compute.trainer_checkpointing(),
                      merge_dir=merge.path)
    _runner.share_merge(merge)
    stage, run_id = spec.asset_key or "rl_policy", spec.mlflow.run_id if spec.mlflow else None
    if result.continued_adapter:  # prompt learning: the policy's virtual tokens on the SFT adapter's base
        work.sync(ADAPTER_SUBDIR)
        model = model_ref(result.output_dir, work.uri_of(ADAPTER_SUBDIR), method=spec.algorithm, stage=stage,
                          base=spec.sft.base, mlflow_run_id=run_id)
    else:
        merged = load_rl_model(work.path)
        work.sync(MODEL_SUBDIR)
        model = model_ref(merged, work.uri_of(MODEL_SUBDIR), method=spec.algorithm, stage=stage,
                          mlflow_run_id=run_id)
    before, after = result.before, result.after
    metrics = {
        "algorithm": spec.algorithm, "continued_adapter": result.continued_adapter, "steps": result.steps,
        "sft_merge_reused": merge_reused,
        "seconds": result.seconds, "beta": params.beta,
        "num_generations": params.num_generations, "max_completion_length": params.max_completion_length,
        "train_prompts": result.train_prompts, "eval_prompts": result.eval_prompts,
        "dropped_long_prompts": result.dropped_long_prompts, "trainable_params": result.trainable_params,
        "total_params": result.total_params, "final_loss": result.losses[-1]["loss"] if result.losses else None,
        **{f"{k}_before": before[k] for k in ("mean_reward", "kl", "tokens_per_s")},
        **{f"{k}_after": after[k] for k in ("mean_reward", "kl", "tokens_per_s")},
    }
    outcome = Outcome(model=model, metrics=metrics, details=result.to_dict(), curves={
        "train": [[c["step"], c["loss"]] for c in result.losses],
        "reward": [[c["step"], c["reward"]] for c in result.losses if "reward" in c],
    })
    log.emit(f"rl done: {result.steps} {spec.algorithm} steps, held-out mean reward {before['mean_reward']:.3f} -> "
             f"{after['mean_reward']:.3f}, KL to the SFT model {after['kl']:.4f} -> {storage.redact(model.uri)}")
    return _runner.finish(spec, outcome, pipes, log=log)


def main(argv: Optional[list[str]] = None) -> int:
    return _runner.run_cli(argv, spec_class=RlSpec, run=run)


if __name__ == "__main__":
    sys.exit(main())
