"""LLaMA-Factory 0.9.5 run for bench/sft_throughput.py (runs in .bench/llamafactory-venv).

Writes the run's YAML recipe (``OUT/llamafactory.yaml``) from the benchmark's ``spec.json`` and
trains it exactly as ``llamafactory-cli train OUT/llamafactory.yaml`` does on one device (the
CLI's launcher calls ``llamafactory.train.tuner.run_exp()`` in-process); the one difference is
the benchmark's timing callback, passed through ``run_exp(callbacks=[...])``. To reproduce a run
by hand: ``.bench/llamafactory-venv/bin/llamafactory-cli train OUT/llamafactory.yaml``.

    .bench/llamafactory-venv/bin/python bench/llamafactory_sft.py --spec SPEC --out DIR --result R.json [--defaults]

Data: a sharegpt-style dataset registered in ``dataset_info.json``. Template: none is named, so
LLaMA-Factory parses one from the tokenizer's own chat template (``parse_template``); the
benchmark checks the resulting token ids and loss mask against ours. Default: bf16 where the CPU has it natively
(the driver's spec says; fp32 elsewhere), gradient checkpointing off (its fastest setting). ``--defaults``: gradient checkpointing at its default (on).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sft_throughput import timing_callback, versions, write_json  # noqa: E402 - stdlib-only module


def recipe(spec: dict, out: Path, defaults: bool, use_cpu: bool) -> dict:
    """The LLaMA-Factory YAML recipe for the benchmark workload."""
    lora = spec["lora"]
    cfg = {
        "model_name_or_path": spec["base_model"],
        "stage": "sft",
        "do_train": True,
        "finetuning_type": "lora",
        "lora_rank": lora["r"],
        "lora_alpha": lora["alpha"],
        "lora_dropout": lora["dropout"],
        "lora_target": "all",
        "dataset_dir": spec["llamafactory_dataset_dir"],
        "dataset": spec["llamafactory_dataset"],
        # no `template`: parsed from the tokenizer's chat template (same ids as ours, checked)
        "cutoff_len": spec["max_length"],
        "overwrite_cache": True,
        "output_dir": str(out / "model"),
        "logging_steps": 1,
        "save_strategy": "no",
        "plot_loss": False,
        "report_to": "none",
        "disable_tqdm": True,
        "per_device_train_batch_size": spec["batch_size"],
        "gradient_accumulation_steps": 1,
        "learning_rate": spec["learning_rate"],
        "max_steps": spec["steps"],
        "lr_scheduler_type": spec["lr_scheduler"],
        "warmup_steps": spec["warmup_steps"],
        "weight_decay": spec["weight_decay"],
        "bf16": spec.get("bf16", True),  # where it is native (the driver decides), else fp32
        "seed": spec["seed"],
        "data_seed": spec["seed"],
        "dataloader_num_workers": 0,
        "include_num_input_tokens_seen": "non_padding",
    }
    if use_cpu:  # bf16 on a machine without CUDA needs it (transformers refuses otherwise)
        cfg["use_cpu"] = True
    if not defaults:
        cfg["disable_gradient_checkpointing"] = True
    return cfg


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--spec", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--result", type=Path, required=True)
    p.add_argument("--defaults", action="store_true", help="gradient checkpointing at its default (on)")
    p.add_argument("--eager", action="store_true", help="flash_attn: disabled (eager attention, best on a CPU)")
    p.add_argument("--write-only", action="store_true", help="write the YAML and stop")
    args = p.parse_args()
    spec = json.loads(args.spec.read_text(encoding="utf-8"))

    import torch
    import yaml

    cfg = recipe(spec, args.out, args.defaults, use_cpu=not torch.cuda.is_available())
    if args.eager:
        cfg["flash_attn"] = "disabled"
    args.out.mkdir(parents=True, exist_ok=True)
    yaml_path = args.out / "llamafactory.yaml"
    yaml_path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    if args.write_only:
        print(yaml_path)
        return 0

    from llamafactory.train.tuner import run_exp

    cb = timing_callback(str(args.out / "train_dataset.jsonl"))
    run_exp(args=dict(cfg), callbacks=[cb])

    write_json(
        args.result,
        {
            **cb.summary(),
            "adapter_dir": str(args.out / "model"),
            "yaml": str(yaml_path),
            "bf16": cfg["bf16"],
            "gradient_checkpointing": args.defaults,
            "defaults": args.defaults,
            "flash_attn": cfg.get("flash_attn", "auto"),
            "threads": torch.get_num_threads(),
            "versions": versions(),
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
