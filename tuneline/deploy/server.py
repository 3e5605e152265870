"""The inference server: one registered model behind ``GET /health`` and ``POST /generate`` (a registered
classifier: ``POST /classify`` instead, :mod:`tuneline.classify.serving`).

``POST /generate`` takes JSON ``{"prompt": str}`` or ``{"messages": [{"role", "content"}, ...]}``
(exactly one) and an optional ``max_new_tokens`` (capped at ``ServeParams.max_new_tokens_limit``).
The prompt goes through the tokenizer's chat template with ``add_generation_prompt=True`` (the path
evaluation and training use) and greedy generation stops at the eos. The answer is
``{text, model, version, alias, new_tokens, prompt_tokens, max_new_tokens, latency_ms, finish_reason, request_id}``
(``request_id``: the inference-log row, what ``POST /feedback`` refers to).

Bad requests get a JSON ``{"detail": ...}`` with 400 (not JSON, not an object, prompt too long),
413 (body above ``max_body_bytes``), 415 (not ``application/json``) or 422 (missing or both of
prompt/messages, wrong types, unknown roles, empty text, unknown fields). Every ``/generate``
request, good or bad, is appended to the :class:`~tuneline.deploy.inference_log.InferenceLog` with its
status, latency, model name, version and alias (the version that answered it). Concurrent requests are
generated together in batches (``serve.max_batch_size``, ``serve.batch_wait_ms``); the server follows its
registry alias and swaps in a promoted or rolled-back version within ``serve.follow_seconds`` without failing
a request (``/health`` says which version is served). It binds 127.0.0.1 unless told otherwise.

``python -m tuneline.deploy.server --model NAME@ALIAS --port 8000 --tracking-uri URI`` serves a
registered model. fastapi, uvicorn, torch and transformers are imported inside the functions.
"""

# no `from __future__ import annotations`: FastAPI must see the real `Request` class in the endpoints
# defined inside create_app (fastapi is imported there, not at module level).

import argparse
import asyncio
import logging
import time
from typing import Any, Callable, Mapping, Optional, Sequence

from tuneline.deploy.batching import Batcher, Follower, ModelSlot, ServedModel
from tuneline.deploy.http import RequestError, read_json_body
from tuneline.deploy.inference_log import InferenceLog
from tuneline.params import ServeParams
from tuneline.tracking import Tracker

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
REQUEST_FIELDS = ("prompt", "messages", "max_new_tokens")
MAX_MESSAGES = 64


