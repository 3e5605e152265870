"""Supervised fine-tuning: one function, read top to bottom.

``train_sft`` tokenizes chat records with completion-only labels, builds the model for the method
(``tuneline.train.methods``), trains with a plain ``transformers.Trainer`` (length-grouped batches,
bf16 autocast where the hardware has it, step-wise evaluation, early stopping, crash-safe
checkpoints with automatic resume) and saves the best adapter or model with its tokenizer.

Why not TRL's ``SFTTrainer``: on this CPU it was 35-60% slower per step on the tiny model (it
computes a fused LM head, entropy and token accuracy every step) and its config defaults turn on
gradient checkpointing; our own tokenization already gives completion-only labels, so the plain
``Trainer`` is all we need.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

from tuneline.params import PROMPT_LEARNING, OffloadParams, SftParams, TokenizerParams

MODEL_SUBDIR = "model"  # final adapter/model + tokenizer under out_dir
CHECKPOINTS_SUBDIR = "checkpoints"  # checkpoint-N folders under out_dir
# adapter methods whose checkpoints hold only adapter weights, so the frozen base may be stored in
# bf16 while training (qlora's base is already 4-bit)
FROZEN_BASE_METHODS = ("lora", "adalora", "ia3", "prefix", "prompt", "ptuning", "multitask_prompt")
SOURCE_SUBDIR = "source"  # multitask prompt tuning: the source stage's own run under out_dir
SOURCE_DONE = "source_done.json"  # written when the source stage is complete (a retry skips it)


@dataclass
class SftResult:
    """What a fine-tuning run produced and how it went."""

    output_dir: str  # the saved adapter or model (+ tokenizer)
    method: str
    global_step: int  # optimizer steps done (resumed steps included)
    best_step: Optional[int]  # step of the restored best checkpoint (None without a validation set)
    best_val_loss: Optional[float]
    stopped_early: bool
    resumed_from_step: int  # 0 when the run started fresh
    train_losses: list[tuple[int, float]]  # (step, loss)
    val_losses: list[tuple[int, float]]  # (step, eval loss)
    trainable_params: int
    total_params: int
    real_tokens: int  # non-padding tokens processed by this process (resumed steps not counted)
    tokens_per_second: float  # real_tokens / train_seconds
    train_seconds: float  # wall time of this process's training loop (evaluation and saving included)
    bf16: bool
    padding_free: bool = False  # batches were packed into rows no longer than their longest sequence
    max_steps: int = 0  # planned optimizer steps (epochs capped by max_steps)
    train_examples: int = 0
    dropped_examples: int = 0  # records whose assistant tokens were all cut by max_length
    examples_per_rank: list[int] = field(default_factory=list)  # train examples each rank trained on (this process)
    method_info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["train_losses"] = [list(x) for x in self.train_losses]
        data["val_losses"] = [list(x) for x in self.val_losses]
        return data


def planned_steps(n_examples: int, params: SftParams, max_steps: Optional[int] = None) -> int:
    """Optimizer steps the run makes: ``params.epochs`` passes, capped by ``params.max_steps`` and ``max_steps``."""
    batches_per_epoch = math.ceil(n_examples / params.batch_size)
    steps_per_epoch = max(1, math.ceil(batches_per_epoch / params.grad_accum))
    steps = max(1, math.ceil(params.epochs * steps_per_epoch))
    for cap in (params.max_steps, max_steps):
        if cap is not None:
            steps = min(steps, cap)
    return steps


PADDING_FREE_MIN_MEAN_TOKENS = 64


def use_padding_free(params: SftParams, train_data: Sequence[dict[str, Any]]) -> bool:
    """Whether batches are packed padding-free (``PackedCollator``: block-diagonal attention in rows no
    longer than the batch's longest sequence).

    ``params.padding_free`` decides when set. Left to None it is on when the tokenized train rows
    average at least ``PADDING_FREE_MIN_MEAN_TOKENS``: on shorter rows the block-diagonal mask costs
    about what the padding it removes saves (measured on 2 CPU cores, LoRA r16 on the tiny Llama: 8%
    slower on the 23-token demo rows, 1.6x faster on alpaca's 98-token rows; docs/benchmarks.md). A
    batch that cannot be packed tighter stays padded, so long rows lose nothing. Never for prefix,
    prompt and P-tuning, whose virtual tokens go in front of each row.
    """
    if params.method in PROMPT_LEARNING:  # virtual tokens in front: padded only
        return False
    if params.padding_free is not None:
        return params.padding_free
    mean = sum(len(f["input_ids"]) for f in train_data) / max(1, len(train_data))
    return mean >= PADDING_FREE_MIN_MEAN_TOKENS


def needed_mask(mask: Any) -> Any:
    """None for a right-padded batch: under causal attention its real tokens only ever see earlier real
    tokens, and padding positions carry no label, so the mask changes nothing the loss reads; without it
    SDPA runs its causal kernel instead of materializing a mask (measured: ~10% less time per step)."""
    if mask is None or mask.shape[1] < 2 or bool((mask[:, 1:] <= mask[:, :-1]).all()):
        return None
    return mask


def train_sft(
    base_model_path: str | Path,
    train_records: Sequence[Any],
    val_records: Sequence[Any],
    params: SftParams,
    out_dir: str | Path,
    *,
    seed: int,
    max_steps: Optional[int] = None,
    extra_callbacks: Iterable[Any] = (),
    on_log: Optional[Callable[[int, dict[str, Any]], None]] = None,
    on_checkpoint: Optional[Callable[[Path], None]] = None,
    multitask: Optional[Any] = None,
    tokens: Optional[TokenizerParams] = None,
    offload: Optional[OffloadParams] = None,
    gradient_checkpointing: bool = False,
    save: bool = True,
) -> SftResult:
    """Fine-tune ``base_model_path`` on chat records; resumes from the last complete checkpoint in ``out_dir``.

    ``max_steps`` is a recipe-level cap on top of ``params.max_steps``; ``on_log(step, logs)`` sees
    every log (loss, learning_rate, grad_norm, eval_loss, ...); ``on_checkpoint(folder)`` runs after each
    checkpoint is complete (the recipe CLI uploads it when the output is remote). The best checkpoint (lowest
    validation loss) is restored and saved to ``out_dir/model`` with the tokenizer, as safetensors.

    ``multitask_prompt`` runs two stages: first a source stage over the train records' task families
    (``out_dir/source``, its own resumable run, ``task_ids`` = the family of each record), then the target stage
    initialized from it (one task, id 0, which evaluation and serving pass too). ``multitask`` is the stage
    (:class:`~tuneline.train.methods.MultitaskStage`) when this call is one of them.

    ``tokens`` (the recipe's ``tokenizer`` section) adds tokens first; eos/bos/pad are checked against the chat
    template before anything trains (:func:`tuneline.train.tokens.check_special_tokens`). ``offload`` with a
    ``zero_stage`` trains under DeepSpeed ZeRO (CUDA and ``deepspeed`` required, checked first).

    ``save=False`` (a search trial, which needs the losses only) writes no checkpoint and no model: nothing
    resumes it, the best weights are not reloaded at the end, and ``output_dir`` of the result does not exist;
    evaluation and early stopping run as they would otherwise.
    """
    import torch
    from transformers import PrinterCallback, TrainingArguments

    from tuneline.models.loading import load_tokenizer, resolve_bf16
    from tuneline.models.offload import check_zero_runs, zero_config
    from tuneline.train import callbacks as cb
    from tuneline.train import checkpoints as ck
    from tuneline.train import distributed
    from tuneline.train.common import PackedCollator, PadCollator, checkpointing_args, tokenize_chat
    from tuneline.train.methods import apply_method, bf16_autocast_layout, fast_adapter_dropout, write_method_file

    distributed.check_world(params.num_processes, "tuneline.recipes.sft")
    check_zero_runs(offload)
    out = Path(out_dir)
    checkpoints = out / CHECKPOINTS_SUBDIR
    bf16 = resolve_bf16(params.bf16)

    # data: completion-only labels (assistant tokens and their eos)
    from tuneline.train.tokens import check_special_tokens, extend_tokenizer

    tokenizer = load_tokenizer(base_model_path)
    added = extend_tokenizer(tokenizer, tokens)
    special_tokens = check_special_tokens(tokenizer)
    source_result = None
    if params.method == "multitask_prompt" and multitask is None:
        source_result, multitask = _multitask_source_stage(
            base_model_path, train_records, val_records, params, out, seed=seed, max_steps=max_steps,
            on_log=on_log, on_checkpoint=on_checkpoint)
    task_id = (lambda record: multitask.task_id(record.task)) if multitask is not None else None
    train_data = tokenize_chat(tokenizer, train_records, params.max_length, task_id)
    val_data = tokenize_chat(tokenizer, val_records, params.max_length, task_id)
    if not train_data:
        raise ValueError(f"no train example keeps an assistant token within max_length={params.max_length}")
    steps = planned_steps(len(train_data), params, max_steps)
    has_val = bool(val_data)

    padding_free = use_padding_free(params, train_data)
    # model for the method (adapters, quantization, freezing)
    model, info = apply_method(base_model_path, params, seed=seed, total_steps=steps, multitask=multitask,
                               added_tokens=added if added["ids"] else None)
    info["special_tokens"] = special_tokens
    if source_result is not None:
        info["multitask"]["source_run"] = {k: source_result[k] for k in (
            "global_step", "best_val_loss", "train_examples", "output_dir")}

    args = TrainingArguments(
        output_dir=str(checkpoints),
        max_steps=steps,
        per_device_train_batch_size=params.batch_size,
        per_device_eval_batch_size=params.batch_size,
        gradient_accumulation_steps=params.grad_accum,
        learning_rate=params.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=math.ceil(params.warmup_ratio * steps),
        weight_decay=params.weight_decay,
        bf16=bf16,
        fp16=False,
        **checkpointing_args(gradient_checkpointing),  # off by default: it costs ~25% per step here
        dataloader_num_workers=0,
        eval_strategy="steps" if has_val else "no",
        eval_steps=params.eval_steps,
        save_strategy="steps" if save else "no",
        save_steps=params.save_steps,
        save_total_limit=2,
        load_best_model_at_end=has_val and save,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        logging_strategy="steps",
        logging_steps=1,
        logging_nan_inf_filter=False,  # a NaN loss must show, not be averaged away
        include_num_input_tokens_seen="non_padding",
        report_to=[],
        disable_tqdm=True,
        remove_unused_columns=False,
        label_names=["labels"],
        seed=seed,
        data_seed=seed,
        use_cpu=not torch.cuda.is_available(),
        ddp_backend=distributed.ddp_backend(),  # every rank opts into gloo on CPU, else each trains alone
        deepspeed=zero_config(offload, bf16=bf16) if offload is not None else None,
    )
    # resume: a retried run continues from its last complete checkpoint (incomplete ones are deleted)
    resume = ck.last_valid_checkpoint(checkpoints)
    resumed_from = ck.checkpoint_step(resume) if resume is not None else 0

    # the bf16 autocast layout (same matmuls as autocast's casts, without them): CPU adapters only;
    # undone before any other on_train_end sees the model
    callbacks: list[Any] = []
    if bf16 and not torch.cuda.is_available() and params.method in FROZEN_BASE_METHODS:
        callbacks.append(cb.UndoAtTrainEndCallback(bf16_autocast_layout(model)))
    if not torch.cuda.is_available():
        info["fast_dropout_modules"] = fast_adapter_dropout(model)
    # callbacks that add files to a checkpoint come before the one that marks it complete
    if params.method == "adalora":
        callbacks.append(cb.AdaLoraAllocateCallback(resume_from=resume))
    if params.method == "ptuning":
        callbacks.append(cb.PromptEncoderStateCallback(resume_from=resume))
    callbacks += [cb.CompleteCheckpointCallback(on_checkpoint), cb.EvaluateAtEndCallback()]
    early = None
    if has_val:
        early = cb.early_stopping_callback(params.early_stopping.patience, params.early_stopping.min_delta,
                                           best_model_loaded=save)
        callbacks.append(early)
    if on_log is not None:
        callbacks.append(cb.MetricsCallback(on_log))
    callbacks.extend(extra_callbacks)

    from tuneline.train.trainers import SftTrainer

    trainer = SftTrainer(
        model=model,
        args=args,
        train_dataset=train_data,
        eval_dataset=val_data if has_val else None,
        data_collator=(PackedCollator if padding_free else PadCollator)(tokenizer.pad_token_id),
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    trainer.group_by_length = params.group_by_length
    trainer.method = params.method
    trainer.remove_callback(PrinterCallback)  # progress goes through on_log, not stdout

    tokens_before = 0
    if resume is not None:
        state = json.loads((resume / "trainer_state.json").read_text(encoding="utf-8"))
        tokens_before = int(state.get("num_input_tokens_seen", 0))

    started = time.perf_counter()
    with ck.disk_full_explained(checkpoints):
        trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
    train_seconds = time.perf_counter() - started

    # the best weights are loaded (load_best_model_at_end); rank 0 saves them with the tokenizer
    final_dir = out / MODEL_SUBDIR
    examples_per_rank = distributed.gather_counts(trainer.examples_seen)
    if save and distributed.is_main_process():
        final_dir.mkdir(parents=True, exist_ok=True)
        if params.method == "adapter":  # the adapter weights only, with their JSON config
            from tuneline.train.bottleneck import BottleneckConfig, save_bottleneck

            shape = info["bottleneck"]
            save_bottleneck(trainer.model, BottleneckConfig(**{**shape, "targets": tuple(shape["targets"])}), final_dir)
        elif info.get("added_tokens") and params.method != "full":
            # the adapter's token rows replace the base's new rows: no copy of the whole embedding in the adapter
            trainer.model.save_pretrained(final_dir, save_embedding_layers=False)
        else:
            trainer.model.save_pretrained(final_dir)
        tokenizer.save_pretrained(final_dir)
        write_method_file(final_dir, info, base_model_path)

    state = trainer.state
    history = state.log_history
    train_losses = [(int(h["step"]), float(h["loss"])) for h in history if "loss" in h]
    val_losses = [(int(h["step"]), float(h["eval_loss"])) for h in history if "eval_loss" in h]
    stopped_early = bool(
        early is not None
        and early.early_stopping_patience_counter >= early.early_stopping_patience
        and state.global_step < steps
    )
    real_tokens = int(state.num_input_tokens_seen) - tokens_before
    return SftResult(
        output_dir=str(final_dir),
        method=params.method,
        global_step=int(state.global_step),
        best_step=state.best_global_step if has_val else None,
        best_val_loss=float(state.best_metric) if has_val and state.best_metric is not None else None,
        stopped_early=stopped_early,
        resumed_from_step=resumed_from,
        train_losses=train_losses,
        val_losses=val_losses,
        trainable_params=info["trainable_params"],
        total_params=info["total_params"],
        real_tokens=real_tokens,
        tokens_per_second=real_tokens / train_seconds if train_seconds > 0 else 0.0,
        train_seconds=train_seconds,
        bf16=bf16,
        padding_free=padding_free,
        max_steps=steps,
        train_examples=len(train_data),
        dropped_examples=len(train_records) - len(train_data),
        examples_per_rank=examples_per_rank,
        method_info=info,
    )


def _multitask_source_stage(
    base_model_path: str | Path, train_records: Sequence[Any], val_records: Sequence[Any], params: SftParams,
    out: Path, *, seed: int, max_steps: Optional[int], on_log: Any, on_checkpoint: Any,
) -> tuple[dict[str, Any], Any]:
    """Run (or reuse, when complete) the source stage of multitask prompt tuning; returns its result figures and
    the target stage it initializes."""
    import dataclasses

    from tuneline.train.methods import MultitaskStage, task_families

    mt = params.multitask_prompt
    families = task_families(train_records)
    if mt.target_task is not None and mt.target_task not in families:
        raise ValueError(f"sft.multitask_prompt.target_task {mt.target_task!r} is not a task family of the train "
                         f"split ({', '.join(families)})")
    source_dir = out / SOURCE_SUBDIR
    done = source_dir / SOURCE_DONE
    if done.is_file():
        figures = json.loads(done.read_text(encoding="utf-8"))
    else:
        source_params = dataclasses.replace(
            params, max_steps=mt.source_steps, learning_rate=mt.source_learning_rate or params.learning_rate)
        result = train_sft(base_model_path, train_records, val_records, source_params, source_dir, seed=seed,
                           max_steps=max_steps, on_log=on_log, on_checkpoint=on_checkpoint,
                           multitask=MultitaskStage(families))
        figures = {k: v for k, v in result.to_dict().items() if k != "method_info"}
        from tuneline.train import distributed

        if distributed.is_main_process():
            done.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    weights = Path(figures["output_dir"]) / "adapter_model.safetensors"
    stage = MultitaskStage(families, source_weights=str(weights),
                           source_task=families.index(mt.target_task) if mt.target_task else 0)
    return figures, stage


# ---------------------------------------------------------------------------
# using what training saved


def load_trained(base_model_path: str | Path, output_dir: str | Path, offload: Any = None) -> tuple[Any, Any]:
    """(model, tokenizer) from ``train_sft``'s output: an adapter (PEFT, or our bottleneck adapters) on the base
    model, or a full model. ``offload``: the recipe's offload section (inference device_map), applied to the
    base or full model as it loads."""
    from transformers import AutoModelForCausalLM

    from tuneline.models.loading import load_tokenizer
    from tuneline.models.offload import device_map_kwargs
    from tuneline.train.bottleneck import attach_if_bundle, is_bottleneck_dir, load_bottleneck
    from tuneline.train.common import attention_implementation
    from tuneline.train.methods import load_base, read_method_file

    output_dir = Path(output_dir)
    tokenizer = load_tokenizer(output_dir)
    if is_bottleneck_dir(output_dir):
        model = load_bottleneck(load_base(base_model_path, offload=offload), output_dir)
    elif (output_dir / "adapter_config.json").is_file():
        from peft import PeftModel

        from tuneline.train.methods import bind_task_ids

        meta = read_method_file(output_dir)
        vocab = (meta.get("added_tokens") or {}).get("vocab_size")
        model = PeftModel.from_pretrained(load_base(base_model_path, meta.get("quantization"), vocab, offload=offload),
                                          output_dir)
        if model.peft_config["default"].peft_type.value == "MULTITASK_PROMPT_TUNING":
            bind_task_ids(model, 0)  # the target stage's one task
    else:
        model = attach_if_bundle(AutoModelForCausalLM.from_pretrained(
            output_dir, attn_implementation=attention_implementation(), **device_map_kwargs(offload)), output_dir)
    model.eval()
    return model, tokenizer


def merge_adapter(
    base_model_path: str | Path, adapter_dir: str | Path, out_dir: str | Path, *, tolerance: float = 1e-3
) -> dict[str, Any]:
    """Merge a LoRA-like adapter (lora, qlora, adalora, ia3) into full weights and save them (safetensors).

    The merged model's logits on a fixed sample are compared to the unmerged adapter's; raises
    ``RuntimeError`` when they differ by more than ``tolerance``. A QLoRA adapter is merged into
    the base in its compute dtype (bf16 on a GPU: half the bytes of an fp32 copy; merging into 4-bit weights
    would re-quantize them), and DPO loads that merged model in 4-bit again (:func:`tuneline.train.dpo.train_dpo`);
    the check compares against the adapter on that same base. Prompt-learning adapters (prefix, prompt,
    ptuning) have no weights to merge and raise ``ValueError``.
    """
    import torch
    from peft import PeftConfig, PeftModel

    from tuneline.models.loading import load_tokenizer
    from tuneline.train.bottleneck import is_bottleneck_dir, save_model
    from tuneline.train.methods import load_base, read_method_file

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    if is_bottleneck_dir(adapter_dir):
        raise ValueError(f"cannot merge the bottleneck adapters in {adapter_dir}: a down-projection, a non-linearity "
                         "and an up-projection are not a weight delta; serve them loaded on the base (load_trained)")
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ValueError(f"{adapter_dir} holds no adapter (a full or freeze model is already merged)")
    peft_type = PeftConfig.from_pretrained(adapter_dir).peft_type.value
    if peft_type not in ("LORA", "ADALORA", "IA3"):
        raise ValueError(
            f"cannot merge a {peft_type} adapter: its virtual tokens/prefix are not weight deltas; "
            "serve it with the adapter loaded (load_trained)"
        )
    meta = read_method_file(adapter_dir)
    method = meta.get("method", peft_type.lower())
    vocab = (meta.get("added_tokens") or {}).get("vocab_size")
    quantization = meta.get("quantization") if method == "qlora" else None
    dtype = getattr(torch, quantization["compute_dtype"]) if quantization else torch.float32
    if dtype != torch.float32:  # bf16 rounding of the merged sums: compare at bf16's resolution
        tolerance = max(tolerance, 0.05)
    model = PeftModel.from_pretrained(load_base(base_model_path, vocab_size=vocab, dtype=dtype), adapter_dir).eval()
    vocab = model.get_input_embeddings().weight.shape[0]
    sample = torch.randint(0, vocab, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        unmerged = model(input_ids=sample).logits.float()
        merged_model = model.merge_and_unload()
        merged = merged_model(input_ids=sample).logits.float()
    max_abs_diff = float((merged - unmerged).abs().max())
    if not max_abs_diff <= tolerance:
        raise RuntimeError(f"merged logits differ from the adapter's by {max_abs_diff:.3g} > tolerance {tolerance}")

    out_dir.mkdir(parents=True, exist_ok=True)
    save_model(merged_model, out_dir)  # a bundle stays a bundle: the merged base weights, the adapters beside them
    load_tokenizer(adapter_dir).save_pretrained(out_dir)
    return {
        "output_dir": str(out_dir),
        "method": method,
        "peft_type": peft_type,
        "max_abs_diff": max_abs_diff,
        "tolerance": tolerance,
        "merged_into": f"{str(dtype).replace('torch.', '')} base" + (" (adapter trained on the 4-bit base)"
                                                                      if method == "qlora" else ""),
        "quantization": quantization,  # DPO reloads a QLoRA SFT model merged like this in 4-bit
    }
