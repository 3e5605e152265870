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


def test_under_pipes_training_step_lines_are_thinned_and_every_other_line_goes_through() -> None:
    """Each Pipes line is an event the Dagster process writes: step lines go for step 1 and every 10th step;
    evaluations and summaries always; MLflow gets every step."""
    sent: list[str] = []
    pipes = type("P", (), {"log": type("L", (), {"info": staticmethod(sent.append)})()})()
    logger = _runner.StepLogger(pipes, None)
    logged: list[int] = []
    logger.sink = lambda step, metrics: logged.append(step)
    for step in range(1, 26):
        logger(step, {"loss": 1.0 / step, "learning_rate": 1e-3})
        if step == 20:
            logger(step, {"eval_loss": 0.5})
    logger(25, {"train_runtime": 3.0, "train_loss": 0.2})
    steps = [(json.loads(m)["step"], "eval_loss" in m) for m in sent]
    assert steps == [(1, False), (10, False), (20, False), (20, True), (25, False)]
    assert logged == [*range(1, 21), 20, *range(21, 26), 25]
    unthrottled: list[str] = []
    stdout = _runner.StepLogger(None, None)
    stdout.emit = unthrottled.append
    for step in range(1, 4):
        stdout(step, {"loss": 1.0})
    assert len(unthrottled) == 3  # stdout (a trial's, a standalone run's) keeps every step
