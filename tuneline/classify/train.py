"""Train a sequence classifier: one readable loop (AdamW, linear warmup and decay, optional class weights),
validation macro-F1 every ``eval_steps`` with early stopping (the best weights restored), and atomic
checkpoints that a rerun of the same call resumes from (like SFT's: a retried stage continues, it does not
start over).

A checkpoint is a folder ``checkpoints/ckpt-<step>`` written under a temporary name and renamed when
complete: the trainable weights and the best ones so far (safetensors), the optimizer and scheduler state,
and ``state.json`` (step, best step and score, patience, curves). Batches come from a per-epoch permutation
seeded by ``seed + epoch``, so a resumed run sees the same batches the uninterrupted one would have.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from tuneline.classify.data import Examples, LabelSet, class_weights, imbalance_ratio, label_counts
from tuneline.params import ClassifierParams

MODEL_SUBDIR = "model"
CHECKPOINTS = "checkpoints"
DEFAULT_LR = {"head": 5e-3, "lora": 1e-3, "top_layers": 1e-4, "full": 5e-5}


@dataclass
class ClassifierResult:
    """What a training run did (``result.json`` of the trainer; the asset's figures)."""

    strategy: str
    output_dir: str
    labels: list[str]
    global_step: int
    max_steps: int
    best_step: int
    best_val_macro_f1: float
    stopped_early: bool
    resumed_from_step: int
    trainable_params: int
    total_params: int
    learning_rate: float
    max_length: int
    class_weighted: bool
    imbalance_ratio: float
    train_examples: int
    val_examples: int
    train_seconds: float
    examples_per_second: float
    bf16: bool
    train_losses: list[list[float]] = field(default_factory=list)
    val_macro_f1: list[list[float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan_steps(n_train: int, params: ClassifierParams, cap: Optional[int]) -> int:
    steps = math.ceil(params.epochs * math.ceil(n_train / params.batch_size))
    for limit in (params.max_steps, cap):
        if limit is not None:
            steps = min(steps, limit)
    return max(1, steps)


def _trainable_state(model: Any) -> dict[str, Any]:
    return {n: p.detach().clone().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def _load_trainable(model: Any, state: dict[str, Any]) -> None:
    import torch

    params = dict(model.named_parameters())
    missing = set(state) ^ {n for n, p in params.items() if p.requires_grad}
    if missing:
        raise ValueError(f"checkpoint does not match the model's trainable parameters ({sorted(missing)[:3]} ...)")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def init_head_from_probe(model: Any, tokenizer: Any, texts: Any, y: list[int], *, max_length: int, seed: int,
                         c: float = 10.0, batch_size: int = 64) -> None:
    """Set the linear head to a logistic regression fitted on the model's own pooled embeddings of the train
    texts (the linear probe), so training starts where the probe ends."""
    import numpy as np
    import torch
    from sklearn.linear_model import LogisticRegression

    from tuneline.classify.model import encode_texts

    model.eval()
    chunks = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            batch = encode_texts(tokenizer, texts[start:start + batch_size], max_length)
            chunks.append(model.pooled(batch["input_ids"], batch["attention_mask"]).numpy())
    clf = LogisticRegression(C=c, max_iter=2000, random_state=seed).fit(np.concatenate(chunks), np.asarray(y))
    k = model.config.num_labels
    weight, bias = np.zeros((k, clf.coef_.shape[1])), np.zeros(k)
    if len(clf.classes_) == 2 and clf.coef_.shape[0] == 1:  # binary: one score w.x + b for the second class
        weight[clf.classes_[1]], bias[clf.classes_[1]] = clf.coef_[0] / 2, clf.intercept_[0] / 2
        weight[clf.classes_[0]], bias[clf.classes_[0]] = -clf.coef_[0] / 2, -clf.intercept_[0] / 2
    else:
        weight[clf.classes_], bias[clf.classes_] = clf.coef_, clf.intercept_
    with torch.no_grad():
        model.classifier.weight.copy_(torch.as_tensor(weight, dtype=model.classifier.weight.dtype))
        model.classifier.bias.copy_(torch.as_tensor(bias, dtype=model.classifier.bias.dtype))
    model.train()


def latest_checkpoint(folder: Path) -> Optional[Path]:
    """The newest complete checkpoint (one with ``state.json``); temporary folders are ignored."""
    done = [p for p in folder.glob("ckpt-*") if (p / "state.json").is_file() and p.name[5:].isdigit()]
    return max(done, key=lambda p: int(p.name[5:]), default=None)


def train_classifier(*args: Any, **kwargs: Any) -> ClassifierResult:
    """Train ``strategy`` on ``encoder`` (a path or hub id); the best model is saved to ``out_dir/model``
    (arguments as :func:`fit_classifier`)."""
    return fit_classifier(*args, **kwargs)[0]


def fit_classifier(
    encoder: str,
    train: Examples,
    val: Examples,
    params: ClassifierParams,
    out_dir: str | Path,
    *,
    strategy: str,
    seed: int,
    max_steps: Optional[int] = None,
    max_length: Optional[int] = None,
    on_log: Optional[Callable[[int, dict[str, Any]], None]] = None,
    on_checkpoint: Optional[Callable[[Path], None]] = None,
) -> tuple[ClassifierResult, Any, Any]:
    """(result, the trained model with the best weights as saved, its tokenizer)."""
    import torch
    from safetensors.torch import load_file, save_file

    from tuneline.classify.metrics import macro_f1
    from tuneline.classify.model import (
        apply_strategy,
        load_encoder_classifier,
        plain_model,
        predict_proba,
        save_classifier,
    )
    from tuneline.models.loading import resolve_bf16

    out = Path(out_dir)
    ckpt_root = out / CHECKPOINTS
    ckpt_root.mkdir(parents=True, exist_ok=True)
    labels = LabelSet.from_labels(train.labels)
    y_train = torch.tensor(labels.encode(train.labels, "train split"))
    y_val = labels.encode(val.labels, "validation split (labels the train split lacks)")
    length = max_length or params.max_length
    bf16 = resolve_bf16(params.bf16)
    torch.manual_seed(seed)
    model, tokenizer = load_encoder_classifier(encoder, labels, pooling=params.pooling)
    if params.head_init == "probe":
        init_head_from_probe(model, tokenizer, train.texts, y_train.tolist(), max_length=length, seed=seed)
    model, plan = apply_strategy(model, strategy, top_layers=params.top_layers, lora=params.lora, seed=seed)
    counts = label_counts(train.labels)
    weights = class_weights(counts, labels, params.class_weights)
    loss_fn = torch.nn.CrossEntropyLoss(weight=torch.tensor(weights, dtype=torch.float32) if weights else None)
    lr = params.learning_rate or DEFAULT_LR[strategy]
    total = plan_steps(len(train), params, max_steps)
    warmup = int(params.warmup_ratio * total)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=params.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / max(1, warmup) if s < warmup else max(0.0, (total - s) / max(1, total - warmup)))
    encoded = tokenizer(list(train.texts), truncation=True, max_length=length)["input_ids"]
    pad_id = tokenizer.pad_token_id or 0
    per_epoch = math.ceil(len(train) / params.batch_size)

    step, best_step, best_f1, bad_evals, stopped = 0, 0, -1.0, 0, False
    losses: list[list[float]] = []
    f1s: list[list[float]] = []
    best_state = _trainable_state(model)
    resumed = latest_checkpoint(ckpt_root)
    if resumed is not None:
        state = json.loads((resumed / "state.json").read_text(encoding="utf-8"))
        _load_trainable(model, load_file(str(resumed / "trainable.safetensors")))
        best_state = load_file(str(resumed / "best.safetensors"))
        extra = torch.load(resumed / "optimizer.pt", weights_only=True)
        optimizer.load_state_dict(extra["optimizer"])
        scheduler.load_state_dict(extra["scheduler"])
        step, best_step, best_f1 = state["step"], state["best_step"], state["best_f1"]
        bad_evals, stopped, losses, f1s = state["bad_evals"], state["stopped"], state["losses"], state["f1s"]
    resumed_from = step

    def evaluate() -> float:
        probs = predict_proba(model, tokenizer, val.texts, max_length=length, batch_size=64, bf16=bf16)
        return macro_f1(y_val, probs.argmax(axis=1), len(labels))

    def checkpoint() -> None:
        tmp = ckpt_root / f".tmp-ckpt-{step}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file(_trainable_state(model), str(tmp / "trainable.safetensors"))
        save_file(best_state, str(tmp / "best.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({
            "step": step, "best_step": best_step, "best_f1": best_f1, "bad_evals": bad_evals, "stopped": stopped,
            "losses": losses, "f1s": f1s}), encoding="utf-8")
        final = ckpt_root / f"ckpt-{step}"
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in ckpt_root.glob("ckpt-*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
        if on_checkpoint is not None:
            on_checkpoint(final)

    if step == 0:  # the starting point counts: a probe-initialized head may already be the best model
        f1s.append([0, evaluate()])
        best_f1 = f1s[-1][1]
        if on_log is not None:
            on_log(0, {"val_macro_f1": best_f1, "best_val_macro_f1": best_f1})
    model.train()
    started = time.perf_counter()
    seen = 0
    while step < total and not stopped:
        epoch, position = divmod(step, per_epoch)
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed + epoch))
        idx = order[position * params.batch_size:(position + 1) * params.batch_size].tolist()
        longest = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), longest), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), longest), dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, :len(encoded[i])] = torch.tensor(encoded[i])
            mask[row, :len(encoded[i])] = 1
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(input_ids=ids, attention_mask=mask).logits
        loss = loss_fn(logits.float(), y_train[idx])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        seen += len(idx)
        losses.append([step, float(loss.detach())])
        if on_log is not None:
            on_log(step, {"loss": float(loss.detach()), "learning_rate": scheduler.get_last_lr()[0], "epoch": step / per_epoch})
        if step % params.eval_steps == 0 or step == total:
            score = evaluate()
            f1s.append([step, score])
            if score > best_f1 + 1e-9:
                best_f1, best_step, bad_evals, best_state = score, step, 0, _trainable_state(model)
            else:
                bad_evals += 1
                stopped = bad_evals >= params.patience and step < total
            if on_log is not None:
                on_log(step, {"val_macro_f1": score, "best_val_macro_f1": best_f1})
            checkpoint()
    seconds = time.perf_counter() - started
    _load_trainable(model, best_state)
    info = {"strategy": strategy, "max_length": length, "best_step": best_step, "encoder": encoder}
    model = plain_model(model)
    model.eval()
    save_classifier(model, tokenizer, out / MODEL_SUBDIR, info=info)
    return ClassifierResult(
        strategy=strategy, output_dir=str(out / MODEL_SUBDIR), labels=list(labels.names), global_step=step,
        max_steps=total, best_step=best_step, best_val_macro_f1=best_f1, stopped_early=stopped,
        resumed_from_step=resumed_from, trainable_params=plan.trainable_params, total_params=plan.total_params,
        learning_rate=lr, max_length=length, class_weighted=weights is not None,
        imbalance_ratio=round(imbalance_ratio(counts), 3), train_examples=len(train), val_examples=len(val),
        train_seconds=round(seconds, 2), examples_per_second=round(seen / seconds, 2) if seconds > 0 else 0.0,
        bf16=bf16, train_losses=losses, val_macro_f1=f1s), model, tokenizer
