"""Base-model provisioning: load a model by hub id or local path, or build the offline tiny one.

``provision_base_model`` is the one function the base-model stage calls. It always ends with a
directory that ``from_pretrained`` reads (safetensors weights, tokenizer, chat template) and a
:class:`BaseModelInfo` describing it (weights hash, shape, pretraining curve).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from tuneline.models.pretrain import PretrainResult, Progress, pretrain_causal_lm
from tuneline.params import ModelParams, PretrainParams
from tuneline.records import sha256_file

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


class ModelNotAvailableError(OSError):
    """A model or tokenizer that cannot be loaded: not a local directory and not reachable or cached."""


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


def _not_available(kind: str, name_or_path: str, revision: Optional[str], exc: BaseException) -> ModelNotAvailableError:
    rev = f" at revision {revision!r}" if revision else ""
    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("TRANSFORMERS_OFFLINE") == "1"
    hint = (
        "the Hugging Face Hub is disabled here (HF_HUB_OFFLINE=1)"
        if offline
        else "it is neither a local directory nor reachable on / cached from the Hugging Face Hub"
    )
    return ModelNotAvailableError(
        f"cannot load {kind} {name_or_path!r}{rev}: {hint}. Download it to a local directory and set "
        f"model.name_or_path to that path, or use model.build: tiny. ({type(exc).__name__}: {exc})"
    )


def _check_local(name_or_path: str) -> None:
    looks_local = name_or_path.startswith(("/", "./", "../", "~", ".\\")) or name_or_path.count("/") > 1
    if looks_local and not Path(name_or_path).expanduser().is_dir():
        raise ModelNotAvailableError(f"cannot load {name_or_path!r}: local directory not found")


def load_tokenizer(name_or_path: str | Path, revision: Optional[str] = None) -> Any:
    """``AutoTokenizer.from_pretrained`` without remote code; a clear error when it cannot be had."""
    from transformers import AutoTokenizer

    name = str(name_or_path)
    _check_local(name)
    try:
        return AutoTokenizer.from_pretrained(name, revision=revision, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        if Path(name).expanduser().is_dir():
            raise
        raise _not_available("tokenizer", name, revision, exc) from exc


def _resolve_dtype(dtype: Any) -> Any:
    import torch

    if dtype is None:
        return torch.float32  # trainable master weights; bf16 comes from autocast
    if isinstance(dtype, str) and dtype != "auto":
        resolved = getattr(torch, dtype, None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}")
        return resolved
    return dtype


def load_causal_lm(name_or_path: str | Path, revision: Optional[str] = None, dtype: Any = None,
                   offload: Any = None) -> Any:
    """``AutoModelForCausalLM.from_pretrained`` from safetensors only, without remote code.

    ``dtype`` None loads float32 (what training wants); "auto" keeps the checkpoint's dtype; a
    torch dtype or its name ("bfloat16") loads that. ``offload`` (the recipe's
    :class:`~tuneline.params.OffloadParams`) with ``inference`` on places the model across devices and disk
    (accelerate ``device_map``, ``max_memory``, ``offload_folder``).
    """
    from transformers import AutoModelForCausalLM

    from tuneline.models.offload import device_map_kwargs

    name = str(name_or_path)
    _check_local(name)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name,
            revision=revision,
            trust_remote_code=False,
            use_safetensors=True,
            dtype=_resolve_dtype(dtype),
            **device_map_kwargs(offload),
        )
    except (OSError, ValueError) as exc:
        if Path(name).expanduser().is_dir():
            raise
        raise _not_available("model", name, revision, exc) from exc
    from tuneline.train.bottleneck import is_bottleneck_dir, load_bottleneck

    if is_bottleneck_dir(name):  # a served bundle: the base's weights plus bottleneck adapters
        load_bottleneck(model, name)
    model.eval()
    return model


def weight_files(model_dir: str | Path) -> list[Path]:
    return sorted(Path(model_dir).glob("*.safetensors"))


def weights_sha256(model_dir: str | Path) -> str:
    """sha256 of the single safetensors file; for sharded weights, sha256 over "name sha" lines."""
    files = weight_files(model_dir)
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {model_dir}")
    if len(files) == 1:
        return sha256_file(files[0])
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.name} {sha256_file(file)}\n".encode())
    return digest.hexdigest()


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


def local_model_dir(ref: "ModelRef") -> Path:
    """The model's directory on this machine (fetched from the artifact store when it is remote); the
    weights are checked against the reference's sha256."""
    from tuneline import storage

    path = storage.fetch(ref.uri)
    actual = weights_sha256(path)
    if actual != ref.sha256:
        raise ValueError(f"{storage.redact(ref.uri)}: weights sha256 {actual[:16]} does not match the "
                         f"reference's {ref.sha256[:16]} (the files changed after {ref.stage} wrote them)")
    return path


def load_model_ref(ref: "ModelRef", offload: Any = None) -> tuple[Any, Any]:
    """(model, tokenizer) for a reference: full weights, or the adapter (PEFT or bottleneck) on its base;
    ``offload`` as in :func:`load_causal_lm`."""
    from tuneline.train.sft import load_trained

    if ref.kind == "adapter":
        assert ref.base is not None
        return load_trained(local_model_dir(ref.base), local_model_dir(ref), offload=offload)
    path = local_model_dir(ref)
    return load_causal_lm(path, offload=offload), load_tokenizer(path)
