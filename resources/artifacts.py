"""Where stages keep their files: an interface with two implementations, both addressed by URI.

``LocalArtifactStore`` keeps them on this machine's disk (``file://`` URIs); ``ObjectArtifactStore`` in any
fsspec object store (``s3://``, ``gs://``, ...), so a trainer on another machine reads and writes the
same URIs. Credentials come from the environment only (see :mod:`tuneline.storage`).
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg
from pydantic import Field

from tuneline import storage


class ArtifactStore(dg.ConfigurableResource):
    """Gives each (stage, Dagster run) its own URI; stages return references to what they wrote."""

    def root_uri(self) -> str:
        raise NotImplementedError("use a concrete ArtifactStore such as LocalArtifactStore")

    def stage_uri(self, stage: str, run_id: str) -> str:
        """The URI a stage of one run writes under."""
        return storage.join(self.root_uri(), stage, run_id)

    def shared_uri(self, name: str) -> str:
        """A location shared across runs (caches keyed by content hash)."""
        return storage.join(self.root_uri(), "_shared", name)

    def local_shared_dir(self, name: str) -> Path:
        """A folder on this machine shared across runs (a SQLite file needs one): under the store when it is
        local, else under the state folder."""
        from tuneline.paths import state_dir

        uri = self.shared_uri(name)
        path = storage.local_path(uri) if storage.is_local(uri) else state_dir() / "shared" / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def workspace(self, stage: str, run_id: str) -> storage.Workspace:
        """A local folder for the stage's files, uploaded to :meth:`stage_uri` by ``sync()`` when remote."""
        return storage.Workspace(self.stage_uri(stage, run_id))


class LocalArtifactStore(ArtifactStore):
    """Folders on this machine's disk (by default under .tuneline/artifacts)."""

    root: str = Field(description="Root folder for stage outputs.")

    def root_uri(self) -> str:
        return Path(self.root).expanduser().resolve().as_uri()


class ObjectArtifactStore(ArtifactStore):
    """An object store (or any fsspec filesystem) addressed by URI, e.g. ``s3://bucket/tuneline``.

    Credentials and the endpoint come from environment variables (``AWS_ACCESS_KEY_ID``,
    ``AWS_SECRET_ACCESS_KEY``, ``TUNELINE_S3_ENDPOINT_URL``), never from this config.
    """

    uri: str = Field(description="Root URI, e.g. s3://bucket/prefix (no credentials in it).")

    def root_uri(self) -> str:
        if storage.redact(self.uri) != self.uri:
            raise ValueError("the artifact root URI must not hold credentials: set them in the environment")
        return self.uri.rstrip("/")
