"""Where stages keep their files. An interface: local disk now, object storage or a shared volume later."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
from pydantic import Field


class ArtifactStore(dg.ConfigurableResource):
    """Gives each (stage, Dagster run) its own folder; stages return references to what they wrote."""

    def stage_dir(self, stage: str, run_id: str) -> Path:
        raise NotImplementedError("use a concrete ArtifactStore such as LocalArtifactStore")

    def shared_dir(self, name: str) -> Path:
        """A folder shared across runs (caches keyed by content hash, Optuna storage)."""
        raise NotImplementedError("use a concrete ArtifactStore such as LocalArtifactStore")


class LocalArtifactStore(ArtifactStore):
    """Folders on this machine's disk (by default under .tuneline/artifacts)."""

    root: str = Field(description="Root folder for stage outputs.")

    def stage_dir(self, stage: str, run_id: str) -> Path:
        path = Path(self.root).resolve() / stage / run_id
        path.mkdir(parents=True, exist_ok=True)
        return path

    def shared_dir(self, name: str) -> Path:
        path = Path(self.root).resolve() / "_shared" / name
        path.mkdir(parents=True, exist_ok=True)
        return path
