"""Property-based fuzzing of every data reader and of the validator (issue 13, item 6).

Each property writes a file hypothesis generated (random valid rows of a random schema, then random
byte-level corruption: truncation, BOMs, control characters, invalid UTF-8, flipped bytes, huge fields,
deep nesting; or rows with wrong types; or CSV in a random dialect) and reads it the way the pipeline does.
What must always hold:

* the reader returns or raises ``IngestError``, nothing else; an error is one line that names the file;
* ``read == len(records) + len(rejected)``; every rejection names the file, a line (>= 1, within the
  file) and a known reason; everything read can be written as UTF-8 JSON (records.jsonl, quarantine.jsonl);
* valid rows are all read back, unchanged, whatever the container, dialect or line endings;
* the validator keeps ``accepted + quarantined = read`` and accepts no row that breaks a rule;
* ``tuneline ingest`` and ``tuneline drift`` end with 0 or with one line on stderr and exit 2.

``make test`` runs a few hundred examples per reader (derandomized, no example database, so CI is
reproducible); ``bench/fuzz_drill.py`` runs the same properties with at least 5,000 per reader
(``TUNELINE_FUZZ_SCALE`` multiplies every property's count, ``TUNELINE_FUZZ_SCALE_<READER>`` one reader's).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Optional

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tuneline.data.ingest import IngestError, read_source
from tuneline.params import DataSource, ValidationParams
from tuneline.records import ChatRecord, Rejection

SCALE = float(os.environ.get("TUNELINE_FUZZ_SCALE", "1"))
COUNTS: Counter = Counter()  # examples run, per reader (bench/fuzz_drill.py reports them)

INGEST_REASONS = {
    "invalid_utf8", "invalid_unicode", "malformed_json", "not_an_object", "missing_field", "null_field",
    "wrong_type", "empty_field", "extra_columns", "missing_column", "invalid_messages", "malformed_dialogue",
    "prompt_mismatch", "no_preference",
}
RULE_REASONS = {"empty_field", "control_characters", "too_long", "tokenizer_error", "too_short",
                "unknown_label", "chosen_equals_rejected", "duplicate", "label_conflict"}
FLAT_SCHEMAS = ("alpaca", "dolly", "prompt_completion", "preference", "hh_rlhf", "alpaca_eval",
                "classification", "text")
NESTED_SCHEMAS = ("self_instruct", "messages", "sharegpt")


def fuzz(examples: int, reader: str):
    """Settings for one property: ``examples`` (times the scale), reproducible, no deadline; counts runs."""
    def decorate(test):
        inner = test.hypothesis.inner_test

        def counted(*args, **kwargs):
            COUNTS[reader] += 1
            return inner(*args, **kwargs)

        test.hypothesis.inner_test = counted
        test.fuzz_reader = reader  # bench/fuzz_drill.py groups the properties by reader
        scale = float(os.environ.get(f"TUNELINE_FUZZ_SCALE_{reader.upper()}", SCALE))
        return settings(max_examples=max(1, int(examples * scale)), deadline=None, derandomize=True,
                        database=None, print_blob=False, suppress_health_check=list(HealthCheck))(test)
    return decorate


# ---------------------------------------------------------------------------
# strategies: valid rows of every schema

TEXT = st.text(max_size=30)  # any code point but lone surrogates: control characters, NUL, U+2028, ...
WORDS = st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc", "Zl", "Zp")), min_size=1, max_size=20)


def _hh_text():
    return TEXT.filter(lambda s: "\n\nHuman:" not in s and "\n\nAssistant:" not in s)


@st.composite
def rows_of(draw, schema: str, max_rows: int = 8) -> list[dict]:
    """Valid rows of ``schema`` (every value a string in the flat schemas, so CSV can hold them)."""
    n = draw(st.integers(1, max_rows))
    rows = []
    for _ in range(n):
        if schema == "alpaca":
            row = {"instruction": draw(TEXT), "input": draw(TEXT), "output": draw(TEXT)}
        elif schema == "dolly":
            row = {"instruction": draw(TEXT), "context": draw(TEXT), "response": draw(TEXT), "category": draw(WORDS)}
        elif schema == "prompt_completion":
            row = {"prompt": draw(TEXT), "completion": draw(TEXT)}
        elif schema == "preference":
            row = {"prompt": draw(TEXT), "chosen": draw(TEXT), "rejected": draw(TEXT)}
        elif schema == "hh_rlhf":
            turns = draw(st.lists(st.tuples(_hh_text(), _hh_text()), min_size=0, max_size=2))
            prefix = "".join(f"\n\nHuman: {q}\n\nAssistant: {a}" for q, a in turns)
            prefix += f"\n\nHuman: {draw(_hh_text())}"
            row = {"chosen": f"{prefix}\n\nAssistant: {draw(_hh_text())}",
                   "rejected": f"{prefix}\n\nAssistant: {draw(_hh_text())}"}
        elif schema == "alpaca_eval":
            row = {"instruction": draw(TEXT), "output_1": draw(TEXT), "output_2": draw(TEXT),
                   "preference": draw(st.sampled_from(["1", "2", "1.0", " 2 "]))}
        elif schema == "classification":
            row = {"text": draw(TEXT), "label": draw(WORDS)}
        elif schema == "text":
            row = {"text": draw(TEXT)}
        elif schema == "self_instruct":
            row = {"instruction": draw(TEXT),
                   "instances": draw(st.lists(st.fixed_dictionaries({"input": TEXT, "output": TEXT}),
                                              min_size=1, max_size=3))}
        elif schema in ("messages", "sharegpt"):
            pairs = draw(st.lists(st.tuples(TEXT, TEXT), min_size=1, max_size=3))
            turns = [t for q, a in pairs for t in (("user", q), ("assistant", a))]
            if draw(st.booleans()):
                turns.insert(0, ("system", draw(TEXT)))
            if schema == "messages":
                row = {"messages": [{"role": r, "content": c} for r, c in turns]}
            else:
                names = {"user": draw(st.sampled_from(["human", "user"])), "assistant": draw(
                    st.sampled_from(["gpt", "assistant", "chatgpt"])), "system": "system"}
                row = {"conversations": [{"from": names[r], "value": c} for r, c in turns]}
        else:  # pragma: no cover
            raise AssertionError(schema)
        rows.append(row)
    return rows


def expected_targets(schema: str, rows: list[dict]) -> list[str]:
    """The text each record must end with (the response, label or passage), one per record, in order."""
    out: list[str] = []
    for row in rows:
        if schema == "alpaca":
            out.append(row["output"])
        elif schema == "dolly":
            out.append(row["response"])
        elif schema == "prompt_completion":
            out.append(row["completion"])
        elif schema == "preference":
            out.append(row["chosen"] + "\x00" + row["rejected"])
        elif schema == "hh_rlhf":
            out.append(row["chosen"].rsplit("\n\nAssistant:", 1)[1].strip() + "\x00"
                       + row["rejected"].rsplit("\n\nAssistant:", 1)[1].strip())
        elif schema == "alpaca_eval":
            one = float(row["preference"]) == 1
            pair = (row["output_1"], row["output_2"]) if one else (row["output_2"], row["output_1"])
            out.append(pair[0] + "\x00" + pair[1])
        elif schema == "classification":
            out.append(row["label"])
        elif schema == "text":
            out.append(row["text"])
        elif schema == "self_instruct":
            out.extend(instance["output"] for instance in row["instances"])
        elif schema == "messages":
            out.append(row["messages"][-1]["content"])
        elif schema == "sharegpt":
            out.append(row["conversations"][-1]["value"])
    return out


def record_target(record: ChatRecord) -> str:
    if record.kind == "preference":
        return f"{record.chosen}\x00{record.rejected}"
    if record.kind == "classification":
        return record.label or ""
    return record.messages[-1]["content"]


# ---------------------------------------------------------------------------
# containers

HUGE_INT = "@@huge-int@@"  # written as a 5,000-digit integer literal (json.dumps cannot write one)


def _dumps(value: Any, ascii: bool = False, **kwargs: Any) -> str:
    return json.dumps(value, ensure_ascii=ascii, **kwargs).replace(json.dumps(HUGE_INT), "1" * 5000)


def to_jsonl(rows: list[Any], *, crlf: bool = False, bom: bool = False, ascii: bool = False) -> bytes:
    """JSON Lines; ``ascii`` writes \\uXXXX escapes (so a lone surrogate arrives as an escape, not bytes)."""
    eol = "\r\n" if crlf else "\n"
    text = eol.join(_dumps(row, ascii) for row in rows) + eol
    return (b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8", errors="surrogatepass")


def to_json(rows: list[Any], *, wrapper: Optional[str] = None, indent: Optional[int] = None,
            ascii: bool = False) -> bytes:
    value: Any = {wrapper: rows} if wrapper else rows
    return _dumps(value, ascii, indent=indent).encode("utf-8", errors="surrogatepass")


def to_csv(rows: list[dict], **dialect: Any) -> bytes:
    out = io.StringIO(newline="")
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), **dialect)
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue().encode("utf-8")


def to_parquet(rows: list[dict]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    return sink.getvalue()


def to_text(paragraphs: list[str], eol: str = "\n") -> bytes:
    return (eol + eol).join(paragraphs).encode("utf-8") + eol.encode()


# ---------------------------------------------------------------------------
# corruption

BAD_UTF8 = [b"\xff", b"\xfe", b"\x80", b"\xc3", b"\xc3\x28", b"\xe2\x82", b"\xed\xa0\x80", b"\xf4\x90\x80\x80",
            b"\xc0\xaf", b"\xf8\x88\x80\x80\x80"]
STRUCTURE = [b'"', b",", b"{", b"}", b"[", b"]", b"\n", b"\r", b"\r\n", b"\t", b"\\", b":", b";", b"\n\n",
             b"null", b"1e999", b"-", b"\\u", b'\\ud800', b'\\udfff"', b"NaN"]


@st.composite
def corrupted(draw, data: bytes) -> bytes:
    """``data`` with 1 to 4 random byte-level defects."""
    data = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        kind = draw(st.sampled_from([
            "truncate", "bom", "control", "utf8", "flip", "delete", "duplicate", "structure", "huge_field",
            "huge_number", "deep_nesting", "crlf", "cr",
        ]))
        if kind == "truncate":
            del data[at:]
        elif kind == "bom":
            data[at:at] = b"\xef\xbb\xbf" * draw(st.integers(1, 2))
        elif kind == "control":
            data[at:at] = bytes(draw(st.lists(st.sampled_from([*range(0, 32), 127]), min_size=1, max_size=4)))
        elif kind == "utf8":
            data[at:at] = draw(st.sampled_from(BAD_UTF8))
        elif kind == "flip" and data:
            data[min(at, len(data) - 1)] = draw(st.integers(0, 255))
        elif kind == "delete":
            del data[at:at + draw(st.integers(1, 64))]
        elif kind == "duplicate":
            data[at:at] = data[at:at + draw(st.integers(1, 200))]
        elif kind == "structure":
            data[at:at] = draw(st.sampled_from(STRUCTURE))
        elif kind == "huge_field":
            size = draw(st.sampled_from([20_001, 100_000, 1_000_000]))
            data[at:at] = draw(st.sampled_from([b'"', b""])) + b"x" * size + draw(st.sampled_from([b'"', b""]))
        elif kind == "huge_number":
            data[at:at] = b"1" * draw(st.sampled_from([4_301, 10_000])) + draw(st.sampled_from([b"", b".5", b"e5"]))
        elif kind == "deep_nesting":
            depth = draw(st.sampled_from([100, 1_000, 100_000]))
            opener = draw(st.sampled_from([b"[", b'{"a":', b'{"messages":']))
            closer = {b"[": b"]", b'{"a":': b"}", b'{"messages":': b"}"}[opener]
            data[at:at] = opener * depth + (b"1" + closer * depth if draw(st.booleans()) else b"")
        elif kind == "crlf":
            data = bytearray(bytes(data).replace(b"\n", b"\r\n"))
        elif kind == "cr":
            data = bytearray(bytes(data).replace(b"\n", b"\r"))
    return bytes(data)


JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), TEXT, st.just(HUGE_INT))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(TEXT, inner, max_size=3)), max_leaves=8)
WEIRD_KEYS = st.one_of(TEXT, st.sampled_from(["\ud800", "a\udfffb", "", " ", "instruction ", "\x00", "input"]))


@st.composite
def wrong_typed(draw, rows: list[dict]) -> list[Any]:
    """Rows with random fields replaced by random JSON values, removed, renamed, or rows replaced by scalars."""
    rows = [dict(row) for row in rows]
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(rows) - 1))
        if not isinstance(rows[i], dict):
            continue
        keys = sorted(rows[i])
        kind = draw(st.sampled_from(["retype", "delete", "add", "row", "nest", "null_all"]))
        if kind == "retype" and keys:
            rows[i][draw(st.sampled_from(keys))] = draw(JSON_VALUES)
        elif kind == "delete" and keys:
            del rows[i][draw(st.sampled_from(keys))]
        elif kind == "add":
            rows[i][draw(WEIRD_KEYS)] = draw(JSON_VALUES)
        elif kind == "row":
            rows[i] = draw(JSON_VALUES)
        elif kind == "nest" and keys:
            value: Any = draw(TEXT)
            for _ in range(draw(st.integers(1, 200))):
                value = draw(st.sampled_from([[value], {"content": value, "role": "user"}, {"value": value}]))
            rows[i][draw(st.sampled_from(keys))] = value
        elif kind == "null_all":
            rows[i] = {k: None for k in keys}
    return rows


# ---------------------------------------------------------------------------
# the checks every read must pass

def _utf8_json(value: Any) -> None:
    json.dumps(value, ensure_ascii=False).encode("utf-8")  # raises on a lone surrogate


def _physical_lines(data: bytes) -> int:
    """An upper bound on the file's lines however its line ends are read (\\r\\r\\n is two in a text file)."""
    return data.count(b"\n") + data.count(b"\r") + 1


