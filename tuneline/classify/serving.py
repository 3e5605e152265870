"""``POST /classify`` on the inference server, for a registered classifier.

The body is JSON ``{"text": str}`` or ``{"texts": [str, ...]}`` (exactly one; at most ``max_batch`` texts,
none blank). The answer is ``{model, version, alias, results: [{label, probabilities: {label: p}}], latency_ms}``.
Bad requests get ``{"detail": ...}`` with 400 (not JSON or not an object), 413 (body too large or more than
``max_batch`` texts), 415 (not ``application/json``) or 422 (missing/both fields, wrong types, blank texts,
unknown fields). Every text of a request is one row of the inference log (its label as the response; a refused
request one row with the error), so the drift sensor reads classifier traffic the way it reads chat prompts.
"""

# no `from __future__ import annotations`: FastAPI must see the real `Request` class of the endpoint

import json
import threading
import time
from typing import Any, Mapping, Optional

from tuneline.deploy.http import RequestError, read_json_body

FIELDS = ("text", "texts")
DEFAULT_MAX_BATCH = 64


class ClassifyRequestError(RequestError):
    """A /classify request the server refuses (HTTP ``status``)."""


def parse_classify_request(body: Any, max_batch: int) -> list[str]:
    """The texts of a decoded JSON body, or :class:`ClassifyRequestError`."""
    if not isinstance(body, dict):
        raise ClassifyRequestError(400, f"the body must be a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise ClassifyRequestError(422, f"unknown field(s) {unknown}; allowed: {list(FIELDS)}")
    if ("text" in body) == ("texts" in body):
        raise ClassifyRequestError(422, "give exactly one of 'text' (a string) and 'texts' (a list of strings)")
    texts = [body["text"]] if "text" in body else body["texts"]
    if not isinstance(texts, list) or not texts:
        raise ClassifyRequestError(422, "'texts' must be a non-empty list of strings")
    if len(texts) > max_batch:
        raise ClassifyRequestError(413, f"{len(texts)} texts in one request; at most {max_batch} are accepted")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ClassifyRequestError(422, f"texts[{i}] must be a string, got {type(text).__name__}")
        if not text.strip():
            raise ClassifyRequestError(422, f"texts[{i}] is empty")
    return texts


def add_classify_route(app: Any, model: Any, tokenizer: Any, info: Mapping[str, Any], log: Any, *,
                       max_body_bytes: int, max_batch: int = DEFAULT_MAX_BATCH, max_length: int = 128) -> None:
    """Register ``POST /classify`` on the FastAPI ``app`` for the classifier ``model``."""
    from fastapi import Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import JSONResponse

    from tuneline.classify.model import predict_proba

    name, version, alias = info.get("name"), info.get("version"), info.get("alias")
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    lock = threading.Lock()

    def _predict(texts: list[str]) -> Any:
        with lock:
            return predict_proba(model, tokenizer, texts, max_length=max_length)

    def _log(rows: list[dict[str, Any]]) -> None:
        for row in rows:
            log.append(model_name=name, model_version=version, alias=alias, **row)

    @app.post("/classify")
    async def classify(request: Request) -> Any:
        start = time.perf_counter()
        texts: Optional[list[str]] = None
        try:
            body = await read_json_body(request, max_body_bytes, ClassifyRequestError)
            texts = parse_classify_request(body, max_batch)
            probs = await run_in_threadpool(_predict, texts)
        except ClassifyRequestError as exc:
            latency = (time.perf_counter() - start) * 1000.0
            await run_in_threadpool(_log, [{"prompt": None, "latency_ms": latency, "status": exc.status,
                                            "error": str(exc)}])
            return JSONResponse({"detail": str(exc)}, status_code=exc.status)
        latency = (time.perf_counter() - start) * 1000.0
        results = [{"label": labels[int(row.argmax())],
                    "probabilities": {label: round(float(p), 6) for label, p in zip(labels, row)}} for row in probs]
        await run_in_threadpool(_log, [{"prompt": text, "response": r["label"], "latency_ms": latency, "status": 200}
                                       for text, r in zip(texts, results)])
        return JSONResponse({"model": name, "version": version, "alias": alias, "results": results,
                             "latency_ms": round(latency, 3)})


def load_classifier_version(tracker: Any, ref: str, cache_dir: Optional[str] = None) -> Optional[tuple[Any, Any, dict]]:
    """(model, tokenizer, info with ``kind`` and ``max_length``) when ``ref`` names a registered classifier, else
    None (the server then loads it as a chat model)."""
    from pathlib import Path

    from tuneline.classify.model import LABELS_FILE, load_classifier
    from tuneline.classify.registry import KIND, TAG_KIND, download_classifier
    from tuneline.deploy.registry import get_version

    info = get_version(tracker, ref)
    if info.get("tags", {}).get(TAG_KIND) != KIND:
        return None
    path = download_classifier(tracker, ref, cache_dir)
    model, tokenizer, _ = load_classifier(path)
    extra = json.loads((Path(path) / LABELS_FILE).read_text()) if (Path(path) / LABELS_FILE).is_file() else {}
    return model, tokenizer, {**info, "kind": KIND, "path": str(path), "max_length": extra.get("max_length", 128)}
