"""Hyperparameter search over SFT with Optuna: resumable, every trial visible, pruning across processes.

The study lives in an RDB storage (SQLite by default), so:

* a retried run *resumes* it: finished trials (complete or pruned) are counted and only the missing ones run;
  a trial a crashed process left RUNNING is marked FAIL and its parameters are queued to run again;
* each trial can run in its own process (the orchestrator launches ``python -m tuneline.recipes.hpo_trial``);
  that process rebuilds the trial from the storage with :class:`OptunaPruningCallback`, reports every
  validation loss and stops training when the pruner says so.

The pruner's settings are stored on the study (``study.user_attrs["pruner"]``) so the trial's process
rebuilds exactly the pruner :func:`run_study` uses.

Trial parameter names are the :class:`~tuneline.params.SearchSpace` field names (``learning_rate``,
``lora_r``, ``lora_alpha``, ``lora_dropout``, ``batch_size``, ``grad_accum``, ``epochs``, ``warmup_ratio``).
A choice with one option or a range with equal ends is fixed, not searched (so it never shows up as a
"parameter" with zero importance).
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from tuneline.params import HpoParams, SearchSpace, SftParams

TRIAL_STATES = ("complete", "pruned")


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
# study plumbing shared by the orchestrating process and the trial's process


def _pruner_settings(params: HpoParams) -> dict[str, int]:
    return {
        "n_startup_trials": int(params.pruner_startup_trials),
        "n_warmup_steps": int(params.pruner_warmup_steps),
        "interval_steps": 1,
    }


def _make_pruner(settings: dict[str, int]) -> Any:
    import optuna

    return optuna.pruners.MedianPruner(**settings)


def load_trial(study_name: str, storage_url: str, trial_id: int) -> Any:
    """Rebuild a running trial in another process, with the pruner the study was created with."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=study_name, storage=storage_url)
    settings = study.user_attrs.get("pruner")
    if settings is None:
        raise RuntimeError(f"study {study_name!r} has no pruner settings: was it created by run_study?")
    study.pruner = _make_pruner(settings)
    return optuna.trial.Trial(study, int(trial_id))


def resolve_trial_id(study_name: str, storage_url: str, trial_number: int) -> int:
    """The storage-wide trial id of trial ``trial_number`` of a study (what the pruning callback needs)."""
    import optuna

    study = optuna.load_study(study_name=study_name, storage=storage_url)
    return study._storage.get_trial_id_from_study_id_trial_number(study._study_id, int(trial_number))


def _build_pruning_callback_class() -> type:
    from transformers import TrainerCallback

    class OptunaPruningCallback(TrainerCallback):
        """Report ``eval_loss`` to the Optuna trial at every evaluation; stop training when it is pruned.

        Runs in the trial's own process: the trial is rebuilt from the storage (``optuna.load_study`` +
        ``optuna.trial.Trial(study, trial_id)``) on first use. After training, ``pruned`` tells whether the
        pruner stopped it, ``pruned_at_step`` when, and ``reported`` holds every ``(step, eval_loss)`` sent.
        """

        def __init__(self, study_name: str, storage_url: str, trial_id: int, metric: str = "eval_loss") -> None:
            self.study_name = study_name
            self.storage_url = storage_url
            self.trial_id = int(trial_id)
            self.metric = metric
            self.pruned = False
            self.pruned_at_step: Optional[int] = None
            self.reported: list[tuple[int, float]] = []
            self._trial: Any = None

        @property
        def trial(self) -> Any:
            if self._trial is None:
                self._trial = load_trial(self.study_name, self.storage_url, self.trial_id)
            return self._trial

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            if not metrics or self.metric not in metrics or self.pruned:
                return control
            value = float(metrics[self.metric])
            if not math.isfinite(value):
                value = float("inf")
            step = int(state.global_step)
            self.trial.report(value, step)
            self.reported.append((step, value))
            if self.trial.should_prune():
                self.pruned = True
                self.pruned_at_step = step
                control.should_training_stop = True
            return control

    OptunaPruningCallback.__module__ = __name__
    OptunaPruningCallback.__qualname__ = "OptunaPruningCallback"
    return OptunaPruningCallback


_LAZY: dict[str, type] = {}