def check_read(path: Path, data: Optional[bytes], **how: Any):
    """Read ``path`` (holding ``data``, None: unknown) and check the invariants; the result, or None for a
    whole-file error."""
    name = str(path)
    try:
        result = read_source(DataSource(path=name, **how))
    except IngestError as exc:
        message = str(exc)
        assert message.startswith(f"{name}: "), message[:300]
        assert "\n" not in message and "\r" not in message, message[:300]
        message.encode("utf-8")  # printable on a strict UTF-8 stderr
        return None
    assert result.read == len(result.records) + len(result.rejected)
    assert result.read > 0
    limit = _physical_lines(data) if data is not None and result.container != "parquet" else 10**9
    if result.container in ("csv", "tsv", "parquet"):
        limit = result.read  # CSV rows are numbered by data row, Parquet rows by index
    for rejection in result.rejected:
        assert isinstance(rejection, Rejection)
        assert rejection.source == name
        assert isinstance(rejection.line, int) and 1 <= rejection.line <= limit, (rejection.line, limit)
        assert rejection.reason in INGEST_REASONS, rejection.reason
        assert rejection.detail and isinstance(rejection.detail, str)
        if rejection.reason in ("missing_field", "null_field", "wrong_type", "missing_column"):
            assert rejection.field, rejection
        _utf8_json(rejection.to_dict())
    for record in result.records:
        assert record.source == name
        assert isinstance(record.line, int) and 1 <= record.line <= limit, (record.line, limit)
        _utf8_json(record.to_dict())
    return result


