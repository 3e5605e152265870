"""Direct preference optimization from the SFT model, with no second full copy as the reference.

Reads top to bottom:

1. **Merged base.** The SFT adapter (lora, qlora, adalora, ia3) is merged into full weights in
   ``out_dir/merged`` (``merge_adapter``); a full or freeze SFT model is already full weights and is used
   as it is. Bottleneck adapters (``adapter``) cannot be merged: the base and the adapters are bundled in
   ``out_dir/merged`` and load together, and the fresh LoRA below leaves the adapters and the projections they
   follow alone. Prompt-learning SFT adapters (prefix, prompt, ptuning, multitask_prompt) have no weights to
   merge: their model's weights are the base's, and DPO continues their virtual tokens instead (2).
2. **Fresh adapter.** TRL's ``DPOTrainer`` (as :class:`~tuneline.train.dpo_shared.SharedPromptDPOTrainer`,
   which feeds each pair as one row with its prompt computed once: the same loss to fp32 rounding) gets that model,
   ``ref_model=None`` and a new ``LoraConfig``: it wraps the model in a fresh LoRA adapter (B = 0, so the policy
   starts equal to the reference) and computes the reference log-probs with the adapter disabled. One set of full
   weights in memory. After prompt learning, TRL gets the SFT prompt adapter itself, trainable
   (``continued_prompt_adapter``), and keeps a frozen copy of it (adapter ``ref``) as the reference: the policy
   starts equal to the SFT model.
3. **Measured before and after** on held-out pairs: implicit reward ``beta * (logp_policy - logp_ref)``
   summed over the response tokens; reward accuracy (chosen reward > rejected reward), mean margin and the
   policy's raw log-prob preference accuracy. Before training the policy *is* the reference, so margins
   are 0 and the log-prob accuracy is the SFT model's own.
4. **Saved**: the DPO adapter in ``out_dir/adapter`` (+ tokenizer); :func:`load_dpo_model` merges it onto
   the merged SFT base for use as a teacher or evaluation candidate (a continued prompt adapter stays an
   adapter on the SFT's base).

TRL's config defaults are set on purpose here: gradient checkpointing off, bf16 from ``resolve_bf16``,
lr and beta from ``DpoParams``, no reporting integrations. Heavy libraries are imported inside functions.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from tuneline.params import PROMPT_LEARNING, DpoParams
from tuneline.train.common import CONTINUED_REFERENCE, TrainedStats, use_training_attention

MERGEABLE_METHODS = ("lora", "qlora", "adalora", "ia3")
FULL_WEIGHT_METHODS = ("full", "freeze")
BOTTLENECK_METHOD = "adapter"  # bundled with its base, not merged (merged_sft_base)
MERGED_SUBDIR = "merged"  # the SFT model as full weights (adapter methods only)
ADAPTER_SUBDIR = "adapter"  # the DPO adapter + tokenizer
MODEL_SUBDIR = "model"  # load_dpo_model: DPO adapter merged onto the merged SFT base
RESULT_FILE = "dpo_result.json"
MERGE_MARKER = "merge.json"  # written after a merge completes: a retry reuses the merged weights

OnLog = Callable[[int, dict[str, Any]], None]


@dataclass
class PreferenceMetrics:
    """Preference metrics of a policy against its reference on a set of pairs."""

    reward_accuracy: float  # share of pairs with chosen reward > rejected reward
    reward_margin: float  # mean (chosen reward - rejected reward)
    logprob_accuracy: float  # share of pairs where the policy gives the chosen response the higher log-prob
    chosen_reward: float  # mean implicit reward of the chosen responses
    rejected_reward: float
    pairs: int


@dataclass
class DpoResult(TrainedStats):
    """What a DPO run produced and measured."""

    output_dir: str  # the DPO adapter (+ tokenizer)
    merged_base_dir: str  # the SFT model as full weights: the adapter's base and the reference
    sft_method: str
    reference: str  # how the reference log-probs are computed
    ref_model_is_none: bool  # no second model was given to (or built by) the trainer
    fresh_adapter: bool  # every LoRA B matrix was zero before training: policy == reference at step 0
    before: dict[str, float]  # PreferenceMetrics on val, before training
    after: dict[str, float]  # PreferenceMetrics on val, after training
    train_pairs: int = 0
    val_pairs: int = 0
    merge: Optional[dict[str, Any]] = None  # merge_adapter's report (None when the SFT model was full weights)
    continued_adapter: bool = False  # prompt learning: the SFT's virtual tokens trained on, on the SFT's base
    shared_prompts: bool = False  # each pair fed as one row, its prompt computed once (dpo_shared)
    reference_once: bool = False  # each pair's reference log-probs computed once, not every step (dpo_shared)


# ---------------------------------------------------------------------------
# data


def _pair_parts(pair: Any) -> tuple[list[dict[str, str]], str, str]:
    """(prompt messages, chosen, rejected) from a preference ``ChatRecord`` or its dict."""
    get = pair.get if isinstance(pair, dict) else lambda k, d=None: getattr(pair, k, d)
    kind = get("kind", "preference")
    if kind != "preference":
        raise ValueError(f"DPO needs records of kind 'preference', got {kind!r}")
    messages, chosen, rejected = get("messages"), get("chosen"), get("rejected")
    if not messages or chosen is None or rejected is None:
        raise ValueError("a preference record needs prompt messages, chosen and rejected")
    return list(messages), chosen, rejected


def to_conversational(pairs: Sequence[Any]) -> list[dict[str, list[dict[str, str]]]]:
    """TRL's conversational preference rows: prompt turns, then one assistant turn each for chosen/rejected."""
    rows = []
    for pair in pairs:
        messages, chosen, rejected = _pair_parts(pair)
        rows.append(
            {
                "prompt": messages,
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}],
            }
        )
    return rows


