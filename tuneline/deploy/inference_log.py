"""The inference log: every request the server answers (good or bad), in one SQLite file.

One row per request in table ``requests``; ``id`` only grows, so a drift sensor keeps the last id it
has seen as its cursor and reads what came after it with :meth:`InferenceLog.read_since`. The file is
in WAL mode (readers do not block the writer), and every call opens and closes its own connection, so
threads and processes may write at the same time (SQLite serializes them; ``busy_timeout`` waits).
"""

from __future__ import annotations

import json
import sqlite3
import time
from contextlib import closing
from pathlib import Path
from typing import Any, Optional, Sequence

COLUMNS = (
    "id",
    "ts",
    "model_name",
    "model_version",
    "alias",
    "prompt",
    "messages_json",
    "response",
    "latency_ms",
    "prompt_tokens",
    "new_tokens",
    "status",
    "error",
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    id INTEGER PRIMARY KEY,
    ts REAL NOT NULL,
    model_name TEXT,
    model_version TEXT,
    alias TEXT,
    prompt TEXT,
    messages_json TEXT,
    response TEXT,
    latency_ms REAL,
    prompt_tokens INT,
    new_tokens INT,
    status INT,
    error TEXT
);
CREATE INDEX IF NOT EXISTS requests_ts ON requests (ts);
CREATE TABLE IF NOT EXISTS feedback (
    id INTEGER PRIMARY KEY,
    ts REAL NOT NULL,
    kind TEXT NOT NULL,
    request_id INTEGER NOT NULL REFERENCES requests (id),
    other_request_id INTEGER REFERENCES requests (id),
    rating INTEGER,
    dedup_key TEXT NOT NULL UNIQUE
);
"""

FEEDBACK_KINDS = ("rating", "pairwise")  # a rating of one answer; a choice of one answer over another


class DuplicateFeedback(ValueError):
    """The same feedback was recorded before (``feedback.dedup_key`` is unique): nothing is logged twice."""


def default_log_path() -> Path:
    """``$TUNELINE_HOME/inference.db``."""
    from tuneline.paths import state_dir

    return state_dir() / "inference.db"


class InferenceLog:
    """An append-only SQLite log of inference requests. Safe for concurrent writers."""

    def __init__(self, path: str | Path | None = None, *, timeout_s: float = 30.0) -> None:
        self.path = Path(path) if path is not None else default_log_path()
        self.timeout_s = timeout_s
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with closing(self._connect()) as conn:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.executescript(_SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(str(self.path), timeout=self.timeout_s, isolation_level=None)
        conn.execute(f"PRAGMA busy_timeout={int(self.timeout_s * 1000)}")
        conn.execute("PRAGMA synchronous=NORMAL")  # durable across process crashes in WAL mode
        conn.row_factory = sqlite3.Row
        return conn

    def journal_mode(self) -> str:
        with closing(self._connect()) as conn:
            return str(conn.execute("PRAGMA journal_mode").fetchone()[0])

    def append(
        self,
        *,
        model_name: Optional[str],
        model_version: Optional[str | int],
        alias: Optional[str] = None,
        prompt: Optional[str] = None,
        messages: Optional[Sequence[Any]] = None,
        response: Optional[str] = None,
        latency_ms: Optional[float] = None,
        prompt_tokens: Optional[int] = None,
        new_tokens: Optional[int] = None,
        status: int = 200,
        error: Optional[str] = None,
        ts: Optional[float] = None,
    ) -> int:
        """Write one request; returns its id. ``messages`` is stored as JSON; ``ts`` defaults to now."""
        row = (
            time.time() if ts is None else float(ts),
            model_name,
            None if model_version is None else str(model_version),
            alias,
            prompt,
            None if messages is None else json.dumps(list(messages), ensure_ascii=False),
            response,
            latency_ms,
            prompt_tokens,
            new_tokens,
            int(status),
            error,
        )
        with closing(self._connect()) as conn:
            cur = conn.execute(
                "INSERT INTO requests (ts, model_name, model_version, alias, prompt, messages_json, response,"
                " latency_ms, prompt_tokens, new_tokens, status, error) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                row,
            )
            return int(cur.lastrowid)

    def read_since(self, last_id: int = 0, limit: int = 1000) -> list[dict[str, Any]]:
        """Rows with ``id > last_id``, oldest first, at most ``limit``; the last row's id is the next cursor.

        Each row is a dict of the table's columns plus ``messages`` (``messages_json`` decoded, or None).
        """
        if limit < 1:
            raise ValueError("limit must be >= 1")
        with closing(self._connect()) as conn:
            rows = conn.execute(
                "SELECT * FROM requests WHERE id > ? ORDER BY id LIMIT ?", (int(last_id), int(limit))
            ).fetchall()
        out = []
        for row in rows:
            item = dict(row)
            item["messages"] = json.loads(item["messages_json"]) if item["messages_json"] else None
            out.append(item)
        return out

    def count(self) -> int:
        with closing(self._connect()) as conn:
            return int(conn.execute("SELECT COUNT(*) FROM requests").fetchone()[0])

    def get(self, request_id: int) -> Optional[dict[str, Any]]:
        """One logged request (as :meth:`read_since` gives it), or None when no request has that id."""
        with closing(self._connect()) as conn:
            row = conn.execute("SELECT * FROM requests WHERE id = ?", (int(request_id),)).fetchone()
        if row is None:
            return None
        item = dict(row)
        item["messages"] = json.loads(item["messages_json"]) if item["messages_json"] else None
        return item

    def add_feedback(self, *, kind: str, request_id: int, other_request_id: Optional[int] = None,
                     rating: Optional[int] = None, ts: Optional[float] = None) -> int:
        """Record feedback on logged requests; returns its id. A rating is kept once per request and a pairwise
        choice once per pair of requests (either order): a repeat raises :class:`DuplicateFeedback`."""
        if kind not in FEEDBACK_KINDS:
            raise ValueError(f"feedback kind {kind!r} is not one of {FEEDBACK_KINDS}")
        key = (f"rating:{int(request_id)}" if kind == "rating"
               else "pairwise:" + ":".join(str(i) for i in sorted((int(request_id), int(other_request_id or 0)))))
        with closing(self._connect()) as conn:
            try:
                cur = conn.execute(
                    "INSERT INTO feedback (ts, kind, request_id, other_request_id, rating, dedup_key)"
                    " VALUES (?,?,?,?,?,?)",
                    (time.time() if ts is None else float(ts), kind, int(request_id),
                     None if other_request_id is None else int(other_request_id), rating, key))
            except sqlite3.IntegrityError as exc:
                raise DuplicateFeedback(f"this {kind} feedback was recorded before ({key})") from exc
            return int(cur.lastrowid)

    def read_feedback_since(self, last_id: int = 0, limit: int = 100000) -> list[dict[str, Any]]:
        """Feedback rows with ``id > last_id``, oldest first."""
        with closing(self._connect()) as conn:
            rows = conn.execute("SELECT * FROM feedback WHERE id > ? ORDER BY id LIMIT ?",
                                (int(last_id), int(limit))).fetchall()
        return [dict(r) for r in rows]

    def last_feedback_id(self) -> int:
        with closing(self._connect()) as conn:
            return int(conn.execute("SELECT COALESCE(MAX(id), 0) FROM feedback").fetchone()[0])

    def last_id(self) -> int:
        """The newest row's id (0 when empty): a cursor that skips everything logged so far."""
        with closing(self._connect()) as conn:
            return int(conn.execute("SELECT COALESCE(MAX(id), 0) FROM requests").fetchone()[0])
