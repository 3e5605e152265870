"""Shared fixtures. Real public samples live in ../shared/data (never copied into the project)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("TUNELINE_SHARED_DATA", ROOT.parent / "shared" / "data")).resolve()

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared real datasets; skip with a reason when absent, fail under TUNELINE_REQUIRE_SHARED=1."""
    if not (SHARED_DATA / "MANIFEST.json").is_file():
        reason = f"shared datasets not found at {SHARED_DATA} (set TUNELINE_SHARED_DATA to point at them)"
        if os.environ.get("TUNELINE_REQUIRE_SHARED") == "1":
            pytest.fail(reason + "; TUNELINE_REQUIRE_SHARED=1 requires them")
        pytest.skip(reason)
    return SHARED_DATA


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "state"
    monkeypatch.setenv("TUNELINE_HOME", str(home))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///" + str(home / "mlflow.db"))
    home.mkdir()
    return home