def _ids(tokenizer: Any, messages: list[dict[str, str]], **kwargs: Any) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)["input_ids"])


def tokenize_pair(tokenizer: Any, pair: Any, max_length: int) -> tuple[list[int], list[int], list[int], list[int]]:
    """(chosen ids, chosen response mask, rejected ids, rejected mask), tokenized the way TRL does.

    The response starts where the prompt (rendered with the generation prompt) and prompt+response diverge;
    sequences are cut to ``max_length`` on the right (TRL's ``keep_start``).
    """
    messages, chosen, rejected = _pair_parts(pair)
    prompt = _ids(tokenizer, messages, add_generation_prompt=True)
    out: list[list[int]] = []
    fulls = [_ids(tokenizer, messages + [{"role": "assistant", "content": text}]) for text in (chosen, rejected)]
    start = min(_common_prefix(prompt, full) for full in fulls)
    for full in fulls:
        full = full[:max_length]
        out.append(full)
        out.append([0] * min(start, len(full)) + [1] * max(0, len(full) - start))
    return out[0], out[1], out[2], out[3]


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


# ---------------------------------------------------------------------------
# evaluation


def _sequence_logps(model: Any, seqs: list[list[int]], masks: list[list[int]], pad_id: int) -> list[float]:
    """Sum of log p(token) over the masked (response) tokens of each sequence."""
    import torch

    n, longest = len(seqs), max(len(s) for s in seqs)
    ids = torch.full((n, longest), pad_id, dtype=torch.long)
    attn = torch.zeros((n, longest), dtype=torch.long)
    resp = torch.zeros((n, longest), dtype=torch.bool)
    for i, (s, m) in enumerate(zip(seqs, masks)):
        ids[i, : len(s)] = torch.tensor(s)
        attn[i, : len(s)] = 1
        resp[i, : len(m)] = torch.tensor(m, dtype=torch.bool)
    device = next(model.parameters()).device
    ids, attn, resp = ids.to(device), attn.to(device), resp.to(device)
    from tuneline.evaluate.report import virtual_tokens_sliced

    logits = virtual_tokens_sliced(model(input_ids=ids, attention_mask=attn).logits, ids)[:, :-1].float()
    logp = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return (logp * resp[:, 1:]).sum(-1).tolist()


