"""MLflow internals tuneline relies on (mlflow 3.17.2), in one place.

A split is logged as a dataset input of a run that already exists (``MlflowClient.log_inputs``, no active
run): that needs the dataset's entity, which MLflow builds with the private ``_to_mlflow_entity``.
``tests/unit/test_compat_mlflow.py`` checks it against the installed version.
"""

from __future__ import annotations

from typing import Any

PINNED = "3.17.2"  # the version this was checked against (pyproject.toml pins it)


def dataset_entity(dataset: Any) -> Any:
    """The ``mlflow.entities.Dataset`` of an ``mlflow.data`` dataset (what ``log_inputs`` takes)."""
    return dataset._to_mlflow_entity()
