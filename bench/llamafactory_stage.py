"""LLaMA-Factory 0.9.5 contender for bench/stage_throughput.py: ``stage: pt`` and ``stage: dpo`` (runs in
.bench/llamafactory-venv, built by bench/setup_llamafactory.sh; imports nothing from tuneline).

Writes the run's YAML recipe (``OUT/llamafactory.yaml``) and trains it as ``llamafactory-cli train`` does on one
device (``llamafactory.train.tuner.run_exp``, in-process), with a timing callback around the training loop. The
figures the benchmark compares (held-out loss, reward accuracy) are computed afterwards by the benchmark itself,
in the project's venv, from the model this run saves, the same way as for the other contenders.

- ``pt``: full fine-tuning on exactly the benchmark's training blocks, handed over pre-tokenized
  (``tokenized_path``: a ``datasets`` folder the benchmark wrote), so every contender trains on the same blocks;
- ``dpo``: LoRA on every linear layer, sigmoid loss, the adapter disabled as the reference (LLaMA-Factory's own
  choice for LoRA), on the benchmark's preference pairs as a sharegpt ranking dataset; the chat template is parsed
  from the tokenizer's own (no ``template`` key), as in bench/llamafactory_sft.py.

Both at their best flags for the CPU the parent names (``--bf16``), gradient checkpointing off.

    .bench/llamafactory-venv/bin/python bench/llamafactory_stage.py --stage pt --work W --base B --out O \
        --workload '{"steps": 60, ...}' --bf16 1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any


def common(base: str, out: Path, w: dict[str, Any], bf16: bool) -> dict[str, Any]:
    import torch

    cfg = {
        "model_name_or_path": base,
        "do_train": True,
        "output_dir": str(out / "model"),
        "overwrite_output_dir": True,
        "per_device_train_batch_size": w["batch_size"],
        "gradient_accumulation_steps": 1,
        "learning_rate": w["learning_rate"],
        "max_steps": w["steps"],
        "lr_scheduler_type": "cosine",
        "bf16": bf16,
        "disable_gradient_checkpointing": True,
        "save_strategy": "no",
        "logging_steps": 10,
        "plot_loss": False,
        "report_to": "none",
        "disable_tqdm": True,
        "seed": w["seed"],
        "data_seed": w["seed"],
        "dataloader_num_workers": 0,
        "overwrite_cache": True,
    }
    if not torch.cuda.is_available():
        cfg["use_cpu"] = True
    return cfg


def pt_recipe(work: Path, base: str, out: Path, w: dict[str, Any], bf16: bool) -> dict[str, Any]:
    return {**common(base, out, w, bf16), "stage": "pt", "finetuning_type": "full",
            "tokenized_path": str(work / "pt_tokenized"),  # the benchmark's blocks; other data arguments are ignored
            "dataset_dir": str(work / "llamafactory"), "dataset": "bench_corpus", "cutoff_len": w["seq_len"],
            "warmup_steps": w["warmup_steps"], "weight_decay": 0.01, "adam_beta2": 0.95}


def dpo_recipe(work: Path, base: str, out: Path, w: dict[str, Any], bf16: bool) -> dict[str, Any]:
    return {**common(base, out, w, bf16), "stage": "dpo", "finetuning_type": "lora", "lora_rank": w["lora_r"],
            "lora_alpha": 2 * w["lora_r"], "lora_dropout": 0.0, "lora_target": "all", "pref_beta": w["beta"],
            "pref_loss": "sigmoid", "dataset_dir": str(work / "llamafactory"), "dataset": "bench_pref",
            "cutoff_len": w["max_length"], "warmup_steps": 0, "weight_decay": 0.0}


def timing() -> Any:
    from transformers import TrainerCallback

    class Timing(TrainerCallback):
        begin = end = 0.0
        steps = 0

        def on_train_begin(self, args, state, control, **kwargs):
            self.begin = time.perf_counter()

        def on_train_end(self, args, state, control, **kwargs):
            self.end = time.perf_counter()
            self.steps = int(state.global_step)

    return Timing()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stage", choices=["pt", "dpo"], required=True)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--base", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--workload", required=True, help="the stage's workload (JSON), as the benchmark defines it")
    p.add_argument("--bf16", type=int, choices=[0, 1], required=True)
    p.add_argument("--eager", action="store_true", help="flash_attn: disabled (eager attention, best on a CPU)")
    args = p.parse_args()

    import yaml
    from llamafactory.train.tuner import run_exp

    w = json.loads(args.workload)
    make = pt_recipe if args.stage == "pt" else dpo_recipe
    cfg = make(args.work, args.base, args.out, w, bool(args.bf16))
    if args.eager:
        cfg["flash_attn"] = "disabled"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "llamafactory.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    clock = timing()
    run_exp(args=dict(cfg), callbacks=[clock])
    if clock.steps != w["steps"]:
        raise RuntimeError(f"LLaMA-Factory ran {clock.steps} steps, the workload is {w['steps']}")
    print("ROW " + json.dumps({"seconds": clock.end - clock.begin, "saved": str(args.out / "model"),
                               "bf16": bool(args.bf16), "yaml": str(args.out / "llamafactory.yaml")}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