def _write(data: bytes, suffix: str) -> Path:
    folder = Path(tempfile.mkdtemp(prefix="fuzz-", dir=_TMP))
    path = folder / f"data{suffix}"
    path.write_bytes(data)
    return path


_TMP = tempfile.mkdtemp(prefix="tuneline-fuzz-")


def _cleanup(path: Path) -> None:
    for child in path.parent.iterdir():
        child.unlink()
    path.parent.rmdir()


def assert_all_read(result, schema: str, rows: list[dict]) -> None:
    assert result is not None
    assert result.rejected == [], result.rejected[:3]
    assert result.schema == schema
    assert [record_target(r) for r in result.records] == expected_targets(schema, rows)


# ---------------------------------------------------------------------------
# JSON Lines

SCHEMAS_ALL = st.sampled_from(FLAT_SCHEMAS + NESTED_SCHEMAS)


@fuzz(80, "jsonl")
@given(data=st.data(), schema=SCHEMAS_ALL, crlf=st.booleans(), bom=st.booleans(), gz=st.booleans())
def test_jsonl_valid_rows_are_all_read(data, schema, crlf, bom, gz):
    rows = data.draw(rows_of(schema))
    raw = to_jsonl(rows, crlf=crlf, bom=bom)
    path = _write(gzip.compress(raw, mtime=0) if gz else raw, ".jsonl.gz" if gz else ".jsonl")
    try:
        assert_all_read(check_read(path, raw), schema, rows)
    finally:
        _cleanup(path)


@fuzz(120, "jsonl")
@given(data=st.data(), schema=SCHEMAS_ALL, gz=st.booleans())
def test_jsonl_corrupt_bytes_never_crash(data, schema, gz):
    raw = data.draw(corrupted(to_jsonl(data.draw(rows_of(schema)))))
    path = _write(gzip.compress(raw, mtime=0) if gz else raw, ".jsonl.gz" if gz else ".jsonl")
    try:
        check_read(path, raw)
    finally:
        _cleanup(path)


