"""Each classifier strategy trains a few steps on (a two-block cut of) the real MiniLM encoder: frozen
parameters unchanged, trainable ones moved, the saved model reloads to identical logits; a rerun resumes from
its checkpoint; ``auto`` picks the matrix's answer."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from safetensors.torch import load_file

from tuneline.classify.data import Examples, LabelSet, class_weights
from tuneline.classify.strategy import MATRIX, decide
from tuneline.params import ClassifierParams, LoraParams

from _minilm import minilm2  # noqa: F401 - the fixture

TEXTS = ("my card has not arrived", "where is my new card", "card still not here", "how do I top up",
         "top up with bank transfer", "add money to my account", "the app charged me twice", "double charge today")
LABELS = ("card_arrival", "card_arrival", "card_arrival", "top_up", "top_up", "top_up", "charged_twice",
          "charged_twice")
TRAIN = Examples(TEXTS, LABELS)
PARAMS = ClassifierParams(batch_size=4, max_length=12, eval_steps=1, max_steps=2, top_layers=1, bf16=False,
                          lora=LoraParams(r=4, alpha=8, dropout=0.0, target_modules=("query", "value")))


@pytest.fixture(scope="module")
def encoder(minilm2: str) -> str:
    return minilm2


def _weights(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("strategy,pooling", [("head", "mean"), ("top_layers", "mean"), ("full", "mean"),
                                              ("lora", "mean"), ("head", "cls")])
def test_strategy_trains_what_it_says(strategy: str, pooling: str, encoder: str, tmp_path: Path) -> None:
    import torch

    from tuneline.classify.model import load_classifier, load_encoder_classifier, predict_proba
    from tuneline.classify.train import fit_classifier

    params = dataclasses.replace(PARAMS, pooling=pooling, head_init="probe" if pooling == "mean" else "random")
    torch.manual_seed(3)
    before = _weights(load_encoder_classifier(encoder, LabelSet.from_labels(LABELS), pooling=pooling)[0])
    result, model, tokenizer = fit_classifier(encoder, TRAIN, TRAIN, params, tmp_path, strategy=strategy, seed=3)
    after = _weights(model)
    assert set(before) == set(after) and result.global_step == 2 and result.strategy == strategy
    # the last step's trainable weights (the checkpoint); the returned model holds the best (validation) ones
    last = load_file(str(tmp_path / "checkpoints" / "ckpt-2" / "trainable.safetensors"))
    prefix = "encoder." if pooling == "mean" else "bert."
    head = {n for n in before if n.startswith(("classifier.", "bert.pooler."))}
    top = {n for n in before if n.startswith(f"{prefix}encoder.layer.1.")}
    if strategy == "lora":
        assert all("lora_" in n or "classifier" in n for n in last)
        assert any("lora_B" in n and last[n].abs().sum() > 0 for n in last)  # B starts at zero: it moved
        untouched = {n for n in before if ".key." in n or ".intermediate." in n or "embeddings" in n}
    else:
        expected = {"head": head, "top_layers": head | top, "full": set(before)}[strategy]
        assert set(last) == expected
        assert all(not torch.equal(last[n], before[n]) for n in expected if n.endswith("weight"))
        untouched = set(before) - expected
    assert (untouched or strategy == "full") and all(torch.equal(before[n], after[n]) for n in untouched)  # frozen
    assert result.trainable_params < result.total_params or strategy == "full"
    reloaded, tok2, labels = load_classifier(result.output_dir)
    assert labels.names == tuple(sorted(set(LABELS))) and type(reloaded) is type(model)
    a = predict_proba(model, tokenizer, TEXTS, max_length=12)
    b = predict_proba(reloaded, tok2, TEXTS, max_length=12)
    assert abs(a - b).max() < 1e-6


def test_probe_initialized_head_starts_at_the_probe(encoder: str, tmp_path: Path) -> None:
    from tuneline.classify.train import fit_classifier

    params = dataclasses.replace(PARAMS, max_steps=1)
    result, _, _ = fit_classifier(encoder, TRAIN, TRAIN, params, tmp_path, strategy="head", seed=0)
    assert result.val_macro_f1[0] == [0, 1.0]  # a logistic regression separates 8 training texts exactly


def test_rerun_resumes_from_the_checkpoint(encoder: str, tmp_path: Path) -> None:
    from tuneline.classify.train import train_classifier

    first = train_classifier(encoder, TRAIN, TRAIN, PARAMS, tmp_path, strategy="head", seed=1)
    assert first.resumed_from_step == 0 and (tmp_path / "checkpoints" / "ckpt-2" / "state.json").is_file()
    longer = dataclasses.replace(PARAMS, max_steps=3)
    again = train_classifier(encoder, TRAIN, TRAIN, longer, tmp_path, strategy="head", seed=1)
    assert again.resumed_from_step == 2 and again.global_step == 3
    assert [s for s, _ in again.train_losses][:2] == [1, 2]  # the curve carried over


def test_unknown_validation_label_is_an_error(encoder: str, tmp_path: Path) -> None:
    from tuneline.classify.data import LabelError
    from tuneline.classify.train import train_classifier

    with pytest.raises(LabelError, match="'refund'"):
        train_classifier(encoder, TRAIN, Examples(("give money back",), ("refund",)), PARAMS, tmp_path,
                         strategy="head", seed=0)


def test_class_weights_only_when_imbalanced() -> None:
    labels = LabelSet(("a", "b"))
    assert class_weights({"a": 10, "b": 9}, labels, "auto") is None
    assert class_weights({"a": 30, "b": 10}, labels, "auto") == pytest.approx([40 / 60, 40 / 20])
    assert class_weights({"a": 10, "b": 10}, labels, "balanced") == [1.0, 1.0]


@pytest.mark.parametrize("per_class,similar,expected", [
    (5, True, "head"), (5, False, "top_layers"), (500, True, "top_layers"), (500, False, "full")])
def test_auto_applies_the_matrix(per_class: int, similar: bool, expected: str) -> None:
    import numpy as np

    def embed(texts):  # task texts point one way; the reference the same way (similar) or orthogonal
        out = []
        for t in texts:
            v = np.zeros(4)
            v[0 if t.startswith("task") or similar else 1] = 1.0
            v[2] = 0.05 * (hash(t) % 7)
            out.append(v / np.linalg.norm(v))
        return np.array(out)

    counts = {"x": per_class, "y": per_class + 3}
    task = [f"task {i}" for i in range(40)]
    ref = [f"ref {i}" for i in range(40)]
    d = decide(counts, task, ref, large_data_per_class=100, similar_distance=0.5, sample=30, embed=embed)
    assert d.strategy == expected == MATRIX[(per_class >= 100, similar)]
    assert (d.domain_distance < 0.5) is similar and d.examples_per_class == per_class + 1.5
