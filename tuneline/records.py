"""What stages hand each other: canonical records, quarantine entries, references and reports."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

KINDS = ("sft", "preference", "classification", "text")


def canonical_json(value: Any) -> str:
    """Deterministic JSON (sorted keys, no spaces) used for hashing."""
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", errors="surrogatepass")).hexdigest()


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class ChatRecord:
    """One canonical example.

    kind "sft": ``messages`` ends with the assistant turn to learn.
    kind "preference": ``messages`` is the shared prompt (ends with a user turn);
    ``chosen``/``rejected`` are the two final assistant responses.
    kind "classification": ``messages`` is one user turn with the text; ``label`` the class.
    kind "text": ``messages`` is one user turn holding a passage of plain text (corpus).
    """

    kind: str
    messages: list[dict[str, str]]
    source: str
    line: int
    chosen: Optional[str] = None
    rejected: Optional[str] = None
    label: Optional[str] = None
    task: Optional[str] = None
    meta: dict[str, Any] = field(default_factory=dict)
    id: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind {self.kind!r} is not one of {KINDS}")
        if not self.id:
            self.id = self.content_id()

    def content(self) -> dict[str, Any]:
        """What the record says, without where it came from: the basis of its id."""
        return {
            "kind": self.kind,
            "messages": self.messages,
            "chosen": self.chosen,
            "rejected": self.rejected,
            "label": self.label,
        }

    def content_id(self) -> str:
        return sha256_text(canonical_json(self.content()))[:16]

    def prompt_text(self) -> str:
        """The conversation up to the response to learn, as plain text."""
        turns = self.messages[:-1] if self.kind == "sft" else self.messages
        return "\n".join(m["content"] for m in turns)

    def response_texts(self) -> list[str]:
        if self.kind == "sft":
            return [self.messages[-1]["content"]]
        if self.kind == "preference":
            return [self.chosen or "", self.rejected or ""]
        return [self.label] if self.label is not None else []

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ChatRecord":
        return cls(**data)


@dataclass
class Rejection:
    """A row sent to quarantine: where it was, why, and what it held (when it could be read)."""

    source: str
    line: int
    reason: str
    detail: str = ""
    field: Optional[str] = None
    raw: Optional[str] = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> int:
    """Write rows atomically (temp file + rename); returns the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    n = 0
    with open(tmp, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    tmp.replace(path)
    return n


def read_jsonl(path: str | Path) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)


def read_records(path: str | Path) -> list[ChatRecord]:
    return [ChatRecord.from_dict(row) for row in read_jsonl(path)]