@fuzz(80, "jsonl")
@given(data=st.data(), schema=SCHEMAS_ALL, named=st.booleans(), ascii=st.booleans())
def test_jsonl_wrong_types_are_rejected_with_a_reason(data, schema, named, ascii):
    rows = data.draw(wrong_typed(data.draw(rows_of(schema))))
    raw = to_jsonl(rows, ascii=ascii)
    path = _write(raw, ".jsonl")
    try:
        check_read(path, raw, schema=schema if named else "auto")
    finally:
        _cleanup(path)


@fuzz(20, "jsonl")
@given(gz_data=st.binary(max_size=200), flip=st.integers(0, 10_000))
def test_corrupt_gzip_is_one_error(gz_data, flip):
    raw = bytearray(gzip.compress(to_jsonl([{"prompt": "p", "completion": "c"}] * 20), mtime=0))
    raw[flip % len(raw)] ^= 0xFF
    path = _write(bytes(raw) + gz_data, ".jsonl.gz")
    try:
        check_read(path, None)
    finally:
        _cleanup(path)


# ---------------------------------------------------------------------------
# JSON (array, wrapper object, one record)

@fuzz(60, "json")
@given(data=st.data(), schema=SCHEMAS_ALL, wrapper=st.sampled_from([None, "data", "rows"]),
       indent=st.sampled_from([None, 2]), suffix=st.sampled_from([".json", ""]))
def test_json_valid_rows_are_all_read(data, schema, wrapper, indent, suffix):
    rows = data.draw(rows_of(schema))
    raw = to_json(rows, wrapper=wrapper, indent=indent)
    path = _write(raw, suffix)
    try:
        result = check_read(path, raw)
        assert_all_read(result, schema, rows)
        if indent is None and wrapper is None:
            assert [r.line for r in result.rejected + result.records] and all(r.line == 1 for r in result.records)
    finally:
        _cleanup(path)


@fuzz(120, "json")
@given(data=st.data(), schema=SCHEMAS_ALL, wrapper=st.sampled_from([None, "data"]), indent=st.sampled_from([None, 1]))
def test_json_corrupt_bytes_never_crash(data, schema, wrapper, indent):
    raw = data.draw(corrupted(to_json(data.draw(rows_of(schema)), wrapper=wrapper, indent=indent)))
    path = _write(raw, ".json")
    try:
        check_read(path, raw)
    finally:
        _cleanup(path)


@fuzz(60, "json")
@given(data=st.data(), schema=SCHEMAS_ALL, wrapper=st.sampled_from([None, "data"]), ascii=st.booleans())
def test_json_wrong_types_are_rejected_with_a_reason(data, schema, wrapper, ascii):
    rows = data.draw(wrong_typed(data.draw(rows_of(schema))))
    raw = to_json(rows, wrapper=wrapper, indent=1, ascii=ascii)
    path = _write(raw, ".json")
    try:
        check_read(path, raw)
    finally:
        _cleanup(path)


# ---------------------------------------------------------------------------
# CSV / TSV in random dialects

STANDARD = {",": ".csv", "\t": ".tsv"}


@st.composite
def dialects(draw) -> dict:
    quoting = draw(st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL, csv.QUOTE_NONNUMERIC, csv.QUOTE_NONE]))
    dialect = {
        "delimiter": draw(st.sampled_from([",", "\t", ";", "|"])),
        "quotechar": draw(st.sampled_from(['"', "'"])),
        "quoting": quoting,
        "doublequote": draw(st.booleans()),
        "escapechar": draw(st.sampled_from([None, "\\"])),
        "lineterminator": draw(st.sampled_from(["\r\n", "\n", "\r"])),
    }
    if quoting == csv.QUOTE_NONE or not dialect["doublequote"]:
        dialect["escapechar"] = "\\"
    return dialect


def _standard(dialect: dict, rows: list[dict]) -> bool:
    """What the reader reads exactly: RFC 4180 quoting with ',' (.csv) or TAB (.tsv), any line ending.

    Python's writer quotes a field holding the line terminator's own characters only: with ``\\n`` line ends
    a field's bare ``\\r`` (or with ``\\r`` a bare ``\\n``) is written unquoted, which any reader takes for a row
    break; such files are only checked for never crashing.
    """
    quoted = dialect["quoting"] in (csv.QUOTE_ALL, csv.QUOTE_NONNUMERIC) or dialect["lineterminator"] == "\r\n"
    bare_breaks = any("\r" in v or "\n" in v for row in rows for v in row.values())
    return (dialect["quotechar"] == '"' and dialect["doublequote"] and dialect["escapechar"] is None
            and dialect["quoting"] != csv.QUOTE_NONE and (quoted or not bare_breaks))


@fuzz(120, "csv")
@given(data=st.data(), schema=st.sampled_from(FLAT_SCHEMAS), dialect=dialects(), bom=st.booleans(),
       by_extension=st.booleans())
def test_csv_any_dialect(data, schema, dialect, bom, by_extension):
    rows = data.draw(rows_of(schema))
    try:
        body = to_csv(rows, **dialect)
    except csv.Error:  # a dialect that cannot write these rows (QUOTE_NONE and a lone empty field)
        assume(False)
    raw = (b"\xef\xbb\xbf" if bom else b"") + body
    suffix = STANDARD.get(dialect["delimiter"], ".csv") if by_extension else ".txt"
    how = {} if by_extension else {"format": "tsv" if dialect["delimiter"] == "\t" else "csv"}
    path = _write(raw, suffix)
    try:
        result = check_read(path, raw, **how)
        if dialect["delimiter"] in STANDARD and _standard(dialect, rows):
            assert_all_read(result, schema, rows)
            assert [r.line for r in result.records] == list(range(1, len(result.records) + 1))
    finally:
        _cleanup(path)


@fuzz(120, "csv")
@given(data=st.data(), schema=st.sampled_from(FLAT_SCHEMAS), delimiter=st.sampled_from([",", "\t"]))
def test_csv_corrupt_bytes_never_crash(data, schema, delimiter):
    raw = data.draw(corrupted(to_csv(data.draw(rows_of(schema)), delimiter=delimiter)))
    path = _write(raw, STANDARD[delimiter])
    try:
        check_read(path, raw)
    finally:
        _cleanup(path)


