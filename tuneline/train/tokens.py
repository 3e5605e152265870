"""Tokenizer changes at fine-tuning time: new special and regular tokens, and the eos/bos/pad checks against the
chat template that stop a model from being trained never to stop.

``extend_tokenizer`` adds the recipe's ``tokenizer.add_special_tokens`` / ``tokenizer.add_tokens`` (and a pad
token when the recipe names one); ``resize_embeddings`` grows the model's embedding (and untied LM head) with
mean-resizing, so new rows start at the mean of the old ones instead of at random; the LoRA methods then train
only those rows (``trainable_token_indices``, see :func:`tuneline.train.methods.apply_method`).
``check_special_tokens`` runs before training and raises with the fix. Heavy imports inside functions.
"""

from __future__ import annotations

from typing import Any, Optional

from tuneline.params import TokenizerParams

PROBE = [{"role": "user", "content": "Say yes."}, {"role": "assistant", "content": "yes"}]


def extend_tokenizer(tokenizer: Any, params: Optional[TokenizerParams]) -> dict[str, Any]:
    """Add the recipe's tokens to ``tokenizer`` in place; returns what was added (ids of the new tokens, the new
    vocabulary size). Tokens the tokenizer already has are not added again (and not listed as new)."""
    if params is None or not params.changes():
        return {"special": [], "regular": [], "ids": [], "vocab_size": len(tokenizer)}
    before = len(tokenizer)
    vocab = tokenizer.get_vocab()
    special = [t for t in params.add_special_tokens if t not in vocab]
    regular = [t for t in params.add_tokens if t not in vocab]
    if params.pad_token is not None and tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": params.pad_token})
        if params.pad_token not in vocab:
            special.insert(0, params.pad_token)
    if special:
        tokenizer.add_special_tokens({"additional_special_tokens": special}, replace_extra_special_tokens=False)
    if regular:
        tokenizer.add_tokens(regular)
    ids = list(range(before, len(tokenizer)))
    for token in special + regular:
        encoded = tokenizer.encode(token, add_special_tokens=False)
        if len(encoded) != 1 or encoded[0] not in ids:
            raise ValueError(f"tokenizer: the added token {token!r} does not encode to its own single id ({encoded})")
    return {"special": special, "regular": regular, "ids": ids, "vocab_size": len(tokenizer)}


def resize_embeddings(model: Any, vocab_size: int) -> bool:
    """Grow the input embedding (and an untied LM head) to ``vocab_size`` rows, new rows at the mean of the old
    ones (``mean_resizing``); returns whether anything changed."""
    if model.get_input_embeddings().weight.shape[0] >= vocab_size:
        return False
    model.resize_token_embeddings(vocab_size, mean_resizing=True)
    return True


def embeddings_tied(model: Any) -> bool:
    head = model.get_output_embeddings()
    return head is not None and head.weight is model.get_input_embeddings().weight


def trainable_token_indices(model: Any, ids: list[int]) -> dict[str, list[int]]:
    """PEFT's ``trainable_token_indices``: the embedding's new rows, and the LM head's when it is not tied (a tied
    head follows the embedding)."""
    names = {id(m): n.rsplit(".", 1)[-1] for n, m in model.named_modules()}
    out = {names[id(model.get_input_embeddings())]: list(ids)}
    if not embeddings_tied(model):
        out[names[id(model.get_output_embeddings())]] = list(ids)
    return out


def check_special_tokens(tokenizer: Any) -> dict[str, Any]:
    """eos/bos/pad against the chat template, before any training; raises ValueError saying how to fix it.

    - a pad token must exist (batches are padded);
    - the template must emit the eos token after an assistant turn, else the model is trained never to stop;
    - the template and the tokenizer must not both put a bos in front (a doubled bos at serving time).
    Returns what was checked (for the run's report).
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("the tokenizer has no chat template: set one (tokenizer.chat_template, saved as "
                         "chat_template.jinja) before fine-tuning on chat records")
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token: set tokenizer.pad_token in the recipe (for example "
                         "'<pad>', added as a new special token) or give the base model's tokenizer one; do not "
                         "reuse a token the template emits inside a turn")
    ids = list(tokenizer.apply_chat_template(PROBE, tokenize=True, return_dict=True)["input_ids"])
    answer = tokenizer.encode(PROBE[-1]["content"], add_special_tokens=False)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos token: set eos_token to the token the chat template ends an "
                         "assistant turn with")
    end = _find(ids, answer)
    after = ids[end:] if end is not None else ids
    if eos not in after:
        rendered = tokenizer.decode(after)
        raise ValueError(
            f"the chat template never emits the eos token {tokenizer.eos_token!r} after an assistant turn (it renders "
            f"{rendered!r} after the answer): the model would be trained never to stop. End assistant turns with "
            "{{ eos_token }} in the template, or set the tokenizer's eos_token to the template's end-of-turn token "
            "(and generation_config.eos_token_id with it)")
    bos = tokenizer.bos_token_id
    doubled = bos is not None and len(ids) > 1 and ids[0] == bos and ids[1] == bos
    if doubled:
        raise ValueError(f"the chat template and the tokenizer both add the bos token {tokenizer.bos_token!r}: "
                         "remove {{ bos_token }} from the template or set the tokenizer's add_bos_token to false")
    return {"eos": tokenizer.eos_token, "bos": tokenizer.bos_token, "pad": tokenizer.pad_token,
            "pad_is_eos": tokenizer.pad_token_id == eos, "template_emits_eos": True}


def _find(seq: list[int], sub: list[int]) -> Optional[int]:
    """Index just past the last occurrence of ``sub`` in ``seq`` (None when absent)."""
    for start in range(len(seq) - len(sub), -1, -1):
        if seq[start:start + len(sub)] == sub:
            return start + len(sub)
    return None
