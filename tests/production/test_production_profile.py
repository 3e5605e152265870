"""The asset graph under TUNELINE_PROFILE=production: Dagster steps, an MLflow tracking server on PostgreSQL,
Optuna on PostgreSQL, artifacts in an S3-compatible object store; then what it left is scanned for secrets."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import dagster as dg
import pytest
import yaml


CHAIN = {
    "name": "ci-prod",
    "seed": 5,
    "model": {"build": "tiny", "tiny": {"vocab_size": 400, "hidden_size": 64, "intermediate_size": 128,
                                        "num_layers": 2, "num_heads": 2, "num_kv_heads": 2,
                                        "max_position_embeddings": 256}},
    "pretrain": {"steps": 20, "batch_size": 8, "seq_len": 64, "warmup_steps": 2, "checkpoint_every": 10},
    "data": {"demo": {"seed": 2, "examples_per_task": 30, "preference_pairs": 60, "corpus_paragraphs": 200,
                      "drift_examples": 10}},
    "validation": {"max_tokens": 200, "min_accepted": 50, "max_quarantined_fraction": 0.2},
    "split": {"val_fraction": 0.15, "test_fraction": 0.15},
    "hpo": {"n_trials": 2, "trial_max_steps": 4, "eval_steps": 2, "pruner_startup_trials": 1,
            "pruner_warmup_steps": 0, "space": {"learning_rate": [0.003, 0.006], "warmup_ratio": []}},
    "sft": {"method": "full", "learning_rate": 0.003, "max_steps": 20, "batch_size": 16, "eval_steps": 10,
            "save_steps": 10, "max_length": 128},
    "dpo": {"max_steps": 3, "batch_size": 8, "max_length": 128},
    "distill": {"max_steps": 3, "batch_size": 8, "student_layers": 1, "max_length": 128},
    "reward": {"max_steps": 3, "batch_size": 8, "max_length": 128},
    "rl": {"max_steps": 2, "batch_size": 4, "num_generations": 2, "max_completion_length": 8, "eval_prompts": 8},
    "evaluation": {"max_examples": 20, "bootstrap_samples": 200, "max_new_tokens": 8, "policy_prompts": 8},
    "gate": {"primary_metric": "loss", "min_margin": 0.0, "require_ci_above_zero": False,
             "max_latency_increase": 100.0, "max_preference_accuracy_drop": 1.0, "max_parent_regression": 10.0},
}


@pytest.fixture(scope="module")
def production(make_database, mlflow_server, s3, tmp_path_factory):
    """The production environment: every URL carries the test password where one can go."""
    home = tmp_path_factory.mktemp("prod-home")
    recipe = home / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(CHAIN))
    env = {
        **s3,
        "TUNELINE_PROFILE": "production",
        "TUNELINE_HOME": str(home / "state"),
        "TUNELINE_CACHE": str(home / "cache"),
        "TUNELINE_MLFLOW_URI": mlflow_server.uri,
        "TUNELINE_ARTIFACT_ROOT": f"s3://tuneline-prod/{uuid.uuid4().hex[:8]}",
        "TUNELINE_OPTUNA_STORAGE": make_database("optuna"),
        "TUNELINE_RECIPE": str(recipe),
    }
    # the Dagster instance of `tuneline run` (deploy/dagster.production.yaml) on its own database, by env
    dagster_db = urlsplit(make_database("dagster"))
    env.update(DAGSTER_PG_USERNAME=dagster_db.username, DAGSTER_PG_PASSWORD=dagster_db.password,
               DAGSTER_PG_HOST=dagster_db.hostname, DAGSTER_PG_PORT=str(dagster_db.port),
               DAGSTER_PG_DB=dagster_db.path.lstrip("/"))
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        yield env


def materialize(selection=None):
    from pipelines import definitions
    from resources import build_resources

    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize([*definitions.ASSETS, *definitions.CHECKS], resources=build_resources("production"),
                            raise_on_error=False, instance=instance, selection=selection)
    return result, instance


@pytest.fixture(scope="module")
def chain(production):
    result, instance = materialize()
    return result, instance


@pytest.mark.slow
def test_the_chain_runs_on_postgres_mlflow_server_and_object_store(production, chain, secret) -> None:
    import optuna
    from mlflow.tracking import MlflowClient

    from tuneline import storage
    from tuneline.deploy.lineage import build_passport, verify_passport
    from tuneline.tracking import TAG_DAGSTER_RUN, Tracker

    result, _ = chain
    assert result.success, [e.step_failure_data.error.message[:500] for e in result.all_events
                            if e.event_type == dg.DagsterEventType.STEP_FAILURE]
    # every stage's MLflow run is on the tracking server (PostgreSQL behind it)
    client = MlflowClient(tracking_uri=production["TUNELINE_MLFLOW_URI"])
    experiment = client.get_experiment_by_name("tuneline/ci-prod")
    runs = client.search_runs([experiment.experiment_id], f"tags.`{TAG_DAGSTER_RUN}` = '{result.run_id}'")
    assert {r.data.tags["tuneline.asset_key"] for r in runs} >= {
        "base_model", "prepared_dataset", "dataset_splits", "hpo_study", "sft_adapter", "dpo_adapter",
        "distilled_student", "evaluation_report", "registered_model"}
    # the Optuna study and its trials are in PostgreSQL
    study = result.output_for_node("hpo_study")
    trials = optuna.load_study(study_name=study.study_name, storage=production["TUNELINE_OPTUNA_STORAGE"]).trials
    assert len(trials) == 2 and study.storage and secret not in study.storage
    # stage outputs are object-store URIs; the registered version and its lineage verify over HTTP
    sft = result.output_for_node("sft_adapter")
    assert sft.uri.startswith(production["TUNELINE_ARTIFACT_ROOT"]) and storage.exists(sft.uri + "/model.safetensors")
    registered = result.output_for_node("registered_model")
    assert registered.decision == "registered" and registered.version == 1
    tracker = Tracker(production["TUNELINE_MLFLOW_URI"])
    passport = build_passport(tracker, "tuneline-ci-prod@champion")
    assert passport["broken_links"] == [] and verify_passport(tracker, passport) == []


@pytest.mark.slow
def test_no_secret_in_any_param_tag_artifact_or_metadata(production, chain, secret, tmp_path: Path) -> None:
    """The password sits in the Optuna URL and the object store's secret key: it must appear nowhere."""
    from mlflow.tracking import MlflowClient

    from tuneline import storage

    result, instance = chain
    leaks: list[str] = []
    client = MlflowClient(tracking_uri=production["TUNELINE_MLFLOW_URI"])
    experiment = client.get_experiment_by_name("tuneline/ci-prod")
    for run in client.search_runs([experiment.experiment_id], max_results=500):
        texts = {**{f"param {k}": v for k, v in run.data.params.items()},
                 **{f"tag {k}": v for k, v in run.data.tags.items()}}
        leaks += [f"run {run.info.run_id} {k}" for k, v in texts.items() if secret in str(v)]
        folder = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / run.info.run_id)))
        for path in folder.rglob("*"):
            if path.is_file() and secret.encode() in path.read_bytes():
                leaks.append(f"run {run.info.run_id} artifact {path.relative_to(folder)}")
    for record in instance.get_event_records(dg.EventRecordsFilter(
            event_type=dg.DagsterEventType.ASSET_MATERIALIZATION)):
        metadata = record.asset_materialization.metadata
        leaks += [f"metadata {record.asset_key.to_user_string()}.{k}" for k, v in metadata.items()
                  if secret in str(v.value)]
    leaks += [f"log: {e.user_message[:80]}" for e in instance.all_logs(result.run_id) if secret in e.user_message]
    fs, root = storage.filesystem(production["TUNELINE_ARTIFACT_ROOT"])
    for path in fs.find(root):
        if path.endswith((".json", ".jsonl", ".md", ".txt", ".yaml")) and secret.encode() in fs.cat_file(path):
            leaks.append(f"object {path}")
    assert leaks == []


