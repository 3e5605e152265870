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


def test_run_summary_leaves_out_the_stages_the_recipe_turned_off() -> None:
    """A stage turned off passes its input on: the summary must not read the SFT model's figures as its own
    (make run with sft.method: adapter ended with KeyError 'steps' after every step had succeeded)."""
    from pipelines.cli import summary_figures
    from tuneline.refs import ModelRef

    sft = ModelRef(uri="file:///x", sha256="0" * 64, kind="full", method="full", stage="sft_adapter",
                   metrics={"method": "full", "global_step": 5, "best_step": 5, "stopped_early": False,
                            "best_val_loss": 1.0, "tokens_per_second": 10.0})
    outputs = {"sft_adapter": sft, "dpo_adapter": sft, "reward_model": sft, "rl_policy": sft, "distilled_student": sft}
    assert list(summary_figures(outputs.get)) == ["sft_adapter"]
    assert summary_figures(outputs.get)["sft_adapter"] == ["full: 5 steps (best 5, stopped early False), best val "
                                                          "loss 1.0000, 10 real tok/s"]
