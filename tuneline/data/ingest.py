"""Read instruction, preference, classification and plain-text files into canonical ChatRecords.

One call, :func:`read_source`, turns a file into ``ChatRecord``s plus ``Rejection``s for the rows
that cannot be read or mapped. Three steps, each a section of this module:

1. **Containers** (JSONL, JSON array, CSV/TSV, Parquet, plain text) become ``_Row``s: a 1-based line
   number, the raw text (for quarantine) and the parsed value, or the reason it could not be parsed.
   JSONL lines are decoded one by one, so one bad line never sinks the file.
2. **Schema detection** votes over the keys of the first parseable object rows.
3. **Schema mappers** turn one row into one canonical record (self-instruct: one per instance),
   with strict type rules: a required string that is missing, null or not a string is rejected,
   never coerced with ``str()``.

Row *content* rules (empty texts, lengths, duplicates, labels) belong to ``validate.py``; here a
row is only rejected when it cannot be turned into a record at all. A record whose required source
fields are blank strings names them in ``meta["blank_fields"]`` (validation quarantines it as
``empty_field``, naming the file's own column). ``read`` always equals ``len(records) + len(rejected)``.

Rejection reasons raised here: ``invalid_utf8``, ``invalid_unicode``, ``malformed_json``,
``not_an_object``, ``missing_field``, ``null_field``, ``wrong_type``, ``empty_field`` (a value the
mapper needs is empty, e.g. an hh-rlhf dialogue or an ``instances`` list), ``extra_columns``,
``missing_column``, ``invalid_messages``, ``malformed_dialogue``, ``prompt_mismatch``,
``no_preference``.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from tuneline.params import SCHEMAS, DataSource
from tuneline.records import ChatRecord, Rejection

RAW_LIMIT = 500  # characters of a rejected row kept in Rejection.raw
DETECT_ROWS = 200  # parseable object rows that vote on the schema
BOM = b"\xef\xbb\xbf"

TEXT_COLUMNS = ("text", "sentence", "content")  # classification text column, first present wins
LABEL_COLUMNS = ("label", "category", "class", "intent")  # classification label column
SHAREGPT_ROLES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "bard": "assistant",
    "bing": "assistant", "model": "assistant",
    "system": "system",
}
CHAT_ROLES = ("system", "user", "assistant")


class IngestError(ValueError):
    """A file that cannot be ingested at all; the one-line message names the file.

    The message is made one line of valid UTF-8 (whitespace runs collapsed, undecodable bytes and lone
    surrogates backslash-escaped) whatever it quotes: a library's multi-line error, a header read from a
    damaged file.
    """

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(_escaped(message).split()))


@dataclass
class IngestResult:
    """What one file yielded."""

    path: str
    container: str  # jsonl, json, csv, tsv, parquet or txt
    schema: str  # one of tuneline.params.SCHEMAS (never "auto")
    read: int  # rows read (self-instruct instances counted one by one); == records + rejected
    records: list[ChatRecord] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)


def read_source(source: DataSource | str | Path) -> IngestResult:
    """Read one file into canonical records and rejections; raise IngestError if it is unusable."""
    if not isinstance(source, DataSource):
        source = DataSource(path=str(source))
    path = Path(source.path)
    name = str(source.path)
    data = _read_bytes(path, name)
    if not data.replace(BOM, b"", 1).strip():
        raise IngestError(f"{name}: file is empty")

    container = _detect_container(path, data, source.format)
    if container == "txt":
        if source.schema not in ("auto", "text"):
            raise IngestError(f"{name}: schema {source.schema!r} cannot be read from plain text")
        return _read_text(name, data, source.task)
    if container in ("csv", "tsv"):
        delimiter = source.delimiter or ("\t" if container == "tsv" else ",")
        rows = _csv_rows(name, data, delimiter, columns=None if source.header else list(source.columns))
        _check_csv_columns(name, rows, delimiter, source)
    else:
        container, rows = _container_rows(container, path, name, data)
    if not rows:
        raise IngestError(f"{name}: no rows in {container} file")

    rename = _renamer(source.fields)
    for row in rows:
        if row.reason is None and isinstance(row.value, dict):
            row.value = rename(row.value)
    schema = source.schema
    if schema == "auto":
        try:
            schema = detect_schema([r.value for r in rows if r.reason is None and isinstance(r.value, dict)])
        except IngestError as exc:
            raise IngestError(f"{name}: {exc}") from None

    result = IngestResult(path=name, container=container, schema=schema, read=0)
    for row in rows:
        for item in _map_row(row, MAPPERS[schema], name, source.task, dict(source.fields)):
            result.read += 1
            (result.records if isinstance(item, ChatRecord) else result.rejected).append(item)
    return result


# ---------------------------------------------------------------------------
# 1. containers -> rows


@dataclass
class _Row:
    line: int  # 1-based physical line (JSON), data-row number (CSV) or row index (Parquet)
    raw: str  # the row's text, for quarantine
    value: Any = None  # parsed value when reason is None
    reason: Optional[str] = None  # why the row could not be parsed
    detail: str = ""
    field: Optional[str] = None


def _read_bytes(path: Path, name: str) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise IngestError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise IngestError(f"{name}: is a directory, not a file") from None
    except OSError as exc:
        raise IngestError(f"{name}: cannot read file ({exc.strerror or exc})") from None
    if path.suffix == ".gz":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as exc:  # a damaged deflate stream raises zlib.error
            raise IngestError(f"{name}: not a readable gzip file ({exc})") from None
    return data


def _suffix(path: Path) -> str:
    """The extension that names the container (``.jsonl`` for ``x.jsonl.gz``)."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


