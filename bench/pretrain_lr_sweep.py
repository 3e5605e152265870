"""Held-out pretraining loss of the demo's tiny model against the peak learning rate and the step count.

Runs what ``base_model`` runs, ``tuneline.models.provision.provision_base_model`` on the recipe's demo corpus (the
tokenizer trained on it, the tiny Llama from the recipe's seed, pretrained and saved), once per (steps, lr) pair, one
after another in this process, everything else as the recipe says. The loss is deterministic for the same inputs on one
machine, so one run per point. What it does not say is how well each base fine-tunes: that needs the whole demo
(``make run`` with the recipe changed; docs/benchmarks.md has both for the kept recipe).

    python bench/pretrain_lr_sweep.py --steps 400 --lrs 3e-3 2e-3 1.2e-3 8e-4 [--recipe configs/demo.yaml]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._machine import cpu  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default=str(ROOT / "configs" / "demo.yaml"))
    parser.add_argument("--steps", type=int, nargs="+", default=None, help="step counts (default: the recipe's)")
    parser.add_argument("--lrs", type=float, nargs="+", default=None,
                        help="peak learning rates (default: the recipe's)")
    parser.add_argument("--out", default=None, help="also write the JSON lines to this file")
    args = parser.parse_args()

    from tuneline.data.demo import generate_corpus
    from tuneline.models.provision import provision_base_model
    from tuneline.params import load_recipe

    recipe = load_recipe(args.recipe)
    if recipe.model.build != "tiny" or recipe.data.demo is None:
        raise SystemExit(f"{args.recipe}: the sweep builds the tiny model on the demo corpus "
                         "(model.build: tiny and data.demo)")
    texts = generate_corpus(recipe.data.demo)
    machine = cpu()
    lines = []
    for steps in args.steps or [recipe.pretrain.steps]:
        for lr in args.lrs or [recipe.pretrain.learning_rate]:
            params = dataclasses.replace(recipe.pretrain, steps=steps, learning_rate=lr)
            start = time.perf_counter()
            with tempfile.TemporaryDirectory() as out:
                result = provision_base_model(recipe.model, params, texts, out, seed=recipe.seed).pretrain
            assert result is not None  # a tiny build always pretrains
            line = {"cpu": machine, "steps": steps, "learning_rate": lr, "batch_size": params.batch_size,
                    "seq_len": params.seq_len, "eval_loss_before": round(result["eval_loss_before"], 4),
                    "eval_loss_after": round(result["eval_loss_after"], 4), "train_seconds": round(
                        result["seconds"], 1), "wall_seconds": round(time.perf_counter() - start, 1),
                    "tokens_per_second": round(result["tokens_per_second"]), "bf16": result["bf16"],
                    "compile": result["meta"]["compile"]}
            print(json.dumps(line), flush=True)
            lines.append(line)
    if args.out:
        Path(args.out).write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