def __getattr__(name: str) -> Any:
    # ``OptunaPruningCallback`` subclasses transformers' TrainerCallback; building it on first access keeps
    # ``import tuneline.train.hpo`` free of the ~6 s transformers import (the orchestrating process never needs it).
    if name == "OptunaPruningCallback":
        if name not in _LAZY:
            _LAZY[name] = _build_pruning_callback_class()
        return _LAZY[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------------
# the study


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
    n_failed: int
    n_run_now: int  # trials this call ran (a resumed study runs only the missing ones)
    n_resumed_failed: int  # trials a crashed process left RUNNING, marked FAIL and queued again
    history: list[dict[str, Any]] = field(default_factory=list)
    plots: dict[str, str] = field(default_factory=dict)
    plot_notes: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _open_study(study_name: str, storage_url: str, params: HpoParams, seed: int) -> Any:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    settings = _pruner_settings(params)
    study = optuna.create_study(
        study_name=study_name,
        storage=storage_url,
        pruner=_make_pruner(settings),
        direction="minimize",
        load_if_exists=True,
    )
    # Seeded, and offset by the trials already in the study: a resumed study must not replay the random
    # start-up samples of the first run (the same seed would propose trial 0's parameters again).
    study.sampler = optuna.samplers.TPESampler(
        seed=seed + len(study.trials), n_startup_trials=max(2, min(10, params.n_trials // 2))
    )
    stored = study.user_attrs.get("pruner")
    if stored is None:
        study.set_user_attr("pruner", settings)
    elif stored != settings:
        raise ValueError(f"study {study_name!r} was created with pruner {stored}, not {settings}: use a new study name")
    return study


def _fail_stale_trials(study: Any) -> int:
    """Mark trials left RUNNING by a crashed process FAIL and queue their parameters to run again."""
    from optuna.trial import TrialState

    stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for trial in stale:
        study._storage.set_trial_system_attr(trial._trial_id, "fail_reason", "left RUNNING by a crashed process")
        study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
        study.enqueue_trial(dict(trial.params), user_attrs={"retry_of": trial.number})
    return len(stale)


def _history(study: Any) -> list[dict[str, Any]]:
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
            }
        )
    return rows


def _json_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def run_study(
    study_name: str,
    storage_url: str,
    space: SearchSpace,
    params: HpoParams,
    *,
    seed: int,
    run_trial: Callable[[int, dict], dict],
    plots_dir: Optional[str | Path] = None,
) -> StudyResult:
    """Run (or resume) the study until it holds ``params.n_trials`` finished trials.

    ``run_trial(trial_number, trial_params)`` trains one configuration (usually out of process; find the
    trial's storage id with :func:`resolve_trial_id` for :class:`OptunaPruningCallback`) and returns
    ``{"state": "complete" | "pruned", "value": best validation loss, ...}``; other scalar keys are kept as
    the trial's user attributes. An exception or another state marks the trial FAIL; this call then moves
    on (a retried run fills the gap). Raises if no trial has completed at the end.
    """
    from optuna.trial import TrialState

    started = time.perf_counter()
    study = _open_study(study_name, storage_url, params, seed)
    n_resumed_failed = _fail_stale_trials(study)
    finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    missing = max(0, params.n_trials - len(finished))

    for _ in range(missing):
        trial = study.ask()
        trial_params = sample_params(trial, space)
        trial.set_user_attr("trial_params", trial_params)
        try:
            outcome = run_trial(trial.number, dict(trial_params))
        except Exception as exc:  # a failed trial is recorded; the study goes on
            study._storage.set_trial_system_attr(trial._trial_id, "fail_reason", f"{type(exc).__name__}: {exc}"[:500])
            study.tell(trial, state=TrialState.FAIL)
            continue
        for key, value in outcome.items():
            if key not in ("state", "value") and _json_scalar(value):
                trial.set_user_attr(key, value)
        state = outcome.get("state")
        value = outcome.get("value")
        if state == "complete" and value is not None and math.isfinite(float(value)):
            study.tell(trial, float(value))
        elif state == "pruned":
            study.tell(trial, state=TrialState.PRUNED)
        else:
            study._storage.set_trial_system_attr(
                trial._trial_id, "fail_reason", f"run_trial returned state={state!r} value={value!r}"
            )
            study.tell(trial, state=TrialState.FAIL)

    trials = study.get_trials(deepcopy=False)
    n_complete = sum(t.state == TrialState.COMPLETE for t in trials)
    best = study.best_trial if n_complete else None
    result = StudyResult(
        study_name=study_name,
        storage_url=storage_url,
        best_params=dict(best.user_attrs.get("trial_params") or best.params) if best else None,
        best_value=best.value if best else None,
        best_trial_number=best.number if best else None,
        n_trials_target=params.n_trials,
        n_complete=n_complete,
        n_pruned=sum(t.state == TrialState.PRUNED for t in trials),
        n_failed=sum(t.state == TrialState.FAIL for t in trials),
        n_run_now=missing,
        n_resumed_failed=n_resumed_failed,
        history=_history(study),
    )
    if plots_dir is not None:
        plots = plot_study(study, plots_dir)
        result.plots = plots["plots"]
        result.plot_notes = plots["notes"]
    result.seconds = round(time.perf_counter() - started, 3)
    if best is None:
        raise RuntimeError(
            f"study {study_name!r}: no trial completed ({result.n_pruned} pruned, {result.n_failed} failed)"
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