@fuzz(60, "csv")
@given(data=st.data(), schema=st.sampled_from(FLAT_SCHEMAS), header=st.lists(WEIRD_KEYS, min_size=1, max_size=4))
def test_csv_odd_headers_and_ragged_rows(data, schema, header):
    rows = data.draw(rows_of(schema))
    columns = list(rows[0]) + header
    out = io.StringIO(newline="")
    writer = csv.writer(out)
    writer.writerow(columns)
    for row in rows:
        cells = list(row.values())
        cells = cells[: data.draw(st.integers(0, len(columns) + 2))] + [data.draw(TEXT)] * data.draw(st.integers(0, 3))
        writer.writerow(cells)
    raw = out.getvalue().encode("utf-8", errors="surrogatepass")  # a lone surrogate: invalid UTF-8 bytes
    path = _write(raw, ".csv")
    try:
        check_read(path, raw)
    finally:
        _cleanup(path)


# ---------------------------------------------------------------------------
# Parquet

@fuzz(60, "parquet")
@given(data=st.data(), schema=SCHEMAS_ALL)
def test_parquet_valid_rows_are_all_read(data, schema):
    rows = data.draw(rows_of(schema))
    raw = to_parquet(rows)
    path = _write(raw, data.draw(st.sampled_from([".parquet", ".pq", ""])))
    try:
        assert_all_read(check_read(path, raw), schema, rows)
    finally:
        _cleanup(path)


PARQUET_COLUMNS = st.sampled_from(["string", "int", "float", "bool", "null", "list", "binary", "struct", "nested",
                                   "timestamp", "date"])


def _column_values(kind: str, n: int, draw) -> Any:
    if kind in ("timestamp", "date"):  # any int64, most far outside Python's datetime range
        import pyarrow as pa

        ints = pa.array([draw(st.one_of(st.none(), st.integers(-2**62, 2**62))) for _ in range(n)], pa.int64())
        return ints.cast(pa.timestamp("ms") if kind == "timestamp" else pa.date64(), safe=False)
    value = {
        "string": TEXT, "int": st.integers(-2**63, 2**63 - 1), "float": st.floats(), "bool": st.booleans(),
        "null": st.none(), "list": st.lists(TEXT, max_size=3), "binary": st.binary(max_size=20),
        "struct": st.fixed_dictionaries({"role": TEXT, "content": TEXT}),
        "nested": st.lists(st.fixed_dictionaries({"from": TEXT, "value": st.one_of(st.none(), TEXT)}), max_size=3),
    }[kind]
    return [draw(st.one_of(st.none(), value)) for _ in range(n)]


@fuzz(80, "parquet")
@given(data=st.data(), schema=SCHEMAS_ALL)
def test_parquet_wrong_types_are_rejected_with_a_reason(data, schema):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = data.draw(rows_of(schema))
    columns: dict[str, list] = {key: [row.get(key) for row in rows] for key in rows[0]}
    for key in data.draw(st.lists(st.sampled_from(sorted(columns) + ["extra", "label", "text"]), max_size=3)):
        columns[key] = _column_values(data.draw(PARQUET_COLUMNS), len(rows), data.draw)
    try:
        table = pa.table(columns)
    except (pa.ArrowException, ValueError, TypeError, OverflowError):
        assume(False)
    sink = io.BytesIO()
    pq.write_table(table, sink)
    raw = sink.getvalue()
    path = _write(raw, ".parquet")
    try:
        check_read(path, raw)
    finally:
        _cleanup(path)


@fuzz(100, "parquet")
@given(data=st.data(), schema=SCHEMAS_ALL)
def test_parquet_corrupt_bytes_never_crash(data, schema):
    raw = bytearray(to_parquet(data.draw(rows_of(schema))))
    for _ in range(data.draw(st.integers(1, 4))):
        kind = data.draw(st.sampled_from(["flip", "truncate", "zero", "insert"]))
        at = data.draw(st.integers(0, len(raw) - 1))
        if kind == "flip":
            raw[at] = data.draw(st.integers(0, 255))
        elif kind == "truncate":
            del raw[at:]
            if not raw:
                raw = bytearray(b"PAR1")
        elif kind == "zero":
            raw[at:at + 16] = bytes(len(raw[at:at + 16]))
        else:
            raw[at:at] = data.draw(st.sampled_from(BAD_UTF8))
    path = _write(bytes(raw), ".parquet")
    try:
        check_read(path, bytes(raw))
    finally:
        _cleanup(path)


# ---------------------------------------------------------------------------
# plain text

PARAGRAPH = st.lists(WORDS.filter(lambda s: s.strip() and not s.lstrip().startswith("***")), min_size=1, max_size=3)


@fuzz(80, "txt")
@given(paragraphs=st.lists(PARAGRAPH, min_size=1, max_size=6), eol=st.sampled_from(["\n", "\r\n", "\r"]))
def test_text_valid_paragraphs_are_all_read(paragraphs, eol):
    assume(not any(p[0].lstrip().lower().startswith("end of") for p in paragraphs))
    raw = to_text([eol.join(p) for p in paragraphs], eol)
    path = _write(raw, ".txt")
    try:
        result = check_read(path, raw)
        assert result is not None and not result.rejected
        assert [r.messages[0]["content"] for r in result.records] == ["\n".join(p) for p in paragraphs]
    finally:
        _cleanup(path)


@fuzz(120, "txt")
@given(data=st.data(), paragraphs=st.lists(st.lists(TEXT, min_size=1, max_size=3), min_size=1, max_size=6))
def test_text_corrupt_bytes_never_crash(data, paragraphs):
    raw = data.draw(corrupted(to_text(["\n".join(p) for p in paragraphs])))
    path = _write(raw, data.draw(st.sampled_from([".txt", ".md", ""])))
    try:
        check_read(path, raw)
    finally:
        _cleanup(path)


# ---------------------------------------------------------------------------
# a file of unknown extension (container sniffed from its bytes)

