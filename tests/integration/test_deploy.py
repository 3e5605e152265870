"""Deployment: registry (register, aliases, promote, rollback, load), the inference log, the HTTP server.

A real tiny Llama saved to a temp directory, a real SQLite MLflow (``sqlite:////abs/path``), a real
uvicorn server on a free port, and real HTTP requests through ``http.client``.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from tuneline.deploy.inference_log import InferenceLog
from tuneline.deploy.registry import parse_model_ref
from tuneline.params import ServeParams, TinyModelParams

SMALL = TinyModelParams(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2, num_kv_heads=2,
    max_position_embeddings=256,
)


# ---------------------------------------------------------------------------
# unit: references, request parsing, the inference log


@pytest.mark.parametrize(
    "ref, expected",
    [
        ("chat@champion", ("chat", "champion", None)),
        ("models:/chat@challenger", ("chat", "challenger", None)),
        ("tuneline-demo.v2/3", ("tuneline-demo.v2", None, 3)),
        ("models:/chat/12", ("chat", None, 12)),
        ("chat", ("chat", None, None)),
    ],
)
def test_parse_model_ref(ref, expected) -> None:
    assert parse_model_ref(ref) == expected


@pytest.mark.parametrize("ref", ["", "  ", "@champion", "chat@", "chat/0", "chat/abc", "/3", "chat@bad alias", "a b/1"])
def test_parse_model_ref_rejects_bad_references(ref) -> None:
    with pytest.raises(ValueError):
        parse_model_ref(ref)


def test_parse_generate_request_rules() -> None:
    from tuneline.deploy.server import RequestError, parse_generate_request

    params = ServeParams(default_max_new_tokens=4, max_new_tokens_limit=8)
    assert parse_generate_request({"prompt": "hi"}, params) == ([{"role": "user", "content": "hi"}], 4)
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert parse_generate_request({"messages": turns, "max_new_tokens": 999}, params) == (turns, 8)
    assert parse_generate_request({"prompt": "hi", "max_new_tokens": 2}, params)[1] == 2
    bad = [
        ([], 400),
        ({}, 422),
        ({"prompt": "a", "messages": turns}, 422),
        ({"prompt": 3}, 422),
        ({"prompt": "   "}, 422),
        ({"messages": []}, 422),
        ({"messages": "hi"}, 422),
        ({"messages": [{"role": "robot", "content": "x"}]}, 422),
        ({"messages": [{"role": "user", "content": ""}]}, 422),
        ({"messages": [{"role": "user", "content": 5}]}, 422),
        ({"messages": [{"role": "user", "content": "x", "name": "n"}]}, 422),
        ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}, 422),
        ({"prompt": "x", "max_new_tokens": "5"}, 422),
        ({"prompt": "x", "max_new_tokens": True}, 422),
        ({"prompt": "x", "max_new_tokens": 0}, 422),
        ({"prompt": "x", "temperature": 0.7}, 422),
    ]
    for body, status in bad:
        with pytest.raises(RequestError) as err:
            parse_generate_request(body, params)
        assert err.value.status == status, body


def test_inference_log_cursor_reads_and_concurrent_writers(tmp_path: Path) -> None:
    log = InferenceLog(tmp_path / "sub" / "inference.db")
    assert log.journal_mode() == "wal"
    assert log.count() == 0 and log.read_since(0) == [] and log.last_id() == 0
    for i in range(5):
        log.append(model_name="m", model_version=1, alias="champion", prompt=f"p{i}", response=f"r{i}",
                   latency_ms=1.5, prompt_tokens=3, new_tokens=2, status=200)
    first = log.read_since(0, limit=2)
    assert [r["prompt"] for r in first] == ["p0", "p1"]
    rest = log.read_since(first[-1]["id"], limit=100)
    assert [r["prompt"] for r in rest] == ["p2", "p3", "p4"]
    assert log.read_since(rest[-1]["id"]) == []  # the cursor is exhausted
    assert rest[0]["model_version"] == "1" and rest[0]["status"] == 200 and rest[0]["ts"] > 0

    msgs = [{"role": "user", "content": "héllo"}]
    log.append(model_name="m", model_version="2", messages=msgs, status=422, error="bad", latency_ms=0.1)
    row = log.read_since(rest[-1]["id"])[0]
    assert row["messages"] == msgs and row["error"] == "bad" and row["response"] is None

    def write(k: int) -> None:
        own = InferenceLog(log.path)  # a second handle, as another process would have
        for j in range(20):
            own.append(model_name="m", model_version=1, prompt=f"t{k}-{j}", status=200)

    threads = [threading.Thread(target=write, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert log.count() == 6 + 80
    ids = [r["id"] for r in log.read_since(0, limit=1000)]
    assert ids == sorted(set(ids)) and len(ids) == 86
    with sqlite3.connect(log.path) as conn:  # the schema the drift sensor reads
        cols = [r[1] for r in conn.execute("PRAGMA table_info(requests)")]
    assert cols == ["id", "ts", "model_name", "model_version", "alias", "prompt", "messages_json", "response",
                    "latency_ms", "prompt_tokens", "new_tokens", "status", "error"]


# ---------------------------------------------------------------------------
# fixtures: two tiny models and a SQLite MLflow


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> list[Path]:
    from tuneline.data.demo import generate_corpus
    from tuneline.models.tiny import init_tiny_model, save_model, train_tokenizer
    from tuneline.params import DemoDataParams

    root = tmp_path_factory.mktemp("models")
    tokenizer = train_tokenizer(generate_corpus(DemoDataParams(seed=3, corpus_paragraphs=200)), SMALL)
    return [save_model(init_tiny_model(tokenizer, SMALL, seed), tokenizer, root / f"seed{seed}") for seed in (0, 1)]


@pytest.fixture(scope="module")
def tracker(tmp_path_factory):
    from tuneline.tracking import Tracker

    root = tmp_path_factory.mktemp("mlflow").resolve()
    uri = "sqlite:///" + str(root / "mlflow.db")
    assert uri.startswith("sqlite:////")
    return Tracker(tracking_uri=uri, artifact_root=str(root / "artifacts"))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("registry-cache")


def _run(tracker, name: str) -> str:
    return tracker.start_run("tuneline/test-deploy", name, tags={"tuneline.asset_key": "registered_model"})


# ---------------------------------------------------------------------------
# registry


@pytest.mark.slow
def test_register_promote_load_and_generate(tracker, model_dirs, cache_dir) -> None:
    import mlflow.pyfunc

    from tuneline.deploy.registry import (
        TAG_PREVIOUS_CHAMPION,
        TAG_SOURCE_RUN,
        TAG_WEIGHTS,
        get_version,
        load_registered,
        promote,
        register_model,
    )
    from tuneline.models.generation import chat_generate
    from tuneline.models.loading import weights_sha256

    run_id = _run(tracker, "sft")
    out = register_model(tracker, "chat-a", model_dirs[0], run_id=run_id, passport_md="# Passport\nseed 0\n",
                         tags={"tuneline.method": "sft", "tuneline.eval_score": 0.5})
    sha = weights_sha256(model_dirs[0])
    assert out["name"] == "chat-a" and out["version"] == 1 and out["run_id"] == run_id
    assert out["model_uri"] == "models:/chat-a/1" and out["aliases"] == ["challenger"]

    v = get_version(tracker, "chat-a@challenger")
    assert v["version"] == 1 and v["alias"] == "challenger" and v["run_id"] == run_id
    assert v["tags"][TAG_SOURCE_RUN] == run_id and v["tags"][TAG_WEIGHTS] == sha
    assert v["tags"]["tuneline.method"] == "sft" and v["tags"]["tuneline.eval_score"] == "0.5"
    assert get_version(tracker, "chat-a", 1)["version"] == 1 and get_version(tracker, "chat-a/1")["aliases"] == ["challenger"]
    passport = tracker.client().download_artifacts(run_id, "passport.md", str(cache_dir))
    assert Path(passport).read_text() == "# Passport\nseed 0\n"

    promoted = promote(tracker, "chat-a", 1)
    assert promoted == {"name": "chat-a", "alias": "champion", "version": 1, "previous_version": None, "changed": True}
    assert TAG_PREVIOUS_CHAMPION not in get_version(tracker, "chat-a@champion")["tags"]

    model, tokenizer, info = load_registered(tracker, "chat-a@champion", cache_dir=cache_dir)
    assert info["version"] == 1 and info["alias"] == "champion"
    assert weights_sha256(info["path"]) == sha
    assert (Path(info["path"]) / "chat_template.jinja").is_file()
    assert tokenizer.chat_template and not list(Path(info["path"]).glob("*.bin"))
    result = chat_generate(model, tokenizer, [{"role": "user", "content": "What is 2 plus 3?"}], max_new_tokens=5)
    assert 1 <= result["new_tokens"] <= 5 and result["finish_reason"] in ("stop", "length")
    assert result["prompt_tokens"] > 2 and isinstance(result["text"], str)
    again = load_registered(tracker, "chat-a/1", cache_dir=cache_dir)[2]  # served from the checked cache
    assert again["path"] == info["path"]

    # the logged MLflow model itself loads and predicts (params declared in its signature)
    pyfunc = mlflow.pyfunc.load_model(info["source"])
    preds = pyfunc.predict([{"prompt": "hello"}, {"prompt": "hi"}], params={"max_new_tokens": 3})
    preds += pyfunc.predict([{"messages": [{"role": "user", "content": "hi"}]}], params={"max_new_tokens": 2})
    assert len(preds) == 3 and all(1 <= p["new_tokens"] <= 3 for p in preds) and preds[2]["new_tokens"] <= 2


@pytest.mark.slow
def test_second_version_promoted_then_rollback_restores_the_first(tracker, model_dirs, cache_dir) -> None:
    from tuneline.deploy.registry import (
        TAG_PREVIOUS_CHAMPION,
        RegistryError,
        get_version,
        load_registered,
        promote,
        register_model,
        rollback,
        set_alias,
    )
    from tuneline.models.loading import weights_sha256

    v1 = register_model(tracker, "chat-b", model_dirs[0], run_id=_run(tracker, "v1"), passport_md=None, tags={})
    v2 = register_model(tracker, "chat-b", model_dirs[1], run_id=_run(tracker, "v2"), passport_md=None, tags={},
                        aliases=("challenger", "candidate"))
    assert (v1["version"], v2["version"]) == (1, 2)
    assert get_version(tracker, "chat-b@challenger")["version"] == 2  # the alias moved to the new version
    assert get_version(tracker, "chat-b@candidate")["version"] == 2

    promote(tracker, "chat-b", 1)
    second = promote(tracker, "chat-b", 2)
    assert second["previous_version"] == 1 and second["changed"]
    assert get_version(tracker, "chat-b@champion")["tags"][TAG_PREVIOUS_CHAMPION] == "1"
    assert promote(tracker, "chat-b", 2)["changed"] is False  # promoting the champion again is a no-op

    back = rollback(tracker, "chat-b")
    assert back == {"name": "chat-b", "alias": "champion", "from_version": 2, "to_version": 1}
    assert get_version(tracker, "chat-b@champion")["version"] == 1
    _, _, info = load_registered(tracker, "chat-b@champion", cache_dir=cache_dir)
    assert info["version"] == 1 and weights_sha256(info["path"]) == weights_sha256(model_dirs[0])
    with pytest.raises(RegistryError, match="no previous champion"):
        rollback(tracker, "chat-b")  # version 1 was the first champion

    assert set_alias(tracker, "chat-b", "canary", 2)["version"] == 2
    with pytest.raises(RegistryError, match="no version 7"):
        set_alias(tracker, "chat-b", "canary", 7)
    with pytest.raises(RegistryError, match="no version 9"):
        promote(tracker, "chat-b", 9)
    with pytest.raises(RegistryError, match="no alias 'nope'"):
        get_version(tracker, "chat-b@nope")


@pytest.mark.slow
def test_rollback_without_a_previous_champion_errors_clearly(tracker, model_dirs) -> None:
    from tuneline.deploy.registry import RegistryError, promote, register_model, rollback

    register_model(tracker, "chat-c", model_dirs[0], run_id=_run(tracker, "c"), passport_md=None, tags={})
    with pytest.raises(RegistryError, match="no version holds the alias 'champion'"):
        rollback(tracker, "chat-c")
    promote(tracker, "chat-c", 1)
    with pytest.raises(RegistryError, match="has no previous champion"):
        rollback(tracker, "chat-c")


@pytest.mark.slow
def test_promotion_is_compare_and_set(tracker, model_dirs) -> None:
    """A decision made against champion version N never overwrites a champion that moved on since."""
    from tuneline.deploy.registry import ChampionMoved, get_version, promote, register_model

    for seed in (0, 1):
        register_model(tracker, "chat-cas", model_dirs[seed], run_id=_run(tracker, f"cas{seed}"))
    assert promote(tracker, "chat-cas", 1, expected=None)["changed"]  # no champion yet: as the gate saw it
    with pytest.raises(ChampionMoved, match="version 1, not the version None"):
        promote(tracker, "chat-cas", 2, expected=None)  # a concurrent run promoted version 1 meanwhile
    assert get_version(tracker, "chat-cas@champion")["version"] == 1
    assert promote(tracker, "chat-cas", 2, expected=1)["previous_version"] == 1


@pytest.mark.slow
def test_register_refuses_a_directory_without_safetensors_or_with_pickles(tracker, model_dirs, tmp_path) -> None:
    import shutil

    from tuneline.deploy.registry import register_model

    with pytest.raises(FileNotFoundError, match="safetensors"):
        register_model(tracker, "chat-d", tmp_path, run_id=_run(tracker, "d"), passport_md=None, tags={})
    bad = shutil.copytree(model_dirs[0], tmp_path / "with-pickle")
    (bad / "pytorch_model.bin").write_bytes(b"not really")
    with pytest.raises(ValueError, match="pickle"):
        register_model(tracker, "chat-d", bad, run_id=_run(tracker, "d"), passport_md=None, tags={})


def _lora_adapter(base_dir: Path, out: Path, seed: int) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model

    from tuneline.models.loading import load_causal_lm, load_tokenizer

    torch.manual_seed(seed)
    model = get_peft_model(load_causal_lm(base_dir, device="cpu"),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for n, p in model.named_parameters():
        if "lora_B" in n:  # a trained adapter, not the zero start
            p.data.normal_(0.0, 0.5)
    model.save_pretrained(out)
    load_tokenizer(base_dir).save_pretrained(out)
    return out


@pytest.mark.slow
def test_adapters_register_by_reference_to_one_logged_base(tracker, model_dirs, tmp_path, monkeypatch) -> None:
    """Two adapter versions on one base: the base is logged once, each version holds only its adapter and the
    base's reference; loading merges onto the fetched, hash-checked base (the adapter's own logits); a changed
    base in the store is refused."""
    import mlflow.pyfunc
    import torch
    from peft import PeftModel

    from tuneline.deploy.registry import (
        BASE_REF_FILE,
        TAG_BASE_MODEL,
        TAG_BASE_WEIGHTS,
        RegistryError,
        get_version,
        load_registered,
        register_model,
    )
    from tuneline.models.loading import load_causal_lm, weights_sha256

    base = model_dirs[0]
    adapters = [_lora_adapter(base, tmp_path / f"adapter{i}", seed=i) for i in (0, 1)]
    out = [register_model(tracker, "chat-ref", a, run_id=_run(tracker, f"ref{i}"), base_dir=base,
                          base_tags={"tuneline.base_source": "tiny"}) for i, a in enumerate(adapters)]
    assert [o["version"] for o in out] == [1, 2] and {o["base_weights_sha256"] for o in out} == {weights_sha256(base)}
    tags = [get_version(tracker, "chat-ref", v)["tags"] for v in (1, 2)]
    assert tags[0][TAG_BASE_MODEL] == tags[1][TAG_BASE_MODEL] and tags[0][TAG_BASE_WEIGHTS] == weights_sha256(base)
    client = tracker.client()
    experiment = client.get_run(out[0]["run_id"]).info.experiment_id
    bases = client.search_logged_models(experiment_ids=[experiment],
                                        filter_string=f"tags.`{TAG_BASE_WEIGHTS}` = '{weights_sha256(base)}'")
    assert len(bases) == 1  # logged once for both versions

    sample = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    for i, adapter in enumerate(adapters):
        model, tokenizer, info = load_registered(tracker, f"chat-ref/{i + 1}", cache_dir=tmp_path / "cache",
                                                 device="cpu")
        stored = Path(info["path"]).parent.parent  # the cached version: the adapter and its reference only
        artifact = next(stored.rglob(BASE_REF_FILE)).parent
        assert not (artifact / "model.safetensors").exists() and (artifact / "adapter_model.safetensors").is_file()
        reference = PeftModel.from_pretrained(load_causal_lm(base, device="cpu"), adapter).eval()
        with torch.no_grad():
            diff = (model(input_ids=sample).logits - reference(input_ids=sample).logits).abs().max()
        assert float(diff) < 1e-4 and tokenizer.chat_template
    assert len(list((tmp_path / "cache" / "_bases").iterdir())) == 1  # one cached base for both versions

    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracker.tracking_uri)  # the pyfunc fetches its base too
    pyfunc = mlflow.pyfunc.load_model(info["source"])
    assert 1 <= pyfunc.predict([{"prompt": "hello"}], params={"max_new_tokens": 3})[0]["new_tokens"] <= 3

    stored_base = Path(bases[0].artifact_location.removeprefix("file://")) / "model.safetensors"
    stored_base.write_bytes(stored_base.read_bytes()[:-8] + b"\0" * 8)  # the base changed in the store
    with pytest.raises(RegistryError, match="does not match the reference"):
        load_registered(tracker, "chat-ref/1", cache_dir=tmp_path / "fresh-cache", device="cpu")


@pytest.mark.slow
def test_generation_stops_at_an_end_of_turn_token(model_dirs) -> None:
    from tuneline.models.generation import chat_generate
    from tuneline.models.loading import load_causal_lm, load_tokenizer

    tokenizer, model = load_tokenizer(model_dirs[0]), load_causal_lm(model_dirs[0])
    model.generation_config.eos_token_id = list(range(len(tokenizer)))  # every token ends the turn
    result = chat_generate(model, tokenizer, [{"role": "user", "content": "hi"}], max_new_tokens=9)
    assert result == {**result, "finish_reason": "stop", "new_tokens": 1, "ids": [], "text": ""}


# ---------------------------------------------------------------------------
# the HTTP server


class _Http:
    def __init__(self, port: int) -> None:
        self.port = port

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
                chunked: bool = False) -> tuple[int, dict]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            hdrs = {"Content-Type": "application/json", **(headers or {})}
            if chunked:
                parts = [body[i : i + 1024] for i in range(0, len(body), 1024)]
                conn.request(method, path, body=iter(parts), headers=hdrs, encode_chunked=True)
            else:
                conn.request(method, path, body=body, headers=hdrs)
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read() or b"null")
        finally:
            conn.close()

    def post(self, payload, **kw) -> tuple[int, dict]:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        return self.request("POST", "/generate", body, **kw)


@contextlib.contextmanager
def _running(app):
    """A real uvicorn server for ``app`` on a free loopback port; yields an HTTP client for it."""
    from tuneline.deploy.server import make_server

    server = make_server(app, host="127.0.0.1", port=0, log_level="warning")
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield _Http(server.servers[0].sockets[0].getsockname()[1])
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        assert not thread.is_alive(), "the server did not shut down"


@pytest.fixture(scope="module")
def served(tracker, model_dirs, cache_dir, tmp_path_factory):
    from tuneline.deploy.registry import load_registered, promote, register_model
    from tuneline.deploy.server import create_app

    register_model(tracker, "chat-s", model_dirs[0], run_id=_run(tracker, "serve"), passport_md=None, tags={})
    promote(tracker, "chat-s", 1)
    model, tokenizer, info = load_registered(tracker, "chat-s@champion", cache_dir=cache_dir)
    log = InferenceLog(tmp_path_factory.mktemp("serve") / "inference.db")
    params = ServeParams(default_max_new_tokens=4, max_new_tokens_limit=8, max_body_bytes=16384, batch_wait_ms=20)
    with _running(create_app(model, tokenizer, info, log, params)) as client:
        yield client, log, info


@pytest.mark.slow
def test_server_health_generate_errors_and_log(served) -> None:
    client, log, info = served
    start_id = log.last_id()

    status, health = client.request("GET", "/health")
    assert status == 200 and health["status"] == "ok"
    assert (health["model"], health["version"], health["alias"]) == ("chat-s", 1, "champion")

    expected_statuses = []

    def post(payload, want: int, **kw) -> dict:
        status, body = client.post(payload, **kw)
        assert status == want, (payload if not isinstance(payload, bytes) else payload[:60], body)
        expected_statuses.append(want)
        return body

    good = post({"prompt": "What is 2 plus 3?"}, 200)
    assert set(good) >= {"text", "model", "version", "new_tokens", "latency_ms", "finish_reason"}
    assert good["model"] == "chat-s" and good["version"] == 1 and good["alias"] == "champion"
    assert 1 <= good["new_tokens"] <= 4 and good["max_new_tokens"] == 4  # the configured default
    assert good["finish_reason"] in ("stop", "length") and good["latency_ms"] > 0

    turns = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name a day."}]
    chat = post({"messages": turns, "max_new_tokens": 3}, 200)
    assert 1 <= chat["new_tokens"] <= 3 and chat["max_new_tokens"] == 3

    capped = post({"prompt": "Count to one hundred.", "max_new_tokens": 100000}, 200)
    assert capped["max_new_tokens"] == 8 and 1 <= capped["new_tokens"] <= 8

    # bad requests: clear JSON errors
    assert "exactly one" in post({}, 422)["detail"]
    assert "exactly one" in post({"prompt": "a", "messages": turns}, 422)["detail"]
    assert "string" in post({"prompt": 42}, 422)["detail"]
    assert "role" in post({"messages": [{"role": "robot", "content": "beep"}]}, 422)["detail"]
    assert "empty" in post({"prompt": "   "}, 422)["detail"]
    assert "integer" in post({"prompt": "hi", "max_new_tokens": "many"}, 422)["detail"]
    assert "JSON" in post(b"{not json", 400)["detail"]
    assert "JSON" in post(b"just text", 415, headers={"Content-Type": "text/plain"})["detail"]
    huge = json.dumps({"prompt": "x" * 20000}).encode()
    assert "16384" in post(huge, 413)["detail"]
    assert "16384" in post(huge, 413, chunked=True)["detail"]  # no Content-Length: counted while streaming
    long_prompt = " ".join(f"w{i}" for i in range(1500))  # under the byte cap, over the token cap
    assert "tokens" in post({"prompt": long_prompt}, 400)["detail"]

    # every /generate request is in the log, with model, version, alias, latency and status
    rows = log.read_since(start_id)
    assert [r["status"] for r in rows] == expected_statuses
    assert all(r["model_name"] == "chat-s" and r["model_version"] == "1" and r["alias"] == "champion" for r in rows)
    assert all(r["latency_ms"] is not None and r["latency_ms"] > 0 and r["ts"] > 0 for r in rows)
    ok = [r for r in rows if r["status"] == 200]
    assert [r["response"] for r in ok] == [good["text"], chat["text"], capped["text"]]
    assert [r["new_tokens"] for r in ok] == [good["new_tokens"], chat["new_tokens"], capped["new_tokens"]]
    assert ok[0]["prompt"] == "What is 2 plus 3?" and ok[1]["messages"] == turns
    assert all(r["prompt_tokens"] and r["prompt_tokens"] > 0 for r in ok)
    bad = [r for r in rows if r["status"] != 200]
    assert all(r["error"] and r["response"] is None for r in bad)
    assert health["logged_requests"] == start_id  # health reads the log; it is not logged itself
    assert log.count() == start_id + len(expected_statuses)


def _hammer(client: _Http, n: int, concurrency: int, payload_of=lambda i: {"prompt": "What is 2 plus 3?"}):
    """``n`` requests from ``concurrency`` threads; returns [(status, body)] in request order."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(lambda i: client.post(payload_of(i)), range(n)))


