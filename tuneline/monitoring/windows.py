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


@dataclass(frozen=True)
class WindowPlan:
    """What the drift sensor does with the rows it read: a window to test (or none), and how far its cursor
    may move without ever skipping a usable request."""

    window: Optional[Window]
    cursor: int  # the last log id the sensor is done with
    skipped: int  # unusable rows (failed requests, no user text) passed over
    reason: str  # why there is no window, or what the window is


def plan_window(rows: list[dict[str, Any]], *, last_id: int, now: float, window_requests: int,
                window_minutes: float, min_requests: int = 10) -> WindowPlan:
    """Plan the next drift test over the log rows read after ``last_id`` (oldest first).

    The cursor moves past unusable rows (failed requests, rows without a user turn) even when no window forms,
    so a log where most requests fail never makes the sensor re-read the same rows forever; it never moves
    past a usable row that is not yet in a tested window.
    """
    usable_ids = [row["id"] for row in rows if prompt_of(row)]
    window = next_window(rows, now=now, window_requests=window_requests, window_minutes=window_minutes,
                         min_requests=min_requests)
    if window is not None:
        skipped = sum(1 for row in rows if row["id"] <= window.last_id and row["id"] not in set(usable_ids))
        return WindowPlan(window, window.last_id, skipped, f"window {window.id} ({window.reason})")
    if usable_ids:
        before = [row["id"] for row in rows if row["id"] < usable_ids[0]]
        return WindowPlan(None, before[-1] if before else last_id, len(before),
                          f"{len(usable_ids)} usable request(s) waiting: the window is not complete yet"
                          + (f"; {len(before)} failed request(s) passed over" if before else ""))
    if rows:
        return WindowPlan(None, rows[-1]["id"], len(rows),
                          f"{len(rows)} failed request(s) passed over: nothing to test for drift")
    return WindowPlan(None, last_id, 0, "no new requests")