@fuzz(80, "sniffed")
@given(data=st.data(), schema=st.sampled_from(FLAT_SCHEMAS))
def test_sniffed_container_never_crashes(data, schema):
    rows = data.draw(rows_of(schema))
    maker = data.draw(st.sampled_from(["jsonl", "json", "csv", "tsv", "parquet", "text"]))
    raw = {"jsonl": lambda: to_jsonl(rows), "json": lambda: to_json(rows), "csv": lambda: to_csv(rows),
           "tsv": lambda: to_csv(rows, delimiter="\t"), "parquet": lambda: to_parquet(rows),
           "text": lambda: to_text([r[next(iter(r))] or "x" for r in rows])}[maker]()
    if data.draw(st.booleans()):
        raw = data.draw(corrupted(raw))
    path = _write(raw, data.draw(st.sampled_from(["", ".dat", ".gz"])))
    try:
        check_read(path, raw)
    finally:
        _cleanup(path)


# ---------------------------------------------------------------------------
# a recipe that names the container, the schema or field mappings (rightly or wrongly)

FORMATS = ("auto", "jsonl", "json", "csv", "tsv", "parquet", "txt")
CANONICAL = ("instruction", "input", "output", "prompt", "completion", "chosen", "rejected", "text", "label",
             "messages", "response")


@fuzz(120, "forced")
@given(data=st.data(), schema=SCHEMAS_ALL, forced=st.sampled_from(("auto",) + FLAT_SCHEMAS + NESTED_SCHEMAS),
       fmt=st.sampled_from(FORMATS), task=st.sampled_from([None, "qa"]))
def test_named_format_schema_and_fields_never_crash(data, schema, forced, fmt, task):
    rows = data.draw(rows_of(schema))
    maker = data.draw(st.sampled_from(["jsonl", "json", "csv", "parquet", "text"]))
    if maker == "csv" and schema in NESTED_SCHEMAS:
        maker = "jsonl"
    raw = {"jsonl": lambda: to_jsonl(rows), "json": lambda: to_json(rows), "csv": lambda: to_csv(rows),
           "parquet": lambda: to_parquet(rows), "text": lambda: to_text(["a b", "c"])}[maker]()
    if data.draw(st.booleans()):
        raw = data.draw(corrupted(raw))
    columns = sorted(rows[0]) + ["nowhere", "text", ""]
    fields = data.draw(st.dictionaries(st.sampled_from(CANONICAL), st.sampled_from(columns), max_size=3))
    path = _write(raw, data.draw(st.sampled_from(["." + maker, ".dat"])))
    if "" in fields.values():  # an empty column name is a recipe error, caught at load
        from tuneline.params import RecipeError

        with pytest.raises(RecipeError, match="must be a non-empty string"):
            DataSource(path=str(path), fields=fields)
        fields = {k: v for k, v in fields.items() if v}
    try:
        result = check_read(path, raw if maker != "parquet" else None, format=fmt, schema=forced, fields=fields,
                            task=task)
        if result is not None and task is not None:
            assert all(r.task == task for r in result.records)
    finally:
        _cleanup(path)


# ---------------------------------------------------------------------------
# the MANIFEST.json reader of raw.py (licences)

@fuzz(100, "manifest")
@given(data=st.data())
def test_manifest_licence_never_crashes(data):
    from tuneline.data.raw import licence_of

    good = {"files": [{"file": "data.jsonl", "sources": [{"license": "MIT"}, {"license": "CC-BY-4.0"}]}]}
    shape = data.draw(st.sampled_from(["good", "values", "bytes"]))
    if shape == "good":
        raw = json.dumps(good).encode()
    elif shape == "values":
        value: Any = json.loads(json.dumps(good))
        where = data.draw(st.sampled_from(["top", "files", "entry", "sources", "source", "license"]))
        junk = data.draw(JSON_VALUES)
        if where == "top":
            value = junk
        elif where == "files":
            value["files"] = junk
        elif where == "entry":
            value["files"][0] = junk
        elif where == "sources":
            value["files"][0]["sources"] = junk
        elif where == "source":
            value["files"][0]["sources"][0] = junk
        else:
            value["files"][0]["sources"][0]["license"] = junk
        raw = json.dumps(value).encode()
    else:
        raw = data.draw(corrupted(json.dumps(good).encode()))
    path = _write(b"{}\n", ".jsonl")
    path.with_name("data.jsonl").write_bytes(b"{}\n")
    (path.parent / "MANIFEST.json").write_bytes(raw)
    try:
        licence = licence_of(path.with_name("data.jsonl"))
        assert licence is None or isinstance(licence, str)
        if shape == "good":
            assert licence == "MIT; CC-BY-4.0"
    finally:
        _cleanup(path)


# ---------------------------------------------------------------------------
# the validator

@st.composite
def chat_records(draw, n_max: int = 12) -> list[ChatRecord]:
    texts = st.one_of(TEXT, st.sampled_from(["", " ", "\t\n", "a\x00b", "é\u0085", "x" * 25_000, "dup", "Dup "]))
    pool: list[ChatRecord] = []
    for line in range(1, draw(st.integers(0, n_max)) + 1):
        if pool and draw(st.integers(0, 4)) == 0:  # a duplicate (maybe with other spacing/case, or another label)
            other = draw(st.sampled_from(pool))
            record = ChatRecord(kind=other.kind, messages=[dict(m) for m in other.messages], source="f.jsonl",
                                line=line, chosen=other.chosen, rejected=other.rejected,
                                label=draw(st.sampled_from([other.label, "other", " POS "])) if other.label else None)
            pool.append(record)
            continue
        kind = draw(st.sampled_from(["sft", "preference", "classification", "text", "odd_turns"]))
        if kind == "odd_turns":  # no turns, a lone system turn, assistant first, two users in a row, ...
            turns = draw(st.lists(st.tuples(st.sampled_from(["system", "user", "assistant"]), texts), max_size=4))
            record = ChatRecord(kind="sft", messages=[{"role": r, "content": c} for r, c in turns], source="f.jsonl",
                                line=line)
        elif kind == "sft":
            messages = [{"role": "user", "content": draw(texts)}, {"role": "assistant", "content": draw(texts)}]
            if draw(st.booleans()):
                messages.insert(0, {"role": "system", "content": draw(texts)})
            record = ChatRecord(kind=kind, messages=messages, source="f.jsonl", line=line)
        elif kind == "preference":
            record = ChatRecord(kind=kind, messages=[{"role": "user", "content": draw(texts)}], source="f.jsonl",
                                line=line, chosen=draw(texts), rejected=draw(texts))
        elif kind == "classification":
            record = ChatRecord(kind=kind, messages=[{"role": "user", "content": draw(texts)}], source="f.jsonl",
                                line=line, label=draw(st.sampled_from(["pos", "neg", " POS ", "", "weird", "0"])))
        else:
            record = ChatRecord(kind=kind, messages=[{"role": "user", "content": draw(texts)}], source="f.jsonl",
                                line=line)
        if draw(st.integers(0, 9)) == 0:
            record.meta["blank_fields"] = ["output"]
        pool.append(record)
    return pool


