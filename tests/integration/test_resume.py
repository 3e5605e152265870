"""Every training stage survives kill -9: pretraining, DPO and distillation (SFT: test_sft_resume.py).

Each recipe CLI runs once uninterrupted, then again from scratch and is SIGKILLed as soon as a checkpoint is
marked complete; the rerun of the same spec resumes from it and must end with the same final figures and the
same weights, bitwise (every stage is seeded, and the batches and random draws after a resume are the ones the
uninterrupted run drew).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tuneline.models.provision import model_ref
from tuneline.params import TinyModelParams
from tuneline.records import ChatRecord, write_jsonl

ROOT = Path(__file__).resolve().parents[2]
TINY = TinyModelParams(vocab_size=400, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2,
                       num_kv_heads=2, max_position_embeddings=128, tokenizer_min_frequency=1)
WORDS = "red green blue cat dog sun moon tree fish bird milk cake".split()


def sft_records(n: int) -> list[ChatRecord]:
    return [ChatRecord(kind="sft", source="t", line=i, messages=[
        {"role": "user", "content": f"echo {WORDS[i % 12]} {WORDS[(i * 5) % 12]}"},
        {"role": "assistant", "content": f"{WORDS[i % 12]} {WORDS[(i * 5) % 12]}"}]) for i in range(n)]


def pairs(n: int) -> list[ChatRecord]:
    return [ChatRecord(kind="preference", source="t", line=i, messages=[
        {"role": "user", "content": f"name a colour {i}"}], chosen=WORDS[i % 3], rejected=WORDS[3 + i % 9])
        for i in range(n)]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    from tuneline.data.demo import generate_corpus
    from tuneline.models.tiny import init_tiny_model, save_model, train_tokenizer
    from tuneline.params import DemoDataParams

    root = tmp_path_factory.mktemp("resume")
    corpus = generate_corpus(DemoDataParams(seed=4, corpus_paragraphs=400))
    (root / "corpus.txt").write_text("\n\n".join(corpus) + "\n")
    tokenizer = train_tokenizer(corpus + [m["content"] for r in sft_records(24) for m in r.messages], TINY)
    base = save_model(init_tiny_model(tokenizer, TINY, seed=0), tokenizer, root / "base")
    write_jsonl(root / "sft.jsonl", (r.to_dict() for r in sft_records(64)))
    write_jsonl(root / "pairs.jsonl", (r.to_dict() for r in pairs(48)))
    return {"root": root, "base": model_ref(base, base.as_uri(), method="full", stage="sft_adapter").to_dict()}


def spec_for(stage: str, world: dict, out: Path) -> dict:
    root = world["root"]
    common = {"out_uri": out.as_uri(), "seed": 3}
    if stage == "pretrain":
        return {**common, "model": {"build": "tiny", "tiny": {k: getattr(TINY, k) for k in (
                    "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                    "max_position_embeddings")}},
                "pretrain": {"steps": 40, "batch_size": 8, "seq_len": 64, "warmup_steps": 2, "log_every": 5,
                             "checkpoint_every": 10},
                "corpus_uris": [(root / "corpus.txt").as_uri()], "steps": 40}
    if stage == "dpo":
        return {**common, "sft": world["base"], "train_uri": (root / "pairs.jsonl").as_uri(),
                "val_uri": (root / "pairs.jsonl").as_uri(), "max_steps": 12,
                "params": {"learning_rate": 5e-3, "batch_size": 8, "max_length": 48, "bf16": False, "save_steps": 4,
                           "lora": {"r": 4, "alpha": 8, "dropout": 0.0}}}
    return {**common, "teacher": world["base"], "train_uri": (root / "sft.jsonl").as_uri(),
            "val_uri": (root / "sft.jsonl").as_uri(), "cache_uri": (out.parent / f"{out.name}-cache").as_uri(),
            "max_steps": 16, "top_k": 16,
            "params": {"student_layers": 1, "batch_size": 8, "bf16": False, "save_steps": 4, "max_length": 48}}


def run(stage: str, spec: dict, path: Path, *, kill_after_checkpoint: bool = False) -> subprocess.CompletedProcess:
    path.write_text(json.dumps(spec))
    cmd = [sys.executable, "-m", f"tuneline.recipes.{stage}", "--spec", str(path)]
    if not kill_after_checkpoint:
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    checkpoints = Path(spec["out_uri"].removeprefix("file://")) / "checkpoints"
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not list(checkpoints.glob("checkpoint-*/CHECKPOINT_COMPLETE")):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    return subprocess.CompletedProcess(cmd, proc.returncode)


FIGURES = {"pretrain": ("pretrain_eval_loss_after", "pretrain_final_loss"),
           "dpo": ("final_loss", "reward_accuracy_after", "reward_margin_after"),
           "distill": ("final_loss", "val_kl_after", "val_ce_after")}


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["pretrain", "dpo", "distill"])
def test_killed_stage_resumes_to_the_same_result(stage: str, world: dict, tmp_path: Path) -> None:
    straight = run(stage, spec_for(stage, world, tmp_path / "straight"), tmp_path / "straight.json")
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed_spec = spec_for(stage, world, tmp_path / "killed")
    run(stage, killed_spec, tmp_path / "killed.json", kill_after_checkpoint=True)
    resumed = run(stage, killed_spec, tmp_path / "killed.json")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = json.loads((tmp_path / "straight" / "result.json").read_text())
    b = json.loads((tmp_path / "killed" / "result.json").read_text())
    resumed_key = "pretrain_resumed_from_step" if stage == "pretrain" else "resumed_from_step"
    assert b["metrics"][resumed_key] > 0 and a["metrics"][resumed_key] == 0  # it resumed; the straight run did not
    for key in FIGURES[stage]:
        assert b["metrics"][key] == a["metrics"][key], (key, a["metrics"][key], b["metrics"][key])
    assert b["model"]["sha256"] == a["model"]["sha256"]  # bitwise the same weights