@pytest.mark.slow
@pytest.mark.long  # two whole `tuneline run` processes: `make test-long`
def test_two_runs_of_one_recipe_at_once_keep_their_own_artifacts_runs_and_trials(production, tmp_path) -> None:
    """Two `tuneline run` processes of the same recipe at the same time: each finishes with its own stage
    outputs, MLflow runs and Optuna study (the search used to share one study and fail the other's trials)."""
    import os
    import subprocess
    import sys

    import optuna
    from mlflow.tracking import MlflowClient

    from tuneline.paths import project_root

    select = "raw_dataset,base_model,prepared_dataset,dataset_splits,hpo_study,sft_adapter"
    # the Dagster database is created once, as `tuneline prod up` does, before two runs use it at once (two
    # processes creating one schema at the same moment race: "relation jobs already exists")
    init = ("from pipelines.cli import setup_environment; setup_environment(); "
            "import dagster as dg; dg.DagsterInstance.get()")
    subprocess.run([sys.executable, "-c", init], cwd=project_root(), check=True,
                   env={**os.environ, "DAGSTER_HOME": str(tmp_path / "dagster-init")})
    procs = []
    for i in range(2):
        env = {**os.environ, "DAGSTER_HOME": str(tmp_path / f"dagster-{i}")}
        cmd = [sys.executable, "-m", "pipelines.cli", "run", "--select", select]
        procs.append(subprocess.Popen(cmd, cwd=project_root(), env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=1800)[0] for p in procs]
    for proc, out in zip(procs, outputs):
        assert proc.returncode == 0, out[-4000:]
    run_ids = [next(line.split()[2].rstrip(":") for line in out.splitlines() if line.startswith("tuneline run "))
               for out in outputs]
    assert len(set(run_ids)) == 2
    client = MlflowClient(tracking_uri=production["TUNELINE_MLFLOW_URI"])
    experiment = client.get_experiment_by_name("tuneline/ci-prod")
    studies = set()
    for run_id in run_ids:
        runs = client.search_runs([experiment.experiment_id], f"tags.`tuneline.dagster_run_id` = '{run_id}'")
        stages = {r.data.tags["tuneline.asset_key"]: r for r in runs if "tuneline.trial" not in r.data.tags}
        assert {"base_model", "prepared_dataset", "dataset_splits", "hpo_study", "sft_adapter"} <= set(stages)
        assert all(r.info.status == "FINISHED" for r in stages.values())
        studies.add(stages["hpo_study"].data.params.get("study_name") or
                    json.loads(Path(client.download_artifacts(stages["hpo_study"].info.run_id, "study.json",
                                                              str(tmp_path / run_id))).read_text())["study_name"])
    assert len(studies) == 2
    for name in studies:
        trials = optuna.load_study(study_name=name, storage=production["TUNELINE_OPTUNA_STORAGE"]).trials
        assert len(trials) == 2 and all(t.state.name in ("COMPLETE", "PRUNED") for t in trials)