_TOKENIZER = None


def _tokenizer():
    """The pipeline's own tiny byte-level BPE tokenizer with its chat template (trained here in a second)."""
    global _TOKENIZER
    if _TOKENIZER is None:
        from tuneline.models.tiny import train_tokenizer
        from tuneline.params import TinyModelParams

        _TOKENIZER = train_tokenizer(["the cat sat on the mat", "a b c d e f g", "héllo wörld ✓"] * 30,
                                     TinyModelParams(vocab_size=512))
    return _TOKENIZER


@fuzz(20, "validator")
@given(records=chat_records(), dedup=st.sampled_from(["exact", "normalized"]), tokenized=st.booleans(),
       labels=st.sampled_from([(), ("pos", "neg"), ("pos", "neg", "0", "weird")]),
       bounds=st.sampled_from([(0, 512), (2, 100), (5, 20_000), (0, 1)]),
       parse=st.lists(st.builds(Rejection, source=st.just("f.jsonl"), line=st.integers(1, 50),
                                reason=st.sampled_from(sorted(INGEST_REASONS)), detail=st.just("d")), max_size=3))
def test_validator_accounts_for_every_row(records, dedup, tokenized, labels, bounds, parse):
    from tuneline.data.validate import CONTROL, _content_key, _normalize, validate_records

    params = ValidationParams(min_tokens=bounds[0], max_tokens=bounds[1], dedup=dedup, labels=labels,
                              min_accepted=0)
    result = validate_records(records, params, tokenizer=_tokenizer() if tokenized else None, parse_rejections=parse)
    assert result.read == len(records) + len(parse) == len(result.accepted) + len(result.quarantined)
    assert sum(result.reasons.values()) == len(result.quarantined)
    for rejection in result.quarantined:
        assert rejection.source == "f.jsonl" and rejection.line >= 1
        assert rejection.reason in RULE_REASONS | INGEST_REASONS
        assert rejection.detail
        _utf8_json(rejection.to_dict())
    keys = set()
    norm = _normalize if dedup == "normalized" else (lambda s: s)
    for record in result.accepted:
        texts = [m["content"] for m in record.messages] + [record.chosen or "", record.rejected or "",
                                                           record.label or ""]
        assert not any(CONTROL.search(t) for t in texts)
        assert not record.meta.get("blank_fields")
        assert all(m["content"].strip() for m in record.messages if m["role"] != "system")
        if labels and record.kind == "classification":
            assert record.label in labels
        key = _content_key(record, record.label, norm)
        assert key not in keys, "two accepted rows are duplicates"
        keys.add(key)
        _utf8_json(record.to_dict())


# ---------------------------------------------------------------------------
# the whole prepare step (read, validate, write records.jsonl and quarantine.jsonl)

@fuzz(8, "prepare")
@given(data=st.data(), schema=SCHEMAS_ALL, container=st.sampled_from(["jsonl", "json", "csv", "parquet"]))
def test_prepare_writes_what_it_read(data, schema, container):
    import dataclasses

    from tuneline.data.prepare import prepare
    from tuneline.records import sha256_file
    from tuneline.refs import FileRef, RawDataRef

    rows = data.draw(rows_of(schema))
    if container in ("jsonl", "json"):
        rows = data.draw(wrong_typed(rows))
    if container == "csv":
        rows = [{k: v if isinstance(v, str) else json.dumps(v) for k, v in row.items()} for row in rows]
    raw = {"jsonl": to_jsonl, "json": to_json, "parquet": to_parquet, "csv": to_csv}[container](rows)
    if container != "parquet" and data.draw(st.booleans()):
        raw = data.draw(corrupted(raw))
    path = _write(raw, "." + container)
    recipe = dataclasses.replace(_demo_recipe(), validation=ValidationParams(min_accepted=0))
    ref = RawDataRef(recipe="fuzz", files=(FileRef(uri=path.as_uri(), sha256=sha256_file(path), bytes=len(raw),
                                                  role="data"),), sha256="0")
    try:
        try:
            prepared = prepare(ref, recipe, None, path.parent / "out")
        except IngestError as exc:
            assert str(exc).startswith(str(path)) and "\n" not in str(exc)
            return
        from tuneline.records import read_jsonl  # lines end at \n only (str.splitlines also splits at U+0085)

        records = list(read_jsonl(path.parent / "out" / "records.jsonl"))
        quarantine = list(read_jsonl(path.parent / "out" / "quarantine.jsonl"))
        assert len(records) == prepared.accepted and len(quarantine) == prepared.quarantined
        assert prepared.read == prepared.accepted + prepared.quarantined
        for row in quarantine:
            assert row["source"] == path.as_uri() and row["line"] >= 1 and row["reason"]
    finally:
        import shutil

        shutil.rmtree(path.parent, ignore_errors=True)


_RECIPE = None


