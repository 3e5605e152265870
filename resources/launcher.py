"""How training jobs run: out of process, through Dagster Pipes.

Every training job (pretraining, a search worker, SFT, DPO, distillation, evaluation) is a recipe CLI under
``tuneline/recipes/`` that takes ``--spec SPEC`` (a typed :class:`tuneline.specs.Spec`). The launcher is an
interface: the subprocess implementation runs it on this machine (``torchrun`` when the job asks for several
processes), the Kubernetes one (``resources/k8s.py``) in a pod; either way the trainer writes its
:class:`~tuneline.specs.Outcome` to ``<out_uri>/result.json``, which the launcher reads back.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import dagster as dg
from pydantic import Field

from tuneline import storage
from tuneline.params import K8sParams, Recipe
from tuneline.paths import project_root, state_dir
from tuneline.recipes import _preload
from tuneline.recipes._runner import trainer_error
from tuneline.specs import RESULT_FILE, Outcome, Spec
from tuneline.train.distributed import launch_command


@dataclass
class LaunchResult:
    """What a finished job left: its outcome and anything it reported over Pipes."""

    outcome: Outcome
    reported_metadata: dict[str, Any] = field(default_factory=dict)


class TrainingFailed(dg.Failure):
    pass


class TrainingLauncher(dg.ConfigurableResource):
    """Runs a recipe CLI with a spec and returns its outcome."""

    def launch(self, context: dg.AssetExecutionContext, spec: Spec, *, num_processes: int = 1,
               k8s: Optional[K8sParams] = None) -> LaunchResult:
        """Run ``spec`` as ``num_processes`` ranks; ``k8s`` is the recipe's pod placement (used by launchers
        that start pods)."""
        raise NotImplementedError("use a concrete TrainingLauncher such as PipesSubprocessLauncher")

    def prepare(self, spec: Spec, *, num_processes: int = 1) -> None:
        """Start in the background what launching ``spec`` will need, so that it overlaps the caller's own set-up
        before :meth:`launch`. Nothing here; the subprocess launcher starts its preloaded server."""

    def prepare_run(self, recipe: Recipe) -> None:
        """Like :meth:`prepare`, once for a whole run of ``recipe``, before Dagster starts it (``tuneline run``)."""


def read_outcome(spec: Spec) -> Outcome:
    uri = storage.join(spec.out_uri, RESULT_FILE)
    if not storage.exists(uri):
        raise TrainingFailed(description=f"{spec.module} exited without writing {storage.redact(uri)}")
    return Outcome.load(uri)


class PipesSubprocessLauncher(TrainingLauncher):
    """A child Python process on this machine, talking Dagster Pipes (logs, metrics, metadata)."""

    python: str = Field(default_factory=lambda: sys.executable, description="Interpreter for the child.")
    env: dict[str, str] = Field(default_factory=dict, description="Extra environment for the child.")
    preload: bool = Field(
        default=True,
        description="Fork single-process jobs from a server that has already imported torch, transformers, PEFT, "
                    "TRL and MLflow (tuneline/recipes/_preload.py), saving each job those imports; off, or a job "
                    "under torchrun/accelerate or with another environment, starts a fresh interpreter.",
    )

    def command(self, spec: Spec, spec_path: Path, num_processes: int) -> list[str]:
        """``python -m module --spec SPEC``; under torchrun (gloo on CPU, NCCL on GPU) for several processes, or
        ``accelerate launch`` with the rendered config (beside the spec) when the recipe's engine is FSDP."""
        config = None
        if self.uses_accelerate(spec):
            from tuneline.train.engines import accelerate_config, write_accelerate_config

            bf16 = getattr(getattr(spec, "params", None), "bf16", None) is not False
            config = str(write_accelerate_config(accelerate_config(spec.compute, num_processes=num_processes,
                                                                   bf16=bf16, offload=getattr(spec, "offload", None)),
                                                 spec_path.parent))
        return launch_command(self.python, spec.module, ["--spec", str(spec_path)], num_processes, config)

    @staticmethod
    def uses_accelerate(spec: Spec) -> bool:
        """Whether ``spec`` runs under ``accelerate launch`` with a rendered config (the FSDP engine)."""
        return spec.compute.engine == "fsdp"

    def forks(self, spec: Spec, cmd: list[str], env: dict[str, str]) -> bool:
        """Whether ``cmd`` runs forked from the preloaded server: one process of this interpreter (``cmd`` starts
        with ``sys.executable -m spec.module``: not torchrun or accelerate, and ``self.python`` is this interpreter)
        with an environment the server's imports saw."""
        return self.preload and cmd[:3] == [sys.executable, "-m", spec.module] and _preload.compatible(env)

    def job_env(self) -> dict[str, str]:
        """The environment every job gets: this process's, the configured extras, the project on PYTHONPATH."""
        return {**os.environ, **self.env, "PYTHONPATH": str(project_root())}

    def prepare(self, spec: Spec, *, num_processes: int = 1) -> None:
        """Start the preloaded server now when ``spec`` will fork from it (one process, no FSDP config): its imports
        run beside the stage's MLflow set-up instead of after it (the first stage of a run: about 6 s of the
        demo's ``base_model``)."""
        if not self.uses_accelerate(spec) and self.forks(
                spec, launch_command(self.python, spec.module, [], num_processes), self.job_env()):
            _preload.warm()

    def prepare_run(self, recipe: Recipe) -> None:
        """Start the server with the run when a one-process job of ``recipe`` forks from it (the demo's first stage,
        ``base_model``), so that its imports also overlap Dagster's start of the run."""
        self.prepare(Spec(out_uri="", seed=recipe.seed, compute=recipe.compute))  # any module: one process here

    def launch(self, context: dg.AssetExecutionContext, spec: Spec, *, num_processes: int = 1,
               k8s: Optional[K8sParams] = None) -> LaunchResult:
        # the spec and the trainer's traceback live on this machine, beside nothing else of the stage
        launch_dir = state_dir() / "launch" / hashlib.sha256(spec.out_uri.encode()).hexdigest()[:16]
        launch_dir.mkdir(parents=True, exist_ok=True)
        error_file = launch_dir / "error.txt"
        spec = replace(spec, error_file=str(error_file))
        spec_path = launch_dir / "spec.json"
        spec.save(str(spec_path))
        error_file.unlink(missing_ok=True)
        result_uri = storage.join(spec.out_uri, RESULT_FILE)
        if storage.is_local(result_uri):
            storage.local_path(result_uri).unlink(missing_ok=True)
        env = self.job_env()
        cmd = self.command(spec, spec_path, num_processes)
        forked = self.forks(spec, cmd, env)
        context.log.info(f"launching {' '.join(cmd)}" + (" (forked from the preloaded server)" if forked else ""))
        try:
            if forked:
                invocation = run_forked(context, spec.module, cmd[3:], env)
            else:
                client = dg.PipesSubprocessClient(env=env, cwd=str(project_root()),
                                                  message_reader=WholeLineMessageReader())
                invocation = client.run(command=cmd, context=context)
        except Exception as exc:  # the trainer crashed, was killed, or reported an exception
            raise TrainingFailed(
                description=f"{spec.module} failed: {trainer_error(error_file) or exc}",
                metadata={"spec": dg.MetadataValue.path(str(spec_path))},
            ) from exc
        return LaunchResult(outcome=read_outcome(spec), reported_metadata=reported_metadata(invocation))


