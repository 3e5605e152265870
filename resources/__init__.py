"""Resources, and the one function that chooses them for an environment."""

from __future__ import annotations

import os
from typing import Any, Optional

from resources.artifacts import ArtifactStore, LocalArtifactStore
from resources.launcher import PipesSubprocessLauncher, TrainingLauncher
from resources.recipe import RecipeResource
from resources.tracking import MlflowResource
from tuneline.paths import state_dir
from tuneline.tracking import default_tracking_uri

PROFILES = ("local", "production")


def build_resources(profile: Optional[str] = None) -> dict[str, Any]:
    """Resources for ``profile`` (default: $TUNELINE_PROFILE, else "local").

    local: everything under .tuneline/ (SQLite MLflow, artifacts on disk).
    production: MLflow and artifact locations from environment variables (secrets never in files).
    """
    profile = profile or os.environ.get("TUNELINE_PROFILE", "local")
    if profile == "local":
        home = state_dir()
        return {
            "recipe": RecipeResource(),
            "mlflow": MlflowResource(
                tracking_uri=default_tracking_uri(home), artifact_root=str(home / "mlartifacts")
            ),
            "artifacts": LocalArtifactStore(root=str(home / "artifacts")),
            "launcher": PipesSubprocessLauncher(),
        }
    if profile == "production":
        missing = [v for v in ("TUNELINE_MLFLOW_URI", "TUNELINE_ARTIFACT_ROOT") if not os.environ.get(v)]
        if missing:
            raise RuntimeError(f"profile 'production' needs the environment variables {', '.join(missing)}")
        return {
            "recipe": RecipeResource(path=os.environ.get("TUNELINE_RECIPE", "configs/demo.yaml")),
            "mlflow": MlflowResource(tracking_uri=os.environ["TUNELINE_MLFLOW_URI"]),
            "artifacts": LocalArtifactStore(root=os.environ["TUNELINE_ARTIFACT_ROOT"]),
            "launcher": PipesSubprocessLauncher(),
        }
    raise ValueError(f"unknown profile {profile!r}: choose one of {', '.join(PROFILES)}")


__all__ = [
    "ArtifactStore", "LocalArtifactStore", "MlflowResource", "PipesSubprocessLauncher", "RecipeResource",
    "TrainingLauncher", "build_resources",
]
