"""The Optuna internals tuneline uses (tuneline/compat/optuna.py) still work on the installed version: a trial is
rebuilt by its storage id in "another process" (another study object on the same storage), reports, prunes."""

from __future__ import annotations

from pathlib import Path

import optuna

from tuneline.compat import optuna as optuna_compat


def test_pinned_version_is_the_installed_one() -> None:
    # a new optuna must be checked against the calls below before the pin moves
    assert optuna.__version__ == optuna_compat.PINNED, (
        f"optuna {optuna.__version__} installed, compat checked for {optuna_compat.PINNED}: re-run these tests, "
        "then update PINNED"
    )
    pin = [line for line in (Path(__file__).parents[2] / "pyproject.toml").read_text().splitlines()
           if line.strip().startswith('"optuna==')]
    assert pin == [f'  "optuna=={optuna_compat.PINNED}",'], pin


def test_trial_id_and_rebuild_trial_across_study_objects(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'o.db'}"
    asker = optuna.create_study(study_name="s", storage=storage, direction="minimize")
    done = asker.ask()
    asker.tell(done, 1.0)
    asker.tell(asker.ask(), 2.0)
    running = asker.ask()
    trial_id = optuna_compat.trial_id(running)
    assert isinstance(trial_id, int) and trial_id == optuna_compat.trial_id(asker.trials[2])  # Trial and FrozenTrial

    other = optuna.load_study(study_name="s", storage=storage)  # what the trial's own process holds
    other.pruner = optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0)
    rebuilt = optuna_compat.rebuild_trial(other, trial_id)
    assert isinstance(rebuilt, optuna.trial.Trial) and rebuilt.number == running.number == 2
    rebuilt.report(9.0, 0)
    assert asker.trials[2].intermediate_values == {0: 9.0}  # reported into the shared storage
    # the earlier trials reported nothing at step 0, so the pruner has no peers there yet: add two that did
    for value in (1.0, 1.5):
        other.add_trial(optuna.create_trial(params={}, distributions={}, value=value, intermediate_values={0: value}))
    assert rebuilt.should_prune()  # 9.0 at step 0 is worse than the finished trials' median
