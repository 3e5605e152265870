"""The kill -9 drill: every training stage is SIGKILLed at a random step of its run, rerun with the same spec,
and must end with the figures and the weights of an uninterrupted run.

    .venv/bin/python bench/kill_drill.py --seeds 5 [--stages pretrain,sft,dpo,distill] [--out bench/results/kill_drill.json]

For each stage: one uninterrupted run, then per seed a run killed at a random step, and a rerun of the same spec.
The step is drawn from the seed: the trainer is SIGKILLed a random 0-50 ms after a random one of its checkpoints
(one with training left after it) is complete, so it dies in the middle of the steps after it; the rerun must
resume from the newest complete checkpoint at the kill. Reported per kill: the checkpoint waited for, the moment,
the checkpoint resumed from, whether the final figures are equal and the weights bitwise equal. The short
version of this drill is tests/integration/test_resume.py (one kill per stage, right after the first checkpoint).
Prints the CPU model and flags with the results.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._machine import cpu  # noqa: E402

FIGURES = {"pretrain": ("pretrain_eval_loss_after", "pretrain_final_loss"),
           "sft": ("best_val_loss", "global_step", "final_train_loss"),
           "dpo": ("final_loss", "reward_accuracy_after", "reward_margin_after"),
           "distill": ("final_loss", "val_kl_after", "val_ce_after")}


def world(root: Path) -> dict:
    """A tiny base model, a corpus, SFT records and preference pairs: what every stage's spec points at."""
    from tuneline.data.demo import generate_corpus
    from tuneline.models.provision import model_ref
    from tuneline.models.tiny import init_tiny_model, save_model, train_tokenizer
    from tuneline.params import DemoDataParams, TinyModelParams
    from tuneline.records import ChatRecord, write_jsonl

    tiny = TinyModelParams(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2,
                           num_kv_heads=2, max_position_embeddings=128, tokenizer_min_frequency=1)
    words = "red green blue cat dog sun moon tree fish bird milk cake".split()
    sft = [ChatRecord(kind="sft", source="d", line=i, messages=[
        {"role": "user", "content": f"echo {words[i % 12]} {words[(i * 5) % 12]}"},
        {"role": "assistant", "content": f"{words[i % 12]} {words[(i * 5) % 12]}"}]) for i in range(96)]
    pairs = [ChatRecord(kind="preference", source="d", line=i, messages=[{"role": "user", "content": f"colour {i}"}],
                        chosen=words[i % 3], rejected=words[3 + i % 9]) for i in range(64)]
    corpus = generate_corpus(DemoDataParams(seed=4, corpus_paragraphs=600))
    (root / "corpus.txt").write_text("\n\n".join(corpus) + "\n")
    tokenizer = train_tokenizer(corpus + [m["content"] for r in sft for m in r.messages], tiny)
    base = save_model(init_tiny_model(tokenizer, tiny, seed=0), tokenizer, root / "base")
    write_jsonl(root / "sft.jsonl", (r.to_dict() for r in sft))
    write_jsonl(root / "pairs.jsonl", (r.to_dict() for r in pairs))
    return {"root": root, "tiny": tiny,
            "base": model_ref(base, base.as_uri(), method="full", stage="sft_adapter").to_dict()}


def spec_for(stage: str, w: dict, out: Path) -> dict:
    root, tiny = w["root"], w["tiny"]
    common = {"out_uri": out.as_uri(), "seed": 3}
    if stage == "pretrain":
        shape = {k: getattr(tiny, k) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                                               "num_heads", "num_kv_heads", "max_position_embeddings")}
        return {**common, "model": {"build": "tiny", "tiny": shape}, "steps": 120, "corpus_uris": [
            (root / "corpus.txt").as_uri()], "pretrain": {"steps": 120, "batch_size": 8, "seq_len": 64,
                                                          "warmup_steps": 4, "log_every": 5, "checkpoint_every": 20}}
    if stage == "sft":
        return {**common, "base": w["base"], "train_uri": (root / "sft.jsonl").as_uri(),
                "val_uri": (root / "sft.jsonl").as_uri(),
                "params": {"method": "lora", "batch_size": 8, "max_steps": 60, "eval_steps": 10, "save_steps": 10,
                           "bf16": False, "max_length": 48, "lora": {"r": 4, "alpha": 8},
                           "early_stopping": {"patience": 100}}}
    if stage == "dpo":
        return {**common, "sft": w["base"], "train_uri": (root / "pairs.jsonl").as_uri(),
                "val_uri": (root / "pairs.jsonl").as_uri(), "max_steps": 40,
                "params": {"learning_rate": 5e-3, "batch_size": 8, "max_length": 48, "bf16": False, "save_steps": 8,
                           "lora": {"r": 4, "alpha": 8, "dropout": 0.0}}}
    return {**common, "teacher": w["base"], "train_uri": (root / "sft.jsonl").as_uri(),
            "val_uri": (root / "sft.jsonl").as_uri(), "cache_uri": (out.parent / f"{out.name}-cache").as_uri(),
            "max_steps": 60, "top_k": 16,
            "params": {"student_layers": 1, "batch_size": 8, "bf16": False, "save_steps": 10, "max_length": 48}}


