"""Jobs forked from the preloaded server behave as ``python -m MODULE ARGS`` in a fresh interpreter would."""

from __future__ import annotations

import json
import os
import sys
import textwrap

import pytest

from tuneline.recipes import _preload

pytestmark = pytest.mark.skipif(not _preload.available(), reason="needs Linux with the forkserver start method")

PROBE = textwrap.dedent('''
    import json, os, sys
    import torch
    out = {"argv": sys.argv[1:], "cwd": os.getcwd(), "threads": torch.get_num_threads(),
           "marker": os.environ.get("PROBE_MARKER"), "pipes": os.environ.get("DAGSTER_PIPES_CONTEXT"),
           "main": __name__, "torch_preloaded": "transformers.trainer" in sys.modules}
    open(sys.argv[1], "w").write(json.dumps(out))
    if sys.argv[2] == "raise":
        raise RuntimeError("probe failed on purpose")
    sys.exit(int(sys.argv[2]))
''')


@pytest.fixture()
def probe(tmp_path):
    (tmp_path / "preload_probe_mod.py").write_text(PROBE)
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "OMP_NUM_THREADS": "1", "DAGSTER_PIPES_CONTEXT": "ctx"}
    return tmp_path, env


def test_a_forked_job_gets_its_argv_environment_cwd_threads_and_exit_code(probe, monkeypatch):
    tmp_path, env = probe
    work = tmp_path / "work"
    work.mkdir()
    assert _preload.compatible(env)  # threads, Pipes variables and PYTHONPATH are the child's own
    # a variable the server did not start with: not forked (libraries read some at import)
    assert not _preload.compatible({**env, "PROBE_MARKER": "m"})
    code = _preload.run("preload_probe_mod", [str(tmp_path / "out.json"), "3"], env, str(work))
    out = json.loads((tmp_path / "out.json").read_text())
    assert code == 3
    assert out == {"argv": [str(tmp_path / "out.json"), "3"], "cwd": str(work), "threads": 1, "marker": None,
                   "pipes": "ctx", "main": "__main__", "torch_preloaded": True}
    assert os.getcwd() != str(work) and sys.argv[1:2] != [str(tmp_path / "out.json")]  # the caller is untouched
    # this process's environment changed (as a test's monkeypatch does): the idle server is replaced by one that
    # imported with the new environment
    monkeypatch.setenv("PROBE_MARKER", "m")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    assert _preload.compatible(env)
    assert _preload.run("preload_probe_mod", [str(tmp_path / "out.json"), "0"], env, str(work)) == 0
    assert json.loads((tmp_path / "out.json").read_text())["marker"] == "m"


def test_an_exception_in_a_forked_job_is_a_nonzero_exit(probe):
    tmp_path, env = probe
    assert _preload.run("preload_probe_mod", [str(tmp_path / "out.json"), "raise"], env, str(tmp_path)) == 1
    assert json.loads((tmp_path / "out.json").read_text())["main"] == "__main__"


