"""Resources, built from the one function that chooses the environment (:func:`tuneline.settings.load_settings`)."""

from __future__ import annotations

from typing import Any, Optional

import dagster as dg

from resources.artifacts import ArtifactStore, LocalArtifactStore, ObjectArtifactStore
from resources.io import RefIOManager
from resources.k8s import K8sTrainingLauncher
from resources.launcher import PipesSubprocessLauncher, TrainingLauncher
from resources.recipe import RecipeResource
from resources.tracking import MlflowResource, StudyStorage
from tuneline import storage
from tuneline.settings import PROFILES, Settings, load_settings


def training_launcher(settings: Settings) -> TrainingLauncher:
    """``TUNELINE_LAUNCHER=k8s``: training pods on Kubernetes (settings from TUNELINE_K8S_*); else processes here."""
    return K8sTrainingLauncher.from_env() if settings.launcher == "k8s" else PipesSubprocessLauncher()


def build_resources(profile: Optional[str] = None, *, settings: Optional[Settings] = None) -> dict[str, Any]:
    """Resources for ``profile`` (default: $TUNELINE_PROFILE, else "local").

    local: everything under .tuneline/ (SQLite MLflow, artifacts on disk). production: the tracking server,
    artifact store and Optuna storage named by environment variables, read at run time through
    ``dg.EnvVar`` (never written into a config the UI shows).
    """
    settings = settings or load_settings(profile)
    if settings.profile == "local":
        mlflow = MlflowResource(tracking_uri=settings.tracking_uri,
                                artifact_root=str(storage.local_path(settings.artifact_root).parent / "mlartifacts"))
        artifacts: ArtifactStore = LocalArtifactStore(root=str(storage.local_path(settings.artifact_root)))
    else:
        mlflow = MlflowResource(tracking_uri=dg.EnvVar("TUNELINE_MLFLOW_URI"))
        artifacts = (LocalArtifactStore(root=str(storage.local_path(settings.artifact_root)))
                     if storage.is_local(settings.artifact_root) else ObjectArtifactStore(uri=dg.EnvVar("TUNELINE_ARTIFACT_ROOT")))
    study = StudyStorage(url=dg.EnvVar("TUNELINE_OPTUNA_STORAGE") if settings.optuna_storage else None)
    return {
        "recipe": RecipeResource(path=settings.recipe),
        "study_storage": study,
        "mlflow": mlflow,
        "artifacts": artifacts,
        "launcher": training_launcher(settings),
        "io_manager": RefIOManager(root=storage.join(settings.artifact_root, "_refs")),
    }


__all__ = [
    "ArtifactStore", "K8sTrainingLauncher", "LocalArtifactStore", "MlflowResource", "ObjectArtifactStore",
    "PROFILES", "PipesSubprocessLauncher", "RecipeResource", "RefIOManager", "StudyStorage", "TrainingLauncher",
    "build_resources",
]
