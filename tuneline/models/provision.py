"""Base-model provisioning: load a model by hub id or local path (through :mod:`tuneline.models.loading`), or
build the offline tiny one.

``provision_base_model`` is the one function the base-model stage calls. It always ends with a
directory that ``from_pretrained`` reads (safetensors weights, tokenizer, chat template) and a
:class:`BaseModelInfo` describing it (weights hash, shape, pretraining curve).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from tuneline.models.loading import load_causal_lm, load_tokenizer, weight_files, weights_sha256
from tuneline.models.pretrain import PretrainResult, Progress, pretrain_causal_lm
from tuneline.params import ModelParams, PretrainParams

if TYPE_CHECKING:
    from tuneline.refs import ModelRef

CONFIG_FIELDS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "tie_word_embeddings",
)


@dataclass
class BaseModelInfo:
    """What the base-model stage produced."""

    path: str  # directory from_pretrained reads (model + tokenizer)
    source: str  # "tiny", or the hub id / local path it was loaded from
    weights_sha256: str  # sha256 of the safetensors file (one file), or of their names+hashes (sharded)
    n_params: int  # parameters (tied weights counted once)
    vocab_size: int  # len(tokenizer)
    config: dict[str, Any]  # main shape fields of the model config
    pretrain: Optional[dict[str, Any]]  # PretrainResult.to_dict(), or None when not pretrained
    loss_curve: list[list[float]]  # [step, loss] points of pretraining (empty when not pretrained)
    revision: Optional[str] = None  # hub revision pinned, if any
    seed: Optional[int] = None  # seed of the tiny build / pretraining
    weight_files: list[str] = field(default_factory=list)  # safetensors file names
    special_tokens: dict[str, Any] = field(default_factory=dict)  # bos/eos/pad tokens and ids
    has_chat_template: bool = False  # whether the tokenizer carries a chat template
    notes: list[str] = field(default_factory=list)  # adjustments made (e.g. pad token set)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def config_summary(config: Any) -> dict[str, Any]:
    """The main shape fields of a (text) model config, JSON-able."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    out: dict[str, Any] = {}
    for name in CONFIG_FIELDS:
        value = getattr(text, name, None)
        if value is None and name == "model_type":
            value = getattr(config, name, None)
        if value is not None:
            out[name] = value if isinstance(value, (int, float, str, bool)) else str(value)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if dtype is not None:
        out["dtype"] = str(dtype).replace("torch.", "")
    return out


def _ensure_pad(tokenizer: Any, model: Any, notes: list[str]) -> None:
    if tokenizer.pad_token_id is not None:
        return
    if tokenizer.unk_token is not None and tokenizer.unk_token_id != tokenizer.eos_token_id:
        tokenizer.pad_token = tokenizer.unk_token
    elif tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    else:
        raise ValueError("tokenizer has no pad, unk or eos token to pad with")
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    notes.append(f"tokenizer had no pad token; using {tokenizer.pad_token!r}")


def provision_base_model(
    model_params: ModelParams,
    pretrain_params: PretrainParams,
    corpus_texts: list[str],
    out_dir: str | Path,
    *,
    seed: int,
    steps: Optional[int] = None,
    progress: Optional[Progress] = None,
    checkpoint_dir: Optional[str | Path] = None,
    on_checkpoint: Optional[Callable[[Path], None]] = None,
) -> BaseModelInfo:
    """Build or load the base model, pretrain it on ``corpus_texts`` when asked, save it to ``out_dir``.

    ``build: tiny`` trains the tokenizer on the corpus, initializes the Llama from ``seed`` and
    always pretrains (``steps`` or ``pretrain_params.steps``). ``name_or_path`` loads the model and
    runs continued pretraining only when ``pretrain_params.enabled``. ``out_dir`` is replaced. With
    ``checkpoint_dir`` pretraining writes resumable checkpoints there and a rerun continues from them.
    """
    import torch

    from tuneline.models.tiny import init_tiny_model, save_model, train_tokenizer

    notes: list[str] = []
    if model_params.build == "tiny":
        if not corpus_texts:
            raise ValueError("build: tiny needs a corpus to train the tokenizer and pretrain on")
        tokenizer = train_tokenizer(corpus_texts, model_params.tiny)
        model = init_tiny_model(tokenizer, model_params.tiny, seed)
        source, do_pretrain = "tiny", True
    else:
        assert model_params.name_or_path is not None
        source = model_params.name_or_path
        tokenizer = load_tokenizer(source, model_params.revision)
        model = load_causal_lm(source, model_params.revision)
        _ensure_pad(tokenizer, model, notes)
        do_pretrain = pretrain_params.enabled
        if do_pretrain and not corpus_texts:
            raise ValueError("pretrain.enabled is true but the corpus is empty")

    result: Optional[PretrainResult] = None
    if do_pretrain:
        if torch.cuda.is_available():
            model.to("cuda")
        result = pretrain_causal_lm(
            model,
            tokenizer,
            corpus_texts,
            pretrain_params,
            seed=seed,
            steps=steps if steps is not None else pretrain_params.steps,
            progress=progress,
            checkpoint_dir=checkpoint_dir,
            on_checkpoint=on_checkpoint,
        )
        model.to("cpu")

    out = Path(out_dir)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    save_model(model, tokenizer, tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)

    files = weight_files(out)
    if any(out.glob("*.bin")):
        raise RuntimeError(f"{out} holds pickle (.bin) weights; only safetensors are allowed")
    return BaseModelInfo(
        path=str(out),
        source=source,
        weights_sha256=weights_sha256(out),
        n_params=sum(p.numel() for p in model.parameters()),
        vocab_size=len(tokenizer),
        config=config_summary(model.config),
        pretrain=result.to_dict() if result else None,
        loss_curve=[[int(s), float(v)] for s, v in result.losses] if result else [],
        revision=model_params.revision,
        seed=seed,
        weight_files=[f.name for f in files],
        special_tokens={
            "bos": [tokenizer.bos_token, tokenizer.bos_token_id],
            "eos": [tokenizer.eos_token, tokenizer.eos_token_id],
            "pad": [tokenizer.pad_token, tokenizer.pad_token_id],
        },
        has_chat_template=bool(getattr(tokenizer, "chat_template", None)),
        notes=notes,
    )


# ---------------------------------------------------------------------------
# references to model directories (what stages hand each other)


def model_ref(local_dir: str | Path, uri: str, *, method: str, stage: str, **fields: Any) -> "ModelRef":
    """A :class:`~tuneline.refs.ModelRef` for a saved model directory: ``adapter`` when it holds an adapter
    (then ``base=`` is required), else ``full``; the weights hash is taken from the files."""
    from tuneline.refs import ModelRef
    from tuneline.train.bottleneck import is_bottleneck_dir

    adapter = (Path(local_dir) / "adapter_config.json").is_file() or is_bottleneck_dir(local_dir)
    kind = "adapter" if adapter else "full"
    return ModelRef(uri=uri, sha256=weights_sha256(local_dir), kind=kind, method=method, stage=stage, **fields)
