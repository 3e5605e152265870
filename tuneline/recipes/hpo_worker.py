"""One search worker out of process: ``python -m tuneline.recipes.hpo_worker --spec SPEC.json``
(a :class:`~tuneline.specs.HpoWorkerSpec`).

The ``hpo_study`` step creates the study and launches ``hpo.workers`` of these at once through the launcher
resource. Each loads the study and runs trials (:func:`tuneline.train.hpo.run_worker`) until the study holds
``n_trials`` finished ones. Every trial is its own process, ``python -m tuneline.recipes.hpo_trial`` (under
torchrun when ``params.num_processes`` > 1; otherwise forked from a server that has imported the training
libraries once, :mod:`tuneline.recipes._preload`: a copy of this worker when it was itself forked from one),
given ``threads`` torch threads so that ``workers`` workers share the cores without oversubscribing them; it dies
with its worker. This process keeps the trial's heartbeat
while it trains. With ``mlflow`` (the ``hpo_study`` run), each trial gets a run nested under it.
``<out_uri>/result.json`` holds the :class:`~tuneline.specs.Outcome` (the trials this worker ran, its thread
count and the study's counts). Any error exits non-zero with the traceback on stderr.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

from tuneline.recipes import _preload, _runner
from tuneline.specs import HpoTrialSpec, HpoWorkerSpec, MlflowTarget, Outcome


def trial_env(threads: int) -> dict[str, str]:
    """The trial process's environment: ``threads`` torch/OpenMP threads, and no Dagster Pipes variables (the
    worker is the one that talks Pipes; a trial writing to the same channel would garble it)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DAGSTER_PIPES_")}
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def run(spec: HpoWorkerSpec, pipes: Any = None) -> Outcome:
    """Run trials of the study until it holds ``n_trials`` finished ones; write the outcome."""
    from tuneline import storage
    from tuneline.tracking import Tracker
    from tuneline.train.distributed import launch_command
    from tuneline.train.hpo import counts, load_study, run_worker, threads_per_worker

    hpo, sft = spec.hpo, spec.params
    log = _runner.StepLogger(pipes)
    threads = threads_per_worker(hpo, sft.num_processes)
    tracker = Tracker(spec.mlflow.tracking_uri) if spec.mlflow else None
    max_steps = hpo.trial_max_steps if spec.max_steps is None else min(hpo.trial_max_steps, spec.max_steps)
    work = storage.Workspace(spec.out_uri)

    def run_trial(number: int, trial_id: int, trial_params: dict) -> dict:
        local = work.path / f"trial-{number}"
        local.mkdir(parents=True, exist_ok=True)
        child = None
        if tracker is not None and spec.mlflow is not None:
            child = tracker.start_run(
                spec.experiment or "tuneline", run_name=f"trial-{number}", parent_run_id=spec.mlflow.run_id,
                tags={**spec.tags, "tuneline.trial": str(number), "tuneline.hpo_worker": str(spec.worker)},
                params={f"trial.{k}": v for k, v in trial_params.items()},
            )
        trial = HpoTrialSpec(
            out_uri=work.uri_of(f"trial-{number}"),
            seed=spec.seed, max_steps=max_steps, error_file=str(local / "error.txt"),
            mlflow=MlflowTarget(tracking_uri=spec.mlflow.tracking_uri, run_id=child) if child else None,
            base=spec.base, train_uri=spec.train_uri, val_uri=spec.val_uri, params=sft, trial_params=trial_params,
            study_name=spec.study_name, storage_url=spec.storage_url, trial_id=trial_id, trial_number=number,
            eval_steps=hpo.eval_steps, tokenizer=spec.tokenizer,
        )
        # the spec holds the study's storage URL, password included: it goes to a private scratch file, never into
        # the workspace (which is published to the artifact store)
        spec_dir = Path(tempfile.mkdtemp(prefix="tuneline-trial-"))
        spec_path = spec_dir / "spec.json"
        trial.save(str(spec_path))
        for stale in (local / _runner.RESULT_FILE, local / "error.txt"):
            stale.unlink(missing_ok=True)
        log.emit(f"worker {spec.worker}: trial {number} {trial_params} ({threads} threads x {sft.num_processes} "
                 "processes)")
        cmd = launch_command(sys.executable, HpoTrialSpec.module, ["--spec", str(spec_path)], sft.num_processes)
        env = trial_env(threads)
        try:
            if sft.num_processes == 1 and _preload.compatible(env):  # forked: no imports to wait for
                returncode = _preload.run(HpoTrialSpec.module, cmd[3:], env, os.getcwd())
            else:
                returncode = subprocess.run(cmd, env=env, preexec_fn=_runner.die_with_parent).returncode
        finally:
            shutil.rmtree(spec_dir, ignore_errors=True)
        result_uri = storage.join(trial.out_uri, _runner.RESULT_FILE)
        if returncode != 0 or not storage.exists(result_uri):
            if tracker is not None and child:
                tracker.end_run(child, status="FAILED")
            error = _runner.trainer_error(local / "error.txt", lines=5) or f"exit code {returncode}"
            raise RuntimeError(f"trial {number} failed: {error}")
        metrics = Outcome.load(result_uri).metrics
        if tracker is not None and child:
            tracker.log_metrics(child, {"best_val_loss": metrics.get("value") or float("nan")})
            tracker.end_run(child, status="KILLED" if metrics.get("state") == "pruned" else "FINISHED")
        log.emit(f"worker {spec.worker}: trial {number} {metrics.get('state')} value={metrics.get('value')}")
        return {**metrics, "mlflow_run_id": child, "worker": spec.worker}

    space = hpo.space.for_method(sft.method)
    ran = run_worker(spec.study_name, spec.storage_url, space, hpo, seed=spec.seed, worker=spec.worker,
                     run_trial=run_trial, log=log.emit)
    now = counts(load_study(spec.study_name, spec.storage_url))
    work.sync()
    outcome = Outcome(model=None, metrics={"worker": spec.worker, "trials_run": len(ran), "threads": threads},
                      details={"trials": ran, "counts": dataclasses.asdict(now)})
    log.emit(f"worker {spec.worker} done: ran trials {ran}; study {dataclasses.asdict(now)}")
    return _runner.finish(spec, outcome, pipes)


def main(argv: Optional[list[str]] = None) -> int:
    _preload.serve_from_here()  # forked itself: the trials fork from this process, not from a fresh import
    return _runner.run_cli(argv, spec_class=HpoWorkerSpec, run=run)


if __name__ == "__main__":
    sys.exit(main())
