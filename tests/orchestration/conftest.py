"""Orchestration tests run the real assets in memory against a tiny recipe and a temp state dir."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

TINY_RECIPE = {
    "name": "ci-tiny",
    "seed": 3,
    "model": {"build": "tiny", "tiny": {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
                                        "num_layers": 2, "num_heads": 2, "num_kv_heads": 2,
                                        "max_position_embeddings": 256}},
    "pretrain": {"steps": 6, "batch_size": 4, "seq_len": 64, "warmup_steps": 2},
    "data": {"demo": {"seed": 1, "examples_per_task": 30, "preference_pairs": 60, "corpus_paragraphs": 200,
                      "drift_examples": 20}},
    "validation": {"max_tokens": 200, "min_accepted": 50, "max_quarantined_fraction": 0.2},
    "split": {"val_fraction": 0.15, "test_fraction": 0.15},
}


@pytest.fixture
def tiny_recipe(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY_RECIPE))
    return path
