"""Typed references and trainer specs: one JSON round trip, strict on the way in."""

from __future__ import annotations

import json

import pytest

from tuneline.params import DpoParams, SftParams
from tuneline.refs import FileRef, ModelRef, RawDataRef, RefError, SplitsRef
from tuneline.specs import DpoSpec, MlflowTarget, Outcome, SftSpec

BASE = ModelRef(uri="file:///m/base", sha256="a" * 64, kind="full", method="tiny", stage="base_model",
                mlflow_run_id="r0")


def test_refs_round_trip_through_json() -> None:
    adapter = ModelRef(uri="s3://bucket/sft/model", sha256="b" * 64, kind="adapter", method="lora",
                       stage="sft_adapter", base=BASE, metrics={"global_step": 5}, params={"lora": {"r": 8}})
    assert ModelRef.from_json(adapter.to_json()) == adapter
    raw = RawDataRef(recipe="demo", sha256="c" * 64, files=(
        FileRef(uri="file:///d/a.jsonl", sha256="d" * 64, bytes=10, role="sft", fields={"prompt": "q"}),))
    again = RawDataRef.from_json(raw.to_json())
    assert again == raw and isinstance(again.files, tuple) and isinstance(again.files[0], FileRef)


def test_unknown_keys_and_wrong_types_are_errors_naming_the_key() -> None:
    data = BASE.to_dict()
    with pytest.raises(RefError, match="unknown key path"):
        ModelRef.from_dict({**data, "path": "/m/base"})
    with pytest.raises(RefError, match="kind: 'merged' is not one of"):
        ModelRef.from_dict({**data, "kind": "merged"})
    with pytest.raises(RefError, match="an adapter needs its base"):
        ModelRef.from_dict({**data, "kind": "adapter"})
    with pytest.raises(RefError, match="not valid JSON"):
        ModelRef.from_json("{")


def test_every_spec_round_trips_and_rejects_unknown_keys() -> None:
    sft = SftSpec(out_uri="file:///o", seed=3, base=BASE, train_uri="file:///t", val_uri="file:///v",
                  params=SftParams(method="full"), mlflow=MlflowTarget(tracking_uri="sqlite:///x", run_id="r"))
    assert SftSpec.from_json(sft.to_json()) == sft and SftSpec.module == "tuneline.recipes.sft"
    dpo = DpoSpec(out_uri="file:///o", seed=1, sft=BASE, train_uri="a", val_uri="b", params=DpoParams(beta=0.2))
    assert DpoSpec.from_json(dpo.to_json()).params.beta == 0.2
    with pytest.raises(RefError, match="unknown key params.lr"):
        SftSpec.from_dict({**json.loads(sft.to_json()), "params": {"lr": 1}})
    with pytest.raises(RefError, match="missing key"):
        SftSpec.from_dict({"out_uri": "file:///o", "seed": 1})
    outcome = Outcome(model=BASE, metrics={"steps": 2}, curves={"train": [[1, 2.0]]})
    assert Outcome.from_json(outcome.to_json()) == outcome


def test_splits_ref_names_the_missing_split() -> None:
    ref = SplitsRef(uris={"train": "file:///t"}, counts={"train": 1}, sha256={"train": "x"}, dataset_sha256="y",
                    seed=0, membership_uri="m", drift_reference_uri="d", mlflow_run_id="r")
    with pytest.raises(RefError, match="no 'preference_train' split .* has train"):
        ref.uri("preference_train")