def evaluate_preferences(
    model: Any,
    tokenizer: Any,
    pairs: Sequence[Any],
    beta: float,
    *,
    ref: Any = "adapter-disabled",
    max_length: int = 256,
    batch_size: int = 8,
) -> PreferenceMetrics:
    """Reward accuracy, mean reward margin and log-prob accuracy of ``model`` against a reference.

    ``ref="adapter-disabled"`` (default): the reference is ``model`` with its PEFT adapter disabled, or its frozen
    ``ref`` copy when it continues an adapter (a model without an adapter is its own reference, so every margin
    is 0). Or pass a reference model.
    Implicit reward = ``beta * (logp_policy - logp_ref)`` of the response tokens (eos included).
    """
    import contextlib

    import torch

    if not pairs:
        raise ValueError("evaluate_preferences needs at least one pair")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = [tokenize_pair(tokenizer, p, max_length) for p in pairs]
    was_training = model.training
    model.eval()

    def logps(m: Any, context: Any) -> tuple[list[float], list[float]]:
        chosen, rejected = [], []
        with torch.no_grad(), context:
            for start in range(0, len(encoded), batch_size):
                chunk = encoded[start : start + batch_size]
                seqs = [c[0] for c in chunk] + [c[2] for c in chunk]
                masks = [c[1] for c in chunk] + [c[3] for c in chunk]
                values = _sequence_logps(m, seqs, masks, pad_id)
                chosen += values[: len(chunk)]
                rejected += values[len(chunk) :]
        return chosen, rejected

    pol_c, pol_r = logps(model, contextlib.nullcontext())
    if isinstance(ref, str):
        if ref != "adapter-disabled":
            raise ValueError(f"ref must be a model or 'adapter-disabled', got {ref!r}")
        if hasattr(model, "disable_adapter"):
            from tuneline.train.common import reference_context

            ref_c, ref_r = logps(model, reference_context(model))
        else:
            ref_c, ref_r = pol_c, pol_r
    else:
        ref_was_training = ref.training
        ref.eval()
        ref_c, ref_r = logps(ref, contextlib.nullcontext())
        ref.train(ref_was_training)
    model.train(was_training)

    chosen_rewards = [beta * (p - r) for p, r in zip(pol_c, ref_c)]
    rejected_rewards = [beta * (p - r) for p, r in zip(pol_r, ref_r)]
    margins = [c - r for c, r in zip(chosen_rewards, rejected_rewards)]
    n = len(margins)
    return PreferenceMetrics(
        reward_accuracy=sum(m > 0 for m in margins) / n,
        reward_margin=sum(margins) / n,
        logprob_accuracy=sum(c > r for c, r in zip(pol_c, pol_r)) / n,
        chosen_reward=sum(chosen_rewards) / n,
        rejected_reward=sum(rejected_rewards) / n,
        pairs=n,
    )


# ---------------------------------------------------------------------------
# the merged SFT base


MERGE_CACHE_FORMAT = 1  # bump when the merged layout changes (it is part of the key)


def merge_cache_key(sft_model_dir: str | Path, base_sha256: str, sft_method: str) -> Optional[str]:
    """The folder name of the SFT model's merge in a shared cache: a hash of every file of the SFT model (an
    adapter: small), its base's weights hash and the method, so DPO, the reward model and RL, which all start
    from the same SFT model, find one merge instead of writing three. None when nothing is merged (full
    weights are used as they are, virtual tokens sit on their base)."""
    from tuneline.records import canonical_json, sha256_file, sha256_text

    if sft_method not in MERGEABLE_METHODS + (BOTTLENECK_METHOD,):
        return None
    root = Path(sft_model_dir)
    files = {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}
    return sha256_text(canonical_json({"format": MERGE_CACHE_FORMAT, "method": sft_method, "sft_files": files,
                                       "base_weights_sha256": base_sha256}))