EXTENSIONS = {
    ".jsonl": "jsonl", ".ndjson": "jsonl", ".jsonlines": "jsonl", ".json": "json",
    ".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".parquet": "parquet", ".pq": "parquet",
    ".txt": "txt", ".text": "txt", ".md": "txt",
}


def _detect_container(path: Path, data: bytes, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    by_extension = EXTENSIONS.get(_suffix(path))
    if by_extension:
        return by_extension
    if data[:4] == b"PAR1":
        return "parquet"
    head = data.replace(BOM, b"", 1).lstrip()
    if head[:1] == b"[":
        return "json"
    if head[:1] == b"{":
        return "json"  # one object, a wrapper object, or JSON Lines: decided when read
    first_line = head.split(b"\n", 1)[0]
    if b"\t" in first_line:
        return "tsv"
    if b"," in first_line:
        return "csv"
    return "txt"


def _container_rows(container: str, path: Path, name: str, data: bytes) -> tuple[str, list[_Row]]:
    """(the container really found, its rows): a .json file may turn out to be JSON Lines."""
    if container in ("json", "jsonl"):
        return _json_or_jsonl_rows(name, data, prefer_lines=container == "jsonl")
    if container in ("csv", "tsv"):
        return container, _csv_rows(name, data, "\t" if container == "tsv" else ",")
    if container == "parquet":
        return container, _parquet_rows(path, name, data)
    raise IngestError(f"{name}: unsupported container {container!r}")


def _json_or_jsonl_rows(name: str, data: bytes, *, prefer_lines: bool) -> tuple[str, list[_Row]]:
    """JSON Lines, or a JSON array / an object holding one list (sniffed from the first byte)."""
    head = data.replace(BOM, b"", 1).lstrip()[:1]
    if head == b"[" or (head == b"{" and not prefer_lines):
        text = data.decode("utf-8", errors="surrogateescape").lstrip("\ufeff")
        try:
            whole = json.loads(text, parse_int=_parse_int)
        except json.JSONDecodeError as exc:
            if head == b"[" and not prefer_lines:
                raise IngestError(f"{name}: malformed JSON at line {exc.lineno}: {exc.msg}") from None
            whole = None  # not one JSON document: read it line by line
        except RecursionError:
            if not prefer_lines:
                raise IngestError(f"{name}: JSON nested too deeply") from None
            whole = None
        if isinstance(whole, list) or (isinstance(whole, dict) and _list_key(whole)):
            return "json", _json_array_rows(text, whole)
        if isinstance(whole, dict):  # a single record
            return "json", [_check_parsed(_Row(line=1, raw=_safe_raw(text)), whole, text)]
    return "jsonl", _jsonl_rows(data)


def _jsonl_rows(data: bytes) -> list[_Row]:
    rows = []
    for number, line in enumerate(data.split(b"\n"), start=1):
        if number == 1 and line.startswith(BOM):
            line = line[len(BOM):]
        line = line.rstrip(b"\r")
        if not line.strip():
            continue  # blank and whitespace-only lines are not rows
        row = _Row(line=number, raw=_safe_raw(line))
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            row.reason, row.detail = "invalid_utf8", f"invalid UTF-8 byte 0x{line[exc.start]:02X} at byte {exc.start}"
            rows.append(row)
            continue
        try:
            value = json.loads(text, parse_int=_parse_int)
        except json.JSONDecodeError as exc:
            row.reason, row.detail = "malformed_json", f"{exc.msg} (column {exc.colno})"
            rows.append(row)
            continue
        except RecursionError:
            row.reason, row.detail = "malformed_json", "nested too deeply"
            rows.append(row)
            continue
        rows.append(_check_parsed(row, value, text))
    return rows


class _HugeInt:
    """An integer literal longer than Python converts (4,300 digits): a value no mapper accepts."""

    def __init__(self, digits: int) -> None:
        self.digits = digits

    def __repr__(self) -> str:
        return f"<integer of {self.digits} digits>"


def _parse_int(text: str) -> int | _HugeInt:
    """``json``'s integer hook: ``int`` raises ValueError past 4,300 digits, which would sink the whole file."""
    try:
        return int(text)
    except ValueError:
        return _HugeInt(len(text.lstrip("-")))


def _list_key(obj: dict) -> Optional[str]:
    """The key of a wrapper object's single list of rows ({"data": [...]}), or None for a record."""
    if _row_schema(obj) is not None:
        return None
    keys = [k for k, v in obj.items() if isinstance(v, list)]
    return keys[0] if len(keys) == 1 else None


def _json_array_rows(text: str, whole: list | dict) -> list[_Row]:
    """One row per element, each with the physical line on which it starts."""
    decoder = json.JSONDecoder(parse_int=_parse_int)
    pos = _skip_ws(text, 0)
    if isinstance(whole, dict):  # walk to the value of the one list key
        key = _list_key(whole)
        pos = _skip_ws(text, pos + 1)
        while True:
            member, pos = decoder.raw_decode(text, pos)
            pos = _skip_ws(text, _skip_ws(text, pos) + 1)  # past ':'
            if member == key:
                break
            _, pos = decoder.raw_decode(text, pos)
            pos = _skip_ws(text, _skip_ws(text, pos) + 1)  # past ','
    rows = []
    line, counted = 1, 0  # physical line of position `counted`
    pos = _skip_ws(text, pos + 1)  # past '['
    while text[pos] != "]":
        value, end = decoder.raw_decode(text, pos)
        line, counted = line + text.count("\n", counted, pos), pos
        raw = text[pos:end]
        rows.append(_check_parsed(_Row(line=line, raw=_safe_raw(raw)), value, raw))
        pos = _skip_ws(text, end)
        if text[pos] == ",":
            pos = _skip_ws(text, pos + 1)
    return rows


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n\ufeff":
        pos += 1
    return pos


def _check_parsed(row: _Row, value: Any, raw_text: str) -> _Row:
    """Reject undecodable bytes, lone surrogates and non-object rows; else keep the value.

    ``raw_text`` is the JSON text the value was parsed from ("" for Parquet, whose strings are valid).
    """
    if _has_surrogate(raw_text):  # literal surrogates only come from undecodable bytes
        row.reason, row.detail = "invalid_utf8", "row contains bytes that are not valid UTF-8"
    elif not isinstance(value, dict):
        row.reason, row.detail = "not_an_object", f"row is {_json_type(value)}, not a JSON object"
    else:
        bad = _surrogate_path(value) if "\\u" in raw_text else None  # only \uD8xx escapes make them
        if bad is not None:
            row.reason, row.field = "invalid_unicode", bad
            row.detail = f"{bad} holds a lone surrogate (cannot be encoded as UTF-8)"
        else:
            row.value = value
    return row


def _csv_rows(name: str, data: bytes, delimiter: str, columns: Optional[list[str]] = None) -> list[_Row]:
    """CSV/TSV with a header (or ``columns`` naming the cells of a file without one); numbered by data row
    (header excluded, blank lines skipped)."""
    text = data.removeprefix(BOM).decode("utf-8", errors="surrogateescape")
    csv.field_size_limit(2**31 - 1)  # allow huge fields; validation rejects them by length
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = list(columns) if columns is not None else next(reader, None)
        if not header or not any(h.strip() for h in header):
            raise IngestError(f"{name}: no header row")
        header = [_escaped(h.strip()) for h in header]  # names from damaged bytes stay printable
        rows = []
        for cells in reader:
            if not cells:
                continue
            row = _Row(line=len(rows) + 1, raw=_safe_raw(_csv_line(cells, delimiter)))
            if any(_has_surrogate(c) for c in cells):
                row.reason, row.detail = "invalid_utf8", "row contains bytes that are not valid UTF-8"
            elif len(cells) > len(header):
                row.reason = "extra_columns"
                row.detail = f"{len(cells)} columns, header has {len(header)}"
            elif len(cells) < len(header):
                missing = header[len(cells)] or f"column {len(cells) + 1}"  # an unnamed column by position
                row.reason, row.field = "missing_column", missing
                row.detail = f"{len(cells)} of {len(header)} columns; no {missing!r}"
            else:
                row.value = dict(zip(header, cells))
            rows.append(row)
    except csv.Error as exc:
        raise IngestError(f"{name}: unreadable CSV near line {reader.line_num}: {exc}") from None
    return rows


def _check_csv_columns(name: str, rows: list[_Row], delimiter: str, source: DataSource) -> None:
    """A CSV whose columns cannot be what the recipe says: a one-line error naming the file and the field.

    A column named in ``fields`` (or ``columns``) that the header lacks is an error; so is a header of one cell
    holding another common separator (the file was read with the wrong delimiter)."""
    header = source.columns if not source.header else next(
        (tuple(r.value) for r in rows if r.reason is None and isinstance(r.value, dict)), ())
    if not header:
        return
    missing = [f"{canonical} -> {column!r}" for canonical, column in source.fields.items() if column not in header]
    if missing:
        raise IngestError(f"{name}: fields {', '.join(missing)}: no such column (the columns are "
                          f"{', '.join(map(repr, header))})")
    if len(header) == 1 and source.schema in ("auto", "classification"):
        other = next((sep for sep in (";", "\t", "|", ",") if sep != delimiter and sep in header[0]), None)
        if other is not None:
            raise IngestError(f"{name}: line 1 is one column {header[0][:60]!r} with {delimiter!r} as delimiter; "
                              f"the file looks {other!r}-separated (set delimiter: {other!r})")


def _csv_line(cells: list[str], delimiter: str) -> str:
    out = io.StringIO()
    csv.writer(out, delimiter=delimiter, lineterminator="").writerow(cells)
    return out.getvalue()


def _parquet_rows(path: Path, name: str, data: bytes) -> list[_Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(pa.BufferReader(data))
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise IngestError(f"{name}: unreadable Parquet file ({exc})") from None
    try:
        values = table.to_pylist()
    except Exception:  # a value Python cannot hold (a timestamp past year 9999, ...): convert cell by cell
        values = _parquet_cells(table)
    rows = []
    for index, value in enumerate(values, start=1):
        raw = json.dumps(value, ensure_ascii=False, default=str)
        rows.append(_check_parsed(_Row(line=index, raw=_safe_raw(raw)), value, ""))
    return rows


class _Unreadable:
    """A Parquet cell Python cannot represent (e.g. a timestamp out of datetime's range): no mapper accepts it."""

    def __init__(self, arrow_type: str, error: Exception) -> None:
        self.arrow_type, self.error = arrow_type, " ".join(str(error).split())[:100]

    def __repr__(self) -> str:
        return f"<unreadable {self.arrow_type}: {self.error}>"


def _parquet_cells(table) -> list[dict]:
    """The rows of ``table``, a cell that cannot be converted to Python standing as an ``_Unreadable``."""
    columns: dict[str, list] = {}
    for name, column in zip(table.column_names, table.columns):
        try:
            columns[name] = column.to_pylist()
        except Exception:
            cells = []
            for i in range(len(column)):
                try:
                    cells.append(column[i].as_py())
                except Exception as exc:  # OverflowError, ValueError, ArrowException
                    cells.append(_Unreadable(str(column.type), exc))
            columns[name] = cells
    return [dict(zip(columns, cells)) for cells in zip(*columns.values())]


GUTENBERG_START = re.compile(r"^\s*\*\*\*\s*START OF", re.IGNORECASE)
GUTENBERG_END = re.compile(r"^\s*\*\*\*\s*END OF", re.IGNORECASE)
GUTENBERG_END_LINE = re.compile(r"^\s*End of (the )?Project Gutenberg", re.IGNORECASE)


def _read_text(name: str, data: bytes, task: Optional[str]) -> IngestResult:
    """Plain text: Gutenberg boilerplate stripped, one ``text`` record per blank-line paragraph."""
    text = data.removeprefix(BOM).decode("utf-8", errors="surrogateescape")
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    start, end = 0, len(lines)
    for i, line in enumerate(lines):
        if GUTENBERG_START.match(line):
            start = i + 1
            break
    for i in range(start, len(lines)):
        if GUTENBERG_END.match(lines[i]):
            end = i
            break

    paragraphs: list[tuple[int, list[str]]] = []
    for i in range(start, end):
        if not lines[i].strip():
            continue
        if i == start or not lines[i - 1].strip():
            paragraphs.append((i + 1, []))
        paragraphs[-1][1].append(lines[i])
    if end < len(lines) and paragraphs and GUTENBERG_END_LINE.match(paragraphs[-1][1][0]):
        paragraphs.pop()  # "End of the Project Gutenberg EBook of ..." belongs to the boilerplate

    result = IngestResult(path=name, container="txt", schema="text", read=len(paragraphs))
    for line, body in paragraphs:
        passage = "\n".join(body)
        if _has_surrogate(passage):
            result.rejected.append(Rejection(
                source=name, line=line, reason="invalid_utf8",
                detail="paragraph contains bytes that are not valid UTF-8", raw=_safe_raw(passage),
            ))
            continue
        result.records.append(ChatRecord(
            kind="text", messages=[{"role": "user", "content": passage}], source=name, line=line,
            task=task, meta={"schema": "text"},
        ))
    if not result.read:
        raise IngestError(f"{name}: no text paragraphs")
    return result


# ---------------------------------------------------------------------------
# 2. schema detection

# Keys a row must have to vote for a schema, in priority order (the first match is the row's vote;
# ties between schemas go to the earlier one).
SIGNATURES: tuple[tuple[str, Callable[[set[str]], bool]], ...] = (
    ("self_instruct", lambda k: {"instruction", "instances"} <= k),
    ("alpaca_eval", lambda k: {"instruction", "output_1", "output_2"} <= k),
    ("messages", lambda k: "messages" in k),
    ("sharegpt", lambda k: "conversations" in k),
    ("preference", lambda k: {"prompt", "chosen", "rejected"} <= k),
    ("hh_rlhf", lambda k: {"chosen", "rejected"} <= k),
    ("dolly", lambda k: {"instruction", "response"} <= k),
    ("alpaca", lambda k: {"instruction", "output"} <= k),
    ("prompt_completion", lambda k: {"prompt", "completion"} <= k),
    ("classification", lambda k: bool(k & set(TEXT_COLUMNS)) and bool(k & set(LABEL_COLUMNS))),
    ("text", lambda k: "text" in k),
)


def _row_schema(row: dict) -> Optional[str]:
    keys = set(row)
    return next((schema for schema, matches in SIGNATURES if matches(keys)), None)


def detect_schema(rows: list[dict]) -> str:
    """The schema most of the first DETECT_ROWS object rows look like; IngestError if none."""
    votes = Counter(_row_schema(row) for row in rows[:DETECT_ROWS] if isinstance(row, dict))
    votes.pop(None, None)
    if not votes:
        seen = sorted({k for row in rows[:DETECT_ROWS] if isinstance(row, dict) for k in row})[:12]
        what = f"keys seen: {', '.join(map(str, seen))}" if seen else "no parseable JSON object rows"
        raise IngestError(f"cannot recognize the schema ({what})")
    order = [schema for schema, _ in SIGNATURES]
    return max(votes, key=lambda s: (votes[s], -order.index(s)))


def _renamer(fields: dict[str, str]) -> Callable[[dict], dict]:
    """Apply DataSource.fields (canonical name -> file column): mapped columns win."""
    if not fields:
        return lambda row: row
    mapped_columns = set(fields.values())

    def rename(row: dict) -> dict:
        out = {k: v for k, v in row.items() if k not in mapped_columns and k not in fields}
        for canonical, column in fields.items():
            if column in row:
                out[canonical] = row[column]
        return out

    return rename


# ---------------------------------------------------------------------------
# 3. schema mappers: one row -> records


class _Problem(Exception):
    """Why a row (or one self-instruct instance) cannot become a record."""

    def __init__(self, reason: str, field: Optional[str], detail: str) -> None:
        super().__init__(detail)
        self.reason, self.field, self.detail = reason, field, detail


@dataclass
class _Context:
    source: str
    line: int
    task: Optional[str]  # DataSource.task; beats the row's own task/category
    columns: dict[str, str]  # canonical field -> file column (for naming fields in rejections)

    def record(self, kind: str, messages: list[dict], row: dict, used: set[str], *,
               task_keys: tuple[str, ...] = ("task", "category"), blank: tuple[str, ...] = (),
               **fields: Any) -> ChatRecord:
        task = self.task or next(
            (row[k] for k in task_keys if isinstance(row.get(k), str) and row[k].strip()), None
        )
        meta: dict[str, Any] = {
            k: v for k, v in row.items()
            if k not in used and isinstance(v, (str, int, float, bool)) and len(str(v)) <= 200
        }
        if blank:
            meta["blank_fields"] = [self.columns.get(f, f) for f in blank]
        return ChatRecord(kind=kind, messages=messages, source=self.source, line=self.line,
                          task=task, meta=meta, **fields)


def _map_row(row: _Row, mapper, source: str, task: Optional[str], columns: dict[str, str]):
    """Yield the records (or rejections) one parsed row gives."""
    def reject(reason: str, field: Optional[str], detail: str) -> Rejection:
        return Rejection(source=source, line=row.line, reason=reason, detail=detail,
                         field=columns.get(field, field) if field else None, raw=row.raw)

    if row.reason is not None:
        yield reject(row.reason, row.field, row.detail)
        return
    ctx = _Context(source=source, line=row.line, task=task, columns=columns)
    try:
        for item in mapper(row.value, ctx):
            yield reject(item.reason, item.field, item.detail) if isinstance(item, _Problem) else item
    except _Problem as problem:
        yield reject(problem.reason, problem.field, problem.detail)


def _require(row: dict, key: str) -> Any:
    if key not in row:
        raise _Problem("missing_field", key, f"no {key!r} field")
    if row[key] is None:
        raise _Problem("null_field", key, f"{key!r} is null")
    return row[key]


def _string(row: dict, key: str, *, required: bool = True) -> str:
    """A string field: missing/null/non-string are rejected when required; optional ones default to ''."""
    if not required and row.get(key) is None:
        return ""
    value = _require(row, key)
    if not isinstance(value, str):
        raise _Problem("wrong_type", key, f"{key!r} is {_json_type(value)}, expected a string")
    return value


def _blank(*pairs: tuple[str, str]) -> tuple[str, ...]:
    return tuple(name for name, value in pairs if not value.strip())


def _user_turn(instruction: str, extra: str) -> str:
    return "\n\n".join(part for part in (instruction, extra) if part.strip())


def _sft(user: str, assistant: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


def _map_alpaca(row: dict, ctx: _Context):
    instruction, extra = _string(row, "instruction"), _string(row, "input", required=False)
    output = _string(row, "output")
    yield ctx.record("sft", _sft(_user_turn(instruction, extra), output), row, {"instruction", "input", "output"},
                     blank=_blank(("instruction", instruction), ("output", output)))


def _map_dolly(row: dict, ctx: _Context):
    instruction, extra = _string(row, "instruction"), _string(row, "context", required=False)
    response = _string(row, "response")
    yield ctx.record("sft", _sft(_user_turn(instruction, extra), response), row,
                     {"instruction", "context", "response", "category"},
                     blank=_blank(("instruction", instruction), ("response", response)))


def _map_self_instruct(row: dict, ctx: _Context):
    instruction = _string(row, "instruction")
    instances = _require(row, "instances")
    if not isinstance(instances, list):
        raise _Problem("wrong_type", "instances", f"'instances' is {_json_type(instances)}, expected a list")
    if not instances:
        raise _Problem("empty_field", "instances", "'instances' is an empty list")
    for i, instance in enumerate(instances):
        try:
            if not isinstance(instance, dict):
                raise _Problem("wrong_type", f"instances[{i}]", f"instance {i} is {_json_type(instance)}")
            extra, output = _string(instance, "input", required=False), _string(instance, "output")
        except _Problem as problem:
            if not problem.field.startswith("instances"):
                problem.field = f"instances[{i}].{problem.field}"
            yield problem
            continue
        record = ctx.record("sft", _sft(_user_turn(instruction, extra), output), row, {"instruction", "instances"},
                            blank=_blank(("instruction", instruction), (f"instances[{i}].output", output)))
        record.meta["instance"] = i
        yield record


def _chat(value: Any, key: str, roles: dict[str, str], role_key: str, content_key: str) -> list[dict[str, str]]:
    """A list of chat turns in canonical {role, content} form; strict about types and roles."""
    if not isinstance(value, list):
        raise _Problem("wrong_type", key, f"{key!r} is {_json_type(value)}, expected a list of turns")
    turns = []
    for i, turn in enumerate(value):
        where = f"{key}[{i}]"
        if not isinstance(turn, dict):
            raise _Problem("wrong_type", where, f"{where} is {_json_type(turn)}, expected an object")
        try:
            role, content = _string(turn, role_key), _string(turn, content_key)
        except _Problem as problem:
            problem.field = f"{where}.{problem.field}"
            raise
        if role.strip().lower() not in roles:
            raise _Problem("invalid_messages", f"{where}.{role_key}", f"unknown role {role!r}")
        turns.append({"role": roles[role.strip().lower()], "content": content})
    return turns


def _check_sft_turns(turns: list[dict[str, str]], key: str) -> list[dict[str, str]]:
    if not any(t["role"] == "user" for t in turns):
        raise _Problem("invalid_messages", key, "no user turn")
    if turns[-1]["role"] != "assistant":
        raise _Problem("invalid_messages", key, f"last turn is {turns[-1]['role']!r}, expected 'assistant'")
    return turns


def _map_messages(row: dict, ctx: _Context):
    _require(row, "messages")
    turns = _chat(row["messages"], "messages", {r: r for r in CHAT_ROLES}, "role", "content")
    turns = _check_sft_turns(turns, "messages")
    yield ctx.record("sft", turns, row, {"messages"})


def _map_sharegpt(row: dict, ctx: _Context):
    _require(row, "conversations")
    turns = _chat(row["conversations"], "conversations", SHAREGPT_ROLES, "from", "value")
    turns = _check_sft_turns(turns, "conversations")
    yield ctx.record("sft", turns, row, {"conversations"})


def _map_prompt_completion(row: dict, ctx: _Context):
    prompt, completion = _string(row, "prompt"), _string(row, "completion")
    yield ctx.record("sft", _sft(prompt, completion), row, {"prompt", "completion"},
                     blank=_blank(("prompt", prompt), ("completion", completion)))


def _response(row: dict, key: str) -> str:
    """A preference response: a string, or a message list ending with the assistant turn."""
    value = row.get(key)
    if isinstance(value, list):
        turns = _chat(value, key, {r: r for r in CHAT_ROLES}, "role", "content")
        if not turns or turns[-1]["role"] != "assistant":
            raise _Problem("invalid_messages", key, f"{key!r} does not end with an assistant turn")
        return turns[-1]["content"]
    return _string(row, key)


def _map_preference(row: dict, ctx: _Context):
    if isinstance(row.get("prompt"), list):
        prompt = _chat(row["prompt"], "prompt", {r: r for r in CHAT_ROLES}, "role", "content")
        if not prompt or prompt[-1]["role"] != "user":
            raise _Problem("invalid_messages", "prompt", "prompt does not end with a user turn")
    else:
        prompt = [{"role": "user", "content": _string(row, "prompt")}]
    chosen, rejected = _response(row, "chosen"), _response(row, "rejected")
    blank = _blank(("prompt", prompt[-1]["content"]), ("chosen", chosen), ("rejected", rejected))
    yield ctx.record("preference", prompt, row, {"prompt", "chosen", "rejected"}, blank=blank,
                     chosen=chosen, rejected=rejected)


HH_TURN = re.compile(r"\n\n(Human|Assistant):")
HH_ASSISTANT = "\n\nAssistant:"


def _hh_split(dialogue: str, key: str) -> tuple[str, str]:
    """(prompt prefix, final response) of a whole hh-rlhf dialogue."""
    if not dialogue.strip():
        raise _Problem("empty_field", key, f"{key!r} is empty")
    cut = dialogue.rfind(HH_ASSISTANT)
    if cut < 0:
        raise _Problem("malformed_dialogue", key, f"{key!r} has no '\\n\\nAssistant:' turn")
    return dialogue[:cut], dialogue[cut + len(HH_ASSISTANT):].strip()


def _map_hh_rlhf(row: dict, ctx: _Context):
    chosen_text, rejected_text = _string(row, "chosen"), _string(row, "rejected")
    prefix, chosen = _hh_split(chosen_text, "chosen")
    other_prefix, rejected = _hh_split(rejected_text, "rejected")
    if prefix != other_prefix:
        shorter = min(len(prefix), len(other_prefix))
        at = next((i for i, (a, b) in enumerate(zip(prefix, other_prefix)) if a != b), shorter)
        raise _Problem("prompt_mismatch", "rejected",
                       f"chosen and rejected dialogues differ before the last Assistant turn (at character {at})")
    parts = HH_TURN.split(prefix)
    if parts[0].strip() or len(parts) < 3:
        raise _Problem("malformed_dialogue", "chosen", "dialogue does not start with a '\\n\\nHuman:' turn")
    roles = {"Human": "user", "Assistant": "assistant"}
    prompt = [{"role": roles[r], "content": c.strip()} for r, c in zip(parts[1::2], parts[2::2])]
    if prompt[-1]["role"] != "user":
        raise _Problem("malformed_dialogue", "chosen", "the turn before the last Assistant turn is not Human")
    yield ctx.record("preference", prompt, row, {"chosen", "rejected"}, chosen=chosen, rejected=rejected)


def _map_alpaca_eval(row: dict, ctx: _Context):
    instruction = _string(row, "instruction")
    output_1, output_2 = _string(row, "output_1"), _string(row, "output_2")
    if "preference" not in row:
        raise _Problem("missing_field", "preference", "no 'preference' field")
    choice = _preference_choice(row["preference"])
    if choice is None:
        raise _Problem("no_preference", "preference", f"preference is {row['preference']!r}, not 1 or 2")
    chosen, rejected = (output_1, output_2) if choice == 1 else (output_2, output_1)
    yield ctx.record("preference", [{"role": "user", "content": instruction}], row,
                     {"instruction", "output_1", "output_2"},
                     blank=_blank(("instruction", instruction), ("output_1", output_1), ("output_2", output_2)),
                     chosen=chosen, rejected=rejected)


def _preference_choice(value: Any) -> Optional[int]:
    """1 or 2 for a clear pairwise preference (int, float or numeric string), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return None
    if isinstance(value, (int, float)) and value in (1, 2):
        return int(value)
    return None


def _map_classification(row: dict, ctx: _Context):
    text_key = next((k for k in TEXT_COLUMNS if k in row), "text")
    label_key = next((k for k in LABEL_COLUMNS if k in row), "label")
    text = _string(row, text_key)
    if label_key in row and isinstance(row[label_key], int) and not isinstance(row[label_key], bool):
        label = str(row[label_key])  # integer class ids are kept as strings
    else:
        label = _string(row, label_key)
    record = ctx.record("classification", [{"role": "user", "content": text}], row, {text_key, label_key},
                        task_keys=("task",), blank=_blank((text_key, text), (label_key, label)), label=label)
    record.meta["label_column"] = ctx.columns.get(label_key, label_key)  # the file's own name, for quarantine
    yield record


def _map_text(row: dict, ctx: _Context):
    text = _string(row, "text")
    yield ctx.record("text", [{"role": "user", "content": text}], row, {"text"}, blank=_blank(("text", text)))


MAPPERS = {
    "alpaca": _map_alpaca,
    "dolly": _map_dolly,
    "self_instruct": _map_self_instruct,
    "messages": _map_messages,
    "sharegpt": _map_sharegpt,
    "prompt_completion": _map_prompt_completion,
    "preference": _map_preference,
    "hh_rlhf": _map_hh_rlhf,
    "alpaca_eval": _map_alpaca_eval,
    "classification": _map_classification,
    "text": _map_text,
}
assert set(MAPPERS) == set(SCHEMAS) - {"auto"}


# ---------------------------------------------------------------------------
# helpers


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, _HugeInt)):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, _Unreadable):
        return f"a {value.arrow_type} value Python cannot represent ({value.error})"
    return type(value).__name__


SURROGATE = re.compile("[\ud800-\udfff]")


def _has_surrogate(text: str) -> bool:
    return SURROGATE.search(text) is not None


def _surrogate_path(value: Any) -> Optional[str]:
    """The field path of the first key or string holding a lone surrogate, or None (iterative: any depth)."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, str) and _has_surrogate(item):
            return path or "value"
        if isinstance(item, dict):
            bad_key = next((k for k in item if _has_surrogate(k)), None)
            if bad_key is not None:  # a key would reach meta (records.jsonl) or a field name
                return _escaped(f"{path}.{bad_key}" if path else bad_key)
            stack.extend((f"{path}.{k}" if path else str(k), v) for k, v in reversed(item.items()))
        elif isinstance(item, list):
            stack.extend((f"{path}[{i}]", v) for i, v in reversed(list(enumerate(item))))
    return None


def _escaped(text: str) -> str:
    """``text`` as valid UTF-8: undecodable bytes (surrogateescape) and lone surrogates backslash-escaped."""
    if not _has_surrogate(text):
        return text
    try:
        return text.encode("utf-8", errors="surrogateescape").decode("utf-8", errors="backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that is not an escaped byte
        return text.encode("utf-8", errors="backslashreplace").decode("utf-8")


def _safe_raw(raw: bytes | str) -> str:
    """The row as valid UTF-8 text, bad bytes and lone surrogates backslash-escaped, truncated."""
    if isinstance(raw, str):
        raw = raw[: RAW_LIMIT + 1]
        try:
            raw = raw.encode("utf-8", errors="surrogateescape")  # undecodable bytes back to bytes
        except UnicodeEncodeError:
            raw = raw.encode("utf-8", errors="backslashreplace")  # lone surrogates -> \ud83d
    text = raw[: 4 * (RAW_LIMIT + 1)].decode("utf-8", errors="backslashreplace")
    return text if len(text) <= RAW_LIMIT else text[:RAW_LIMIT] + "…"
