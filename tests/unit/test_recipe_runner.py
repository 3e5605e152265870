"""The recipe CLIs' shared runner: a spec from an environment variable (how a pod gets it), and the rank-0 rule
for logging (other ranks neither print nor open MLflow)."""

from __future__ import annotations

import json

import pytest

from tuneline.recipes import _runner


def test_spec_from_an_environment_variable(monkeypatch: pytest.MonkeyPatch, tmp_path, capsys) -> None:
    from tuneline.specs import SftSpec

    spec = {"out_uri": tmp_path.as_uri(), "seed": 0, "error_file": str(tmp_path / "error.txt"),
            "base": {"uri": "s3://b/base", "sha256": "0", "kind": "full", "method": "tiny", "stage": "base_model"},
            "train_uri": "s3://b/t", "val_uri": "s3://b/v", "params": {"method": "full", "lr": 1}}
    monkeypatch.setenv("TUNELINE_SPEC", json.dumps(spec))
    assert json.loads(_runner.spec_text("env:TUNELINE_SPEC")) == spec
    # a spec that does not load as its type: the traceback still reaches the error file the launcher reads
    assert _runner.run_cli(["--spec", "env:TUNELINE_SPEC"], spec_class=SftSpec, run=lambda s, p: None) == 1
    assert "unknown key params.lr" in (tmp_path / "error.txt").read_text()
    monkeypatch.delenv("TUNELINE_SPEC")
    with pytest.raises(ValueError, match="TUNELINE_SPEC is not set"):
        _runner.spec_text("env:TUNELINE_SPEC")


def test_only_rank_zero_logs(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from tuneline.specs import MlflowTarget

    bogus = MlflowTarget(tracking_uri="http://127.0.0.1:9/none", run_id="nope")  # rank 0 would fail to reach it
    monkeypatch.setenv("RANK", "1")
    other = _runner.StepLogger(None, bogus)
    other(1, {"loss": 1.0})
    other.emit("hello")
    other.summary(1, {"x": 1.0})
    assert other.sink is None and capsys.readouterr().out == ""
    monkeypatch.setenv("RANK", "0")
    _runner.StepLogger(None, None)(1, {"loss": 1.0})
    assert '"loss": 1.0' in capsys.readouterr().out