def merged_sft_base(
    sft_model_dir: str | Path, base_model_path: str | Path, sft_method: str, out_dir: str | Path
) -> tuple[Path, Optional[dict[str, Any]]]:
    """The SFT model as full weights: merged into ``out_dir/merged`` for LoRA-family methods, or as it is. A
    bottleneck adapter (``adapter``: a non-linear module, nothing to merge) becomes a bundle in ``out_dir/merged``
    instead: the base's weights with the adapters beside them, loaded back together (``load_causal_lm``), and the
    later stage's fresh LoRA leaves the adapters alone (:func:`~tuneline.train.common.fresh_lora_config`).

    A completed merge (its marker file present) is reused, so a retried run, or another stage given the same
    ``out_dir`` (the shared cache entry of :func:`merge_cache_key`), does not merge again. The merge is written
    to a temporary folder and renamed into place complete, so two stages merging at once never see half of one.
    """
    from tuneline.train.checkpoints import move_into_place, temp_sibling
    from tuneline.train.sft import merge_adapter

    sft_model_dir = Path(sft_model_dir)
    if sft_method in PROMPT_LEARNING:  # virtual tokens: the SFT model's weights are its base's
        return Path(base_model_path), {"output_dir": str(base_model_path), "method": sft_method,
                                       "prompt_learning": True, "quantization": None}
    if sft_method in FULL_WEIGHT_METHODS:
        if (sft_model_dir / "adapter_config.json").is_file():
            raise ValueError(f"sft_method={sft_method!r} but {sft_model_dir} holds an adapter")
        return sft_model_dir, None
    if sft_method not in MERGEABLE_METHODS + (BOTTLENECK_METHOD,):
        known = MERGEABLE_METHODS + (BOTTLENECK_METHOD,) + FULL_WEIGHT_METHODS + PROMPT_LEARNING
        raise ValueError(f"unknown sft_method {sft_method!r}: expected one of {', '.join(known)}")
    merged = Path(out_dir) / MERGED_SUBDIR
    marker = merged / MERGE_MARKER
    if marker.is_file():
        return merged, json.loads(marker.read_text(encoding="utf-8"))
    tmp = temp_sibling(merged)
    if sft_method == BOTTLENECK_METHOD:
        from tuneline.deploy.bundle import bottleneck_bundle

        bottleneck_bundle(base_model_path, sft_model_dir, tmp)  # checked against the adapter on its base
        info = {"method": sft_method, "bundle": True, "quantization": None}
    else:
        info = merge_adapter(base_model_path, sft_model_dir, tmp)
    info["output_dir"] = str(merged)
    (tmp / MERGE_MARKER).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    move_into_place(tmp, merged, MERGE_MARKER)  # another stage's identical merge, if first, is kept
    return merged, json.loads(marker.read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------
# TRL, wrapped: version churn stays here


def build_dpo_trainer(
    merged_base_dir: str | Path,
    train_pairs: Sequence[Any],
    params: DpoParams,
    checkpoints_dir: str | Path,
    *,
    seed: int,
    max_steps: Optional[int] = None,
    callbacks: Sequence[Any] = (),
    gradient_checkpointing: bool = False,
    quantization: Optional[dict[str, Any]] = None,
    continue_adapter: Optional[str | Path] = None,
) -> Any:
    """TRL's ``DPOTrainer`` on the merged SFT model with a fresh LoRA adapter and ``ref_model=None``; with
    ``quantization`` (a QLoRA SFT model) the merged model is loaded in 4-bit as QLoRA trained, so neither the
    policy nor the reference is ever a full-precision copy in memory. With ``continue_adapter`` (a
    prompt-learning SFT adapter on ``merged_base_dir``, its base) that adapter is trained on, against its frozen
    copy."""
    from datasets import Dataset
    from trl import DPOConfig

    from tuneline.models.loading import load_causal_lm, load_tokenizer
    from tuneline.train.common import (
        checkpointed_run_args,
        continued_prompt_adapter,
        freeze_reference_adapter,
        fresh_lora_config,
    )
    from tuneline.train.distributed import ddp_backend
    from tuneline.train.dpo_shared import SharedPromptDPOTrainer

    if continue_adapter is not None:
        model, tokenizer = continued_prompt_adapter(merged_base_dir, continue_adapter,
                                                    gradient_checkpointing=gradient_checkpointing)
    elif quantization:
        from peft import prepare_model_for_kbit_training

        from tuneline.train.methods import load_base

        model = prepare_model_for_kbit_training(load_base(merged_base_dir, quantization),
                                                use_gradient_checkpointing=gradient_checkpointing)
        tokenizer = load_tokenizer(merged_base_dir)
    else:
        model, tokenizer = use_training_attention(load_causal_lm(merged_base_dir)), load_tokenizer(merged_base_dir)
    model.config.use_cache = False
    caps = [s for s in (params.max_steps, max_steps) if s is not None]
    config = DPOConfig(
        output_dir=str(checkpoints_dir),
        beta=params.beta,
        learning_rate=params.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=0,
        num_train_epochs=params.epochs,
        max_steps=min(caps) if caps else -1,
        per_device_train_batch_size=params.batch_size,
        max_length=params.max_length,
        ddp_backend=ddp_backend(),  # every rank opts into gloo on CPU, else each trains alone
        precompute_ref_log_probs=False,
        # RPO: the chosen answers' NLL beside the DPO loss keeps their likelihood from falling with the rejected
        **(dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, params.sft_weight]) if params.sft_weight else {}),
        **checkpointed_run_args(params.save_steps, seed, bf16=params.bf16,
                                 gradient_checkpointing=gradient_checkpointing),
    )
    trainer = SharedPromptDPOTrainer(
        model=model,
        ref_model=None,
        args=config,
        train_dataset=Dataset.from_list(to_conversational(train_pairs)),
        processing_class=tokenizer,
        peft_config=None if continue_adapter is not None else fresh_lora_config(params.lora, "CAUSAL_LM", model),
        callbacks=list(callbacks),
    )
    if trainer.ref_model is not None:  # a TRL change that would silently double memory
        raise RuntimeError("DPOTrainer built a separate reference model; expected the adapter-disabled base")
    if continue_adapter is not None:
        freeze_reference_adapter(trainer.model)
    return trainer