@pytest.mark.slow
def test_server_batches_concurrent_requests_with_the_answers_of_single_ones(served) -> None:
    client, log, _info = served
    prompts = ["What is 2 plus 3?", "Name a day.", "Count to three, please, slowly.", "hi"]
    alone = [client.post({"prompt": p, "max_new_tokens": 1 + k})[1] for k, p in enumerate(prompts)]
    _, before = client.request("GET", "/health")
    start_id = log.last_id()
    answers = _hammer(client, 32, 16, lambda i: {"prompt": prompts[i % 4], "max_new_tokens": 1 + i % 4})
    _, after = client.request("GET", "/health")
    assert [status for status, _ in answers] == [200] * 32
    # left-padded batches give each request the answer it gets alone, cut at its own max_new_tokens
    for i, (_, body) in enumerate(answers):
        assert (body["text"], body["new_tokens"]) == (alone[i % 4]["text"], alone[i % 4]["new_tokens"]), i
        assert body["new_tokens"] <= 1 + i % 4
    batches = after["batches"] - before["batches"]
    assert after["batched_requests"] - before["batched_requests"] == 32
    assert batches < 32, "concurrent requests were generated one by one"
    assert len(log.read_since(start_id)) == 32  # exactly one log row per request


def test_batcher_cuts_each_row_at_its_own_cap_and_reports_errors(model_dirs) -> None:
    from tuneline.deploy.batching import Batcher, ModelSlot, ServedModel
    from tuneline.models.loading import load_causal_lm, load_tokenizer

    served = ServedModel(load_causal_lm(model_dirs[0]), load_tokenizer(model_dirs[0]), {"version": 1})
    batcher = Batcher(ModelSlot(served), max_batch_size=3, wait_ms=200)
    try:
        jobs = [batcher.submit([{"role": "user", "content": f"say {k}"}], cap) for k, cap in enumerate([1, 5, 2, 3])]
        results = [job.result(timeout=60) for job in jobs]
        assert [r["new_tokens"] <= cap for r, cap in zip(results, [1, 5, 2, 3])] == [True] * 4
        assert batcher.batches == 2 and batcher.batched_requests == 4  # at most 3 per batch
        assert all(r["served"] is served for r in results)
        bad = batcher.submit([{"role": "user", "content": "x"}], 0)  # generate_greedy refuses a cap < 1
        with pytest.raises(ValueError, match="cap"):
            bad.result(timeout=60)
    finally:
        batcher.close()


