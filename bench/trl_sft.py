"""Bare TRL ``SFTTrainer`` run for bench/sft_throughput.py: what a TRL user would write.

The workload comes from the benchmark's ``spec.json`` (base model, data, LoRA, steps, lr). Data is
a conversational dataset ({"messages": [...]} per line) trained with ``assistant_only_loss=True``:
the tokenizer's chat template marks the assistant turns with ``{% generation %}``, so the loss
covers exactly the tokens our stage labels (the benchmark checks this on the dumped dataset).

    python bench/trl_sft.py --spec SPEC --out DIR --result RESULT.json [--defaults]

Default: bf16 autocast where the CPU has it natively (fp32 elsewhere), gradient checkpointing off (TRL at its best
on this CPU).
``--defaults`` leaves ``bf16`` and ``gradient_checkpointing`` at TRL 1.x's defaults (both on).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sft_throughput import timing_callback, versions, write_json  # noqa: E402 - stdlib-only module


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--spec", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--result", type=Path, required=True)
    p.add_argument("--defaults", action="store_true", help="TRL's own bf16 / gradient checkpointing defaults")
    p.add_argument("--eager", action="store_true", help="load the model with eager attention (best on a CPU)")
    args = p.parse_args()
    spec = json.loads(args.spec.read_text(encoding="utf-8"))

    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    dataset = load_dataset("json", data_files=spec["trl_train"], split="train")
    tokenizer = AutoTokenizer.from_pretrained(spec["base_model"])
    model = AutoModelForCausalLM.from_pretrained(spec["base_model"], dtype=torch.float32,
                                                 **({"attn_implementation": "eager"} if args.eager else {}))

    speed: dict = {}
    if not args.defaults:
        fields = {f.name for f in dataclasses.fields(SFTConfig)}
        speed["bf16"] = spec.get("bf16", True)  # where it is native (the driver decides), else fp32
        # transformers 5 renamed gradient_checkpointing -> activation_checkpointing (old name deprecated)
        speed["activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"] = False
    config = SFTConfig(
        output_dir=str(args.out / "checkpoints"),
        max_steps=spec["steps"],
        per_device_train_batch_size=spec["batch_size"],
        gradient_accumulation_steps=1,
        learning_rate=spec["learning_rate"],
        lr_scheduler_type=spec["lr_scheduler"],
        warmup_steps=spec["warmup_steps"],
        weight_decay=spec["weight_decay"],
        max_length=spec["max_length"],
        assistant_only_loss=True,
        packing=False,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        disable_tqdm=True,
        seed=spec["seed"],
        data_seed=spec["seed"],
        dataloader_num_workers=0,
        include_num_input_tokens_seen="non_padding",
        use_cpu=not torch.cuda.is_available(),
        **speed,
    )
    lora = spec["lora"]
    peft_config = LoraConfig(
        r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"], target_modules="all-linear",
        bias="none", task_type="CAUSAL_LM",
    )
    cb = timing_callback(str(args.out / "train_dataset.jsonl"))
    trainer = SFTTrainer(
        model=model, args=config, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config,
        callbacks=[cb],
    )
    trainer.train()
    adapter_dir = args.out / "model"
    trainer.save_model(str(adapter_dir))

    write_json(
        args.result,
        {
            **cb.summary(),
            "adapter_dir": str(adapter_dir),
            "bf16": bool(config.bf16),
            "gradient_checkpointing": bool(getattr(config, "activation_checkpointing", None)
                                           or getattr(config, "gradient_checkpointing", False)),
            "defaults": args.defaults,
            "attention": model.config._attn_implementation,
            "trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
            "threads": torch.get_num_threads(),
            "versions": versions(),
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