def _adapter_is_fresh(model: Any) -> bool:
    """True when the model has one adapter ("default") and every LoRA B matrix is zero (policy == base)."""
    names = list(getattr(model, "peft_config", {}) or {})
    b_weights = [p for n, p in model.named_parameters() if "lora_B" in n]
    return names == ["default"] and bool(b_weights) and all(float(p.detach().abs().max()) == 0.0 for p in b_weights)


_CURVE_KEYS = {"loss": "loss", "rewards/accuracies": "reward_accuracy", "rewards/margins": "reward_margin",
               "rewards/chosen": "chosen_reward", "rewards/rejected": "rejected_reward"}


# ---------------------------------------------------------------------------
# the stage


def train_dpo(
    sft_model_dir: str | Path,
    base_model_path: str | Path,
    sft_method: str,
    train_pairs: Sequence[Any],
    val_pairs: Sequence[Any],
    params: DpoParams,
    out_dir: str | Path,
    *,
    seed: int,
    max_steps: Optional[int] = None,
    on_log: Optional[OnLog] = None,
    on_checkpoint: Optional[Callable[[Path], None]] = None,
    gradient_checkpointing: bool = False,
    merge_dir: Optional[str | Path] = None,
) -> DpoResult:
    """Train a fresh LoRA adapter with DPO on the (merged) SFT model; the reference is that model itself.

    ``sft_model_dir`` is ``train_sft``'s output (an adapter on ``base_model_path``, or full weights for
    full/freeze); an adapter is merged under ``merge_dir`` (default ``out_dir``: a shared cache entry lets the
    reward model and RL reuse it). ``max_steps`` caps the run on top of ``params.max_steps``; ``on_log(step,
    logs)`` sees every TRL log (loss, rewards/accuracies, rewards/margins, ...). Checkpoints every
    ``params.save_steps`` steps are marked complete once written (then ``on_checkpoint(folder)``); a rerun resumes
    from the last complete one, its loss curve included.
    """
    from tuneline.models.loading import resolve_bf16
    from tuneline.train import callbacks as cb
    from tuneline.train import checkpoints as ck
    from tuneline.train import distributed
    from tuneline.train.common import loss_curve
    from tuneline.train.methods import count_params, read_method_file, write_method_file

    distributed.check_world(params.num_processes, "tuneline.recipes.dpo")
    started = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not train_pairs or not val_pairs:
        raise ValueError(f"DPO needs train and val pairs (got {len(train_pairs)} and {len(val_pairs)})")

    with distributed.main_process_first():  # rank 0 merges; the others find its marker and reuse the merge
        merged_dir, merge_info = merged_sft_base(sft_model_dir, base_model_path, sft_method, merge_dir or out)
    continued = sft_method in PROMPT_LEARNING

    checkpoints = out / "checkpoints"
    resume = ck.last_valid_checkpoint(checkpoints)
    trainer = build_dpo_trainer(
        merged_dir, train_pairs, params, checkpoints, seed=seed, max_steps=max_steps,
        gradient_checkpointing=gradient_checkpointing, quantization=(merge_info or {}).get("quantization"),
        continue_adapter=sft_model_dir if continued else None,
        callbacks=[*([cb.MetricsCallback(on_log)] if on_log else []), cb.CompleteCheckpointCallback(on_checkpoint)],
    )
    model, tokenizer = trainer.model, trainer.processing_class
    ref_model_is_none = trainer.ref_model is None
    fresh = _adapter_is_fresh(model)
    trainable, total = count_params(model)

    before = evaluate_preferences(model, tokenizer, val_pairs, params.beta, max_length=params.max_length,
                                  batch_size=params.batch_size)
    with ck.disk_full_explained(checkpoints):
        output = trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
    curve = loss_curve(trainer.state.log_history, _CURVE_KEYS)  # the whole run's, the part before a resume included
    after = evaluate_preferences(trainer.model, tokenizer, val_pairs, params.beta, max_length=params.max_length,
                                 batch_size=params.batch_size)

    adapter_dir = out / ADAPTER_SUBDIR
    if distributed.is_main_process():
        trainer.model.save_pretrained(adapter_dir, selected_adapters=["default"])  # not TRL's reference copy
        tokenizer.save_pretrained(adapter_dir)
        quantization = (merge_info or {}).get("quantization")  # trained on the 4-bit merged SFT model
        if continued:  # the SFT's method, task families and tokens: it loads and serves like the SFT adapter
            info = read_method_file(sft_model_dir)
        else:
            info = {"method": "qlora", "quantization": quantization} if quantization else {"method": "lora"}
        write_method_file(adapter_dir, info, merged_dir)

    result = DpoResult(
        output_dir=str(adapter_dir),
        merged_base_dir=str(merged_dir),
        sft_method=sft_method,
        reference=(CONTINUED_REFERENCE if continued
                   else "merged SFT model with the DPO adapter disabled (ref_model=None)"),
        ref_model_is_none=ref_model_is_none,
        fresh_adapter=fresh,
        before=dataclasses.asdict(before),
        after=dataclasses.asdict(after),
        losses=curve,
        steps=int(output.global_step),
        seconds=round(time.perf_counter() - started, 3),
        resumed_from_step=ck.checkpoint_step(resume) if resume is not None else 0,
        train_pairs=len(train_pairs),
        val_pairs=len(val_pairs),
        trainable_params=int(trainable),
        total_params=int(total),
        bf16=resolve_bf16(params.bf16),
        merge=merge_info,
        params=dataclasses.asdict(params),
        continued_adapter=continued,
        shared_prompts=trainer.shared_prompts,
        reference_once=trainer.reference_table is not None,
    )
    if distributed.is_main_process():
        (out / RESULT_FILE).write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")
    if not all(math.isfinite(c["loss"]) for c in curve if "loss" in c):
        raise RuntimeError(f"DPO loss went non-finite: {curve[-3:]}")
    return result


def load_dpo_model(result_dir: str | Path, out_dir: Optional[str | Path] = None) -> Path:
    """Merge the DPO adapter of a ``train_dpo`` run onto its merged SFT base; returns the model directory.

    The merged model (safetensors + tokenizer) is written to ``out_dir`` (default ``result_dir/model``) and
    reused when already there: it is a plain ``from_pretrained`` directory, usable as a distillation teacher
    or an evaluation candidate.
    """
    from tuneline.train.sft import merge_adapter

    result_dir = Path(result_dir)
    result = json.loads((result_dir / RESULT_FILE).read_text(encoding="utf-8"))
    target = Path(out_dir) if out_dir is not None else result_dir / MODEL_SUBDIR
    marker = target / MERGE_MARKER
    if marker.is_file():
        return target
    info = merge_adapter(result["merged_base_dir"], result["output_dir"], target)
    marker.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return target
