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


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")
def test_a_trainer_dies_with_the_process_that_launched_it(tmp_path) -> None:
    """Kill the launcher with SIGKILL (as a killed `tuneline run` or Dagster step is): its trainer goes too, so no
    orphan keeps training beside the retry."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    trainer = ("from tuneline.recipes._runner import die_with_parent; die_with_parent(); "
               "import time; time.sleep(120)")
    launcher = (f"import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', {trainer!r}]); "
                "print(p.pid, flush=True); time.sleep(120)")
    parent = subprocess.Popen([sys.executable, "-c", launcher], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(root)})
    child = int(parent.stdout.readline())
    time.sleep(1.0)  # the child is past its prctl call
    os.kill(child, 0)  # alive while its launcher is
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
        try:  # reap it if it became ours (it was re-parented to init, which reaps it)
            os.waitpid(child, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.1)
    os.kill(child, signal.SIGKILL)
    pytest.fail("the trainer outlived its launcher")


def test_run_cli_asks_to_die_with_its_launcher(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    from tuneline.specs import PretrainSpec

    calls = []
    monkeypatch.setattr(_runner, "die_with_parent", lambda: calls.append(True))
    assert _runner.run_cli(["--spec", str(tmp_path / "missing.json")], spec_class=PretrainSpec,
                           run=lambda spec, pipes: None) == 1
    assert calls == [True]
