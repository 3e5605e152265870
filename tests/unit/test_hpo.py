"""HPO: one study per run, resumed by a retry; workers in several processes finish it exactly (SQLite and
PostgreSQL); a SIGKILLed worker's trial is retried; pruning across processes; a real tiny training gets pruned."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tuneline.compat import optuna as optuna_compat
from tuneline.params import HpoParams, RecipeError, SearchSpace, SftParams
from tuneline.train import hpo

ROOT = Path(__file__).resolve().parents[2]
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

    def run_trial(number: int, trial_id: int, params: dict) -> dict:
        calls.append(number)
        trial = hpo.load_trial(study_name, storage_url, trial_id)
        value = None
        for step in range(steps):
            value = (10.0 if number in bad else 1.0) - 0.05 * step - 0.001 * number
            trial.report(value, step)
            if trial.should_prune():
                return {"state": "pruned", "value": value, "steps": step}
        return {"state": "complete", "value": value, "steps": steps}

    return run_trial


def _search(name: str, storage: str, params: HpoParams, run_trial, *, seed: int = 0, plots_dir=None):
    """What the hpo_study step does with one worker in this process: create, run, summarize."""
    hpo.create_study(name, storage, params)
    ran = hpo.run_worker(name, storage, SPACE, params, seed=seed, run_trial=run_trial, log=lambda m: None)
    return hpo.study_result(name, storage, n_run_now=len(ran), plots_dir=plots_dir)


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
    result = _search("prune", storage, params, _curve_trial("prune", storage, bad, calls), plots_dir=tmp_path / "plots")
    states = {row["number"]: row["state"] for row in result.history}
    assert all(states[n] == "pruned" for n in bad), states
    assert all(states[n] == "complete" for n in set(range(6)) - bad), states
    assert (result.n_complete, result.n_pruned, result.n_failed, result.n_run_now) == (4, 2, 0, 6)
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
    curve = _curve_trial("resume", storage, set(), calls)

    def interrupted(number: int, trial_id: int, params: dict) -> dict:
        if number == 2:
            raise KeyboardInterrupt  # the step is stopped in the middle of its third trial
        return curve(number, trial_id, params)

    params = HpoParams(n_trials=4)
    with pytest.raises(KeyboardInterrupt):
        _search("resume", storage, params, interrupted, seed=1)
    assert calls == [0, 1]

    again = _search("resume", storage, params, curve, seed=1)  # the retry of the same run
    assert calls == [0, 1, 3, 4] and again.n_run_now == 2
    assert (again.n_complete, again.n_failed) == (4, 1)
    # the resumed run proposes new configurations, not the first run's start-up samples again
    finished = [row for row in again.history if row["state"] == "complete"]
    assert len({row["params"]["learning_rate"] for row in finished}) == 4
    assert _search("resume", storage, params, curve, seed=1).n_run_now == 0  # a finished study runs nothing
    with pytest.raises(ValueError, match="n_trials=4, not 5"):
        hpo.create_study("resume", storage, HpoParams(n_trials=5))


def test_failed_trial_is_recorded_and_replaced_and_plots_say_why_importance_is_missing(tmp_path: Path) -> None:
    storage = _storage(tmp_path)

    def run_trial(number: int, trial_id: int, params: dict) -> dict:
        if number == 1:
            raise RuntimeError("out of memory")
        return {"state": "complete", "value": 0.5 + number, "mlflow_run_id": f"run-{number}"}

    result = _search("fail", storage, HpoParams(n_trials=2), run_trial, plots_dir=tmp_path / "plots")
    assert [row["state"] for row in result.history] == ["complete", "fail", "complete"]
    assert (result.n_complete, result.n_failed, result.n_run_now) == (2, 1, 3)
    assert result.history[1]["user_attrs"]["fail_reason"] == "RuntimeError: out of memory"
    assert result.history[0]["user_attrs"]["mlflow_run_id"] == "run-0"
    assert "optimization_history" in result.plots and "param_importances" in result.plots

    always = lambda number, trial_id, params: (_ for _ in ()).throw(RuntimeError("broken trainer"))  # noqa: E731
    with pytest.raises(RuntimeError, match="no trial completed"):
        _search("broken", storage, HpoParams(n_trials=2), always, plots_dir=tmp_path / "plots2")
    broken = hpo.counts(hpo.load_study("broken", storage))
    assert (broken.failed, broken.finished) == (2, 0)  # the worker gave up after n_trials failures

    one = _search("one", storage, HpoParams(n_trials=1), run_trial, plots_dir=tmp_path / "plots3")
    assert "param_importances" not in one.plots and "2 complete trials" in one.plot_notes["param_importances"]


def test_study_per_run_and_threads_per_worker() -> None:
    inputs = {"base": "abc", "hpo": {"n_trials": 6}}
    first = hpo.study_name("demo", inputs, "run-1")
    assert first == hpo.study_name("demo", dict(reversed(inputs.items())), "run-1")  # a retry resumes its own
    assert first != hpo.study_name("demo", inputs, "run-2")  # another run never shares it
    assert first.startswith("demo-") and first.endswith("-run-1")
    assert hpo.threads_per_worker(HpoParams(workers=2), 1, cores=8) == 4
    assert hpo.threads_per_worker(HpoParams(workers=2), 2, cores=8) == 2
    assert hpo.threads_per_worker(HpoParams(workers=4), 2, cores=2) == 1
    assert hpo.threads_per_worker(HpoParams(workers=2, threads_per_worker=3), 2, cores=2) == 3
    os.environ[hpo.DEDICATED_CPUS_ENV] = "8"  # a pod of its own: its 8 CPUs, whatever the other workers do
    try:
        assert hpo.threads_per_worker(HpoParams(workers=4), 2, cores=64) == 4
    finally:
        del os.environ[hpo.DEDICATED_CPUS_ENV]
    with pytest.raises(RecipeError, match="grace_period >= 2"):
        HpoParams(heartbeat_interval=10, grace_period=15)
    with pytest.raises(RecipeError, match="workers must be >= 1"):
        HpoParams(workers=0)


# ---------------------------------------------------------------------------
# several worker processes on one study


def _worker(storage: str, study: str, worker: int, params: HpoParams, *extra: str) -> subprocess.Popen:
    from tuneline.params import to_plain

    settings = {k: v for k, v in to_plain(params).items() if k != "space"}
    return subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("hpo_fake_worker.py")), storage, study, str(worker),
         json.dumps(settings), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def _finish(proc: subprocess.Popen, timeout: float = 120) -> dict:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-2000:] + err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def _accounted(storage: str, study: str, n_trials: int) -> list[dict]:
    """Every trial is accounted for: exactly n_trials finished, no parameters trained twice except as the retry
    of a trial whose worker died, and every failed trial says why (or was retried)."""
    rows = hpo._history(hpo.load_study(study, storage))
    finished = [r for r in rows if r["state"] in ("complete", "pruned")]
    assert len(finished) == n_trials, rows
    assert not [r for r in rows if r["state"] in ("running", "waiting")], rows
    retried = {r["retry_of"] for r in rows if r["retry_of"] is not None}
    for r in rows:
        if r["state"] == "fail":
            assert r["number"] in retried or r["user_attrs"].get("fail_reason"), r
    keys = [json.dumps(r["user_attrs"]["trial_params"], sort_keys=True) for r in finished]
    assert len(set(keys)) == len(keys), "a configuration was trained twice"
    return rows


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_two_workers_finish_the_study_with_every_trial_accounted_for(backend: str, tmp_path: Path, request) -> None:
    storage = _storage(tmp_path) if backend == "sqlite" else request.getfixturevalue("postgres_url")
    params = HpoParams(n_trials=8, pruner_startup_trials=2, pruner_warmup_steps=1, workers=2,
                       heartbeat_interval=1, grace_period=10)
    hpo.create_study("pair", storage, params)
    procs = [_worker(storage, "pair", w, params, "--step-seconds", "0.1") for w in range(2)]
    reports = [_finish(p) for p in procs]
    rows = _accounted(storage, "pair", 8)
    ran = [n for r in reports for n in r["ran"]]
    assert all(r["ran"] for r in reports), reports  # both workers took trials
    assert len(ran) == len(set(ran))  # no trial run by two workers
    assert sorted(ran) == sorted(r["number"] for r in rows if not r["user_attrs"].get("fail_reason", "").startswith(hpo.SURPLUS))
    assert any(r["state"] == "pruned" for r in rows)  # the pruner works across workers


def test_sigkilled_workers_trial_is_retried_not_lost(tmp_path: Path) -> None:
    storage = _storage(tmp_path)
    params = HpoParams(n_trials=4, pruner_startup_trials=4, workers=2, heartbeat_interval=1, grace_period=3)
    hpo.create_study("kill", storage, params)
    marker = tmp_path / "hung"
    doomed = _worker(storage, "kill", 0, params, "--hang-first", str(marker))
    deadline = time.time() + 60
    while not marker.exists():
        assert doomed.poll() is None and time.time() < deadline, doomed.communicate()
        time.sleep(0.1)
    hung = int(marker.read_text())
    survivor = _worker(storage, "kill", 1, params)
    os.kill(doomed.pid, signal.SIGKILL)  # mid-trial: the trial stays RUNNING, its heartbeat stops
    doomed.wait()
    report = _finish(survivor)
    rows = _accounted(storage, "kill", 4)
    assert rows[hung]["state"] == "fail" and "fail_reason" not in rows[hung]["user_attrs"]
    retry = [r for r in rows if r["retry_of"] == hung]
    assert len(retry) == 1 and retry[0]["state"] == "complete" and retry[0]["number"] in report["ran"]
    assert retry[0]["params"] == rows[hung]["params"]  # the same configuration, run again


def test_two_runs_studies_never_touch_each_others_trials(tmp_path: Path) -> None:
    """Two Dagster runs of the same recipe at once: run A's trial is live (training) while run B creates and
    finishes its own study on the same storage; A's trial is never failed and A finishes too."""
    import threading

    storage = _storage(tmp_path)
    params = HpoParams(n_trials=2, heartbeat_interval=1, grace_period=3)
    inputs = {"recipe": "same"}
    name_a, name_b = hpo.study_name("demo", inputs, "run-a"), hpo.study_name("demo", inputs, "run-b")
    release, started = threading.Event(), threading.Event()
    curve = _curve_trial(name_a, storage, set(), [])

    def slow(number: int, trial_id: int, trial_params: dict) -> dict:
        started.set()
        assert release.wait(60)
        return curve(number, trial_id, trial_params)

    hpo.create_study(name_a, storage, params)
    a = {}
    thread = threading.Thread(target=lambda: a.update(ran=hpo.run_worker(
        name_a, storage, SPACE, params, seed=0, run_trial=slow, log=lambda m: None)))
    thread.start()
    assert started.wait(60)
    b = _search(name_b, storage, params, _curve_trial(name_b, storage, set(), []))
    time.sleep(params.grace_period + 1)  # longer than the grace period: only a dead trial would be failed now
    release.set()
    thread.join(60)
    assert (b.n_complete, b.n_failed) == (2, 0)
    rows_a = _accounted(storage, name_a, 2)
    assert [r["state"] for r in rows_a] == ["complete", "complete"] and a["ran"] == [0, 1]


