"""The transformers and MLflow internals tuneline uses (tuneline/compat) still work on the installed versions."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from tuneline.compat import mlflow as mlflow_compat
from tuneline.compat import transformers as tf_compat

PYPROJECT = (Path(__file__).parents[2] / "pyproject.toml").read_text()


@pytest.mark.parametrize("package, compat", [("transformers", tf_compat), ("mlflow", mlflow_compat)])
def test_pinned_version_is_the_installed_one(package: str, compat) -> None:
    from importlib.metadata import version

    assert version(package) == compat.PINNED, (
        f"{package} {version(package)} installed, compat checked for {compat.PINNED}: re-run these tests, then "
        "update PINNED")
    assert f'"{package}=={compat.PINNED}"' in PYPROJECT


def test_trainer_still_builds_its_dataloaders_from_the_sampler_hooks() -> None:
    from transformers import Trainer

    source = inspect.getsource(Trainer)
    assert "sampler_fn=self._get_train_sampler" in source and "sampler_fn=self._get_eval_sampler" in source
    assert list(inspect.signature(Trainer._get_train_sampler).parameters) == ["self", "train_dataset"]
    assert list(inspect.signature(Trainer._get_eval_sampler).parameters) == ["self", "eval_dataset"]


def test_sampler_hooks_choose_the_order_or_fall_back(tmp_path: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    data = [{"input_ids": [1, 2, i + 3], "labels": [1, 2, i + 3]} for i in range(6)]

    class Ordered(tf_compat.SamplerHooks, Trainer):
        def train_sampler(self, dataset):
            return list(reversed(range(len(dataset))))

    model = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, per_device_eval_batch_size=2,
                             report_to=[], use_cpu=True)
    collate = lambda rows: {k: torch.tensor([r[k] for r in rows]) for k in ("input_ids", "labels")}  # noqa: E731
    ordered = Ordered(model=model, args=args, train_dataset=data, eval_dataset=data, data_collator=collate)
    first = next(iter(ordered.get_train_dataloader()))["input_ids"][:, -1].tolist()
    assert first == [8, 7]  # the hook's order: the last examples first
    plain = next(iter(ordered.get_eval_dataloader()))["input_ids"][:, -1].tolist()
    assert plain == [3, 4]  # no eval hook: the Trainer's own sequential order


def test_keys_to_not_convert_names_the_head() -> None:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert "lm_head" in tf_compat.keys_to_not_convert(model)


def test_dataset_entity_is_what_log_inputs_takes() -> None:
    import mlflow.data
    import pandas as pd
    from mlflow.entities import Dataset

    dataset = mlflow.data.from_pandas(pd.DataFrame({"id": ["a"]}), source="mem", name="n", digest="d" * 36)
    entity = mlflow_compat.dataset_entity(dataset)
    assert isinstance(entity, Dataset) and entity.name == "n" and entity.digest == "d" * 36
