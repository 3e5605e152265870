"""The one place that chooses the environment: ``TUNELINE_PROFILE=local`` (the embedded default) or ``production``.

Every entry point (``tuneline run``, the sensors and the schedule through the Dagster resources, ``serve``,
``rollback``, ``lineage``, ``drift``, ``reproduce``) reads its tracking server, artifact store, Optuna storage,
inference log and recipe from :func:`load_settings`, so they all act on the same environment and the same
recipe.

- ``local``: everything under ``$TUNELINE_HOME`` (default ``.tuneline/`` in the working directory): MLflow in
  SQLite, artifacts on disk, Optuna in SQLite, the inference log in SQLite.
- ``production``: services a team operates, named by environment variables (secrets only there, never in a
  file): ``TUNELINE_MLFLOW_URI`` (an MLflow tracking server, ``http://...``), ``TUNELINE_ARTIFACT_ROOT`` (an
  object store ``s3://bucket/prefix`` or a shared ``file://`` folder), ``TUNELINE_OPTUNA_STORAGE`` (a SQLAlchemy
  URL, e.g. ``postgresql://user:pw@host/db``; default: the recipe's ``hpo.storage``), and optionally
  ``TUNELINE_LAUNCHER`` (``subprocess`` or ``k8s``).

The recipe comes from ``TUNELINE_RECIPE`` (default ``configs/demo.yaml``), or a ``--recipe`` option where a
command has one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from tuneline.paths import state_dir
from tuneline.tracking import default_tracking_uri

if TYPE_CHECKING:
    from tuneline.params import Recipe

PROFILES = ("local", "production")
DEFAULT_RECIPE = "configs/demo.yaml"
PRODUCTION_REQUIRED = ("TUNELINE_MLFLOW_URI", "TUNELINE_ARTIFACT_ROOT")


class SettingsError(RuntimeError):
    """The environment does not name what the chosen profile needs; the message says what to set."""


@dataclass(frozen=True)
class Settings:
    profile: str
    home: Path  # state folder (local files, caches, the Dagster home of the local profile)
    recipe: str  # recipe file (relative to the checkout, or absolute)
    tracking_uri: str  # MLflow tracking URI (may hold credentials: log it only through redact)
    artifact_root: str  # URI under which stages write
    optuna_storage: Optional[str]  # SQLAlchemy URL; None: SQLite under the artifact store's shared folder
    inference_log: Path  # SQLite inference log the server writes and the sensor reads
    launcher: str  # subprocess or k8s

    def log_path(self, recipe: "Recipe") -> Path:
        """The inference log: the recipe's ``serve.log_path`` when it names one, else the profile's."""
        return Path(recipe.serve.log_path) if recipe.serve.log_path else self.inference_log

    def describe(self) -> dict[str, str]:
        """The settings with every secret masked (for logs and metadata)."""
        from tuneline.storage import redact

        return {"profile": self.profile, "recipe": self.recipe, "tracking_uri": redact(self.tracking_uri),
                "artifact_root": redact(self.artifact_root), "optuna_storage": redact(self.optuna_storage or "sqlite"),
                "inference_log": str(self.inference_log), "launcher": self.launcher}


def load_settings(profile: Optional[str] = None, *, recipe: Optional[str] = None) -> Settings:
    """The settings of ``profile`` (default ``$TUNELINE_PROFILE``, else local); ``recipe`` overrides
    ``$TUNELINE_RECIPE``."""
    profile = profile or os.environ.get("TUNELINE_PROFILE") or "local"
    if profile not in PROFILES:
        raise SettingsError(f"TUNELINE_PROFILE={profile!r}: choose one of {', '.join(PROFILES)}")
    home = state_dir()
    recipe = recipe or os.environ.get("TUNELINE_RECIPE") or DEFAULT_RECIPE
    launcher = os.environ.get("TUNELINE_LAUNCHER", "subprocess")
    if launcher not in ("subprocess", "k8s"):
        raise SettingsError(f"TUNELINE_LAUNCHER={launcher!r}: choose subprocess or k8s")
    log = Path(os.environ.get("TUNELINE_INFERENCE_LOG") or home / "inference.db")
    if profile == "local":
        tracking = default_tracking_uri(home)
        return Settings(profile, home, recipe, tracking, (home / "artifacts").as_uri(),
                        os.environ.get("TUNELINE_OPTUNA_STORAGE"), log, launcher)
    missing = [name for name in PRODUCTION_REQUIRED if not os.environ.get(name)]
    if missing:
        raise SettingsError(
            f"profile 'production' needs {', '.join(missing)} in the environment (an MLflow tracking server "
            "URI and an artifact root URI; `make prod-up` starts both on this machine and prints them)")
    return Settings(profile, home, recipe, os.environ["TUNELINE_MLFLOW_URI"],
                    os.environ["TUNELINE_ARTIFACT_ROOT"].rstrip("/"), os.environ.get("TUNELINE_OPTUNA_STORAGE"),
                    log, launcher)
