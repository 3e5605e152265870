from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg

ROOT = Path(__file__).resolve().parents[2]


def test_definitions_load_with_every_asset_and_check() -> None:
    from pipelines.definitions import defs

    repo = defs.get_repository_def()
    keys = {k.to_user_string() for k in repo.asset_graph.get_all_asset_keys()}
    assert {"raw_dataset", "base_model", "prepared_dataset", "dataset_splits"} <= keys
    checks = {k.name for k in repo.asset_graph.asset_check_keys}
    assert {"prepared_dataset_passes_validation", "dataset_splits_have_no_leakage"} <= checks
    assert defs.get_job_def("prepare_data_job") is not None


def test_importing_definitions_stays_light() -> None:
    """No torch, transformers, peft, trl or great_expectations at import time (they cost seconds)."""
    code = (
        "import sys, pipelines.definitions;"
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'trl', 'great_expectations', 'mlflow')"
        " if m in sys.modules]; print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.stdout.strip() == "", f"heavy modules imported by the definitions: {out.stdout}"


def test_dagster_definitions_validate() -> None:
    exe = Path(sys.executable).parent / "dagster"
    out = subprocess.run([str(exe), "definitions", "validate", "-w", "workspace.yaml"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr


def test_resources_profiles(monkeypatch) -> None:
    import pytest

    from resources import build_resources
    from resources.io import RefIOManager
    from tuneline.settings import SettingsError

    local = build_resources("local")
    assert local["mlflow"].tracking_uri.startswith("sqlite:///")
    assert isinstance(local["io_manager"], RefIOManager) and local["io_manager"].root.startswith("file:///")
    monkeypatch.delenv("TUNELINE_MLFLOW_URI", raising=False)
    with pytest.raises(SettingsError, match="TUNELINE_MLFLOW_URI"):
        build_resources("production")
    with pytest.raises(SettingsError, match="TUNELINE_PROFILE='staging'"):
        build_resources("staging")
    assert isinstance(local["recipe"], dg.ConfigurableResource)
