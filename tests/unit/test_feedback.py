"""Feedback on served answers: /generate returns its request_id, /feedback refuses bad input (never a 5xx) and
logs nothing twice, feedback becomes validated preference pairs, and the sensor asks for a run on enough of it."""

from __future__ import annotations

import http.client
import json
import threading
import time
from pathlib import Path

import dagster as dg
import pytest
import yaml

from tuneline.deploy.feedback import FeedbackError, feedback_pairs, parse_feedback, prepare_feedback
from tuneline.deploy.inference_log import InferenceLog
from tuneline.params import ServeParams, TinyModelParams


def answered(log: InferenceLog, prompt: str, response: str, version: int = 1) -> int:
    return log.append(model_name="m", model_version=version, prompt=prompt,
                      messages=[{"role": "user", "content": prompt}], response=response, status=200)


def test_parse_feedback_rules() -> None:
    assert parse_feedback({"request_id": 3, "rating": 5}).kind == "rating"
    assert parse_feedback({"chosen_request_id": 1, "rejected_request_id": 2}).other_request_id == 2
    for body, status in [([], 400), ({"request_id": 1}, 422), ({"request_id": "1", "rating": 3}, 422),
                         ({"request_id": 1, "rating": 6}, 422), ({"request_id": 1, "rating": True}, 422),
                         ({"request_id": 0, "rating": 3}, 422), ({"request_id": 1, "rating": 3, "x": 1}, 422),
                         ({"chosen_request_id": 4, "rejected_request_id": 4}, 422)]:
        with pytest.raises(FeedbackError) as err:
            parse_feedback(body)
        assert err.value.status == status, body


def test_feedback_becomes_validated_pairs_with_counts(tmp_path: Path) -> None:
    from tuneline.params import load_recipe
    from tuneline.records import read_records
    from tuneline.storage import Workspace

    log = InferenceLog(tmp_path / "inference.db")
    a = answered(log, "What is 2 plus 3?", "5", version=1)
    b = answered(log, "What is 2 plus 3?", "6", version=2)
    c = answered(log, "What is 2 plus 3?", "6", version=2)  # same text as b: a pair of equal answers
    d = answered(log, "Name a fruit.", "apple")
    e = answered(log, "Name a fruit.", "brick")
    lonely = answered(log, "Sort 3 1 2.", "1, 2, 3")
    log.add_feedback(kind="pairwise", request_id=a, other_request_id=b)
    log.add_feedback(kind="pairwise", request_id=b, other_request_id=c)
    log.add_feedback(kind="rating", request_id=d, rating=5)
    log.add_feedback(kind="rating", request_id=e, rating=1)
    log.add_feedback(kind="rating", request_id=lonely, rating=4)

    pairs = feedback_pairs(log)
    assert pairs.feedback_read == 5 and len(pairs.rows) == 3 and pairs.unpaired_ratings == 1
    assert pairs.rows[0]["model_version_chosen"] == "1" and pairs.rows[0]["model_version_rejected"] == "2"
    recipe = load_recipe(Path(__file__).resolve().parents[2] / "configs" / "demo.yaml")
    ref = prepare_feedback(log, Workspace(str(tmp_path / "out")), recipe)
    assert (ref.read, ref.accepted, ref.quarantined) == (3, 2, 1) and ref.balanced
    assert ref.reasons == {"chosen_equals_rejected": 1}
    assert ref.model_versions == {"1": 2, "2": 2} and ref.last_feedback_id == 5
    records = read_records(Path(ref.records_uri.removeprefix("file://")))
    assert {r.chosen for r in records} == {"5", "apple"} and all(r.kind == "preference" for r in records)
    assert records[0].meta["model_version_chosen"] == "1" and records[0].meta["chosen_request_id"] == a


# ---------------------------------------------------------------------------
# the server


class _Http:
    def __init__(self, port: int) -> None:
        self.port = port

    def post(self, path: str, payload, headers: dict | None = None) -> tuple[int, dict]:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            conn.request("POST", path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read() or b"null")
        finally:
            conn.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from tuneline.deploy.server import create_app, make_server
    from tuneline.models.tiny import init_tiny_model, train_tokenizer

    shape = TinyModelParams(vocab_size=400, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                            num_kv_heads=2, max_position_embeddings=128)
    tokenizer = train_tokenizer(["What is two plus two? Four. Name a fruit: apple."] * 20, shape)
    model = init_tiny_model(tokenizer, shape, seed=0)
    log = InferenceLog(tmp_path_factory.mktemp("serve") / "inference.db")
    params = ServeParams(default_max_new_tokens=4, max_new_tokens_limit=8, max_feedback_bytes=256)
    info = {"name": "chat", "version": 7, "alias": "champion"}
    server = make_server(create_app(model, tokenizer, info, log, params), host="127.0.0.1", port=0,
                         log_level="warning")
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    yield _Http(server.servers[0].sockets[0].getsockname()[1]), log
    server.should_exit = True
    thread.join(timeout=15)