def run_forked(context: dg.AssetExecutionContext, module: str, argv: list[str], env: dict[str, str]) -> Any:
    """``PipesSubprocessClient.run`` with the process forked from the preloaded server
    (:mod:`tuneline.recipes._preload`): the same Pipes session (temp-file context and messages), exit-code check
    and termination forwarding."""
    with dg.open_pipes_session(context=context, context_injector=dg.PipesTempFileContextInjector(),
                               message_reader=WholeLineMessageReader()) as session:
        proc = _preload.start(module, argv, {**env, **session.get_bootstrap_env_vars()}, str(project_root()))
        try:
            proc.join()
        except dg.DagsterExecutionInterruptedError:
            context.log.info("[pipes] execution interrupted, sending SIGINT to the trainer.")
            os.kill(proc.pid, signal.SIGINT)
            proc.join(20)
            raise
        if proc.exitcode != 0:
            raise RuntimeError(f"External execution process failed with code {proc.exitcode}")
    return dg.PipesClientCompletedInvocation(session)


def whole_lines(path: str, should_stop: Callable[[], bool], poll: float = 0.01) -> Iterator[str]:
    """The complete lines of a file another process appends to, until ``should_stop()`` and nothing more to read.

    Dagster's own tail (``dagster._utils.tail_file``, 1.13) yields whatever ``readline`` returns, and a read that
    lands while the trainer is writing a message returns half a line: the reader thread then dies on a
    ``JSONDecodeError`` and every later message (step lines, reported metadata) is dropped (seen on 2026-12-02 in
    the demo's SFT near step 520). Here a partial line waits for the rest. After the stop is seen the file is read
    once more: a message written between the last empty read and the stop would otherwise be lost."""
    pending = ""
    stopping = False
    with open(path, encoding="utf-8") as stream:
        while True:
            chunk = stream.readline()
            if chunk:
                pending += chunk
                if pending.endswith("\n"):
                    yield pending
                    pending = ""
            elif stopping:
                break
            elif should_stop():
                stopping = True
            else:
                time.sleep(poll)
    if pending:
        raise ValueError(f"{path}: the last Pipes message has no end of line (the trainer stopped while writing it): "
                         f"{pending[:200]!r}")


class WholeLineFileMessageReader(dg.PipesFileMessageReader):
    """``PipesFileMessageReader`` that parses a message only once its whole line is in the file."""

    def _reader_thread(self, handler: Any, is_resource_complete: Any) -> None:  # dagster 1.13's one hook
        try:
            for line in whole_lines(self._path, is_resource_complete.is_set):
                handler.handle_message(json.loads(line))
        except BaseException:  # reported to the run, as Dagster's own reader does, then raised
            handler.report_pipes_framework_exception(f"{self.__class__.__name__} reader thread", sys.exc_info())
            raise


class WholeLineMessageReader(dg.PipesTempFileMessageReader):
    """``PipesTempFileMessageReader`` (a temporary file the trainer appends its messages to) read with
    :class:`WholeLineFileMessageReader`."""

    @contextmanager
    def read_messages(self, handler: Any) -> Iterator[Any]:
        with tempfile.TemporaryDirectory() as tempdir:
            reader = WholeLineFileMessageReader(os.path.join(tempdir, "messages"),
                                                include_stdio_in_messages=self._include_stdio_in_messages)
            with reader.read_messages(handler) as params:
                yield params


def reported_metadata(invocation: Any) -> dict[str, Any]:
    """Everything the trainer reported over Pipes (materialization metadata), merged."""
    reported: dict[str, Any] = {}
    for item in invocation.get_results():
        reported.update(getattr(item, "metadata", None) or {})
    return reported
