"""Hyperparameter search over SFT with Optuna: one study per Dagster run, N workers, pruning across processes,
dead workers' trials run again.

* **One study per run.** :func:`study_name` keys the study on the recipe, its inputs and the Dagster *root* run
  id: two runs of the same recipe never share a study (so neither can touch the other's trials), and a retry of
  a run resumes its own study, running only the missing trials.
* **Created once, loaded by workers.** The ``hpo_study`` step creates the study (:func:`create_study`;
  concurrent creation races, optuna#1092), then launches ``hpo.workers`` workers
  (``python -m tuneline.recipes.hpo_worker``), each :func:`run_worker` on the loaded study until it holds
  exactly ``n_trials`` finished (complete or pruned) trials.
* **Heartbeats, not guesses.** The storage records a heartbeat for every running trial from the worker that
  runs it (``study.optimize``: heartbeats work there, not with ask/tell). A trial whose worker died (killed,
  node lost) is failed once its heartbeat is ``grace_period`` old and run again as a new trial with the same
  parameters (``RetryHeartbeatStaleTrialCallback``); a live trial is never touched.
* **Each trial in its own process** (``python -m tuneline.recipes.hpo_trial``, under torchrun for
  ``sft.num_processes > 1``, otherwise forked from the worker's preloaded server,
  :mod:`tuneline.recipes._preload`): it rebuilds the trial from the storage with
  :class:`~tuneline.train.callbacks.OptunaPruningCallback`, reports every validation loss and stops training when
  the pruner says so.

The pruner's settings and ``n_trials`` are stored on the study (``study.user_attrs``) so every worker and
trial process rebuilds exactly the study the step created.

Trial parameter names are the :class:`~tuneline.params.SearchSpace` field names (``learning_rate``,
``lora_r``, ``lora_alpha``, ``lora_dropout``, ``batch_size``, ``grad_accum``, ``epochs``, ``warmup_ratio``).
A choice with one option or a range with equal ends is fixed, not searched (so it never shows up as a
"parameter" with zero importance).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from tuneline.compat import optuna as optuna_compat
from tuneline.params import HpoParams, SearchSpace, SftParams

TRIAL_STATES = ("complete", "pruned")
SURPLUS = "surplus"  # fail_reason prefix of a trial asked for after the study was full (never trained)

# run_trial(trial_number, trial_id, trial_params) -> {"state": "complete" | "pruned", "value": float, ...}
RunTrial = Callable[[int, int, dict], dict]


# ---------------------------------------------------------------------------
# search space and params


def sample_params(trial: Any, space: SearchSpace) -> dict[str, Any]:
    """Sample one configuration from ``space`` on an Optuna trial (fixed values where nothing varies)."""

    def uniform(name: str, bounds: tuple[float, float], *, log: bool = False) -> float:
        lo, hi = float(bounds[0]), float(bounds[1])
        if lo == hi:
            return lo
        return trial.suggest_float(name, lo, hi, log=log)

    def choice(name: str, options: tuple) -> Any:
        options = tuple(options)
        if len(options) == 1:
            return options[0]
        return trial.suggest_categorical(name, options)

    sampled: dict[str, Any] = {}
    for name, log in (("learning_rate", True), ("lora_dropout", False), ("warmup_ratio", False)):
        bounds = getattr(space, name)
        if bounds:  # empty: not searched, the SFT recipe's value holds
            sampled[name] = uniform(name, bounds, log=log)
    for name, cast in (("lora_r", int), ("lora_alpha", int), ("batch_size", int), ("grad_accum", int),
                       ("epochs", float)):
        options = getattr(space, name)
        if options:
            sampled[name] = cast(choice(name, options))
    return sampled


def sft_params_from_trial(
    base: SftParams,
    trial_params: dict[str, Any],
    *,
    max_steps: Optional[int] = None,
    eval_steps: Optional[int] = None,
) -> SftParams:
    """``base`` with the trial's hyperparameters applied; unknown keys are an error.

    ``max_steps``/``eval_steps`` (the study's ``trial_max_steps``/``eval_steps``) cap the trial and set how
    often it reports to the pruner; checkpoints follow the evaluations (``save_steps = eval_steps``).
    """
    known = {f.name for f in dataclasses.fields(SearchSpace)}
    unknown = sorted(set(trial_params) - known)
    if unknown:
        raise ValueError(f"unknown trial parameter(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    lora = base.lora
    lora_changes = {
        k_lora: trial_params[k]
        for k, k_lora in (("lora_r", "r"), ("lora_alpha", "alpha"), ("lora_dropout", "dropout"))
        if k in trial_params
    }
    if lora_changes:
        lora = dataclasses.replace(lora, **lora_changes)
    changes: dict[str, Any] = {"lora": lora}
    for key in ("learning_rate", "batch_size", "grad_accum", "epochs", "warmup_ratio"):
        if key in trial_params:
            changes[key] = trial_params[key]
    if max_steps is not None:
        changes["max_steps"] = max_steps
    if eval_steps is not None:
        changes["eval_steps"] = eval_steps
        changes["save_steps"] = eval_steps
    for key in ("learning_rate", "warmup_ratio", "epochs"):
        if key in changes:
            changes[key] = float(changes[key])
    for key in ("batch_size", "grad_accum"):
        if key in changes:
            changes[key] = int(changes[key])
    return dataclasses.replace(base, **changes)


# ---------------------------------------------------------------------------
# the study: named per run, created once, loaded by workers


def study_name(recipe_name: str, inputs: dict[str, Any], root_run_id: str) -> str:
    """``<recipe>-<hash of the search's inputs>-<root run id>``: one study per Dagster run (a retry of the run,
    which keeps its root run id, resumes it), never shared by two runs."""
    from tuneline.records import sha256_text

    return f"{recipe_name}-{sha256_text(json.dumps(inputs, sort_keys=True, default=str))[:12]}-{root_run_id}"


DEDICATED_CPUS_ENV = "TUNELINE_DEDICATED_CPUS"  # set by a launcher that gives each job its own CPUs (a pod)


def threads_per_worker(params: HpoParams, num_processes: int, cores: Optional[int] = None) -> int:
    """Torch threads for each trial process, so workers never oversubscribe the cores: ``params.threads_per_worker``
    when set; else, in a job with CPUs of its own (``TUNELINE_DEDICATED_CPUS``, a pod), those CPUs over its
    ``num_processes`` ranks; else this machine's cores over ``workers * num_processes`` (at least 1)."""
    if params.threads_per_worker is not None:
        return params.threads_per_worker
    dedicated = os.environ.get(DEDICATED_CPUS_ENV)
    if dedicated:
        return max(1, int(dedicated) // max(1, num_processes))
    cores = cores if cores is not None else len(os.sched_getaffinity(0))
    return max(1, cores // (params.workers * max(1, num_processes)))


def _pruner_settings(params: HpoParams) -> dict[str, int]:
    return {
        "n_startup_trials": int(params.pruner_startup_trials),
        "n_warmup_steps": int(params.pruner_warmup_steps),
        "interval_steps": 1,
    }


def _make_pruner(settings: dict[str, int]) -> Any:
    import optuna

    return optuna.pruners.MedianPruner(**settings)


def sqlalchemy_url(url: str) -> str:
    """``url`` with the driver we ship: SQLAlchemy 2.1 reads ``postgresql://`` as psycopg 3; we ship psycopg2."""
    if url.startswith("postgresql://"):
        return "postgresql+psycopg2://" + url[len("postgresql://"):]
    return url


def open_storage(url: str, params: HpoParams) -> Any:
    """An ``RDBStorage`` with heartbeats: a trial silent for ``grace_period`` is failed and queued again (up to
    ``max_retries`` times). ``pool_pre_ping`` replaces connections a database server dropped."""
    import optuna
    from optuna.exceptions import ExperimentalWarning

    url = sqlalchemy_url(url)
    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("sqlite"):
        engine_kwargs["connect_args"] = {"timeout": 60}  # workers and trials write to one file: wait for the lock
    with warnings.catch_warnings():  # heartbeats are "experimental" since optuna 2.5
        warnings.simplefilter("ignore", ExperimentalWarning)
        return optuna.storages.RDBStorage(
            url,
            engine_kwargs=engine_kwargs,
            heartbeat_interval=params.heartbeat_interval,
            grace_period=params.grace_period,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                max_retry=params.max_retries
            ),
        )


def create_study(name: str, storage_url: str, params: HpoParams) -> None:
    """Create the study (or find the one a previous attempt of this run created) and record what every worker
    must agree on: the pruner and ``n_trials``. Only the ``hpo_study`` step calls this."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=name, storage=open_storage(storage_url, params), direction="minimize",
                                load_if_exists=True)
    wanted = {"pruner": _pruner_settings(params), "n_trials": params.n_trials}
    for key, value in wanted.items():
        stored = study.user_attrs.get(key)
        if stored is None:
            study.set_user_attr(key, value)
        elif stored != value:
            raise ValueError(f"study {name!r} was created with {key}={stored}, not {value}: use a new study name")


def load_study(
    name: str, storage_url: str, params: Optional[HpoParams] = None, *, seed: int = 0, worker: int = 0
) -> Any:
    """The study :func:`create_study` made, with its pruner and a TPE sampler seeded from ``seed``, the
    ``worker`` and the trials already there (workers must not propose the same start-up samples, nor a
    resumed study replay the first run's). With ``params``, the storage carries the heartbeat (workers);
    without, it is a plain connection (trial processes)."""
    import numpy as np
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(storage_url, params) if params is not None else sqlalchemy_url(storage_url)
    study = optuna.load_study(study_name=name, storage=storage)
    settings = study.user_attrs.get("pruner")
    if settings is None or "n_trials" not in study.user_attrs:
        raise RuntimeError(f"study {name!r} has no pruner settings or n_trials: was it made by create_study?")
    study.pruner = _make_pruner(settings)
    n_trials = int(study.user_attrs["n_trials"])
    # constant_liar: workers running at once do not all propose next to the same running trial
    sampler_seed = int(np.random.SeedSequence([seed, worker, len(study.trials)]).generate_state(1)[0])
    study.sampler = optuna.samplers.TPESampler(seed=sampler_seed, constant_liar=True,
                                               n_startup_trials=max(2, min(10, n_trials // 2)))
    return study


def load_trial(name: str, storage_url: str, trial_id: int) -> Any:
    """Rebuild a running trial in another process, with the pruner the study was created with."""
    return optuna_compat.rebuild_trial(load_study(name, storage_url), trial_id)


# ---------------------------------------------------------------------------
# workers


@dataclass
class Counts:
    finished: int  # complete or pruned
    running: int
    waiting: int  # queued retries of trials whose worker died
    failed: int  # failed while training (stale trials and surplus asks not counted)


def _failed_training(trial: Any) -> bool:
    """A trial that failed while training: its run_trial raised (it has a reason, and it is not a surplus ask)."""
    from optuna.trial import TrialState

    reason = trial.user_attrs.get("fail_reason")
    return trial.state == TrialState.FAIL and reason is not None and not reason.startswith(SURPLUS)


def counts(study: Any) -> Counts:
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    return Counts(
        finished=sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials),
        running=sum(t.state == TrialState.RUNNING for t in trials),
        waiting=sum(t.state == TrialState.WAITING for t in trials),
        failed=sum(_failed_training(t) for t in trials),
    )


def _is_surplus(study: Any, number: int, n_trials: int) -> bool:
    """Whether trial ``number`` was asked for after ``n_trials`` others were already running or done.

    Two workers may both see room for one more trial and both ask. Trial numbers are given out in order, so
    the later one finds ``n_trials`` live or finished trials before it and stands down: the study never holds
    more than ``n_trials`` finished trials.
    """
    from optuna.trial import TrialState

    live = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
    return sum(t.number < number and t.state in live for t in study.get_trials(deepcopy=False)) >= n_trials


def _objective(study: Any, space: SearchSpace, n_trials: int, run_trial: RunTrial, ran: list[int]) -> Callable:
    import optuna

    def objective(trial: Any) -> float:
        if _is_surplus(study, trial.number, n_trials):
            trial.set_user_attr("fail_reason", f"{SURPLUS}: the study already had {n_trials} trials; not run")
            raise RuntimeError("surplus trial")
        trial_params = sample_params(trial, space)
        trial.set_user_attr("trial_params", trial_params)
        ran.append(trial.number)
        try:
            outcome = run_trial(trial.number, optuna_compat.trial_id(trial), dict(trial_params))
        except Exception as exc:  # recorded on the trial; the worker goes on
            trial.set_user_attr("fail_reason", f"{type(exc).__name__}: {exc}"[:500])
            raise
        for key, value in outcome.items():
            if key not in ("state", "value") and _json_scalar(value):
                trial.set_user_attr(key, value)
        state, value = outcome.get("state"), outcome.get("value")
        if state == "complete" and value is not None and math.isfinite(float(value)):
            return float(value)
        if state == "pruned":
            raise optuna.TrialPruned(f"pruned at step {outcome.get('pruned_at_step')}")
        reason = f"run_trial returned state={state!r} value={value!r}"
        trial.set_user_attr("fail_reason", reason)
        raise RuntimeError(reason)

    return objective


def run_worker(
    name: str,
    storage_url: str,
    space: SearchSpace,
    params: HpoParams,
    *,
    seed: int,
    run_trial: RunTrial,
    worker: int = 0,
    log: Callable[[str], None] = print,
) -> list[int]:
    """Run trials of study ``name`` until it holds ``n_trials`` finished ones; returns the numbers this worker ran.

    Each trial goes through ``study.optimize`` (so its heartbeat runs while ``run_trial`` trains). When the
    remaining trials are all running elsewhere the worker waits: if one of those workers dies, its trial comes
    back (failed once stale, queued again) and a waiting worker runs it. A trial whose ``run_trial`` raises is
    failed with the reason and replaced; after ``n_trials`` such failures the worker gives up (something is
    broken, not unlucky).
    """
    import optuna
    from optuna.exceptions import ExperimentalWarning, UpdateFinishedTrialError

    study = load_study(name, storage_url, params, seed=seed, worker=worker)
    n_trials = int(study.user_attrs["n_trials"])
    objective = _objective(study, space, n_trials, run_trial, ran := [])
    while True:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        now = counts(study)
        if now.finished >= n_trials:
            return ran
        if now.failed >= n_trials:
            log(f"study {name}: {now.failed} trials failed; giving up (see each trial's fail_reason)")
            return ran
        if now.finished + now.running >= n_trials:
            time.sleep(min(5.0, params.heartbeat_interval))  # the rest runs elsewhere; wait in case it dies
            continue
        try:
            study.optimize(objective, n_trials=1, catch=(Exception,), gc_after_trial=True)
        except (ValueError, UpdateFinishedTrialError) as exc:
            if isinstance(exc, ValueError) and "Cannot tell" not in str(exc):
                raise
            # another worker failed this trial as stale while it ran (a heartbeat later than grace_period,
            # optuna#5470): the trial already came back as a retry; this worker goes on
            log(f"study {name}: a trial of this worker was failed as stale while running ({exc}); going on")


# ---------------------------------------------------------------------------
# what the study found


@dataclass
class StudyResult:
    """What a (possibly resumed) study finished with."""

    study_name: str
    storage_url: str
    best_params: Optional[dict[str, Any]]
    best_value: Optional[float]
    best_trial_number: Optional[int]
    n_trials_target: int
    n_complete: int
    n_pruned: int
    n_failed: int  # failed while training (a killed worker's trial, a crash, a surplus ask)
    n_retried: int  # trials run again because their worker died (heartbeat)
    n_run_now: int  # trials the workers of this call started (a resumed study runs only the missing ones)
    history: list[dict[str, Any]] = field(default_factory=list)
    plots: dict[str, str] = field(default_factory=dict)
    plot_notes: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["storage_url"] = self.storage_redacted
        return data

    @property
    def storage_redacted(self) -> str:
        from tuneline.storage import redact

        return redact(self.storage_url)


def _history(study: Any) -> list[dict[str, Any]]:
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    rows = []
    for t in study.get_trials(deepcopy=False):
        rows.append(
            {
                "number": t.number,
                "state": t.state.name.lower(),
                "value": t.value,
                "params": dict(t.params),
                "intermediate_values": {int(k): float(v) for k, v in sorted(t.intermediate_values.items())},
                "seconds": t.duration.total_seconds() if t.duration is not None else None,
                "user_attrs": dict(t.user_attrs),
                "retry_of": RetryHeartbeatStaleTrialCallback.retried_trial_number(t),
            }
        )
    return rows


def _json_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def study_result(
    name: str, storage_url: str, *, n_run_now: int, plots_dir: Optional[str | Path] = None, seconds: float = 0.0
) -> StudyResult:
    """Summarize the study (best trial, counts, every trial's history, plots); raises if no trial completed."""
    from optuna.trial import TrialState

    study = load_study(name, storage_url)
    trials = study.get_trials(deepcopy=False)
    history = _history(study)
    n_complete = sum(t.state == TrialState.COMPLETE for t in trials)
    best = study.best_trial if n_complete else None
    result = StudyResult(
        study_name=name,
        storage_url=storage_url,
        best_params=dict(best.user_attrs.get("trial_params") or best.params) if best else None,
        best_value=best.value if best else None,
        best_trial_number=best.number if best else None,
        n_trials_target=int(study.user_attrs["n_trials"]),
        n_complete=n_complete,
        n_pruned=sum(t.state == TrialState.PRUNED for t in trials),
        n_failed=sum(t.state == TrialState.FAIL for t in trials),
        n_retried=sum(row["retry_of"] is not None for row in history),
        n_run_now=n_run_now,
        history=history,
        seconds=seconds,
    )
    if plots_dir is not None:
        plots = plot_study(study, plots_dir)
        result.plots = plots["plots"]
        result.plot_notes = plots["notes"]
    if best is None:
        raise RuntimeError(
            f"study {name!r}: no trial completed ({result.n_pruned} pruned, {result.n_failed} failed)"
        )
    return result


def plot_study(study: Any, out_dir: str | Path) -> dict[str, dict[str, str]]:
    """Write ``optimization_history.png`` and (with >= 2 complete trials) ``param_importances.png``.

    Returns ``{"plots": {name: path}, "notes": {name: why it is missing}}``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as ovm
    from optuna.exceptions import ExperimentalWarning
    from optuna.trial import TrialState

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots: dict[str, str] = {}
    notes: dict[str, str] = {}

    def save(ax: Any, name: str) -> None:
        fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
        fig.tight_layout()
        path = out / f"{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        plots[name] = str(path)

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    varied = {name for t in complete for name in t.params}
    with warnings.catch_warnings():  # optuna marks its matplotlib backend "experimental" since v2.2
        warnings.simplefilter("ignore", ExperimentalWarning)
        save(ovm.plot_optimization_history(study), "optimization_history")
        if len(complete) < 2:
            notes["param_importances"] = f"needs >= 2 complete trials, the study has {len(complete)}"
        elif not varied:
            notes["param_importances"] = "no parameter is searched (every range is fixed)"
        else:
            save(ovm.plot_param_importances(study), "param_importances")
    return {"plots": plots, "notes": notes}