@pytest.fixture
def postgres_url():
    """A uniquely named database on the machine's PostgreSQL (127.0.0.1:5432, user postgres), dropped after.
    Skips with the reason when unreachable; fails instead under TUNELINE_REQUIRE_SERVICES=1."""
    import uuid

    psycopg2 = pytest.importorskip("psycopg2")
    name = f"tuneline_hpo_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname="postgres", connect_timeout=3)
    except psycopg2.OperationalError as exc:
        reason = f"PostgreSQL unreachable on 127.0.0.1:5432 as user postgres ({str(exc).strip()})"
        if os.environ.get("TUNELINE_REQUIRE_SERVICES") == "1":
            pytest.fail(reason + "; TUNELINE_REQUIRE_SERVICES=1 requires it")
        pytest.skip(reason)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


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
    hpo.create_study("cb", storage, HpoParams(pruner_startup_trials=1, pruner_warmup_steps=0))
    study = hpo.load_study("cb", storage)
    trial = study.ask()
    from tuneline.train.callbacks import OptunaPruningCallback

    callback = OptunaPruningCallback("cb", storage, optuna_compat.trial_id(trial))
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
    from tuneline.models.provision import model_ref

    """Two finished trials reported much lower losses; the third trial's own process trains for real, reports its
    eval loss through OptunaPruningCallback (rebuilt from the storage) and stops when the pruner says so."""
    import optuna
    from optuna.trial import TrialState

    from tuneline.records import write_jsonl

    storage = _storage(tmp_path)
    params = HpoParams(n_trials=3, trial_max_steps=8, eval_steps=2, pruner_startup_trials=2, pruner_warmup_steps=2)
    hpo.create_study("real", storage, params)
    study = hpo.load_study("real", storage)
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
        "base": model_ref(tiny_base, tiny_base.as_uri(), method="tiny", stage="test").to_dict(),
        "train_uri": train.as_uri(),
        "val_uri": val.as_uri(),
        "out_uri": (tmp_path / "trial").as_uri(),
        "params": {"method": "lora", "batch_size": 4, "bf16": False, "group_by_length": False},
        "max_steps": params.trial_max_steps,
        "eval_steps": params.eval_steps,
        "trial_params": {"learning_rate": 1e-9, "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0,
                         "batch_size": 4, "grad_accum": 1, "epochs": 1.0, "warmup_ratio": 0.0},
        "study_name": "real",
        "storage_url": storage,
        "trial_id": optuna_compat.trial_id(trial),
        "trial_number": trial.number,
        "seed": 0,
    }
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "tuneline.recipes.hpo_trial", "--spec", str(spec_path)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "trial" / "result.json").read_text())["metrics"]
    assert result["state"] == "pruned", result
    assert result["pruned_at_step"] == 2 and result["steps"] < params.trial_max_steps
    assert result["value"] > 2.0
    assert sorted(p.name for p in (tmp_path / "trial").iterdir()) == ["result.json"]  # no checkpoints or weights kept

    # the trial's process reported into the shared storage
    reloaded = optuna.load_study(study_name="real", storage=storage).trials[trial.number]
    assert reloaded.state == TrialState.RUNNING  # the worker tells the outcome
    assert reloaded.intermediate_values == {2: pytest.approx(result["value"])}
