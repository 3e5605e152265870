"""Small pieces the trainers share: the attention kernel, chat tokenization with completion-only labels,
a padding collator and length-grouped batch order.

Heavy libraries (torch) are imported inside the functions.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence

IGNORE_INDEX = -100  # label value the loss skips


# ---------------------------------------------------------------------------
# what every TRL-trained stage reports


@dataclass(kw_only=True)
class TrainedStats:
    """The fields DPO, the reward model and RL report alike (each result adds its own before them)."""

    losses: list[dict[str, float]] = field(default_factory=list)  # the trainer's log, one dict per logging step
    steps: int = 0
    seconds: float = 0.0
    resumed_from_step: int = 0  # the checkpoint a rerun continued from (0: started fresh)
    trainable_params: int = 0
    total_params: int = 0
    bf16: bool = False
    params: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------
# attention kernel


def attention_implementation() -> Optional[str]:
    """The attention kernel to load models with: "eager" on CPU, the library default elsewhere.

    Measured here (tiny Llama, LoRA r=16, bf16 autocast, batch 8): eager attention took 19% less
    time per step than SDPA at ~100-token batches and 9% less at 256 tokens; SDPA's CPU flash
    kernel is slow in backward at these sizes. Pretraining (16 x 128-token blocks, full, bf16) took 129 ms
    per step against 155 with SDPA on an Intel Xeon with AMX (2026-12-01), the same loss. Every training
    stage uses it (:func:`use_training_attention` for models built or loaded without it); inference keeps
    the library default (greedy generation measured the same with both). On GPUs SDPA is the better choice.
    """
    import torch

    return None if torch.cuda.is_available() else "eager"


def use_training_attention(model: Any) -> Any:
    """``model`` switched to :func:`attention_implementation` where it was built or loaded with another kernel (a
    model built from its config, ``from_pretrained`` without the keyword); unchanged on a GPU. The choice is not
    saved with the model: its config.json keeps no attention kernel."""
    impl = attention_implementation()
    if impl is not None and model.config._attn_implementation != impl:
        model.set_attn_implementation(impl)
    return model


# ---------------------------------------------------------------------------
# tokenization


def _has_generation_markers(tokenizer: Any) -> bool:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default") or next(iter(template.values()), "")
    return bool(template) and "generation" in template and "endgeneration" in template


def _as_messages(record: Any) -> list[dict[str, str]]:
    kind = getattr(record, "kind", None) if not isinstance(record, dict) else record.get("kind", "sft")
    messages = record["messages"] if isinstance(record, dict) else record.messages
    if kind != "sft":
        raise ValueError(f"SFT needs records of kind 'sft', got {kind!r}")
    if not messages or messages[-1].get("role") != "assistant":
        raise ValueError("an SFT record must end with an assistant turn")
    return messages


def tokenize_chat(
    tokenizer: Any, records: Iterable[Any], max_length: int, task_id: Optional[Callable[[Any], int]] = None
) -> list[dict[str, Any]]:
    """Token ids and completion-only labels for each chat record (``ChatRecord`` or its dict).

    ``labels`` equal ``input_ids`` on assistant tokens, including the eos that closes each assistant
    turn (so the model learns to stop), and ``IGNORE_INDEX`` everywhere else. Sequences longer than
    ``max_length`` are cut on the right; a record whose assistant tokens are all cut away is dropped
    (it would contribute no loss): compare the lengths to count them.

    Templates with ``{% generation %}`` markers give the mask of every assistant turn. Templates
    without them fall back to labelling the final assistant turn: the tokens after the prompt
    rendered with ``add_generation_prompt=True``.

    ``task_id(record)``, when given, adds each row's ``task_ids`` (multitask prompt tuning).
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("the tokenizer has no chat template: SFT on chat records needs one")
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    markers = _has_generation_markers(tokenizer)
    eos_id = tokenizer.eos_token_id
    out: list[dict[str, list[int]]] = []
    for record in records:
        messages = _as_messages(record)
        if markers:
            enc = tokenizer.apply_chat_template(
                messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
            )
            ids = list(enc["input_ids"])
            mask = list(enc["assistant_masks"])
            # a template whose generation block stops before the eos: label the eos right after a turn
            for i in range(1, len(ids)):
                if ids[i] == eos_id and mask[i - 1] and not mask[i]:
                    mask[i] = 1
        else:
            ids = list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])
            prompt = list(
                tokenizer.apply_chat_template(
                    messages[:-1], tokenize=True, return_dict=True, add_generation_prompt=True
                )["input_ids"]
            )
            if ids[: len(prompt)] != prompt:
                raise ValueError(
                    "the chat template renders the prompt differently with and without the answer, and has no "
                    "{% generation %} markers: cannot tell the assistant tokens apart"
                )
            if eos_id is not None and (len(ids) == len(prompt) or ids[-1] != eos_id):
                ids.append(eos_id)
            mask = [0] * len(prompt) + [1] * (len(ids) - len(prompt))
        ids, mask = ids[:max_length], mask[:max_length]
        if not any(mask):
            continue
        labels = [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]
        row: dict[str, Any] = {"input_ids": ids, "labels": labels}
        if task_id is not None:
            row["task_ids"] = task_id(record)
        out.append(row)
    return out


