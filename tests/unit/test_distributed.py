"""Multi-process training (DDP on CPU, gloo): the same global batch gives the same loss curve as one process,
each rank trains on half the data, and only rank 0 reports, logs to MLflow, saves and writes the result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tuneline.params import SftParams, TinyModelParams
from tuneline.train import distributed

ROOT = Path(__file__).resolve().parents[2]
TINY = TinyModelParams(vocab_size=384, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2,
                       num_kv_heads=2, max_position_embeddings=128, tokenizer_min_frequency=1)
# Two processes agree with one to float32 reduction order (gloo sums the two ranks' gradients in another
# order than one process's backward sums its batch): measured within 1e-6 here; the bound leaves room.
LOSS_TOLERANCE = 1e-4


def test_launch_command_runs_one_process_plainly_and_several_under_torchrun() -> None:
    assert distributed.launch_command("py", "tuneline.recipes.sft", ["--spec", "s.json"], 1) == [
        "py", "-m", "tuneline.recipes.sft", "--spec", "s.json"]
    cmd = distributed.launch_command("py", "tuneline.recipes.sft", ["--spec", "s.json"], 2)
    assert cmd[:3] == ["py", "-m", "torch.distributed.run"] and "--standalone" in cmd
    assert cmd[cmd.index("--nproc-per-node") + 1] == "2"
    assert cmd[-4:] == ["--module", "tuneline.recipes.sft", "--spec", "s.json"]
    with pytest.raises(ValueError, match="num_processes must be >= 1"):
        distributed.launch_command("py", "m", [], 0)


def test_world_mismatch_names_the_launch_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match="torchrun --standalone --nproc-per-node 2"):
        distributed.check_world(2, "tuneline.recipes.dpo")
    monkeypatch.setenv("WORLD_SIZE", "2")
    distributed.check_world(2, "tuneline.recipes.dpo")
    monkeypatch.setenv("RANK", "1")
    assert not distributed.is_main_process()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from tuneline.models.tiny import init_tiny_model, save_model, train_tokenizer
    from tuneline.records import ChatRecord, write_jsonl

    words = "red green blue black white pink gold grey".split()
    rows = [ChatRecord(kind="sft", source="test", line=i, messages=[
        {"role": "user", "content": f"colour {i}: {words[i % 8]} {words[(i * 3) % 8]}?"},
        {"role": "assistant", "content": " ".join(words[(i + k) % 8] for k in range(1 + i % 4))}])
        for i in range(24)]
    tokenizer = train_tokenizer([m["content"] for r in rows for m in r.messages], TINY)
    root = tmp_path_factory.mktemp("ddp")
    base = save_model(init_tiny_model(tokenizer, TINY, seed=0), tokenizer, root / "base")
    write_jsonl(root / "train.jsonl", (r.to_dict() for r in rows[:16]))
    write_jsonl(root / "val.jsonl", (r.to_dict() for r in rows[16:]))
    return {"base": Path(base), "train": root / "train.jsonl", "val": root / "val.jsonl", "root": root}


def _params(**kw) -> SftParams:
    # no dropout and fp32: the two runs may differ only by the reduction order of the gradients
    base = dict(method="lora", learning_rate=3e-3, max_steps=4, eval_steps=2, save_steps=2, bf16=False,
                warmup_ratio=0.0, group_by_length=True)
    base.update(kw)
    from tuneline.params import LoraParams

    return SftParams(lora=LoraParams(r=4, alpha=8, dropout=0.0), **base)


@pytest.mark.slow
def test_two_cpu_processes_match_one_and_split_the_data(tiny: dict[str, Path], tmp_path: Path) -> None:
    import torch
    from mlflow.tracking import MlflowClient

    from tuneline.params import to_plain
    from tuneline.records import read_records
    from tuneline.train.sft import train_sft

    torch.set_num_threads(1)
    # one process, global batch 8
    one = train_sft(tiny["base"], read_records(tiny["train"]), read_records(tiny["val"]),
                    _params(batch_size=8), tmp_path / "one", seed=0)

    # two gloo ranks of 4 each (the same global batch), launched as the launcher does, with an MLflow run
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking)
    run_id = client.create_run(client.create_experiment("ddp")).info.run_id
    from tuneline.models.provision import model_ref

    base = Path(tiny["base"])
    spec = {"base": model_ref(base, base.as_uri(), method="tiny", stage="base_model").to_dict(),
            "train_uri": Path(tiny["train"]).as_uri(), "val_uri": Path(tiny["val"]).as_uri(),
            "out_uri": (tmp_path / "two").as_uri(), "seed": 0,
            "params": to_plain(_params(batch_size=4, num_processes=2)),
            "mlflow": {"tracking_uri": tracking, "run_id": run_id}}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    cmd = distributed.launch_command(sys.executable, "tuneline.recipes.sft", ["--spec", str(tmp_path / "spec.json")], 2)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "result.json").read_text())["details"]

    # the same loss curve: every step's global batch holds the same examples
    assert [s for s, _ in two["train_losses"]] == [s for s, _ in one.train_losses] == [1, 2, 3, 4]
    assert [v for _, v in two["train_losses"]] == pytest.approx([v for _, v in one.train_losses], abs=LOSS_TOLERANCE)
    assert one.train_losses[-1][1] < one.train_losses[0][1]  # and it learns
    # each rank trained on half of the 4 x 8 examples; one process on all of them
    assert one.examples_per_rank == [32]
    assert two["examples_per_rank"] == [16, 16]
    # rank 0 alone: one "done" line, one metric per step in MLflow, one saved adapter
    assert proc.stdout.count("sft done:") == 1, proc.stdout[-2000:]
    history = client.get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]
    assert (tmp_path / "two" / "model" / "adapter_model.safetensors").is_file()