def test_generate_returns_its_request_id_and_feedback_rejects_bad_input(served) -> None:
    client, log = served
    status, first = client.post("/generate", {"prompt": "What is two plus two?"})
    assert status == 200 and isinstance(first["request_id"], int)
    assert log.get(first["request_id"])["response"] == first["text"]
    _, second = client.post("/generate", {"prompt": "What is two plus two?"})
    _, other = client.post("/generate", {"prompt": "Name a fruit."})
    status, failed = client.post("/generate", {"prompt": ""})
    assert status == 422 and isinstance(failed["request_id"], int)  # logged too, with its error
    logged = log.count()

    def feedback(payload, want: int, **kw) -> dict:
        status, body = client.post("/feedback", payload, **kw)
        assert status == want, (payload, body)
        return body

    ok = feedback({"request_id": first["request_id"], "rating": 5}, 201)
    assert ok["kind"] == "rating" and ok["feedback_id"] >= 1
    feedback({"request_id": first["request_id"], "rating": 4}, 409)  # nothing logged twice
    feedback({"chosen_request_id": second["request_id"], "rejected_request_id": first["request_id"]}, 201)
    feedback({"chosen_request_id": first["request_id"], "rejected_request_id": second["request_id"]}, 409)
    feedback({"request_id": 999999, "rating": 3}, 404)
    feedback({"chosen_request_id": first["request_id"], "rejected_request_id": 999999}, 404)
    feedback({"chosen_request_id": first["request_id"], "rejected_request_id": other["request_id"]}, 422)
    feedback({"request_id": failed["request_id"], "rating": 1}, 422)  # a failed request has no answer
    feedback({"request_id": "1", "rating": 3}, 422)
    feedback({"request_id": other["request_id"], "rating": 9}, 422)
    feedback({"request_id": other["request_id"]}, 422)
    feedback(b"not json", 400)
    feedback(b"[1, 2]", 400)
    feedback({"request_id": other["request_id"], "rating": 3}, 415, headers={"Content-Type": "text/plain"})
    feedback({"request_id": other["request_id"], "rating": 3, "pad": "x" * 400}, 413)
    assert log.count() == logged  # feedback is not a /generate request: the traffic log is unchanged
    assert [f["kind"] for f in log.read_feedback_since(0)] == ["rating", "pairwise"]


# ---------------------------------------------------------------------------
# the sensor


def test_feedback_sensor_requests_a_run_once_enough_new_feedback_arrived(tmp_path: Path) -> None:
    from pipelines.sensors import feedback_sensor
    from resources.recipe import RecipeResource

    log = InferenceLog(tmp_path / "inference.db")
    recipe = {"name": "fb", "model": {"build": "tiny"}, "data": {"demo": {}},
              "serve": {"log_path": str(tmp_path / "inference.db")}, "feedback": {"min_new": 3}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    instance = dg.DagsterInstance.ephemeral()

    def evaluate(cursor):
        return feedback_sensor(dg.build_sensor_context(instance=instance, cursor=cursor,
                                                       resources={"recipe": RecipeResource(path=str(path))}))

    ids = [answered(log, f"q{i}", "a") for i in range(5)]
    log.add_feedback(kind="rating", request_id=ids[0], rating=5)
    result = evaluate(None)
    assert not result.run_requests and "1 new feedback" in result.skip_reason.skip_message
    for i in ids[1:4]:
        log.add_feedback(kind="rating", request_id=i, rating=2)
    result = evaluate(None)
    assert [r.run_key for r in result.run_requests] == ["feedback-4"]
    assert json.loads(result.cursor) == {"last_feedback_id": 4}
    again = evaluate(result.cursor)  # the same feedback never triggers twice
    assert not again.run_requests and "0 new feedback" in again.skip_reason.skip_message


def test_reward_model_and_dpo_train_on_accepted_feedback_pairs_only_when_the_recipe_uses_them() -> None:
    from assets.feedback import feedback_params, feedback_uris
    from tuneline.params import FeedbackParams, Recipe, build
    from tuneline.refs import FeedbackRef

    recipe = build(Recipe, {"name": "x", "model": {"build": "tiny"}, "data": {"demo": {}}})
    ref = FeedbackRef(records_uri="file:///f/records.jsonl", quarantine_uri="file:///f/q.jsonl", sha256="ab",
                      feedback_read=4, read=3, accepted=2, quarantined=1, reasons={"duplicate": 1},
                      unpaired_ratings=0, missing_requests=0, last_feedback_id=4, model_versions={"1": 3})
    assert feedback_uris(recipe, ref) == ("file:///f/records.jsonl",)
    assert feedback_params(recipe, ref) == {"feedback.pairs": 2, "feedback.sha256": "ab"}
    import dataclasses

    assert feedback_uris(recipe, dataclasses.replace(ref, accepted=0, quarantined=3)) == ()
    off = dataclasses.replace(recipe, feedback=FeedbackParams(use=False))
    assert feedback_uris(off, ref) == () and feedback_params(off, ref)["feedback.pairs"] == 0
