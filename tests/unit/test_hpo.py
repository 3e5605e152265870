"""HPO: the Optuna study resumes, prunes across processes and plots; a real tiny training gets pruned."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tuneline.params import HpoParams, SearchSpace, SftParams
from tuneline.train import hpo

SPACE = SearchSpace(lora_r=(4, 8), lora_alpha=(8, 16), batch_size=(4,))


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """The tiny model is faster on one thread, and far faster when the 2 cores are shared (measured 20x)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _storage(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'optuna.db'}"


def _curve_trial(study_name: str, storage_url: str, bad: set[int], calls: list[int], steps: int = 6):
    """A fake trial body that behaves like the trial's process: rebuild the trial, report, obey the pruner."""

    def run_trial(number: int, params: dict) -> dict:
        calls.append(number)
        trial = hpo.load_trial(study_name, storage_url, hpo.resolve_trial_id(study_name, storage_url, number))
        value = None
        for step in range(steps):
            value = (10.0 if number in bad else 1.0) - 0.05 * step - 0.001 * number
            trial.report(value, step)
            if trial.should_prune():
                return {"state": "pruned", "value": value, "steps": step}
        return {"state": "complete", "value": value, "steps": steps}

    return run_trial


def test_sample_params_and_sft_params_from_trial() -> None:
    import optuna

    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))
    trial = study.ask()
    params = hpo.sample_params(trial, SPACE)
    # grad_accum and epochs are left empty: not searched, so the SFT recipe's values hold
    assert set(params) == {"learning_rate", "lora_r", "lora_alpha", "lora_dropout", "batch_size", "warmup_ratio"}
    lo, hi = SPACE.learning_rate
    assert lo <= params["learning_rate"] <= hi
    assert params["lora_r"] in SPACE.lora_r and params["lora_alpha"] in SPACE.lora_alpha
    # single choices are fixed, not searched
    assert "batch_size" not in trial.params and params["batch_size"] == SPACE.batch_size[0]

    sft = hpo.sft_params_from_trial(SftParams(), params, max_steps=12, eval_steps=4)
    assert sft.learning_rate == params["learning_rate"]
    assert (sft.lora.r, sft.lora.alpha, sft.lora.dropout) == (params["lora_r"], params["lora_alpha"], params["lora_dropout"])
    assert (sft.max_steps, sft.eval_steps, sft.save_steps) == (12, 4, 4)
    recipe = SftParams(epochs=8.0, grad_accum=2)
    assert (hpo.sft_params_from_trial(recipe, params).epochs, hpo.sft_params_from_trial(recipe, params).grad_accum) == (8.0, 2)
    with pytest.raises(ValueError, match="unknown trial parameter"):
        hpo.sft_params_from_trial(SftParams(), {"lr": 1e-3})


def test_pruner_prunes_trials_much_worse_than_the_median(tmp_path: Path) -> None:
    storage = _storage(tmp_path)
    calls: list[int] = []
    params = HpoParams(n_trials=6, pruner_startup_trials=2, pruner_warmup_steps=1)
    bad = {3, 5}
    result = hpo.run_study(
        "prune", storage, SPACE, params, seed=0, run_trial=_curve_trial("prune", storage, bad, calls),
        plots_dir=tmp_path / "plots",
    )
    states = {row["number"]: row["state"] for row in result.history}
    assert all(states[n] == "pruned" for n in bad), states
    assert all(states[n] == "complete" for n in set(range(6)) - bad), states
    assert (result.n_complete, result.n_pruned, result.n_failed) == (4, 2, 0)
    # pruned after the warmup step, long before the end of the curve
    for n in bad:
        assert max(result.history[n]["intermediate_values"]) == 1
    assert result.best_value == pytest.approx(1.0 - 0.05 * 5 - 0.004)
    assert result.best_trial_number == 4
    assert Path(result.plots["optimization_history"]).stat().st_size > 1000
    assert Path(result.plots["param_importances"]).stat().st_size > 1000
    json.dumps(result.to_dict())  # JSON-able for result.json and metadata