@pytest.mark.slow
def test_server_follows_the_champion_alias_under_load(tracker, model_dirs, cache_dir, tmp_path) -> None:
    """The rollback drill, short: promote v2 and roll back to v1 while requests flow; none fails, /health and
    the answers move with the alias within the follow interval, every request is logged once."""
    from tuneline.deploy.registry import load_registered, promote, register_model, rollback
    from tuneline.deploy.server import alias_check, create_app

    for i in (0, 1):
        register_model(tracker, "chat-f", model_dirs[i], run_id=_run(tracker, f"follow{i}"), passport_md=None, tags={})
    promote(tracker, "chat-f", 1)
    model, tokenizer, info = load_registered(tracker, "chat-f@champion", cache_dir=cache_dir)
    log = InferenceLog(tmp_path / "inference.db")
    params = ServeParams(default_max_new_tokens=2, max_new_tokens_limit=4, follow_seconds=0.2)
    app = create_app(model, tokenizer, info, log, params,
                     check=alias_check(tracker, "chat-f@champion", cache_dir=str(cache_dir)))
    with _running(app) as client:
        results: list[tuple[int, dict]] = []
        stop = threading.Event()

        def load() -> None:
            while not stop.is_set():
                results.append(client.post({"prompt": "hi"}))

        workers = [threading.Thread(target=load) for _ in range(4)]
        for w in workers:
            w.start()

        def served_version(want: int) -> float:
            start = time.monotonic()
            while client.request("GET", "/health")[1]["version"] != want:
                assert time.monotonic() - start < 30, f"version {want} not served within 30 s"
                time.sleep(0.05)
            return time.monotonic() - start

        try:
            promote(tracker, "chat-f", 2)
            served_version(2)
            time.sleep(0.3)
            rollback(tracker, "chat-f")
            served_version(1)
            time.sleep(0.3)
        finally:
            stop.set()
            for w in workers:
                w.join(timeout=60)
    assert results and {status for status, _ in results} == {200}
    versions = [body["version"] for _, body in results]
    assert {1, 2} <= set(versions)
    assert versions[-1] == 1  # after the rollback
    assert log.count() == len(results)
    assert sorted({r["model_version"] for r in log.read_since(0, limit=100000)}) == ["1", "2"]


def test_a_token_limit_that_leaves_no_room_for_a_prompt_fails_at_start(model_dirs, tmp_path) -> None:
    from tuneline.deploy.server import create_app
    from tuneline.models.loading import load_causal_lm, load_tokenizer

    model = load_causal_lm(model_dirs[0])  # 256 positions
    with pytest.raises(ValueError, match="no room for a prompt"):
        create_app(model, load_tokenizer(model_dirs[0]), {"name": "m", "version": 1}, InferenceLog(tmp_path / "l.db"),
                   ServeParams(max_new_tokens_limit=256))