def _demo_recipe():
    global _RECIPE
    if _RECIPE is None:
        from tuneline.params import load_recipe

        _RECIPE = load_recipe(Path(__file__).resolve().parents[2] / "configs" / "demo.yaml")
    return _RECIPE


# ---------------------------------------------------------------------------
# the commands that read data: `tuneline ingest` and `tuneline drift`

@fuzz(20, "cli")
@given(data=st.data(), schema=st.sampled_from(FLAT_SCHEMAS), container=st.sampled_from(["jsonl", "json", "csv", "txt"]),
       fmt=st.sampled_from(["auto", "auto", "jsonl", "csv", "txt", "alpaca", "hh_rlhf", "classification"]))
def test_cli_ingest_ends_with_one_line(data, schema, container, fmt):
    from pipelines.cli import main

    rows = data.draw(rows_of(schema))
    raw = {"jsonl": to_jsonl, "json": to_json, "csv": to_csv,
           "txt": lambda r: to_text([x[next(iter(x))] or "x" for x in r])}[container](rows)
    raw = data.draw(corrupted(raw))
    path = _write(raw, "." + container)
    try:
        code, out, err = _run_cli(main, ["ingest", str(path), "--json", "--format", fmt])
        assert code in (0, 2), (code, err)
        if code == 2:
            lines = err.strip("\n").split("\n")
            assert len(lines) == 1 and lines[0].startswith("tuneline ingest: ") and str(path) in lines[0], err[:500]
        else:
            report = json.loads(out)
            assert report["read"] == report["accepted"] + report["quarantined"]
            assert "Traceback" not in err
    finally:
        _cleanup(path)


@fuzz(15, "cli")
@given(data=st.data(), schema=st.sampled_from(FLAT_SCHEMAS))
def test_cli_drift_ends_with_one_line_on_corrupt_input(data, schema):
    from pipelines.cli import main

    raw = data.draw(corrupted(to_jsonl(data.draw(rows_of(schema, max_rows=3)))))
    path = _write(raw, ".jsonl")
    empty = path.with_name("empty.jsonl")
    empty.write_bytes(b"")
    try:
        code, _, err = _run_cli(main, ["drift", "--reference", str(path), "--current", str(empty)])
        assert code == 2, (code, err[:500])
        lines = err.strip("\n").split("\n")
        assert len(lines) == 1 and lines[0].startswith("tuneline drift: "), err[:500]
        assert str(path) in lines[0] or str(empty) in lines[0], lines[0]
    finally:
        _cleanup(path)


def _run_cli(main, argv: list[str]) -> tuple[int, str, str]:
    """Run ``tuneline ARGV`` in process with strict UTF-8 stdout/stderr (as a terminal would encode them)."""
    import contextlib

    out, err = io.BytesIO(), io.BytesIO()
    out_text = io.TextIOWrapper(out, encoding="utf-8", errors="strict", write_through=True)
    err_text = io.TextIOWrapper(err, encoding="utf-8", errors="backslashreplace", write_through=True)
    saved = dict(os.environ)  # the command sets DAGSTER_HOME, MLFLOW_TRACKING_URI, ... for itself
    os.environ.setdefault("TUNELINE_HOME", str(Path(_TMP) / "state"))
    try:
        with contextlib.redirect_stdout(out_text), contextlib.redirect_stderr(err_text):
            try:
                code = main(argv)
            except SystemExit as exc:  # argparse
                code = exc.code if isinstance(exc.code, int) else 2
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return code, out.getvalue().decode("utf-8"), err.getvalue().decode("utf-8")


@pytest.mark.parametrize("raw,suffix", [
    (b'{"instruction": "a", "output": ' + b"1" * 5000 + b"}\n", ".jsonl"),
    (b"\x1f\x8b\x08\x00garbage", ".jsonl.gz"),
])
def test_cli_ingest_subprocess_never_prints_a_traceback(raw, suffix, tmp_path):
    """The real console script, with a strict UTF-8 stdout: exit 0 or one line and exit 2."""
    import subprocess
    import sys

    path = tmp_path / f"bad{suffix}"
    path.write_bytes(raw)
    env = {**os.environ, "PYTHONIOENCODING": "utf-8:strict", "TUNELINE_HOME": str(tmp_path / "state"),
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    done = subprocess.run([sys.executable, "-m", "pipelines.cli", "ingest", str(path), "--json"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    assert done.returncode in (0, 2), done.stderr[-2000:]
    if done.returncode == 2:
        assert len(done.stderr.strip().splitlines()) == 1 and str(path) in done.stderr


@pytest.mark.parametrize("content,suffix,expected", [
    (b"", ".jsonl", "file is empty"),
    (b"\x1f\x8b\x08\x00garbage", ".jsonl.gz", "not a readable gzip file"),
    (b"a;b\n1;2\n", ".csv", "looks ';'-separated (set delimiter: ';')"),
    (None, ".jsonl", "does not exist"),
])
def test_cli_run_refuses_unreadable_data_before_any_step(tmp_path, monkeypatch, content, suffix, expected):
    """``tuneline run`` reads its data files before materializing anything: one line naming the file, exit 2
    (it used to build the base model first and then fail ``prepared_dataset`` with Dagster's traceback)."""
    import yaml

    from pipelines.cli import main

    data = tmp_path / f"data{suffix}"
    if content is not None:
        data.write_bytes(content)
    recipe = yaml.safe_load((Path(__file__).resolve().parents[2] / "configs" / "demo.yaml").read_text())
    recipe["data"]["sources"] = [{"path": str(data)}]  # beside the demo data
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    for key in ("TUNELINE_HOME", "DAGSTER_HOME", "MLFLOW_TRACKING_URI"):
        monkeypatch.setenv(key, str(tmp_path / "state" / key.lower()))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    code, out, err = _run_cli(main, ["run", "--recipe", str(tmp_path / "recipe.yaml")])
    assert code == 2, (out[-1000:], err[-2000:])
    assert "materializing" not in out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tuneline run: ") and str(data) in lines[0], err[-2000:]
    assert expected in lines[0]
