"""The one generation path: greedy decoding of chat prompts, batched with left padding, each row cut at its first
stop token. Evaluation, RL rollouts, the server's dynamic batcher and the registered pyfunc model all use it, so
what is measured is what is served."""

from __future__ import annotations

import time
from typing import Any, Mapping, Optional, Sequence


def input_ids(encoded: Any) -> list[int]:
    """input_ids from what a tokenizer or ``apply_chat_template`` returns (a BatchEncoding in transformers 5, or a list)."""
    if hasattr(encoded, "keys") and "input_ids" in encoded:
        encoded = encoded["input_ids"]
    return [int(t) for t in encoded]


def prompt_ids(tokenizer: Any, messages: Sequence[Mapping[str, str]]) -> list[int]:
    """The conversation rendered by the chat template with the generation prompt (the training and serving path)."""
    return input_ids(tokenizer.apply_chat_template([dict(m) for m in messages], tokenize=True, return_dict=True,
                                                   add_generation_prompt=True))


def batches(order: Sequence[int], size: int) -> list[list[int]]:
    """``order`` cut into consecutive batches of ``size`` (the last one shorter)."""
    return [list(order[i : i + size]) for i in range(0, len(order), size)]


def pad_id(tokenizer: Any) -> int:
    """The pad token id, else the eos id."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token")
    return int(pad)


def stop_ids(model: Any, tokenizer: Any) -> list[int]:
    """The tokenizer's eos plus any eos ids of the model's generation config (end-of-turn tokens)."""
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for i in config_eos if isinstance(config_eos, (list, tuple)) else [config_eos]:
        if i is not None and int(i) not in ids:
            ids.append(int(i))
    if not ids:
        raise ValueError("no eos token: generation could never stop before max_new_tokens")
    return ids


def generate_greedy(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int | Sequence[int],
    batch_size: int,
    warm_up: bool = True,
) -> list[dict[str, Any]]:
    """Greedy completions of tokenized prompts, batched with left padding, each cut at its first eos.

    ``max_new_tokens`` is one cap for all prompts or one per prompt (a batch generates up to its largest
    cap; each row is cut at its own). Returns, per prompt in input order: ``ids`` (new tokens before the
    eos), ``new_tokens`` (tokens generated, the eos included), ``hit_eos`` and ``latency_s`` (its batch's
    wall time / batch size). Prompts are batched in order of length (less padding); unless ``warm_up`` is
    off, one untimed two-token call warms up first.
    """
    import torch
    from transformers import GenerationConfig

    pad = pad_id(tokenizer)
    stops = stop_ids(model, tokenizer)
    caps = [int(max_new_tokens)] * len(prompts) if isinstance(max_new_tokens, int) else [int(c) for c in max_new_tokens]
    if len(caps) != len(prompts) or any(c < 1 for c in caps):
        raise ValueError("max_new_tokens: one cap >= 1, or one per prompt")
    device = next(model.parameters()).device
    results: list[Optional[dict[str, Any]]] = [None] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    with torch.inference_mode():
        if prompts and warm_up:  # untimed warm-up: lazy initialisation must not land in the first batch's latency
            warm = torch.as_tensor([list(prompts[order[0]])], dtype=torch.long, device=device)
            model.generate(
                input_ids=warm,
                attention_mask=torch.ones_like(warm),
                generation_config=GenerationConfig(
                    max_new_tokens=2, do_sample=False, num_beams=1, eos_token_id=stops, pad_token_id=pad
                ),
            )
        for batch in batches(order, batch_size):
            longest = max(len(prompts[i]) for i in batch)
            ids = torch.full((len(batch), longest), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), longest), dtype=torch.long)
            for j, i in enumerate(batch):
                p = list(prompts[i])
                ids[j, longest - len(p) :] = torch.as_tensor(p, dtype=torch.long)
                mask[j, longest - len(p) :] = 1
            config = GenerationConfig(
                max_new_tokens=max(caps[i] for i in batch),
                do_sample=False,
                num_beams=1,
                eos_token_id=stops,
                pad_token_id=pad,
                bos_token_id=tokenizer.bos_token_id,
            )
            start = time.perf_counter()
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
            elapsed = time.perf_counter() - start
            new = out[:, longest:].tolist()
            for j, i in enumerate(batch):
                row = new[j][: caps[i]]
                stop_at = next((k for k, t in enumerate(row) if t in stops), None)
                results[i] = {
                    "ids": row if stop_at is None else row[:stop_at],
                    "new_tokens": len(row) if stop_at is None else stop_at + 1,
                    "hit_eos": stop_at is not None,
                    "latency_s": elapsed / len(batch),
                }
    return results  # type: ignore[return-value]


def chat_generate(model: Any, tokenizer: Any, messages: Sequence[Mapping[str, str]], *, max_new_tokens: int) -> dict[str, Any]:
    """Greedy reply to one conversation through :func:`generate_greedy`.

    Returns ``text`` (decoded without special tokens), ``ids`` (new tokens before the stop token),
    ``prompt_tokens``, ``new_tokens`` (generated, the stop token included) and ``finish_reason``
    ("stop" at an eos, "length" at ``max_new_tokens``).
    """
    prompt = prompt_ids(tokenizer, messages)
    out = generate_greedy(model, tokenizer, [prompt], max_new_tokens=max_new_tokens, batch_size=1, warm_up=False)[0]
    return {"text": tokenizer.decode(out["ids"], skip_special_tokens=True), "ids": out["ids"],
            "prompt_tokens": len(prompt), "new_tokens": out["new_tokens"],
            "finish_reason": "stop" if out["hit_eos"] else "length"}