def test_a_forked_job_has_deepspeed_from_the_server_only_with_a_torch_without_gpu(tmp_path):
    """Every Trainer imports DeepSpeed when it is installed; the server imports it for the jobs, but only where
    that cannot start a GPU driver before the fork (a torch build without CUDA or ROCm)."""
    import importlib.util

    import torch

    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("DeepSpeed is not installed: nothing for the server to import")
    (tmp_path / "preload_ds_probe.py").write_text(
        "import sys\nopen(sys.argv[1], 'w').write(str('deepspeed' in sys.modules))\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    assert _preload.run("preload_ds_probe", [str(tmp_path / "out.txt")], env, str(tmp_path)) == 0
    without_gpu = torch.version.cuda is None and getattr(torch.version, "hip", None) is None
    assert (tmp_path / "out.txt").read_text() == str(without_gpu)


def test_an_environment_the_libraries_read_at_import_is_not_forked(monkeypatch):
    base = dict(os.environ)
    assert _preload.compatible({**base, "OMP_NUM_THREADS": "7", "DAGSTER_PIPES_MESSAGES": "x"})
    assert not _preload.compatible({**base, "HF_HUB_OFFLINE": "0" if base.get("HF_HUB_OFFLINE") == "1" else "1"})
    monkeypatch.setenv(_preload.DISABLE_ENV, "0")
    assert not _preload.compatible(base)


SLEEPER = textwrap.dedent('''
    import os, sys, time
    from tuneline.recipes._runner import die_with_parent
    die_with_parent()  # as every recipe CLI does (run_cli)
    open(sys.argv[1], "w").write(str(os.getpid()))
    time.sleep(300)
''')
LAUNCH = ("import os, sys; from tuneline.recipes import _preload; env = {**os.environ, 'PYTHONPATH': sys.argv[1]}; "
          "_preload.run('preload_sleeper_mod', [sys.argv[2]], env, sys.argv[1])")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not open(f"/proc/{pid}/stat").read().split()[2] == "Z"


def test_a_forked_job_dies_with_the_process_that_launched_it(tmp_path):
    """kill -9 of the launcher (a Dagster run) takes its server and the job down: no orphan trainer."""
    import subprocess
    import time

    (tmp_path / "preload_sleeper_mod.py").write_text(SLEEPER)
    pid_file = tmp_path / "pid"
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCH, str(tmp_path), str(pid_file)])
    deadline = time.monotonic() + 120
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline and launcher.poll() is None, "the job never started"
        time.sleep(0.2)
    job = int(pid_file.read_text())
    assert _alive(job)
    launcher.kill()
    launcher.wait()
    deadline = time.monotonic() + 30
    while _alive(job) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(job), f"the forked job {job} outlived its launcher"


def test_the_launcher_forks_single_process_jobs_of_this_interpreter_only(tmp_path):
    from resources.launcher import PipesSubprocessLauncher
    from tuneline.params import ComputeParams

    spec = type("S", (), {"compute": ComputeParams(), "module": "tuneline.recipes.sft"})()
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    launcher = PipesSubprocessLauncher()
    one, two = (launcher.command(spec, tmp_path / "spec.json", n) for n in (1, 2))
    assert launcher.forks(spec, one, env)
    assert not launcher.forks(spec, two, env)  # torchrun starts its own ranks
    assert not PipesSubprocessLauncher(preload=False).forks(spec, one, env)
    other = PipesSubprocessLauncher(python="/usr/bin/python3")
    assert not other.forks(spec, other.command(spec, tmp_path / "spec.json", 1), env)
    assert not launcher.forks(spec, one, {**env, "HF_HOME": str(tmp_path / "elsewhere")})


OUTER = textwrap.dedent('''
    import json, os, sys, time
    from tuneline.recipes import _preload
    if __name__ == "__main__":  # as a recipe CLI: a fresh server imports this module again as __mp_main__
        _preload.served_by = os.getpid()  # only a copy of this process has it
        served = _preload.serve_from_here()
        env = {**os.environ, "PYTHONPATH": sys.argv[1]}
        job = _preload.start("preload_inner_mod", [sys.argv[2]], env, sys.argv[1])
        open(sys.argv[3], "w").write(json.dumps({"served": served, "job": job.pid}))
        time.sleep(300)
''')
INNER = textwrap.dedent('''
    import json, os, sys, time
    from tuneline.recipes import _preload, _runner
    _runner.die_with_parent()
    open(sys.argv[1], "w").write(json.dumps({"pid": os.getpid(), "served_by": getattr(_preload, "served_by", None)}))
    time.sleep(300)
''')


