"""One HPO trial out of process: ``python -m tuneline.recipes.hpo_trial --spec SPEC.json``
(a :class:`~tuneline.specs.HpoTrialSpec`), launched by a search worker (``tuneline.recipes.hpo_worker``),
under torchrun when ``params.num_processes`` > 1 (rank 0 reports to Optuna; every rank follows the pruner).

The trial trains with ``train_sft`` and :class:`~tuneline.train.callbacks.OptunaPruningCallback`, which rebuilds
the trial from the shared storage, reports every validation loss and stops training when the pruner says
so. ``<out_uri>/result.json`` holds an :class:`~tuneline.specs.Outcome` whose metrics are ``state``
("complete" | "pruned"), ``value`` (best validation loss), ``pruned_at_step``, ``steps``, ``trial_id`` and
``trial_number``, and whose details hold every reported ``(step, loss)`` and the SFT result: what the study
is told (this process never finishes the trial). The trial writes no checkpoint and no weights (a multitask
trial's source stage does, deleted once it ends). Any error exits non-zero with the traceback on stderr.
"""

from __future__ import annotations

import shutil
import sys
from typing import Any, Optional

from tuneline.recipes import _runner
from tuneline.specs import HpoTrialSpec, Outcome


def run(spec: HpoTrialSpec, pipes: Any = None) -> Outcome:
    """Train the trial with the pruning callback; write the outcome; report the materialization under Pipes."""
    from tuneline import storage
    from tuneline.models.loading import local_model_dir
    from tuneline.records import read_records
    from tuneline.train import distributed
    from tuneline.train.callbacks import OptunaPruningCallback
    from tuneline.train.hpo import sft_params_from_trial
    from tuneline.train.sft import CHECKPOINTS_SUBDIR, SOURCE_SUBDIR, train_sft

    trial_id = spec.trial_id
    pruning = OptunaPruningCallback(spec.study_name, spec.storage_url, trial_id)
    params = sft_params_from_trial(spec.params, spec.trial_params, max_steps=spec.max_steps,
                                   eval_steps=spec.eval_steps)
    log = _runner.StepLogger(pipes, spec.mlflow)
    train, val = read_records(storage.fetch(spec.train_uri)), read_records(storage.fetch(spec.val_uri))
    if not val:
        raise ValueError("an HPO trial needs validation records: the study minimizes validation loss")
    work = storage.Workspace(spec.out_uri)
    log.emit(f"hpo trial {spec.trial_number} (id {trial_id}) of {spec.study_name}: {spec.trial_params}")
    result = train_sft(local_model_dir(spec.base), train, val, params, work.path, seed=spec.seed,
                       extra_callbacks=[pruning], on_log=log, tokens=spec.tokenizer, save=False)
    if not result.val_losses:
        raise RuntimeError("the trial finished without a single evaluation: lower eval_steps or raise max_steps")
    value = min(loss for _, loss in result.val_losses)
    state = "pruned" if pruning.pruned else "complete"
    # the study needs the losses only, and nothing resumes a trial (a retried trial gets a new number and folder):
    # train_sft saved no checkpoint and no weights (save=False; it leaves the Trainer's empty output folder); a
    # multitask trial's source stage did save, and goes before the worker syncs its workspace
    if distributed.is_main_process():
        for sub in (CHECKPOINTS_SUBDIR, SOURCE_SUBDIR):
            shutil.rmtree(work.path / sub, ignore_errors=True)
    metrics = {"state": state, "value": value, "pruned_at_step": pruning.pruned_at_step,
               "steps": result.global_step, "trial_id": int(trial_id), "trial_number": spec.trial_number,
               **{f"param_{k}": v for k, v in spec.trial_params.items()}}
    outcome = Outcome(model=None, metrics=metrics,
                      curves={"validation": [list(x) for x in pruning.reported]},
                      details={"trial_params": spec.trial_params,
                               "sft": {k: v for k, v in result.to_dict().items() if k != "output_dir"}})
    log.emit(f"hpo trial {spec.trial_number} {state}: best val loss {value:.4f} after {result.global_step} steps"
             + (f" (pruned at step {pruning.pruned_at_step})" if pruning.pruned else ""))
    return _runner.finish(spec, outcome, pipes, log=log)


def main(argv: Optional[list[str]] = None) -> int:
    return _runner.run_cli(argv, spec_class=HpoTrialSpec, run=run)


if __name__ == "__main__":
    sys.exit(main())