def test_resumed_study_runs_only_the_missing_trials(tmp_path: Path) -> None:
    storage = _storage(tmp_path)
    calls: list[int] = []
    run = _curve_trial("resume", storage, set(), calls)
    first = hpo.run_study("resume", storage, SPACE, HpoParams(n_trials=3), seed=1, run_trial=run)
    assert calls == [0, 1, 2] and first.n_run_now == 3

    again = hpo.run_study("resume", storage, SPACE, HpoParams(n_trials=3), seed=1, run_trial=run)
    assert calls == [0, 1, 2] and again.n_run_now == 0 and again.n_complete == 3
    assert again.best_params == first.best_params

    more = hpo.run_study("resume", storage, SPACE, HpoParams(n_trials=5), seed=1, run_trial=run)
    assert calls == [0, 1, 2, 3, 4] and more.n_complete == 5
    # the resumed run proposes new configurations, not the first run's start-up samples again
    assert len({row["params"]["learning_rate"] for row in more.history}) == 5


def test_trial_left_running_by_a_crash_is_failed_and_rerun(tmp_path: Path) -> None:
    import optuna

    storage = _storage(tmp_path)
    calls: list[int] = []
    run = _curve_trial("crash", storage, set(), calls)
    hpo.run_study("crash", storage, SPACE, HpoParams(n_trials=2), seed=0, run_trial=run)

    # a process that asked for trial 2 and died before telling
    study = optuna.load_study(study_name="crash", storage=storage)
    crashed = study.ask()
    crashed_params = hpo.sample_params(crashed, SPACE)

    result = hpo.run_study("crash", storage, SPACE, HpoParams(n_trials=3), seed=0, run_trial=run)
    states = [row["state"] for row in result.history]
    assert states == ["complete", "complete", "fail", "complete"]
    assert result.n_resumed_failed == 1 and result.n_failed == 1 and result.n_complete == 3
    assert calls == [0, 1, 3]
    rerun = result.history[3]
    assert rerun["user_attrs"]["retry_of"] == crashed.number
    assert rerun["user_attrs"]["trial_params"] == crashed_params


def test_failed_trial_is_recorded_and_plots_say_why_importance_is_missing(tmp_path: Path) -> None:
    storage = _storage(tmp_path)

    def run_trial(number: int, params: dict) -> dict:
        if number == 1:
            raise RuntimeError("out of memory")
        return {"state": "complete", "value": 0.5, "mlflow_run_id": "abc"}

    result = hpo.run_study(
        "fail", storage, SPACE, HpoParams(n_trials=2), seed=0, run_trial=run_trial, plots_dir=tmp_path / "plots",
    )
    assert (result.n_complete, result.n_failed, result.n_run_now) == (1, 1, 2)
    assert result.history[0]["user_attrs"]["mlflow_run_id"] == "abc"
    assert "optimization_history" in result.plots and "param_importances" not in result.plots
    assert "2 complete trials" in result.plot_notes["param_importances"]
    assert not (tmp_path / "plots" / "param_importances.png").exists()


# ---------------------------------------------------------------------------
# a real tiny training, pruned through the callback in another process


CORPUS = [
    ("What colour is the sky?", "The sky is blue."),
    ("What colour is grass?", "Grass is green."),
    ("How many legs has a cat?", "A cat has four legs."),
    ("What is two plus two?", "Two plus two is four."),
    ("Name a fruit.", "An apple is a fruit."),
    ("What do bees make?", "Bees make honey."),
    ("Where do fish live?", "Fish live in water."),
    ("What is ice?", "Ice is frozen water."),
]


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tuneline.models.tiny import init_tiny_model, save_model, train_tokenizer
    from tuneline.params import TinyModelParams

    shape = TinyModelParams(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2,
                            num_kv_heads=2, max_position_embeddings=128)
    texts = [f"{q} {a}" for q, a in CORPUS] * 4
    tokenizer = train_tokenizer(texts, shape)
    out = tmp_path_factory.mktemp("hpo_base")
    save_model(init_tiny_model(tokenizer, shape, seed=0), tokenizer, out)
    return out


