"""Cut the inference log into windows for drift testing.

A window closes when ``window_requests`` new requests have arrived, or when the oldest untested
request is ``window_minutes`` old (and at least ``min_requests`` are waiting). Its id is the range of
log row ids it covers, so the same window always has the same id and never triggers twice.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional


@dataclass(frozen=True)
class Window:
    first_id: int
    last_id: int
    prompts: tuple[str, ...]
    reason: str  # "full" (enough requests) or "timeout" (the oldest request is old enough)

    @property
    def id(self) -> str:
        return f"{self.first_id}-{self.last_id}"


def prompt_of(row: dict[str, Any]) -> Optional[str]:
    """The user's text of a logged request (the last user turn of a conversation)."""
    if row.get("status") not in (None, 200):
        return None
    if row.get("prompt"):
        return row["prompt"]
    messages = row.get("messages") or (json.loads(row["messages_json"]) if row.get("messages_json") else [])
    users = [m.get("content", "") for m in messages if m.get("role") == "user"]
    return users[-1] if users else None


def next_window(
    rows: list[dict[str, Any]], *, now: float, window_requests: int, window_minutes: float, min_requests: int = 10
) -> Optional[Window]:
    """The first complete window among ``rows`` (unread log rows, oldest first), or None."""
    usable = [(row["id"], row["ts"], text) for row in rows if (text := prompt_of(row))]
    if len(usable) >= window_requests:
        chunk = usable[:window_requests]
        return Window(chunk[0][0], chunk[-1][0], tuple(t for _, _, t in chunk), "full")
    if len(usable) >= min_requests and now - usable[0][1] >= window_minutes * 60:
        return Window(usable[0][0], usable[-1][0], tuple(t for _, _, t in usable), "timeout")
    return None
