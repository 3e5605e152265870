"""Optuna internals tuneline relies on (optuna 5.0.0), in one place.

A trial runs in another process than the worker that asked for it (``python -m tuneline.recipes.hpo_trial``),
so that process must rebuild the very trial from the shared storage to report to it and ask the pruner:
Optuna has no public API for either step. ``tests/unit/test_compat_optuna.py`` exercises both against the
installed version.
"""

from __future__ import annotations

from typing import Any

PINNED = "5.0.0"  # the version these were checked against (pyproject.toml pins it)


def trial_id(trial: Any) -> int:
    """The storage-wide id of a ``Trial`` or ``FrozenTrial`` (its ``number`` counts within one study only)."""
    return int(trial._trial_id)


def rebuild_trial(study: Any, trial_id: int) -> Any:
    """The live ``optuna.trial.Trial`` with storage id ``trial_id`` of ``study``, in this process: ``report``
    and ``should_prune`` then go through the shared storage and ``study.pruner``."""
    import optuna

    return optuna.trial.Trial(study, int(trial_id))
