"""Online RL from a reward model: TRL's ``RLOOTrainer`` or ``GRPOTrainer``, KL-tied to the SFT model.

Classic RLHF (PPO) holds four models: the policy, the reference, the reward model and a critic (a value model
as large as the policy, trained alongside it to estimate each prompt's expected reward). TRL 1.16 removed PPO
(trl#7020); RLOO and GRPO drop the critic and take the baseline from the other completions of the same prompt:
RLOO subtracts the mean reward of the prompt's *other* ``num_generations - 1`` completions (leave-one-out),
GRPO the group's mean (scaled by its std). Reads top to bottom:

1. **Merged base.** The SFT model as full weights (``tuneline.train.dpo.merged_sft_base``: an adapter merged,
   full weights as they are).
2. **Fresh adapter.** The trainer gets that model and a new ``LoraConfig``: TRL wraps it in a LoRA adapter
   (B = 0, so the policy starts equal to the reference) and computes the reference log-probs with the adapter
   disabled. One set of full weights; no critic; the reward model is a frozen scorer. After prompt learning
   the policy is the SFT prompt adapter itself, trained on, and the reference its frozen copy (as in DPO).
3. **Rollouts.** For each prompt ``num_generations`` completions are sampled (``temperature``, at most
   ``max_completion_length`` new tokens) and scored by the reward function (:class:`~tuneline.train.reward.RewardScorer`
   or any callable with TRL's signature). The KL to the reference (coefficient ``beta``) is subtracted from the
   reward (RLOO, sequence level) or added to the loss (GRPO, per token).
4. **Measured** before and after on held-out prompts: the mean reward of greedy completions, the exact KL to the
   reference along them, and generated tokens/s (:mod:`tuneline.evaluate.policy`).
5. **Saved**: the adapter in ``out_dir/adapter``; merged onto the SFT base in ``out_dir/model`` (the candidate;
   a continued prompt adapter stays an adapter on the SFT's base).

Every TRL default that matters is set here on purpose: bf16 from ``resolve_bf16`` (TRL's True fails on a CPU
without bf16), gradient checkpointing off, ``num_generations``, ``max_completion_length``, ``beta`` (GRPO's default
0 would drop the KL term), the learning rate (TRL's 1e-6), no reporting integrations.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from tuneline.params import RL_ALGORITHMS, RlParams
from tuneline.train.common import TrainedStats, use_training_attention

ADAPTER_SUBDIR = "adapter"
MODEL_SUBDIR = "model"
RESULT_FILE = "rl_result.json"

OnLog = Callable[[int, dict[str, Any]], None]


def prompts_of(records: Sequence[Any]) -> list[list[dict[str, str]]]:
    """The distinct prompt turns of preference records (their messages) or SFT records (all but the answer)."""
    seen: set[str] = set()
    out: list[list[dict[str, str]]] = []
    for record in records:
        if record.kind == "preference":
            turns = list(record.messages)
        elif record.kind == "sft":
            turns = list(record.messages[:-1])
        else:
            continue
        if not turns or turns[-1].get("role") != "user":
            continue
        key = json.dumps(turns, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append([{"role": t["role"], "content": t["content"]} for t in turns])
    return out


def fitting_prompts(tokenizer: Any, prompts: Sequence[list[dict[str, str]]],
                    max_prompt_length: int) -> list[list[dict[str, str]]]:
    """The prompts whose templated ids fit ``max_prompt_length`` (TRL 1.16 has no prompt-length cap of its own)."""
    from tuneline.models.generation import prompt_ids

    return [p for p in prompts if len(prompt_ids(tokenizer, p)) <= max_prompt_length]


def build_rl_trainer(
    algorithm: str,
    merged_base_dir: str | Path,
    prompts: Sequence[list[dict[str, str]]],
    reward_fn: Any,
    params: RlParams,
    checkpoints_dir: str | Path,
    *,
    seed: int,
    max_steps: Optional[int] = None,
    callbacks: Sequence[Any] = (),
    gradient_checkpointing: bool = False,
    continue_adapter: Optional[str | Path] = None,
) -> Any:
    """TRL's ``RLOOTrainer``/``GRPOTrainer`` on the merged SFT model with a fresh LoRA adapter (the reference is
    that adapter disabled: ``ref_model`` is None); with ``continue_adapter`` (a prompt-learning SFT adapter on
    ``merged_base_dir``) that adapter is trained on, against its frozen copy."""
    from datasets import Dataset

    from tuneline.models.loading import load_causal_lm, load_tokenizer
    from tuneline.train.common import (
        checkpointed_run_args,
        continued_prompt_adapter,
        freeze_reference_adapter,
        fresh_lora_config,
    )
    from tuneline.train.trainers import without_flop_count

    if algorithm not in RL_ALGORITHMS:
        raise ValueError(f"rl algorithm {algorithm!r} is not one of {', '.join(RL_ALGORITHMS)}")
    if continue_adapter is not None:
        model, tokenizer = continued_prompt_adapter(merged_base_dir, continue_adapter,
                                                    gradient_checkpointing=gradient_checkpointing)
    else:
        model, tokenizer = use_training_attention(load_causal_lm(merged_base_dir)), load_tokenizer(merged_base_dir)
    steps = min(s for s in (params.max_steps, max_steps) if s is not None)
    common = dict(
        output_dir=str(checkpoints_dir),
        learning_rate=params.learning_rate,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_steps=steps,
        per_device_train_batch_size=params.batch_size,  # completions per step
        num_generations=params.num_generations,  # TRL: RLOO 2, GRPO 8
        max_completion_length=params.max_completion_length,  # TRL: 512
        temperature=params.temperature,
        top_p=1.0,
        top_k=0,
        beta=params.beta,  # TRL: RLOO 0.05, GRPO 0.0 (no KL at all)
        num_iterations=1,  # one optimizer step per batch of rollouts (on-policy)
        epsilon=0.2,
        disable_dropout=True,  # rollout and update see the same network
        use_vllm=False,
        log_completions=False,
        **checkpointed_run_args(params.save_steps, seed, bf16=params.bf16,
                                 gradient_checkpointing=gradient_checkpointing),
    )
    if algorithm == "rloo":
        from trl import RLOOConfig, RLOOTrainer

        config, trainer_class = RLOOConfig(**common, normalize_advantages=False), RLOOTrainer
    else:
        from trl import GRPOConfig, GRPOTrainer

        config = GRPOConfig(**common, loss_type="dapo", scale_rewards="group")
        trainer_class = GRPOTrainer
    trainer = without_flop_count(trainer_class)(
        model=model,
        reward_funcs=reward_fn,
        args=config,
        train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]),
        processing_class=tokenizer,
        peft_config=None if continue_adapter is not None else fresh_lora_config(params.lora, "CAUSAL_LM", model),
        callbacks=list(callbacks),
    )
    if trainer.ref_model is not None:  # a TRL change that would silently hold a second full copy
        raise RuntimeError(f"{trainer_class.__name__} built a separate reference model; expected the adapter-disabled "
                           "base")
    if continue_adapter is not None:
        freeze_reference_adapter(trainer.model)
    return trainer


@dataclass
class RlResult(TrainedStats):
    """What an RL run produced and measured."""

    algorithm: str
    output_dir: str  # the policy adapter (+ tokenizer)
    merged_base_dir: str  # the SFT model as full weights: the adapter's base and the KL reference
    before: dict[str, float]  # mean reward, KL, tokens/s of greedy completions on held-out prompts
    after: dict[str, float]
    train_prompts: int = 0
    eval_prompts: int = 0
    dropped_long_prompts: int = 0
    reference: str = "merged SFT model with the policy adapter disabled (ref_model=None)"
    baseline: str = ""
    continued_adapter: bool = False  # prompt learning: the SFT's virtual tokens trained on, on the SFT's base


_CURVE_KEYS = {"loss": "loss", "reward": "reward", "kl": "kl", "reward_std": "reward_std",
               "completions/mean_length": "completion_length"}
BASELINES = {"rloo": "leave-one-out: the mean reward of the prompt's other completions",
             "grpo": "group: the mean reward of the prompt's completions, advantages scaled by the group's std"}


def measure(model: Any, tokenizer: Any, prompts: Sequence[list[dict[str, str]]], reward_fn: Any,
            max_new_tokens: int) -> dict[str, float]:
    """Mean reward, KL to the adapter-disabled reference and tokens/s of greedy completions of ``prompts``."""
    from tuneline.evaluate.policy import kl_to_reference, mean_reward, rollouts

    out = rollouts(model, tokenizer, prompts, max_new_tokens=max_new_tokens)
    reward, _ = mean_reward(reward_fn, prompts, out["texts"], out["ids"])
    kl = kl_to_reference(model, out["prompt_ids"], out["ids"], pad_id=tokenizer.pad_token_id or 0)
    return {"mean_reward": reward, "kl": kl, "tokens_per_s": out["tokens_per_s"],
            "mean_new_tokens": out["new_tokens"] / max(1, len(prompts)), "prompts": len(prompts)}


def train_rl(
    algorithm: str,
    sft_model_dir: str | Path,
    base_model_path: Optional[str | Path],
    sft_method: str,
    train_records: Sequence[Any],
    val_records: Sequence[Any],
    reward_fn: Any,
    params: RlParams,
    out_dir: str | Path,
    *,
    seed: int,
    max_steps: Optional[int] = None,
    on_log: Optional[OnLog] = None,
    on_checkpoint: Optional[Callable[[Path], None]] = None,
    gradient_checkpointing: bool = False,
    merge_dir: Optional[str | Path] = None,
) -> RlResult:
    """RLOO/GRPO on the prompts of ``train_records`` from the SFT model, rewarded by ``reward_fn`` (TRL's reward
    function signature), KL-tied (``params.beta``) to the SFT model; figures on ``val_records``' prompts before
    and after. Checkpoints every ``params.save_steps`` are marked complete; a rerun resumes from the last one. An
    adapter SFT model is merged under ``merge_dir`` (default ``out_dir``; a shared cache entry is reused)."""
    from tuneline.models.loading import resolve_bf16
    from tuneline.params import PROMPT_LEARNING
    from tuneline.train import callbacks as cb
    from tuneline.train import checkpoints as ck
    from tuneline.train.common import CONTINUED_REFERENCE, loss_curve
    from tuneline.train.dpo import merged_sft_base
    from tuneline.train.methods import count_params, read_method_file, write_method_file

    started = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    merged_dir, _ = merged_sft_base(sft_model_dir, base_model_path, sft_method, merge_dir or out)
    continued = sft_method in PROMPT_LEARNING

    checkpoints = out / "checkpoints"
    resume = ck.last_valid_checkpoint(checkpoints)
    from tuneline.models.loading import load_tokenizer

    tokenizer = load_tokenizer(sft_model_dir if continued else merged_dir)
    all_train = prompts_of(train_records)
    train_prompts = fitting_prompts(tokenizer, all_train, params.max_prompt_length)
    eval_prompts = fitting_prompts(tokenizer, prompts_of(val_records), params.max_prompt_length)[:params.eval_prompts]
    if not train_prompts or not eval_prompts:
        raise ValueError(f"RL needs prompts of at most {params.max_prompt_length} tokens: {len(train_prompts)} train "
                         f"and {len(eval_prompts)} held-out fit (raise rl.max_prompt_length)")
    trainer = build_rl_trainer(algorithm, merged_dir, train_prompts, reward_fn, params, checkpoints, seed=seed,
                               max_steps=max_steps, gradient_checkpointing=gradient_checkpointing,
                               continue_adapter=sft_model_dir if continued else None,
                               callbacks=[*([cb.MetricsCallback(on_log)] if on_log else []),
                                              cb.CompleteCheckpointCallback(on_checkpoint)])
    model = trainer.model
    trainable, total = count_params(model)
    before = measure(model, tokenizer, eval_prompts, reward_fn, params.max_completion_length)
    with ck.disk_full_explained(checkpoints):
        output = trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
    curve = loss_curve(trainer.state.log_history, _CURVE_KEYS)
    if not all(math.isfinite(c["loss"]) for c in curve):
        raise RuntimeError(f"{algorithm} loss went non-finite: {curve[-3:]}")
    after = measure(trainer.model, tokenizer, eval_prompts, reward_fn, params.max_completion_length)

    adapter_dir = out / ADAPTER_SUBDIR
    trainer.model.save_pretrained(adapter_dir, selected_adapters=["default"])  # not TRL's reference copy
    tokenizer.save_pretrained(adapter_dir)
    write_method_file(adapter_dir, read_method_file(sft_model_dir) if continued else {"method": "lora"}, merged_dir)
    result = RlResult(
        algorithm=algorithm, output_dir=str(adapter_dir), merged_base_dir=str(merged_dir), before=before,
        after=after, losses=curve, steps=int(output.global_step), seconds=round(time.perf_counter() - started, 3),
        train_prompts=len(train_prompts), eval_prompts=len(eval_prompts),
        dropped_long_prompts=len(all_train) - len(train_prompts), trainable_params=int(trainable),
        total_params=int(total), bf16=resolve_bf16(params.bf16), baseline=BASELINES[algorithm],
        params=dataclasses.asdict(params), continued_adapter=continued,
        reference=CONTINUED_REFERENCE if continued else RlResult.reference,
    )
    (out / RESULT_FILE).write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")
    return result


def load_rl_model(result_dir: str | Path) -> Path:
    """Merge the policy adapter of a ``train_rl`` run onto its SFT base in ``result_dir/model`` (reused when there)."""
    from tuneline.train.dpo import MERGE_MARKER
    from tuneline.train.sft import merge_adapter

    result_dir = Path(result_dir)
    result = json.loads((result_dir / RESULT_FILE).read_text(encoding="utf-8"))
    target = result_dir / MODEL_SUBDIR
    if (target / MERGE_MARKER).is_file():
        return target
    info = merge_adapter(result["merged_base_dir"], result["output_dir"], target)
    (target / MERGE_MARKER).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return target
