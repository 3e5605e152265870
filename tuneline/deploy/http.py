"""What every HTTP route of the servers shares: the refusal type and the bounded JSON body reader."""

from __future__ import annotations

import json
from typing import Any


class RequestError(ValueError):
    """A request the server refuses: ``status`` is the HTTP status (never 5xx), the message says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


async def read_json_body(request: Any, max_bytes: int, error: type[RequestError] = RequestError) -> Any:
    """The decoded JSON body of a Starlette request, or ``error``: 415 (not JSON), 413 (above ``max_bytes``,
    declared or streamed: never read further), 400 (not valid JSON)."""
    content_type = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise error(415, f"send JSON (Content-Type: application/json), not {content_type!r}")
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > max_bytes):
        raise error(413, f"request body above {max_bytes} bytes")
    raw = bytearray()
    async for chunk in request.stream():
        raw.extend(chunk)
        if len(raw) > max_bytes:
            raise error(413, f"request body above {max_bytes} bytes")
    try:
        return json.loads(bytes(raw).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(400, f"the body is not valid JSON: {exc}") from None