# ---------------------------------------------------------------------------
# batching


@dataclass
class PadCollator:
    """Right-pads ``input_ids`` (with ``pad_token_id``) and ``labels`` (with -100); adds ``attention_mask``; passes
    rows' ``task_ids`` on as one tensor when they have them."""

    pad_token_id: int
    pad_to_multiple_of: Optional[int] = None

    def __call__(self, features: Sequence[dict[str, Sequence[int]]]) -> dict[str, Any]:
        import torch

        longest = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            longest = (longest + m - 1) // m * m
        n = len(features)
        input_ids = torch.full((n, longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((n, longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((n, longest), dtype=torch.long)
        for i, f in enumerate(features):
            k = len(f["input_ids"])
            input_ids[i, :k] = torch.as_tensor(f["input_ids"], dtype=torch.long)
            labels[i, :k] = torch.as_tensor(f["labels"], dtype=torch.long)
            attention_mask[i, :k] = 1
        batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
        if "task_ids" in features[0]:
            batch["task_ids"] = torch.tensor([int(f["task_ids"]) for f in features], dtype=torch.long)
        return batch


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of ``lengths`` packed first-fit decreasing into rows of at most ``capacity`` tokens."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if lengths[i] > capacity:
            raise ValueError(f"sequence {i} has {lengths[i]} tokens, more than the row capacity {capacity}")
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return rows


@dataclass
class PackedCollator:
    """Padding-free batches whose rows are no longer than the batch's longest sequence.

    The batch's sequences are packed first-fit decreasing into rows of at most that many tokens, each
    sequence's ``position_ids`` restarting at 0, no ``attention_mask``: transformers then builds a
    block-diagonal causal mask (``masking_utils.find_packed_sequence_indices``), so no token attends
    across sequences, and the batch has the padded batch's examples and loss with fewer rows. The rows
    keep the padded layout's width, so attention (quadratic in the row length) never costs more than
    padded; one row for the whole batch would (measured: 10x slower on ~400-token rows,
    docs/benchmarks.md). Short rows are right-padded, their positions continuing the last sequence's
    (so padding joins its block and starts no example). The first label of every sequence is ignored
    so no position predicts the next sequence's first token. A batch no two sequences of which share a
    row is returned padded (``PadCollator``: the plain causal mask). Only for models whose forward adds
    nothing in front of the tokens (not prompt learning).
    """

    pad_token_id: int

    def __call__(self, features: Sequence[dict[str, Sequence[int]]]) -> dict[str, Any]:
        import torch

        lengths = [len(f["input_ids"]) for f in features]
        width = max(lengths)
        rows = pack_rows(lengths, width)
        if len(rows) == len(features):
            return PadCollator(self.pad_token_id)(features)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        positions = torch.zeros((len(rows), width), dtype=torch.long)
        for r, members in enumerate(rows):
            start = 0
            for i in members:
                k = lengths[i]
                input_ids[r, start:start + k] = torch.as_tensor(features[i]["input_ids"], dtype=torch.long)
                labels[r, start + 1:start + k] = torch.as_tensor(features[i]["labels"][1:], dtype=torch.long)
                positions[r, start:start + k] = torch.arange(k)
                start += k
            positions[r, start:] = torch.arange(k, k + width - start)  # padding continues the last sequence
        return {"input_ids": input_ids, "labels": labels, "position_ids": positions,
                "use_cache": False}  # a KV cache turns transformers' packed-sequence detection off


def length_grouped_order(lengths: Sequence[int], batch_size: int, seed: int, megabatch: int = 64) -> list[int]:
    """A shuffled order of indices in which consecutive runs of ``batch_size`` have similar lengths.

    Indices are shuffled, cut into mega-batches of ``megabatch * batch_size``, each sorted by
    length, cut into batches, and the batches shuffled; the batch holding the longest sequence goes
    first so an out-of-memory shows on step one. Same seed, same order.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    size = max(1, megabatch) * batch_size
    batches: list[list[int]] = []
    for start in range(0, len(order), size):
        chunk = sorted(order[start : start + size], key=lambda i: lengths[i], reverse=True)
        batches.extend(chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size))
    if not batches:
        return []
    longest = max(range(len(batches)), key=lambda b: max(lengths[i] for i in batches[b]))
    first = batches.pop(longest)
    rng.shuffle(batches)
    return [i for batch in [first, *batches] for i in batch]


class LengthGroupedSampler:
    """A torch ``Sampler`` yielding :func:`length_grouped_order`, reshuffled each epoch via ``set_epoch``."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, megabatch: int = 64) -> None:
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.megabatch = megabatch
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        return iter(length_grouped_order(self.lengths, self.batch_size, self.seed + self.epoch, self.megabatch))


def padding_fraction(lengths: Sequence[int], order: Sequence[int], batch_size: int) -> float:
    """Share of padded positions when ``order`` is cut into batches of ``batch_size`` (for reports)."""
    total = real = 0
    for start in range(0, len(order), batch_size):
        batch = [lengths[i] for i in order[start : start + batch_size]]
        total += max(batch) * len(batch)
        real += sum(batch)
    return 0.0 if total == 0 else 1.0 - real / total


def loss_curve(history: list[dict[str, Any]], keys: dict[str, str]) -> list[dict[str, float]]:
    """``{"step", short: value}`` of every training log in a trainer's ``log_history`` (those holding ``loss``;
    ``keys`` maps the log keys kept to their short names). Read after training, so a resumed run's curve holds
    the part before the resume too."""
    return [{"step": int(h["step"]), **{short: float(h[k]) for k, short in keys.items() if k in h}}
            for h in history if "loss" in h]


def checkpointed_run_args(save_steps: int, seed: int, *, bf16: Optional[bool] = None,
                          gradient_checkpointing: bool = False) -> dict[str, Any]:
    """What every TRL trainer here (DPO, reward model, RLOO/GRPO) sets the same way: a log line per step, crash-safe
    checkpoints every ``save_steps`` (two kept, marked complete, resumed by a retry), no evaluation loop or
    reporting integration, no dataloader workers, seeded data order; and TRL 1.x's defaults that are wrong here
    set: gradient checkpointing off unless the recipe's ``compute.gradient_checkpointing`` asks (TRL turns it on;
    transformers 5 renamed it ``activation_checkpointing``, the new name wins when both are given) and bf16 on any device (it fails on a CPU; ``bf16`` None resolves to what the device
    runs natively). fp16 is never used."""
    import torch

    from tuneline.models.loading import resolve_bf16

    return dict(logging_steps=1, save_strategy="steps", save_steps=save_steps, save_total_limit=2, eval_strategy="no",
                report_to="none", disable_tqdm=True, dataloader_num_workers=0, seed=seed, data_seed=seed,
                bf16=resolve_bf16(bf16), fp16=False, use_cpu=not torch.cuda.is_available(),
                **checkpointing_args(gradient_checkpointing))


def checkpointing_args(enabled: bool) -> dict[str, Any]:
    """TrainingArguments for activation (gradient) checkpointing: off, or on with the non-reentrant variant (it
    needs no ``enable_input_require_grads`` under a frozen base, so LoRA and the other adapters work)."""
    return dict(gradient_checkpointing=bool(enabled), activation_checkpointing=bool(enabled),
                activation_checkpointing_kwargs={"use_reentrant": False} if enabled else None)


def fresh_lora_config(lora: Any, task_type: str, model: Any) -> Any:
    """The ``peft.LoraConfig`` DPO, RL and the reward model put on the model they start from (``lora``: the
    stage's :class:`~tuneline.params.LoraParams`; ``task_type``: ``CAUSAL_LM`` or ``SEQ_CLS``). On a model
    with bottleneck adapters (a bundle) it leaves the adapters and the projections they follow alone, so the
    trained LoRA merges into the same function."""
    import peft

    from tuneline.train.bottleneck import lora_exclusions

    targets = tuple(lora.target_modules)
    exclude = lora_exclusions(model)
    return peft.LoraConfig(task_type=getattr(peft.TaskType, task_type), r=lora.r, lora_alpha=lora.alpha,
                           lora_dropout=lora.dropout, bias="none",
                           target_modules="all-linear" if targets == ("all-linear",) else list(targets),
                           **({"exclude_modules": exclude} if exclude else {}))


# ---------------------------------------------------------------------------
# prompt learning: later stages continue the SFT's virtual tokens

REFERENCE_ADAPTER = "ref"  # TRL's name for the frozen copy of an adapter it continues training
CONTINUED_REFERENCE = "the SFT prompt adapter's frozen copy on the same base (ref_model=None)"


def continued_prompt_adapter(base_model_path: Any, adapter_dir: Any, *,
                             gradient_checkpointing: bool = False) -> tuple[Any, Any]:
    """A prompt-learning SFT adapter (prefix, prompt, ptuning, multitask_prompt) on its base with its virtual tokens
    trainable again, for DPO and RL to continue: virtual tokens are no weights, so there is nothing to merge and
    nothing for a fresh LoRA to start from. PEFT loads a prompt adapter frozen and refuses ``is_trainable``
    (P-tuning is saved as the prompt its encoder computed, not the encoder), so the saved prompt itself is made
    trainable. TRL's DPO/RLOO/GRPO trainers, given this model and no ``peft_config``, add a copy named
    :data:`REFERENCE_ADAPTER` as the reference (the SFT prompt, frozen by :func:`freeze_reference_adapter`).
    Loaded as every stage loads the SFT output (``load_trained``: a multitask prompt gets its target task id on
    every forward and generate); returns (model, tokenizer)."""
    from tuneline.params import PROMPT_LEARNING
    from tuneline.train.methods import read_method_file
    from tuneline.train.sft import load_trained

    meta = read_method_file(adapter_dir)
    if meta.get("method") not in PROMPT_LEARNING:
        raise ValueError(f"{adapter_dir} holds a {meta.get('method')!r} adapter, not prompt learning "
                         f"({', '.join(PROMPT_LEARNING)})")
    if meta["method"] == "prefix" and gradient_checkpointing:
        raise ValueError("prefix tuning cannot continue with gradient checkpointing (the recomputed attention "
                         "loses the prefix's key/value length); set compute.gradient_checkpointing: false")
    model, tokenizer = load_trained(base_model_path, adapter_dir)
    for name, param in model.named_parameters():
        if ".default." in name and "prompt_encoder" in name:
            param.requires_grad_(True)
    return model, tokenizer


def freeze_reference_adapter(model: Any) -> None:
    """Freeze the reference copy TRL added beside a continued adapter (it copies ``requires_grad`` too); raises
    when there is none, since the reference would otherwise be the base without the SFT prompt."""
    if REFERENCE_ADAPTER not in (getattr(model, "peft_config", None) or {}):
        raise RuntimeError("TRL added no frozen reference copy of the continued adapter; the reference would be "
                           "the base model without the SFT prompt")
    for name, param in model.named_parameters():
        if f".{REFERENCE_ADAPTER}." in name:
            param.requires_grad_(False)


def reference_context(model: Any) -> Any:
    """The context in which ``model`` computes its reference: the frozen copy of a continued adapter, or the model
    with its adapter disabled."""
    if REFERENCE_ADAPTER in (getattr(model, "peft_config", None) or {}):
        from trl.trainer.utils import use_adapter

        return use_adapter(model, REFERENCE_ADAPTER)
    return model.disable_adapter()
