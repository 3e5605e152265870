"""The prompt-template arm: no classifier is trained. A Jinja template renders the text, the label names and k
few-shot examples; a causal LM scores each label by the log-likelihood of its name after the prompt (the sum
over the name's tokens, so labels that tokenize to several tokens are scored whole), and the probabilities
are the softmax over the labels' log-likelihoods.

The prompt runs once per text; its key/value cache is then repeated for every label, so scoring K labels costs
one prompt plus K short continuations. Prompts longer than ``max_length`` lose tokens from the front (few-shot
examples first; the text and the ``Label:`` cue at the end stay).
"""

from __future__ import annotations

import random
from typing import Any, Mapping, Optional, Sequence

from tuneline.classify.data import Examples, LabelSet


def render(template: str, *, text: str, labels: Sequence[str], examples: Sequence[Mapping[str, str]] = ()) -> str:
    """The prompt (a sandboxed Jinja environment: a recipe's template cannot reach Python)."""
    from jinja2.sandbox import SandboxedEnvironment

    env = SandboxedEnvironment(keep_trailing_newline=True)
    return env.from_string(template).render(text=text, labels=list(labels), examples=list(examples))


def choose_shots(train: Examples, k: int, seed: int, names: Mapping[str, str]) -> list[dict[str, str]]:
    """``k`` train examples, seeded, taking labels in turn (so k >= K shows every label once)."""
    if k <= 0:
        return []
    rng = random.Random(seed)
    by_label: dict[str, list[int]] = {}
    for i, label in enumerate(train.labels):
        by_label.setdefault(label, []).append(i)
    order = sorted(by_label)
    rng.shuffle(order)
    for rows in by_label.values():
        rng.shuffle(rows)
    chosen: list[int] = []
    depth = 0
    while len(chosen) < min(k, len(train)):
        for label in order:
            if depth < len(by_label[label]) and len(chosen) < k:
                chosen.append(by_label[label][depth])
        depth += 1
    rng.shuffle(chosen)
    return [{"text": train.texts[i], "label": names.get(train.labels[i], train.labels[i])} for i in chosen]


def label_token_ids(tokenizer: Any, names: Sequence[str], *, chat: bool = False) -> list[list[int]]:
    """Each label name's continuation tokens (`` name``, or ``name`` as an assistant turn's start with ``chat``;
    no special tokens); an empty one is an error."""
    ids = [tokenizer(("" if chat else " ") + name, add_special_tokens=False)["input_ids"] for name in names]
    empty = [n for n, t in zip(names, ids) if not t]
    if empty:
        raise ValueError(f"label names {empty} tokenize to nothing")
    return ids


def score_labels(model: Any, tokenizer: Any, prompt: str, label_ids: Sequence[Sequence[int]], *,
                 max_length: int, add_special_tokens: bool = True) -> list[float]:
    """Sum of log P(label tokens | prompt) for each label, in order."""
    import copy

    import torch

    prompt_ids = tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"]
    longest = max(len(t) for t in label_ids)
    keep = max(1, max_length - longest)
    prompt_ids = prompt_ids[-keep:]
    k = len(label_ids)
    device = next(model.parameters()).device
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([prompt_ids], device=device), use_cache=True)
        first = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
        scores = [float(first[t[0]]) for t in label_ids]
        if longest > 1:
            cache = copy.deepcopy(out.past_key_values)
            cache.batch_repeat_interleave(k)
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
            cont = torch.full((k, longest - 1), pad, dtype=torch.long, device=device)
            for i, t in enumerate(label_ids):
                if len(t) > 1:
                    cont[i, :len(t) - 1] = torch.tensor(t[:-1])
            mask = torch.ones((k, len(prompt_ids) + longest - 1), dtype=torch.long, device=device)
            logp = torch.log_softmax(model(input_ids=cont, attention_mask=mask, past_key_values=cache).logits.float(),
                                     dim=-1)
            for i, t in enumerate(label_ids):
                scores[i] += sum(float(logp[i, j - 1, t[j]]) for j in range(1, len(t)))
    return scores


def template_probs(model: Any, tokenizer: Any, texts: Sequence[str], labels: LabelSet, *, template: str,
                   shots: Sequence[Mapping[str, str]] = (), names: Optional[Mapping[str, str]] = None,
                   max_length: int = 512, chat: bool = False) -> Any:
    """(n, K) probabilities in ``labels`` order: softmax over each label name's log-likelihood. With ``chat`` the
    rendered prompt is the user turn of the tokenizer's chat template and the label the assistant's answer (the
    form :func:`template_records` trains the tuned variant on)."""
    import numpy as np

    names = dict(names or {})
    shown = [names.get(label, label) for label in labels.names]
    ids = label_token_ids(tokenizer, shown, chat=chat)
    model.eval()
    out = np.zeros((len(texts), len(labels)), dtype=np.float64)
    for row, text in enumerate(texts):
        prompt = render(template, text=text, labels=shown, examples=shots)
        if chat:  # cut as template_records cut it for training, so the chat markers stay
            prompt = tokenizer.apply_chat_template(
                [{"role": "user", "content": fit_prompt(tokenizer, prompt, max_length - max(map(len, ids)))}],
                add_generation_prompt=True, tokenize=False)
        scores = np.asarray(score_labels(model, tokenizer, prompt, ids, max_length=max_length,
                                         add_special_tokens=not chat))
        scores -= scores.max()
        out[row] = np.exp(scores) / np.exp(scores).sum()
    return out


CHAT_MARGIN = 8  # tokens left for the chat template's markers (bos, roles, eos) around a cut prompt


def fit_prompt(tokenizer: Any, prompt: str, budget: int) -> str:
    """``prompt`` cut from the front to at most ``budget - CHAT_MARGIN`` tokens (the text and the ``Label:`` cue at
    the end stay), so it fits a chat turn of ``budget`` tokens."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    keep = max(1, budget - CHAT_MARGIN)
    return prompt if len(ids) <= keep else tokenizer.decode(ids[-keep:])


def template_records(examples: Examples, *, template: str, labels: LabelSet, tokenizer: Any, max_length: int,
                     names: Optional[Mapping[str, str]] = None) -> list[Any]:
    """The instruction-tuned variant's SFT data: each example's zero-shot prompt (the recipe's template, cut from
    the front like the scorer's so that prompt and answer fit ``max_length``) as the user turn and its label's name
    as the assistant's answer; scored back with ``template_probs(..., chat=True)``."""
    from tuneline.records import ChatRecord

    names = dict(names or {})
    shown = [names.get(label, label) for label in labels.names]
    budget = max_length - max(map(len, label_token_ids(tokenizer, shown, chat=True)))
    return [ChatRecord(kind="sft", source="template", line=i + 1,
                       messages=[{"role": "user", "content": fit_prompt(tokenizer, render(template, text=text,
                                                                                          labels=shown), budget)},
                                 {"role": "assistant", "content": names.get(label, label)}])
            for i, (text, label) in enumerate(zip(examples.texts, examples.labels))]