def test_a_job_that_launches_jobs_forks_them_from_its_own_imports_and_takes_them_down_when_killed(tmp_path):
    """An HPO worker's trials fork from a copy of the worker (no second interpreter importing torch), and a
    kill -9 of the worker still takes its trial down."""
    import signal
    import time

    (tmp_path / "preload_outer_mod.py").write_text(OUTER)
    (tmp_path / "preload_inner_mod.py").write_text(INNER)
    inner, outer = tmp_path / "inner.json", tmp_path / "outer.json"
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    worker = _preload.start("preload_outer_mod", [str(tmp_path), str(inner), str(outer)], env, str(tmp_path))
    deadline = time.monotonic() + 120
    while not (inner.exists() and outer.exists() and inner.read_text() and outer.read_text()):
        assert time.monotonic() < deadline and worker.is_alive(), "the nested job never started"
        time.sleep(0.2)
    launched, job = json.loads(outer.read_text()), json.loads(inner.read_text())
    assert launched == {"served": True, "job": job["pid"]}
    assert job["served_by"] == worker.pid  # forked from the worker's copy, not from a fresh interpreter
    os.kill(worker.pid, signal.SIGKILL)
    worker.join(30)
    deadline = time.monotonic() + 30
    while _alive(job["pid"]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(job["pid"]), f"the nested job {job['pid']} outlived the worker that launched it"


def test_a_job_that_did_not_preload_does_not_serve_from_itself():
    # a fresh interpreter has imported no trainer library: nothing to fork from (start() then starts the usual server)
    code = ("import sys; from tuneline.recipes import _preload; "
            "sys.exit(0 if _preload.serve_from_here() is False else 1)")
    import subprocess

    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


WARM = textwrap.dedent('''
    import os, sys
    from multiprocessing import forkserver
    from resources.launcher import PipesSubprocessLauncher
    from tuneline.params import ComputeParams
    from tuneline.recipes import _preload

    spec = type("S", (), {"compute": ComputeParams(), "module": "platform"})()
    PipesSubprocessLauncher(preload=False).prepare(spec)
    PipesSubprocessLauncher().prepare(spec, num_processes=2)  # torchrun: its ranks are fresh interpreters
    PipesSubprocessLauncher().prepare(type("S", (), {"compute": ComputeParams(engine="fsdp"), "module": "platform"})())
    assert forkserver._forkserver._forkserver_pid is None, "started a server no job of these would fork from"
    PipesSubprocessLauncher().prepare(spec)
    server = forkserver._forkserver._forkserver_pid
    assert server is not None and _preload.warm() is False  # one server, started once
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path[1:])}
    assert _preload.run("platform", [], env, os.getcwd()) == 0
    assert forkserver._forkserver._forkserver_pid == server  # the job forked from it: not restarted
''')


def test_the_launcher_starts_the_server_before_the_first_launch_only_for_jobs_that_fork_from_it():
    """``prepare`` (called before a stage's MLflow set-up) starts the preloaded server so that its imports overlap
    that set-up; the job then forks from that same server."""
    import subprocess

    from tuneline.paths import project_root

    done = subprocess.run([sys.executable, "-c", WARM], cwd=str(project_root()), timeout=180,
                          env={**os.environ, "PYTHONPATH": str(project_root())}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


WARM_RUN = textwrap.dedent('''
    import dataclasses
    from multiprocessing import forkserver
    from resources.launcher import PipesSubprocessLauncher
    from tuneline.params import ComputeParams, load_recipe

    recipe = load_recipe("configs/demo.yaml")
    PipesSubprocessLauncher(preload=False).prepare_run(recipe)
    PipesSubprocessLauncher().prepare_run(dataclasses.replace(recipe, compute=ComputeParams(engine="fsdp")))
    assert forkserver._forkserver._forkserver_pid is None, "started a server no job of these would fork from"
    PipesSubprocessLauncher().prepare_run(recipe)
    assert forkserver._forkserver._forkserver_pid is not None
''')


def test_a_whole_run_starts_the_server_before_dagster_starts_it_when_its_jobs_fork_from_it():
    """``tuneline run`` calls ``prepare_run`` before the first step: the server's imports then overlap Dagster's
    start of the run too; not when preloading is off or the recipe's jobs run under accelerate (FSDP)."""
    import subprocess

    from tuneline.paths import project_root

    done = subprocess.run([sys.executable, "-c", WARM_RUN], cwd=str(project_root()), timeout=180,
                          env={**os.environ, "PYTHONPATH": str(project_root())}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