# checkpoints to kill after: every one that leaves at least one more checkpoint interval of training (spec_for:
# pretraining 120 steps, SFT 36 (3 epochs of 12), DPO 40, distillation 60; the tiny steps take 20-80 ms)
CHECKPOINTS = {"pretrain": (20, 40, 60, 80), "sft": (10, 20), "dpo": (8, 16, 24), "distill": (10, 20, 30, 40)}


def newest_checkpoint(out: Path) -> int:
    """The step of the newest complete checkpoint under ``out`` (0 when there is none yet)."""
    from tuneline.train.checkpoints import COMPLETE_MARKER, checkpoint_step

    return max((checkpoint_step(m.parent) for m in out.rglob(f"checkpoint-*/{COMPLETE_MARKER}")), default=0)


def launch(stage: str, spec: dict, path: Path) -> subprocess.Popen:
    path.write_text(json.dumps(spec))
    return subprocess.Popen([sys.executable, "-m", f"tuneline.recipes.{stage}", "--spec", str(path)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def outcome(out: Path) -> dict:
    return json.loads((out / "result.json").read_text())


def drill(stage: str, w: dict, seeds: int, scratch: Path) -> dict:
    started = time.monotonic()
    straight = launch(stage, spec_for(stage, w, scratch / f"{stage}-straight"), scratch / f"{stage}-straight.json")
    _, err = straight.communicate()
    assert straight.returncode == 0, err[-2000:]
    duration = time.monotonic() - started
    reference = outcome(scratch / f"{stage}-straight")
    kills = []
    for seed in range(seeds):
        out = scratch / f"{stage}-kill-{seed}"
        spec = spec_for(stage, w, out)
        draw = random.Random(f"{stage}:{seed}")
        target, extra = draw.choice(CHECKPOINTS[stage]), draw.uniform(0.0, 0.05)
        proc = launch(stage, spec, scratch / f"{stage}-kill-{seed}.json")
        launched = time.monotonic()
        while proc.poll() is None and newest_checkpoint(out) < target:
            time.sleep(0.02)
        time.sleep(extra)
        finished_first = proc.poll() is not None
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed_after, killed_at = time.monotonic() - launched, newest_checkpoint(out)
        rerun = launch(stage, spec, scratch / f"{stage}-kill-{seed}.json")
        _, err = rerun.communicate()
        ok = rerun.returncode == 0
        got = outcome(out) if ok else {}
        metrics = got.get("metrics", {})
        resumed = metrics.get("resumed_from_step", metrics.get("pretrain_resumed_from_step"))
        figures_equal = ok and all(metrics.get(k) == reference["metrics"].get(k) for k in FIGURES[stage])
        kills.append({"seed": seed, "after_checkpoint": target, "newest_checkpoint_at_kill": killed_at,
                      "killed_after_s": round(killed_after, 2), "had_finished": finished_first,
                      "rerun_ok": ok, "resumed_from_step": resumed,
                      "resumed_as_expected": ok and not finished_first and killed_at >= target and resumed == killed_at,
                      "figures_equal": figures_equal,
                      "weights_bitwise_equal": ok and got["model"]["sha256"] == reference["model"]["sha256"],
                      "error": None if ok else err[-500:]})
    return {"stage": stage, "uninterrupted_s": round(duration, 1), "kills": kills,
            "all_equal": all(k["figures_equal"] and k["weights_bitwise_equal"] for k in kills),
            "all_resumed": all(k["resumed_as_expected"] for k in kills)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--stages", default="pretrain,sft,dpo,distill")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "kill_drill.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tuneline-kill-drill-") as tmp:
        w = world(Path(tmp))
        results = [drill(stage, w, args.seeds, Path(tmp)) for stage in args.stages.split(",")]
    report = {"cpu": cpu(), "seeds": args.seeds, "stages": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"CPU: {report['cpu']}")
    for r in results:
        resumed = [k["resumed_from_step"] for k in r["kills"]]
        print(f"{r['stage']:9s} uninterrupted {r['uninterrupted_s']:6.1f} s; {len(r['kills'])} kills, resumed from "
              f"{resumed}, each from the newest checkpoint at the kill: {r['all_resumed']}; same figures and "
              f"bitwise weights: {r['all_equal']}")
    return 0 if all(r["all_equal"] and r["all_resumed"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
