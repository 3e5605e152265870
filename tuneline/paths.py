"""Where tuneline keeps state: ``$TUNELINE_HOME``, by default ``.tuneline/`` in the working directory."""

from __future__ import annotations

import os
from pathlib import Path


def state_dir() -> Path:
    return Path(os.environ.get("TUNELINE_HOME", Path.cwd() / ".tuneline")).resolve()


def project_root() -> Path:
    """The checkout (recipes' relative paths resolve against it)."""
    return Path(__file__).resolve().parents[1]


def resolve(path: str | Path, base: Path | None = None) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else (base or project_root()) / p
