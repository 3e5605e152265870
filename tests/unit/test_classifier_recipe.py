"""The classifier trainer CLI end to end on tiny splits: strategy auto decided and recorded, the model, the
report (test metrics, linear probe, plots), the ensemble's members and weights; and the macro-F1 gate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tuneline.params import ClassifierParams, EvaluationParams, GateParams
from tuneline.records import ChatRecord, write_jsonl
from tuneline.specs import ClassifierSpec

from _minilm import minilm2  # noqa: F401 - the fixture

ROWS = [("my card has not arrived", "card"), ("where is my new card", "card"), ("card still not here", "card"),
        ("the card never came", "card"), ("how do I top up", "top_up"), ("top up with a transfer", "top_up"),
        ("add money to my account", "top_up"), ("put cash on my account", "top_up")]


def _split(tmp: Path, name: str) -> str:
    records = [ChatRecord(kind="classification", messages=[{"role": "user", "content": t}], source="x.csv", line=i,
                          label=label) for i, (t, label) in enumerate(ROWS, 1)]
    path = tmp / f"{name}.jsonl"
    write_jsonl(path, (r.to_dict() for r in records))
    return str(path)


def _spec(tmp_path: Path, encoder: str, **kw) -> ClassifierSpec:
    ref = tmp_path / "reference.jsonl"
    ref.write_text("".join(json.dumps({"instruction": f"Write a poem about topic {i}.", "input": "", "output": "ok"})
                           + "\n" for i in range(12)), encoding="utf-8")
    params = ClassifierParams(strategy="auto", batch_size=4, max_length=12, eval_steps=1, max_steps=2, bf16=False,
                              reference_sample=10, ensemble_max_lengths=(8, 12))
    return ClassifierSpec(out_uri=str(tmp_path / "out"), seed=0, encoder=encoder, train_uri=_split(tmp_path, "train"),
                          val_uri=_split(tmp_path, "val"), test_uri=_split(tmp_path, "test"), params=params,
                          evaluation=EvaluationParams(bootstrap_samples=50), reference_uris=(str(ref),), **kw)


def test_single_classifier_with_auto_strategy_and_probe(minilm2: str, tmp_path: Path) -> None:
    from tuneline.classify.strategy import matrix
    from tuneline.recipes.classifier import run

    outcome = run(_spec(tmp_path, minilm2))
    d = outcome.details["decision"]
    assert d["strategy"] == outcome.metrics["strategy"] == matrix(False, d["similar_domain"])  # 4 per class: small
    assert d["domain_distance"] > 0.5 and d["strategy"] == "top_layers"  # bank texts vs poem prompts: dissimilar
    assert d["large_data"] is False and d["examples_per_class"] == 4.0 and "domain_distance" in d
    assert outcome.model is not None and outcome.model.params["labels"] == ["card", "top_up"]
    assert 0.0 <= outcome.metrics["test_macro_f1"] <= 1.0 and "linear_probe_macro_f1" in outcome.metrics
    assert outcome.metrics["latency_b1_p50_ms"] > 0 and outcome.metrics["throughput_b32"] > 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert set(report["reports"]) == {"classifier", "linear_probe"}
    assert Path(report["reports"]["classifier"]["plots"]["confusion"]).is_file()
    assert (tmp_path / "out" / "result.json").is_file()


def test_ensemble_members_and_weights(minilm2: str, tmp_path: Path) -> None:
    from tuneline.recipes.classifier import run

    outcome = run(_spec(tmp_path, minilm2, strategy="head", max_lengths=(8, 12), probe=False))
    ens = outcome.details["ensemble"]
    assert outcome.model is None and ens["max_lengths"] == [8, 12] and sum(ens["weights"]) == pytest.approx(1.0)
    assert [m["params"]["max_length"] for m in ens["members"]] == [8, 12]
    assert set(outcome.details["reports"]) == {"member_8", "member_12", "ensemble"}


def test_macro_f1_gate() -> None:
    from tuneline.evaluate.gate import classifier_promotion

    y = [0, 1, 2, 0, 1, 2] * 20
    good = {"name": "classifier", "predictions": y, "macro_f1": 1.0}
    worse = {"name": "champion", "predictions": [0] * len(y), "macro_f1": 1 / 6}
    params = GateParams(primary_metric="macro_f1", min_margin=0.01, max_parent_regression=0.02)
    assert classifier_promotion(y, good, params, k=3, seed=0, champion=worse).passed
    refused = classifier_promotion(y, worse, params, k=3, seed=0, champion=good)
    assert not refused.passed and "below the margin" in refused.reasons[0]
    first = classifier_promotion(y, worse, params, k=3, seed=0, floor={"name": "probe", "macro_f1": 0.5})
    assert not first.passed and "below the probe floor" in first.reasons[0]
    assert classifier_promotion(y, good, params, k=3, seed=0, floor={"name": "probe", "macro_f1": 0.99}).passed