def parse_generate_request(body: Any, params: ServeParams) -> tuple[list[dict[str, str]], int]:
    """(messages, max_new_tokens) from a decoded JSON body, or :class:`RequestError` (400/422).

    A ``prompt`` becomes one user turn. ``messages`` must be a non-empty list of ``{role, content}``
    with roles system/user/assistant, non-blank string content, ending with a user turn.
    ``max_new_tokens`` (optional, an integer >= 1) is capped at ``params.max_new_tokens_limit``.
    """
    if not isinstance(body, dict):
        raise RequestError(400, f"the body must be a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - set(REQUEST_FIELDS))
    if unknown:
        raise RequestError(422, f"unknown field(s) {unknown}; allowed: {list(REQUEST_FIELDS)}")
    has_prompt = body.get("prompt") is not None
    has_messages = body.get("messages") is not None
    if has_prompt == has_messages:
        raise RequestError(422, "give exactly one of 'prompt' (a string) and 'messages' (a list of {role, content})")
    if has_prompt:
        prompt = body["prompt"]
        if not isinstance(prompt, str):
            raise RequestError(422, f"'prompt' must be a string, got {type(prompt).__name__}")
        if not prompt.strip():
            raise RequestError(422, "'prompt' is empty")
        messages = [{"role": "user", "content": prompt}]
    else:
        raw = body["messages"]
        if not isinstance(raw, list) or not raw:
            raise RequestError(422, "'messages' must be a non-empty list of {role, content} objects")
        if len(raw) > MAX_MESSAGES:
            raise RequestError(422, f"'messages' has {len(raw)} turns; at most {MAX_MESSAGES} are accepted")
        messages = []
        for i, message in enumerate(raw):
            if not isinstance(message, dict):
                raise RequestError(422, f"messages[{i}] must be an object with 'role' and 'content'")
            extra = sorted(set(message) - {"role", "content"})
            if extra:
                raise RequestError(422, f"messages[{i}] has unknown field(s) {extra}")
            role, content = message.get("role"), message.get("content")
            if role not in ROLES:
                raise RequestError(422, f"messages[{i}].role must be one of {list(ROLES)}, got {role!r}")
            if not isinstance(content, str):
                raise RequestError(422, f"messages[{i}].content must be a string, got {type(content).__name__}")
            if not content.strip():
                raise RequestError(422, f"messages[{i}].content is empty")
            messages.append({"role": role, "content": content})
        if messages[-1]["role"] != "user":
            raise RequestError(422, "the last message must come from the user (the model answers it)")
    requested = body.get("max_new_tokens")
    if requested is None:
        max_new_tokens = params.default_max_new_tokens
    else:
        if isinstance(requested, bool) or not isinstance(requested, int):
            raise RequestError(422, f"'max_new_tokens' must be an integer, got {type(requested).__name__}")
        if requested < 1:
            raise RequestError(422, "'max_new_tokens' must be >= 1")
        max_new_tokens = min(requested, params.max_new_tokens_limit)
    return messages, max_new_tokens


def _max_prompt_tokens(model: Any, params: ServeParams) -> Optional[int]:
    if params.max_prompt_tokens is not None:
        return params.max_prompt_tokens
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if positions and int(positions) <= params.max_new_tokens_limit:
        raise ValueError(f"serve.max_new_tokens_limit ({params.max_new_tokens_limit}) leaves no room for a prompt in "
                         f"this model's {positions} positions: lower it (or set serve.max_prompt_tokens)")
    return int(positions) - params.max_new_tokens_limit if positions else None


def create_app(
    model: Any,
    tokenizer: Any,
    info: Mapping[str, Any],
    log: InferenceLog,
    params: Optional[ServeParams] = None,
    *,
    check: Optional[Callable[[Mapping[str, Any]], Optional[ServedModel]]] = None,
) -> Any:
    """A FastAPI app serving ``model`` (``info``: its registry ``name``, ``version`` and ``alias``).

    Concurrent requests are generated in batches (:class:`~tuneline.deploy.batching.Batcher`). With
    ``check`` (given the served info, it returns a new :class:`ServedModel` when the alias moved, else None)
    and ``params.follow_seconds > 0``, the app follows the alias: a promotion or rollback is served within
    ``follow_seconds``, without failing a request."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import JSONResponse

    params = params or ServeParams()
    _max_prompt_tokens(model, params)  # a limit that leaves no room for a prompt fails here, not on every request
    slot = ModelSlot(ServedModel(model, tokenizer, dict(info)))
    batcher = Batcher(slot, max_batch_size=params.max_batch_size, wait_ms=params.batch_wait_ms)
    follower = None
    if check is not None and params.follow_seconds > 0:
        follower = Follower(
            slot, check, params.follow_seconds,
            on_error=lambda exc: logger.warning("could not check the registry alias (serving on): %s", exc),
            on_swap=lambda old, new: logger.info("now serving version %s (was %s)", new.info.get("version"),
                                                 old.info.get("version")),
        )

    @asynccontextmanager
    async def lifespan(_app: Any):
        if follower is not None:
            follower.start()
        yield
        if follower is not None:
            follower.stop()
        batcher.close()

    app = FastAPI(title="tuneline inference", version="1", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)
    app.state.slot, app.state.batcher, app.state.follower = slot, batcher, follower

    @app.get("/health")
    def health() -> dict[str, Any]:
        served = slot.current.info
        return {"status": "ok", "model": served.get("name"), "version": served.get("version"),
                "alias": served.get("alias"), "logged_requests": log.count(),
                "batches": batcher.batches, "batched_requests": batcher.batched_requests,
                "follow_seconds": params.follow_seconds if follower is not None else 0}

    if info.get("kind") == "classifier":  # a registered classifier: POST /classify instead of /generate
        from tuneline.classify.serving import add_classify_route

        add_classify_route(app, model, tokenizer, info, log, max_body_bytes=params.max_body_bytes,
                           max_batch=int(info.get("max_batch", 64)), max_length=int(info.get("max_length", 128)))
        return app

    @app.post("/generate")
    async def generate(request: Request) -> Any:
        start = time.perf_counter()
        current = slot.current
        entry: dict[str, Any] = {"model_name": current.info.get("name"), "model_version": current.info.get("version"),
                                 "alias": current.info.get("alias")}

        async def finish(status: int, payload: dict[str, Any]) -> Any:
            latency_ms = (time.perf_counter() - start) * 1000.0
            if status == 200:
                payload["latency_ms"] = round(latency_ms, 3)
            else:
                entry["error"] = payload["detail"]
            try:
                payload["request_id"] = await run_in_threadpool(
                    lambda: log.append(**entry, latency_ms=latency_ms, status=status))
            except Exception:  # the log must never take the answer down with it
                logger.exception("could not write the inference log")
                payload["request_id"] = None  # not logged: no feedback can refer to it
            return JSONResponse(payload, status_code=status)

        try:
            body = await read_json_body(request, params.max_body_bytes)
            if isinstance(body, dict):
                if isinstance(body.get("prompt"), str):
                    entry["prompt"] = body["prompt"]
                if isinstance(body.get("messages"), list):
                    entry["messages"] = body["messages"]
            messages, max_new_tokens = parse_generate_request(body, params)
            entry["messages"] = messages
            try:
                n = len(await run_in_threadpool(current.prompt_ids, messages))
            except Exception as exc:  # e.g. a template that insists on alternating roles
                raise RequestError(422, f"the chat template rejects these messages: {exc}") from exc
            entry["prompt_tokens"] = n
            max_prompt = _max_prompt_tokens(current.model, params)
            if max_prompt is not None and n > max_prompt:
                raise RequestError(400, f"the prompt is {n} tokens; at most {max_prompt} are accepted")
        except RequestError as exc:
            return await finish(exc.status, {"detail": str(exc)})

        try:
            result = await asyncio.wrap_future(batcher.submit(messages, max_new_tokens))
        except Exception as exc:
            logger.exception("generation failed")
            entry["error"] = f"{type(exc).__name__}: {exc}"
            return await finish(500, {"detail": "generation failed; see the server log"})
        served = result["served"].info  # the version that generated this answer (a swap may have happened)
        entry.update(response=result["text"], prompt_tokens=result["prompt_tokens"], new_tokens=result["new_tokens"],
                     model_name=served.get("name"), model_version=served.get("version"), alias=served.get("alias"))
        return await finish(
            200,
            {
                "text": result["text"],
                "model": served.get("name"),
                "version": served.get("version"),
                "alias": served.get("alias"),
                "new_tokens": result["new_tokens"],
                "prompt_tokens": result["prompt_tokens"],
                "max_new_tokens": max_new_tokens,
                "finish_reason": result["finish_reason"],
            },
        )

    @app.post("/feedback")
    async def feedback(request: Request) -> Any:
        """A rating of one logged answer or a choice between two (``tuneline.deploy.feedback``); never a 5xx for
        bad input: 400/404/409/413/415/422 with ``{"detail"}``."""
        from tuneline.deploy.feedback import FeedbackError, parse_feedback, record_feedback

        try:
            parsed = parse_feedback(await read_json_body(request, params.max_feedback_bytes, FeedbackError))
            return JSONResponse(await run_in_threadpool(record_feedback, log, parsed), status_code=201)
        except FeedbackError as exc:
            return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    return app


def make_server(app: Any, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> Any:
    """A single-worker ``uvicorn.Server`` for ``app`` (``run()`` it; set ``should_exit`` to stop it)."""
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, workers=1, log_level=log_level, access_log=False)
    return uvicorn.Server(config)


def alias_check(tracker: Tracker, ref: str, *, cache_dir: Optional[str] = None
                ) -> Optional[Callable[[Mapping[str, Any]], Optional[ServedModel]]]:
    """For ``NAME@ALIAS``: a check that loads the alias's version when it differs from the served one
    (None for a pinned ``NAME/VERSION``, which never moves)."""
    from tuneline.deploy.registry import get_version, load_registered, parse_model_ref

    name, alias, _version = parse_model_ref(ref)
    if alias is None:
        return None

    def check(served: Mapping[str, Any]) -> Optional[ServedModel]:
        if str(get_version(tracker, ref)["version"]) == str(served.get("version")):
            return None
        return ServedModel(*load_registered(tracker, ref, cache_dir=cache_dir))

    return check


def serve(
    ref: str,
    *,
    tracker: Tracker,
    host: Optional[str] = None,
    port: Optional[int] = None,
    log_path: Optional[str] = None,
    params: Optional[ServeParams] = None,
    cache_dir: Optional[str] = None,
    offload: Any = None,
) -> None:
    """Load ``ref`` (``NAME@ALIAS``, ``NAME/VERSION``, or ``NAME`` meaning ``NAME@params.alias``) and serve it.

    ``host``/``port``/``log_path`` default to ``params`` (127.0.0.1:8000, ``$TUNELINE_HOME/inference.db``).
    Blocks until the server is stopped (SIGINT/SIGTERM).
    """
    from tuneline.deploy.registry import load_registered, parse_model_ref

    params = params or ServeParams()
    name, alias, version = parse_model_ref(ref)
    if alias is None and version is None:
        ref = f"{name}@{params.alias}"
    from tuneline.classify.serving import load_classifier_version

    loaded = load_classifier_version(tracker, ref, cache_dir)  # None unless ref is a registered classifier
    model, tokenizer, info = loaded or load_registered(tracker, ref, cache_dir=cache_dir, offload=offload)
    log = InferenceLog(log_path or params.log_path)
    follow = None if loaded else alias_check(tracker, ref, cache_dir=cache_dir)  # classifiers: pinned for now
    app = create_app(model, tokenizer, info, log, params, check=follow)
    bind = host or params.host
    if bind not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("binding %s: the server has no authentication; put it behind a proxy", bind)
    logger.info("serving %s version %s (alias %s) on %s:%s", info["name"], info["version"], info.get("alias"), bind, port or params.port)
    make_server(app, host=bind, port=params.port if port is None else port).run()


def main(argv: Optional[Sequence[str]] = None) -> int:
    from tuneline.paths import state_dir
    from tuneline.tracking import default_tracking_uri

    parser = argparse.ArgumentParser(prog="python -m tuneline.deploy.server", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="NAME@ALIAS, NAME/VERSION or NAME (= NAME@champion)")
    parser.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="TCP port (default 8000)")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default $TUNELINE_HOME/mlflow.db)")
    parser.add_argument("--registry-uri", default=None, help="MLflow registry URI (default: the tracking URI)")
    parser.add_argument("--log-path", default=None, help="SQLite inference log (default $TUNELINE_HOME/inference.db)")
    parser.add_argument("--cache-dir", default=None, help="where registry downloads go (default $TUNELINE_HOME/registry)")
    parser.add_argument("--max-new-tokens-limit", type=int, default=None, help="cap on a request's max_new_tokens")
    parser.add_argument("--max-body-bytes", type=int, default=None, help="larger request bodies get 413")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = {
        k: v
        for k, v in {"max_new_tokens_limit": args.max_new_tokens_limit, "max_body_bytes": args.max_body_bytes}.items()
        if v is not None
    }
    if args.max_new_tokens_limit is not None:
        overrides["default_max_new_tokens"] = min(ServeParams.default_max_new_tokens, args.max_new_tokens_limit)
    params = ServeParams(**overrides)
    tracker = Tracker(tracking_uri=args.tracking_uri or default_tracking_uri(state_dir()), registry_uri=args.registry_uri)
    serve(args.model, tracker=tracker, host=args.host, port=args.port, log_path=args.log_path, params=params, cache_dir=args.cache_dir)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
