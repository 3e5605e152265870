"""``POST /classify``: input validation (400/413/415/422), labels and probabilities, the inference log."""

from __future__ import annotations

from pathlib import Path

import pytest

from tuneline.classify.serving import ClassifyRequestError, parse_classify_request

from _minilm import minilm2  # noqa: F401 - the fixture


@pytest.mark.parametrize("body,status", [
    ([], 400), ({}, 422), ({"text": "a", "texts": ["b"]}, 422), ({"text": 3}, 422), ({"texts": []}, 422),
    ({"texts": ["ok", "  "]}, 422), ({"texts": ["x"] * 5}, 413), ({"text": "a", "prompt": "b"}, 422)])
def test_bad_requests(body, status) -> None:
    with pytest.raises(ClassifyRequestError) as err:
        parse_classify_request(body, max_batch=4)
    assert err.value.status == status


def test_classify_endpoint(minilm2: str, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from tuneline.classify.data import LabelSet
    from tuneline.classify.model import load_encoder_classifier
    from tuneline.deploy.inference_log import InferenceLog
    from tuneline.deploy.server import create_app
    from tuneline.params import ServeParams

    model, tokenizer = load_encoder_classifier(minilm2, LabelSet(("negative", "positive")))
    model.eval()
    log = InferenceLog(tmp_path / "log.db")
    info = {"name": "clf", "version": 1, "alias": "champion", "kind": "classifier", "max_batch": 3, "max_length": 16}
    client = TestClient(create_app(model, tokenizer, info, log, ServeParams()))
    ok = client.post("/classify", json={"texts": ["a fine film", "dreadful"]})
    assert ok.status_code == 200
    results = ok.json()["results"]
    assert len(results) == 2 and all(r["label"] in ("negative", "positive") for r in results)
    assert all(abs(sum(r["probabilities"].values()) - 1) < 1e-4 for r in results)
    assert client.post("/classify", json={"texts": ["a"] * 4}).status_code == 413
    assert client.post("/classify", content=b"{", headers={"content-type": "application/json"}).status_code == 400
    assert client.post("/classify", content=b"x", headers={"content-type": "text/plain"}).status_code == 415
    assert client.post("/classify", json={"text": ""}).status_code == 422
    rows = log.read_since(0)
    assert [r["status"] for r in rows] == [200, 200, 413, 400, 415, 422]
    assert rows[0]["prompt"] == "a fine film" and rows[0]["response"] in ("negative", "positive")