def _records(n: int) -> list[dict]:
    from tuneline.records import ChatRecord

    rows = []
    for i in range(n):
        q, a = CORPUS[i % len(CORPUS)]
        rows.append(ChatRecord(kind="sft", source="test", line=i,
                               messages=[{"role": "user", "content": q}, {"role": "assistant", "content": a}]))
    return rows


def test_pruning_callback_reports_and_lets_startup_trials_run(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from transformers import TrainerCallback

    storage = _storage(tmp_path)
    study = hpo._open_study("cb", storage, HpoParams(pruner_startup_trials=1, pruner_warmup_steps=0), seed=0)
    trial = study.ask()
    callback = hpo.OptunaPruningCallback("cb", storage, trial._trial_id)
    assert isinstance(callback, TrainerCallback)
    control = SimpleNamespace(should_training_stop=False)
    for step, loss in ((5, 3.0), (10, 2.0)):
        callback.on_evaluate(None, SimpleNamespace(global_step=step), control, metrics={"eval_loss": loss})
    callback.on_evaluate(None, SimpleNamespace(global_step=12), control, metrics={"loss": 9.0})  # not an eval log
    assert not callback.pruned and not control.should_training_stop  # the first trial is a startup trial
    assert callback.reported == [(5, 3.0), (10, 2.0)]
    assert study.trials[0].intermediate_values == {5: 3.0, 10: 2.0}


@pytest.mark.slow
def test_real_training_is_pruned_across_a_process_boundary(tmp_path: Path, tiny_base: Path) -> None:
    """Two finished trials reported much lower losses; the third trial's own process trains for real, reports its
    eval loss through OptunaPruningCallback (rebuilt from the storage) and stops when the pruner says so."""
    import optuna
    from optuna.trial import TrialState

    from tuneline.records import write_jsonl

    storage = _storage(tmp_path)
    params = HpoParams(n_trials=3, trial_max_steps=8, eval_steps=2, pruner_startup_trials=2, pruner_warmup_steps=2)
    study = hpo._open_study("real", storage, params, seed=0)
    # two finished trials with a good curve (what earlier trials reported)
    for _ in range(2):
        trial = study.ask()
        for step, value in ((2, 4.0), (4, 3.0), (6, 2.5), (8, 2.0)):
            trial.report(value, step)
        study.tell(trial, 2.0)

    train, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    write_jsonl(train, (r.to_dict() for r in _records(16)))
    write_jsonl(val, (r.to_dict() for r in _records(8)))
    trial = study.ask()
    spec = {
        "base_model": str(tiny_base),
        "train_path": str(train),
        "val_path": str(val),
        "out_dir": str(tmp_path / "trial"),
        "params": {"method": "lora", "batch_size": 4, "bf16": False, "group_by_length": False},
        "max_steps": params.trial_max_steps,
        "eval_steps": params.eval_steps,
        "trial_params": {"learning_rate": 1e-9, "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0,
                         "batch_size": 4, "grad_accum": 1, "epochs": 1.0, "warmup_ratio": 0.0},
        "study_name": "real",
        "storage_url": storage,
        "trial_number": trial.number,
        "seed": 0,
    }
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "tuneline.recipes.hpo_trial", "--spec", str(spec_path)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "trial" / "result.json").read_text())
    assert result["state"] == "pruned", result
    assert result["pruned_at_step"] == 2 and result["steps"] < params.trial_max_steps
    assert result["value"] > 2.0

    # the trial's process reported into the shared storage
    reloaded = optuna.load_study(study_name="real", storage=storage).trials[trial.number]
    assert reloaded.state == TrialState.RUNNING  # the orchestrator tells the outcome
    assert reloaded.intermediate_values == {2: pytest.approx(result["value"])}
