"""Figures of a generating policy: greedy rollouts, their mean reward, and the KL to a reference model.

Shared by the RL stage (before and after training) and the evaluation report (every model in the table):

- :func:`rollouts`: greedy completions of chat prompts (the serving path: chat template with the generation
  prompt, batched left-padded ``generate``, cut at the eos) and the generated tokens per second;
- :func:`mean_reward`: a reward function (TRL's signature: ``prompts``, ``completions``, ``completion_ids``) over them;
- :func:`kl_to_reference`: the exact per-token KL(policy || reference) of the next-token distributions along the
  policy's own completions, averaged over completion tokens. ``reference=None`` means the policy with its PEFT
  adapter disabled (the DPO/RL reference without a second copy).

torch is imported inside the functions.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Optional, Sequence

RewardFn = Callable[..., list[float]]


def rollouts(model: Any, tokenizer: Any, prompts: Sequence[Sequence[dict[str, str]]], *, max_new_tokens: int,
             batch_size: int = 16) -> dict[str, Any]:
    """Greedy completions: ``ids`` (before the eos), ``texts``, ``prompt_ids`` and ``tokens_per_s``."""
    from tuneline.models.generation import generate_greedy, prompt_ids

    ids = [prompt_ids(tokenizer, p) for p in prompts]
    was_training = model.training
    model.eval()
    out = generate_greedy(model, tokenizer, ids, max_new_tokens=max_new_tokens, batch_size=batch_size)
    model.train(was_training)
    seconds = sum(g["latency_s"] for g in out)
    new = sum(g["new_tokens"] for g in out)
    return {"prompt_ids": ids, "ids": [g["ids"] for g in out],
            "texts": [tokenizer.decode(g["ids"], skip_special_tokens=True).strip() for g in out],
            "new_tokens": new, "tokens_per_s": new / seconds if seconds > 0 else float("nan")}


def mean_reward(reward_fn: RewardFn, prompts: Sequence[Sequence[dict[str, str]]], texts: Sequence[str],
                completion_ids: Sequence[Sequence[int]]) -> tuple[float, list[float]]:
    """The reward function's mean over (prompt, completion) pairs, and each value."""
    values = reward_fn(prompts=[list(p) for p in prompts],
                       completions=[[{"role": "assistant", "content": t}] for t in texts],
                       completion_ids=[list(c) for c in completion_ids])
    values = [float(v) for v in values]
    return (sum(values) / len(values) if values else float("nan")), values


def kl_to_reference(model: Any, prompt_ids_list: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]],
                    reference: Optional[Any] = None, pad_id: int = 0, batch_size: int = 16) -> float:
    """Mean over completion tokens of KL(policy(.|prefix) || reference(.|prefix)), exact over the vocabulary.

    ``reference=None``: the policy with its adapter disabled (``model.disable_adapter()``), or its frozen ``ref``
    copy when it continues an adapter; a model without an adapter is then its own reference (KL 0). Completions
    that are empty count no tokens.
    """
    import torch

    rows = [(list(p), list(c)) for p, c in zip(prompt_ids_list, completion_ids, strict=True) if c]
    if not rows or (reference is None and not hasattr(model, "disable_adapter")):
        return 0.0
    device = next(model.parameters()).device
    total, count = 0.0, 0
    was_training = model.training
    model.eval()

    from tuneline.evaluate.report import virtual_tokens_sliced
    from tuneline.train.common import reference_context

    def logprobs(m: Any, ids: Any, mask: Any, context: Any) -> Any:
        with context:  # a prompt-learning policy's logits start with its virtual tokens': cut off
            logits = virtual_tokens_sliced(m(input_ids=ids, attention_mask=mask).logits, ids)
            return torch.log_softmax(logits.float(), dim=-1)

    with torch.inference_mode():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            longest = max(len(p) + len(c) for p, c in chunk)
            ids = torch.full((len(chunk), longest), pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            keep = torch.zeros((len(chunk), longest), dtype=torch.bool)
            for i, (p, c) in enumerate(chunk):
                seq = p + c
                ids[i, :len(seq)] = torch.as_tensor(seq)
                mask[i, :len(seq)] = 1
                keep[i, len(p) - 1:len(seq) - 1] = True  # positions that predict a completion token
            ids, mask, keep = ids.to(device), mask.to(device), keep.to(device)
            policy = logprobs(model, ids, mask, contextlib.nullcontext())
            if reference is None:
                ref = logprobs(model, ids, mask, reference_context(model))
            else:
                ref = logprobs(reference, ids, mask, contextlib.nullcontext())
            per_position = (policy.exp() * (policy - ref)).sum(-1)
            total += float(per_position[keep].sum())
            count += int(keep.sum())
    model.train(was_training)
    return total / count if count else 0.0
