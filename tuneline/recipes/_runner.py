"""What every recipe CLI shares: the typed spec, log streaming (Dagster Pipes or stdout, plus MLflow),
the outcome written to ``<out_uri>/result.json``, materialization metadata and the ``main`` wrapper
(non-zero exit + traceback).

Only the light ``dagster_pipes`` package is used, and only inside :func:`run_cli`. Launched as several
ranks (``num_processes > 1``), only rank 0 opens Pipes and logs to MLflow; every recipe's ``run`` returns
right after training on the other ranks, so only rank 0 saves and writes ``result.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

from tuneline import storage
from tuneline.specs import RESULT_FILE, MlflowTarget, Outcome, Spec
from tuneline.train.distributed import is_main_process  # noqa: F401 - the recipes ask it through this module

SPEC_ENV_PREFIX = "env:"  # --spec env:NAME reads the spec JSON from that environment variable (a pod's)


def spec_text(path: str | Path) -> str:
    """The spec JSON: from a file, or from an environment variable for ``env:NAME`` (a pod on another machine
    cannot read the launching machine's disk, so the Kubernetes launcher hands the spec over this way)."""
    text = str(path)
    if text.startswith(SPEC_ENV_PREFIX):
        name = text[len(SPEC_ENV_PREFIX):]
        if name not in os.environ:
            raise ValueError(f"--spec {text}: the environment variable {name} is not set")
        return os.environ[name]
    return Path(path).read_text(encoding="utf-8")


def numeric(logs: dict[str, Any]) -> dict[str, float]:
    """The numbers of a trainer log (what metric stores accept); nested keys like ``rewards/margins`` kept."""
    return {k: float(v) for k, v in logs.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class MlflowSink:
    """Per-step metrics to an existing MLflow run (reopened by id), sent in batches by a background thread.

    Training never waits on the tracking server: metrics queue here and a sender thread ships them in order.
    When the server is down, the batch stays at the head of the queue and is retried with backoff (up to
    ``RETRY_MAX_S`` between tries) until the server answers again, so an outage loses nothing. :meth:`flush`
    waits until everything queued has been sent, for at most ``max_wait`` seconds, then raises
    :class:`TrackingUnavailable` naming the (redacted) URI. The run must exist when the sink is created (a
    dead server fails the trainer before any training).
    """

    RETRY_MAX_S = 10.0

    def __init__(self, target: MlflowTarget, flush_every: int = 50, max_wait: float = 300.0) -> None:
        import threading

        from tuneline.tracking import Tracker

        self.tracker = Tracker(target.tracking_uri)
        self.client = self.tracker.client()
        self.run_id = target.run_id
        self.tracker.require_run(self.run_id)  # fail now, not after training
        self.logged_until = self._logged_until()
        self.flush_every = flush_every
        self.max_wait = max_wait
        self.pending: list[Any] = []
        self.sent = 0
        self.failures = 0  # sends that failed and were retried (an outage shows here)
        self._cond = threading.Condition()
        self._in_flight = 0
        self._closed = False
        self._thread = threading.Thread(target=self._send_loop, name="mlflow-sink", daemon=True)
        self._thread.start()

    def _logged_until(self) -> dict[str, int]:
        """key -> the last step already in the run: a retried trainer that resumed from a checkpoint recomputes
        the steps between that checkpoint and the kill, and the curve must not show them twice."""
        keys = list(self.client.get_run(self.run_id).data.metrics)
        return {key: max((m.step for m in self.client.get_metric_history(self.run_id, key)), default=-1)
                for key in keys}

    def __call__(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        with self._cond:
            self.pending.extend(
                Metric(key=key, value=v, timestamp=now, step=int(step))
                for key, v in ((_mlflow_key(k), v) for k, v in metrics.items())
                if int(step) > self.logged_until.get(key, -1)
            )
            if len(self.pending) >= self.flush_every:
                self._cond.notify_all()

    def _send_loop(self) -> None:
        delay = 0.5
        while True:
            with self._cond:
                while not self.pending and not self._closed:
                    self._cond.wait(timeout=5.0)
                if not self.pending and self._closed:
                    return
                batch = self.pending[:1000]
                self._in_flight = len(batch)
            try:
                self.client.log_batch(self.run_id, metrics=batch)
            except Exception:  # noqa: BLE001 - the server is down or unreachable: keep the batch, retry later
                with self._cond:
                    self._in_flight = 0
                    self.failures += 1
                    self._cond.wait(timeout=delay)
                delay = min(self.RETRY_MAX_S, delay * 2)
                continue
            delay = 0.5
            with self._cond:
                del self.pending[: len(batch)]
                self._in_flight = 0
                self.sent += len(batch)
                self._cond.notify_all()

    def flush(self) -> None:
        """Wait until every queued metric was sent (at most ``max_wait`` seconds)."""
        from tuneline.tracking import TrackingUnavailable

        deadline = time.monotonic() + self.max_wait
        with self._cond:
            self._cond.notify_all()
            while self.pending or self._in_flight:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TrackingUnavailable(
                        f"MLflow at {storage.redact(self.tracker.tracking_uri)} took no metric for {self.max_wait:.0f} s:"
                        f" {len(self.pending)} metrics of run {self.run_id} could not be sent")
                self._cond.wait(timeout=min(1.0, left))

    def close(self) -> None:
        self.flush()
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=10)


def _mlflow_key(key: str) -> str:
    # MLflow keys allow letters, digits, '_', '-', '.', ' ', '/'; anything else becomes '_'
    return "".join(c if c.isalnum() or c in "_-. /" else "_" for c in key)


PIPES_EVERY = 10  # a training step's line goes to Dagster for step 1 and every 10th step (MLflow gets every step)


class StepLogger:
    """``on_log(step, logs)`` for the trainers: a JSON line to Pipes (or stdout) and the metrics to MLflow.

    Under Pipes, every line becomes an event the Dagster process writes to its event log (about 8 ms of a core
    each on a 2-core CPU, beside the trainer: 1,000 SFT steps' lines cost that stage 10 s of its 65); so a training
    step's line (one with ``loss``) goes there for step 1 and every :data:`PIPES_EVERY` steps, and every other
    line (evaluations, summaries) always. MLflow still receives every step, and stdout every line."""

    def __init__(self, pipes: Any = None, mlflow: Optional[MlflowTarget] = None, prefix: str = "") -> None:
        main = is_main_process()  # the other ranks' logs would repeat rank 0's (already averaged over ranks)
        self.emit: Callable[[str], None] = (
            pipes.log.info if pipes is not None else (lambda m: print(m, flush=True)) if main else (lambda m: None)
        )
        self.every = PIPES_EVERY if pipes is not None else 1
        self.sink = MlflowSink(mlflow) if mlflow and main else None
        self.prefix = prefix

    def __call__(self, step: int, logs: dict[str, Any]) -> None:
        metrics = numeric(logs)
        if "loss" not in logs or step == 1 or step % self.every == 0:
            self.emit(json.dumps({"step": step, **metrics}, sort_keys=True))
        if self.sink is not None:
            self.sink(step, {f"{self.prefix}{k}": v for k, v in metrics.items()})

    def summary(self, step: int, metrics: dict[str, Any]) -> None:
        """Final figures to MLflow (non-finite and None values skipped)."""
        if self.sink is not None:
            clean = {k: float(v) for k, v in metrics.items()
                     if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}
            self.sink(step, clean)
            self.sink.flush()

    def close(self) -> None:
        if self.sink is not None:
            self.sink.flush()

    def shutdown(self) -> None:
        """Flush and stop the sender thread (the process is about to exit)."""
        if self.sink is not None:
            self.sink.close()


def merge_workspace(cache_uri: Optional[str], sft: Any, sft_dir: Path,
                    work: storage.Workspace) -> tuple[storage.Workspace, bool]:
    """Where an adapter SFT model (``sft``, a ModelRef, fetched to ``sft_dir``) is merged to full weights: its
    entry in the shared cache (``cache_uri``/<content key>, one merge for DPO, the reward model and RL), else
    ``work``, the stage's own workspace (no cache, or nothing to merge); and whether a complete merge is already
    there (another stage's, or a retried run's)."""
    from tuneline.train.dpo import MERGE_MARKER, MERGED_SUBDIR, merge_cache_key

    key = merge_cache_key(sft_dir, sft.base.sha256 if sft.base is not None else "", sft.method) if cache_uri else None
    ws = storage.Workspace(storage.join(cache_uri, key)) if key else work
    return ws, (ws.path / MERGED_SUBDIR / MERGE_MARKER).is_file()


def share_merge(ws: storage.Workspace) -> str:
    """Upload a remote workspace's merge unless its URI holds a complete one already (marker last, so a reader
    never takes a half-uploaded merge for a finished one); returns the merge's URI."""
    from tuneline.train.dpo import MERGE_MARKER, MERGED_SUBDIR

    uri, folder = ws.uri_of(MERGED_SUBDIR), ws.path / MERGED_SUBDIR
    if ws.remote and (folder / MERGE_MARKER).is_file() and not storage.exists(storage.join(uri, MERGE_MARKER)):
        for file in sorted((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.name == MERGE_MARKER):
            storage.publish(file, storage.join(uri, file.relative_to(folder).as_posix()))
    return uri


def finish(spec: Spec, outcome: Outcome, pipes: Any = None, *, log: Optional[StepLogger] = None) -> Outcome:
    """Write the outcome to ``<out_uri>/result.json`` and, under Pipes, report it as the materialization."""
    uri = storage.join(spec.out_uri, RESULT_FILE)
    if log is not None:  # every metric reaches MLflow before the outcome says the stage is done
        log.summary(int(outcome.metrics.get("steps") or outcome.metrics.get("global_step") or 0), outcome.metrics)
        log.shutdown()
    outcome.save(uri)
    if pipes is not None:
        values = dict(outcome.metrics)
        if outcome.model is not None:
            values.update(model_uri=outcome.model.uri, model_sha256=outcome.model.sha256)
        pipes.report_asset_materialization(metadata=metadata(values), asset_key=spec.asset_key)
    return outcome


def metadata(values: dict[str, Any]) -> dict[str, Any]:
    """Materialization metadata: scalars as they are (None dropped, NaN/inf as text, URIs redacted)."""
    meta: dict[str, Any] = {}
    for key, value in values.items():
        if value is None or isinstance(value, (list, dict)):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            value = str(value)
        if isinstance(value, str):
            value = storage.redact(value)
        meta[key] = value
    return meta


def die_with_parent() -> None:
    """Linux: this process gets SIGKILL when the process that started it dies (``prctl(PR_SET_PDEATHSIG)``), so a
    killed ``tuneline run`` or Dagster step leaves no orphan trainer writing beside its retry. Elsewhere a no-op.
    Also usable as a ``preexec_fn`` (between fork and exec)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def run_cli(
    argv: Optional[list[str]],
    *,
    spec_class: type[Spec],
    run: Callable[[Any, Any], Any],
) -> int:
    """Parse ``--spec`` (a file, or ``env:NAME``), read it as ``spec_class``, run under Dagster Pipes when
    launched by it (rank 0 only); 1 with the traceback on error."""
    parser = argparse.ArgumentParser(prog=f"python -m {spec_class.module}", description=spec_class.__doc__)
    parser.add_argument("--spec", required=True, help=f"JSON spec ({spec_class.__name__} in tuneline/specs.py)")
    args = parser.parse_args(argv)
    parent = os.getppid()
    die_with_parent()
    if os.getppid() != parent:  # the launcher died before the request took effect
        return 1
    from tuneline.tracking import fail_fast_defaults

    fail_fast_defaults()
    spec: Optional[Spec] = None
    try:
        spec = spec_class.from_json(spec_text(args.spec))
        from tuneline.train.engines import check_compute

        check_compute(spec.compute, getattr(spec, "offload", None))  # before any model loads
        from dagster_pipes import PipesEnvVarParamsLoader, open_dagster_pipes

        if PipesEnvVarParamsLoader().is_dagster_pipes_process() and is_main_process():
            with open_dagster_pipes() as pipes:  # an exception is reported to Dagster, then re-raised
                run(spec, pipes)
        else:
            run(spec, None)
    except Exception:  # noqa: BLE001 - the launcher shows the trainer's own traceback
        text = storage.redact(traceback.format_exc())
        sys.stderr.write(text)
        error_file = spec.error_file if spec is not None else _error_file(args.spec)
        if error_file:
            Path(error_file).parent.mkdir(parents=True, exist_ok=True)
            Path(error_file).write_text(text, encoding="utf-8")
        return 1
    return 0


def _error_file(spec_path: str) -> Optional[str]:
    """Where the launcher looks for the traceback, read from a spec that did not load as its type."""
    try:
        value = json.loads(spec_text(spec_path)).get("error_file")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def trainer_error(path: str | Path, lines: int = 30) -> Optional[str]:
    """The last lines of a trainer's own traceback (its spec's ``error_file``), when it wrote one."""
    path = Path(path)
    if not path.is_file():
        return None
    text = path.read_text(errors="replace").strip().splitlines()
    return storage.redact("\n".join(text[-lines:]))
