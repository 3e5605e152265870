"""transformers internals tuneline relies on (transformers 5.23.0), in one place.

``Trainer`` has no public hook for the order of training and evaluation examples: a subclass overrides its
private ``_get_train_sampler`` / ``_get_eval_sampler``, which ``Trainer`` hands to its dataloader builder as
``sampler_fn``. :class:`SamplerHooks` is that override, delegating to two public methods the trainer defines.
``get_keys_to_not_convert`` (which Linear layers 4-bit loading leaves unquantized) lives in a private-ish
module. ``tests/unit/test_compat_transformers.py`` checks all of it against the installed version.
"""

from __future__ import annotations

from typing import Any, Optional

PINNED = "5.23.0"  # the version these were checked against (pyproject.toml pins it)


class SamplerHooks:
    """Mixin for a ``transformers.Trainer`` subclass: ``train_sampler(dataset)`` and ``eval_sampler(dataset)``
    choose the order; each returns None to keep the ``Trainer``'s own."""

    def train_sampler(self, dataset: Any) -> Optional[Any]:
        return None

    def eval_sampler(self, dataset: Any) -> Optional[Any]:
        return None

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset  # type: ignore[attr-defined]
        chosen = self.train_sampler(dataset)
        return chosen if chosen is not None else super()._get_train_sampler(train_dataset)  # type: ignore[misc]

    def _get_eval_sampler(self, eval_dataset):
        chosen = self.eval_sampler(eval_dataset)
        return chosen if chosen is not None else super()._get_eval_sampler(eval_dataset)  # type: ignore[misc]


def keys_to_not_convert(model: Any) -> list[str]:
    """Module names 4-bit loading keeps unquantized (output embeddings, tied weights), as from_pretrained does."""
    from transformers.quantizers.base import get_keys_to_not_convert

    return list(get_keys_to_not_convert(model))
