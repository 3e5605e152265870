"""Start recipe CLIs without paying their imports each time: children forked from a server that imported them once.

A trainer process spends about 5 s (2-core CPU) importing torch, transformers' Trainer, PEFT, TRL and MLflow
before its first step, which is most of a short stage's time. Here every single-process job on this machine is
forked from one *forkserver* (``multiprocessing``'s, started on first use, or ahead of it by :func:`warm`) that
has already imported :data:`PRELOAD`; the child then runs ``python -m MODULE ARGS`` as :mod:`runpy` would, with the
job's environment, working directory and thread count. Nothing else changes: the child is its own process (its own
exit code, ``PR_SET_PDEATHSIG`` chain through the server, killed with the launcher), and the server starts before any
CUDA or OpenMP work, so the fork is safe.

Libraries read some environment variables once, when imported (``HF_HUB_OFFLINE``, ``HF_HOME``, ...): the server
imports them with this process's environment. A job whose environment differs from it (apart from
:data:`MAY_DIFFER`, which the child applies itself and no library reads at import) is therefore not forked:
:func:`compatible` says so and the caller starts a plain interpreter, exactly as before. When this process's own
environment has changed since the server started (a test's ``monkeypatch``), the server is restarted once no job
forked from it runs any more.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any, Mapping, Optional, Sequence

PRELOAD = (
    "torch",
    "transformers",
    "transformers.trainer",
    "transformers.models.llama.modeling_llama",
    "peft",
    "trl",
    "mlflow",
    "optuna",
    "safetensors.torch",
    "tuneline.recipes._runner",
    "tuneline.recipes._preload_deepspeed",  # DeepSpeed, with a torch build that has no GPU only (see there)
)
# may differ between this process and a forked job: the child applies them (torch's thread count, the Pipes
# bootstrap variables, new for every job, and sys.path), or libraries of this process set them as it runs and
# no preloaded import reads them (torch inductor's cache directory, read when compiling; sklearn's and joblib's
# settings for Intel's OpenMP runtime, which torch's wheel does not use)
MAY_DIFFER = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "PYTHONPATH", "PYTEST_CURRENT_TEST", "TORCHINDUCTOR_CACHE_DIR",
              "KMP_DUPLICATE_LIB_OK", "KMP_INIT_AT_FORK")
MAY_DIFFER_PREFIXES = ("DAGSTER_PIPES_",)
DISABLE_ENV = "TUNELINE_PRELOAD"  # "0": always start a fresh interpreter

_server_env: Optional[dict[str, str]] = None  # the environment the running server started with (filtered)
_children: list[Any] = []  # the jobs forked from it
_lock = threading.Lock()  # launches may come from several threads (an HPO step's workers)


def _relevant(env: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k not in MAY_DIFFER and not k.startswith(MAY_DIFFER_PREFIXES)}


def _busy() -> bool:
    _children[:] = [p for p in _children if p.is_alive()]
    return bool(_children)


def available() -> bool:
    """Linux with the forkserver start method, and not switched off (``TUNELINE_PRELOAD=0``)."""
    import multiprocessing

    return (sys.platform.startswith("linux") and os.environ.get(DISABLE_ENV, "1") != "0"
            and "forkserver" in multiprocessing.get_all_start_methods())


def compatible(env: Mapping[str, str]) -> bool:
    """Whether a job with environment ``env`` may be forked: ``env`` is this process's environment outside
    :data:`MAY_DIFFER` (the server imports with that), and a server started with another one can be replaced."""
    current = _relevant(os.environ)
    return (available() and _relevant(env) == current
            and (_server_env is None or _server_env == current or not _busy()))


def start(module: str, argv: Sequence[str], env: Mapping[str, str], cwd: str) -> Any:
    """Fork ``python -m module *argv`` from the server; returns the started ``multiprocessing`` process
    (``pid``, ``join``, ``exitcode``, ``terminate``). The caller checks :func:`compatible` first."""
    global _server_env
    import multiprocessing
    from multiprocessing import forkserver

    with _lock:
        ctx = multiprocessing.get_context("forkserver")
        current = _relevant(os.environ)
        if _server_env is not None and _server_env != current:  # started with another environment: replace it
            if _busy():  # another thread forked a job between this caller's compatible() and now
                raise RuntimeError("the preloaded server cannot restart while a job forked from it runs; "
                                   "launch without it (TUNELINE_PRELOAD=0) or retry")
            changed = sorted(k for k in set(_server_env) | set(current) if _server_env.get(k) != current.get(k))
            print(f"tuneline: the preloaded server restarts: the environment changed ({', '.join(changed)})",
                  file=sys.stderr, flush=True)
            forkserver._forkserver._stop()
            _server_env = None
        if _server_env is None:
            _start_server()
        paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        proc = ctx.Process(target=_run_module, args=(module, list(argv), dict(env), cwd, paths),
                           name=f"tuneline:{module}")
        proc.start()
        _children.append(proc)
        return proc


def warm() -> bool:
    """Start the server now, if none runs, rather than at the first :func:`start`: it imports :data:`PRELOAD` in
    its own process (about 12 s on a 2-core CPU) while this one goes on with its own set-up (a stage's MLflow run),
    and the first job forks from it as soon as it is ready. Call it with the environment jobs will be launched
    with (a server started with another one is replaced by :func:`start`, as always). Returns whether it
    started one."""
    if not available():
        return False
    with _lock:
        if _server_env is not None:
            return False
        _start_server()
    return True


def _start_server() -> None:
    """Start the server with this process's environment (the caller holds ``_lock``); returns at once: the server
    imports :data:`PRELOAD` before it accepts the first job."""
    global _server_env
    import multiprocessing
    from multiprocessing import forkserver

    multiprocessing.get_context("forkserver").set_forkserver_preload(list(PRELOAD))
    forkserver.ensure_running()
    _server_env = _relevant(os.environ)


def serve_from_here() -> bool:
    """Make this process, a job that launches jobs (an HPO worker), the server for the jobs it launches, by forking
    it rather than starting a fresh interpreter that imports :data:`PRELOAD` again (about 7 s on a 2-core CPU,
    paid by the search's first trial). Only where that is the same thing: every module of :data:`PRELOAD` is
    already imported here (this job was itself forked from a server), no other thread runs (forking copies
    no thread, and a lock another thread held would stay held in every child), and multiprocessing's server
    loop takes no authentication key (newer Pythons' does: there the usual server starts). The server is
    ``multiprocessing.forkserver``'s own loop in the forked copy; it exits when this process does (its "alive"
    pipe closes), and its jobs with it (``PR_SET_PDEATHSIG``). Returns whether it started; call it before any
    thread starts."""
    global _server_env
    import inspect
    import socket
    from multiprocessing import connection, forkserver, resource_tracker

    server = forkserver._forkserver
    if (not available() or threading.active_count() > 1 or not all(m in sys.modules for m in PRELOAD)
            or "authkey_r" in inspect.signature(forkserver.main).parameters):
        return False
    with _lock:
        if server._forkserver_pid is not None:
            return False
        resource_tracker.ensure_running()  # before the fork: the server's jobs share this process's tracker
        listener = socket.socket(socket.AF_UNIX)
        address = connection.arbitrary_address("AF_UNIX")
        listener.bind(address)
        os.chmod(address, 0o600)
        listener.listen()
        alive_r, alive_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the server; never returns
            code = 1
            try:
                os.close(alive_w)
                forkserver.main(listener.fileno(), alive_r, None)
            except SystemExit as exc:  # the alive pipe closed: this process's launcher is gone
                code = exc.code if isinstance(exc.code, int) else 0
            finally:
                os._exit(code)
        os.close(alive_r)
        listener.close()
        server._forkserver_address, server._forkserver_alive_fd, server._forkserver_pid = address, alive_w, pid
        _server_env = _relevant(os.environ)
    return True


def _run_module(module: str, argv: list[str], env: dict[str, str], cwd: str, paths: list[str]) -> None:
    """In the forked child: become ``python -m module *argv`` with ``env`` in ``cwd``."""
    import atexit
    import runpy
    from multiprocessing import forkserver

    # multiprocessing hands every child the write end of the server's "alive" pipe (so a child could start
    # processes through the same server); holding it keeps the server alive after the launching process dies,
    # and this job with it. Closed, the server exits with its launcher, and the job (PR_SET_PDEATHSIG, set by
    # every recipe CLI) with the server. A job that starts processes itself gets a server of its own.
    server = forkserver._forkserver
    if getattr(server, "_forkserver_alive_fd", None) is not None:
        os.close(server._forkserver_alive_fd)
    server._forkserver_alive_fd = server._forkserver_address = server._forkserver_pid = None
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    for path in reversed(paths):
        if path not in sys.path:
            sys.path.insert(0, path)
    threads = env.get("OMP_NUM_THREADS")
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    sys.argv = [module, *argv]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    finally:  # as an interpreter's exit would (multiprocessing ends the child with os._exit, skipping atexit)
        atexit._run_exitfuncs()


def run(module: str, argv: Sequence[str], env: Mapping[str, str], cwd: str) -> int:
    """:func:`start`, wait, return the exit code (a signal's negative number, as ``subprocess`` reports it); the
    child is terminated if waiting is interrupted."""
    proc = start(module, argv, env, cwd)
    try:
        proc.join()
    except BaseException:
        proc.terminate()
        proc.join(20)
        raise
    return int(proc.exitcode)
