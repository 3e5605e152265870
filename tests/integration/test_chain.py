"""The whole chain in memory on a tiny recipe: search, SFT, DPO, distillation, evaluation, the gate,
registration, lineage; a worse recipe refused by the gate while the champion stays; a retrain on new rows
plus replay whose passport shows both; rollback."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
import yaml

CHAIN = {
    "name": "ci-chain",
    "seed": 3,
    "model": {"build": "tiny", "tiny": {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
                                        "num_layers": 2, "num_heads": 2, "num_kv_heads": 2,
                                        "max_position_embeddings": 256}},
    "validation": {"max_tokens": 200, "min_accepted": 50, "max_quarantined_fraction": 0.2},
    "split": {"val_fraction": 0.15, "test_fraction": 0.15},
    "pretrain": {"steps": 60, "batch_size": 8, "seq_len": 64, "warmup_steps": 5, "learning_rate": 0.005},
    "data": {"demo": {"seed": 1, "examples_per_task": 60, "preference_pairs": 120, "corpus_paragraphs": 300,
                      "drift_examples": 20}},
    "hpo": {"n_trials": 2, "trial_max_steps": 6, "eval_steps": 3, "pruner_startup_trials": 1,
            "pruner_warmup_steps": 0, "space": {"learning_rate": [0.003, 0.006], "lora_r": [8], "lora_alpha": [16]}},
    "sft": {"method": "full", "learning_rate": 0.003, "max_steps": 120, "batch_size": 16, "eval_steps": 40,
            "save_steps": 40, "max_length": 128},
    "dpo": {"max_steps": 10, "batch_size": 8, "max_length": 128},
    "distill": {"max_steps": 20, "batch_size": 8, "student_layers": 1, "max_length": 128},
    "reward": {"max_steps": 20, "batch_size": 8, "max_length": 128, "learning_rate": 0.001},
    "rl": {"max_steps": 4, "batch_size": 8, "num_generations": 4, "max_completion_length": 8,
           "max_prompt_length": 100, "eval_prompts": 16, "save_steps": 2},
    "evaluation": {"max_examples": 60, "bootstrap_samples": 300, "max_new_tokens": 16, "policy_prompts": 16},
    # The CI-sized model learns the answers' distribution long before it answers exactly, so the gate
    # here compares per-example test loss (lower is better); the demo recipe gates on task accuracy. DPO moves
    # probability mass between answers, so it raises the SFT targets' loss a little: the parent may lead by 0.1.
    "gate": {"primary_metric": "loss", "min_margin": 0.2, "max_latency_increase": 20.0,
             "max_preference_accuracy_drop": 0.5, "max_parent_regression": 0.1},
}


def run_chain(recipe: dict, path: Path, retrain: bool = False):
    from pipelines import definitions
    from resources import build_resources
    from resources.recipe import RecipeResource

    path.write_text(yaml.safe_dump(recipe))
    resources = build_resources("local")
    resources["recipe"] = RecipeResource(path=str(path), retrain=retrain)
    result = dg.materialize([*definitions.ASSETS, *definitions.CHECKS], resources=resources, raise_on_error=False)
    return result, resources


def materialized(result) -> set[str]:
    return {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}


@pytest.mark.slow
def test_chain_registers_a_champion_then_refuses_a_worse_candidate(state: Path, tmp_path: Path) -> None:
    from tuneline import storage
    from tuneline.deploy.lineage import build_passport, passport_markdown, verify_passport
    from tuneline.deploy.registry import get_version, load_registered, rollback
    from tuneline.deploy.reproduce import reproduce
    from tuneline.models.generation import chat_generate
    from tuneline.tracking import TAG_DAGSTER_RUN

    result, resources = run_chain(CHAIN, tmp_path / "chain.yaml")
    done = materialized(result)
    assert {"hpo_study", "sft_adapter", "dpo_adapter", "distilled_student", "evaluation_report"} <= done
    dpo_metrics = result.output_for_node("dpo_adapter").metrics
    assert dpo_metrics["shared_prompts"] is True  # one row a pair
    # the reference pass once per pair only where the steps draw every pair (here 10 x 8)
    assert dpo_metrics["reference_once"] is (dpo_metrics["steps"] * 8 >= dpo_metrics["train_pairs"])
    evaluation = result.output_for_node("evaluation_report")
    summary = evaluation.summary
    assert summary["sft"]["loss"] < summary["base"]["loss"] - 0.3, evaluation.table
    assert evaluation.gate.passed, evaluation.gate.reasons
    assert evaluation.candidate.stage == "dpo_adapter" and evaluation.parity["ok"]
    assert "registered_model" in done
    tracker = resources["mlflow"].tracker()
    name = "tuneline-ci-chain"
    champion = get_version(tracker, name, "champion")
    assert champion["version"] == 1

    # every stage's MLflow run can be found from the Dagster run id
    runs = tracker.find_runs("tuneline/ci-chain", f"tags.`{TAG_DAGSTER_RUN}` = '{result.run_id}'")
    stages = {r.data.tags["tuneline.asset_key"] for r in runs}
    assert {"base_model", "prepared_dataset", "dataset_splits", "hpo_study", "sft_adapter", "dpo_adapter",
            "distilled_student", "evaluation_report", "registered_model"} <= stages

    # the passport is complete
    passport = build_passport(tracker, f"{name}@champion")
    assert passport["broken_links"] == []
    assert {"registered_model", "evaluation_report", "dpo_adapter", "sft_adapter", "hpo_study",
            "dataset_splits", "prepared_dataset", "base_model"} <= set(passport["runs"])
    assert passport["data"] and all(d["status"] == "ok" for d in passport["data"])
    assert passport["gate"]["passed"] is True and passport["git_sha"]
    # the records, split membership and quarantine travel with the passport, content-addressed, and verify
    assert {"records", "quarantine"} <= set(passport["content"]["prepared_dataset"])
    assert "membership" in passport["content"]["dataset_splits"]
    assert verify_passport(tracker, passport) == []
    # ... and from a second clone of the code in another folder, sharing only the tracking store
    clone = tmp_path / "second-clone"
    subprocess.run(["git", "clone", "-q", str(Path(__file__).resolve().parents[2]), str(clone)], check=True)
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "lineage", f"{name}@champion", "--verify"],
                          cwd=clone, env={**os.environ, "PYTHONPATH": str(clone)}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "re-hashed; 0 broken" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-2000:]
    registered = result.output_for_node("registered_model")
    assert registered.decision == "registered" and registered.version == 1
    card = tracker.client().download_artifacts(registered.mlflow_run_id, "README.md")
    card_text = Path(card).read_text()
    assert all(d["sha256"] in card_text for d in passport["data"])

    # the chain re-runs from the passport alone: SFT gives its validation loss again, exactly, and the same weights
    report = reproduce(tracker, f"{name}@champion", stages=["sft"], work_dir=tmp_path / "reproduce")
    sft = report["stages"]["sft_adapter"]
    assert report["code"]["same"] and sft["metrics_match"], sft["figures"]
    assert sft["figures"]["best_val_loss"]["original"] == sft["figures"]["best_val_loss"]["reproduced"]
    assert sft["weights"] == "bitwise", sft

    # load by alias and generate
    model, tokenizer, info = load_registered(tracker, f"{name}@champion")
    out = chat_generate(model, tokenizer, [{"role": "user", "content": "What is 2 plus 3?"}], max_new_tokens=8)
    assert isinstance(out["text"], str) and info["version"] == 1

    # a worse recipe: the gate refuses, nothing is registered, the champion stays. It and the retrain below
    # turn the search, DPO, the reward model, RL and distillation off (the gate's candidate is then the SFT model):
    # those stages pass their input on and the graph runs to the end
    off = {"hpo": {"enabled": False}, "dpo": {"enabled": False}, "reward": {"enabled": False},
           "rl": {"enabled": False}, "distill": {"enabled": False}, "gate": {**CHAIN["gate"], "candidate": "sft"}}
    worse = {**CHAIN, **off,
             "sft": {**CHAIN["sft"], "max_steps": 2, "eval_steps": 2, "save_steps": 2, "learning_rate": 0.00001}}
    result2, _ = run_chain(worse, tmp_path / "worse.yaml")
    assert result2.success  # a refusal is a decision, not a failed run
    assert [result2.output_for_node(a).stage for a in ("dpo_adapter", "reward_model", "rl_policy",
                                                       "distilled_student")] == ["sft_adapter"] * 4  # passed on
    gate = result2.output_for_node("evaluation_report").gate
    assert not gate.passed and "champion" in gate.baselines
    refused = result2.output_for_node("registered_model")
    assert refused.decision == "refused" and refused.reason and refused.version is None
    assert refused.champion_version == 1 and get_version(tracker, name, "champion")["version"] == 1

    # a retrain: newly labelled rows of a task the champion never saw, plus a replay of the old train rows;
    # the passport shows both the new file and the replayed share
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    words = ["cat", "dog", "red", "blue", "sun", "moon", "tree", "fish", "bird", "milk"]
    rows = [{"instruction": f"Reverse the order of these words: {' '.join(picked)}.", "input": "",
             "output": " ".join(reversed(picked))} for picked in itertools.islice(itertools.permutations(words, 3), 0, 720, 9)]
    new_file = incoming / "labelled.jsonl"
    new_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    retrain = {**CHAIN, **off, "drift": {"incoming_dir": str(incoming), "replay_ratio": 0.8},
               "gate": {**off["gate"], "min_margin": 0.0}}
    result3, _ = run_chain(retrain, tmp_path / "retrain.yaml", retrain=True)
    replay = result3.output_for_node("dataset_splits").replay
    assert replay["new"] > 0 and replay["replayed"] > 0, replay
    assert result3.output_for_node("registered_model").decision == "registered", (
        result3.output_for_node("evaluation_report").table + str(replay))
    # the incoming file was claimed: moved to consumed/, so no later retrain learns from it again
    assert not new_file.exists() and list(incoming.glob("consumed/*/*/labelled.jsonl"))
    retrained = build_passport(tracker, f"{name}@champion")
    assert retrained["version"] == 2 and retrained["broken_links"] == []
    assert retrained["started_from"] == f"models:/{name}/1"  # the retrain continued from the champion
    roles = {d["role"] for d in retrained["data"]}
    assert "incoming" in roles and roles - {"incoming"}, roles
    claimed = next(incoming.glob("consumed/*/*/labelled.jsonl"))
    assert claimed.as_uri() in {d["uri"] for d in retrained["data"]}
    assert retrained["splits"]["replay"]["new"] == replay["new"]
    assert retrained["splits"]["replay"]["replayed"] == replay["replayed"]
    assert f"{replay['new']} new train rows + {replay['replayed']} replayed" in passport_markdown(retrained)

    # rollback moves champion back to version 1 and says so
    moved = rollback(tracker, name)
    assert (moved["from_version"], moved["to_version"]) == (2, 1)
    assert get_version(tracker, name, "champion")["version"] == 1

    # a broken link is reported: remove a data file the chain read
    data_file = storage.local_path(passport["data"][0]["uri"])
    data_file.unlink()
    broken = build_passport(tracker, f"{name}/1")["broken_links"]
    assert any(str(data_file) in b["link"] for b in broken)

    # version 1 was the first champion: there is nothing before it to roll back to
    with pytest.raises(LookupError):
        rollback(tracker, name)
