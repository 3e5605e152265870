"""Concrete inputs the fuzzing properties (tests/unit/test_fuzz.py) found to break a reader, one test each.

Each was a crash or a wrong answer before its fix; each must now give a one-line ``IngestError`` naming the
file, or rows with a line and a reason.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from tuneline.data.ingest import IngestError, read_source


def test_damaged_gzip_stream_is_one_error_not_zlib_error(tmp_path: Path):
    """A flipped byte inside the deflate stream raised ``zlib.error`` (not an OSError) out of read_source."""
    raw = bytearray(gzip.compress(b'{"prompt": "p", "completion": "c"}\n' * 20, mtime=0))
    raw[28] ^= 0xFF  # zlib: "invalid distance too far back"
    path = tmp_path / "rows.jsonl.gz"
    path.write_bytes(bytes(raw))
    with pytest.raises(IngestError, match=r"rows\.jsonl\.gz: not a readable gzip file \(Error -3"):
        read_source(path)


@pytest.mark.parametrize("suffix,text", [
    (".jsonl", '{"prompt": "p", "completion": "c"}\n{"prompt": "q", "completion": DIGITS}\n'),
    (".json", '[{"prompt": "p", "completion": "c"},\n {"prompt": "q", "completion": DIGITS}]'),
    (".jsonl", '{"prompt": "p", "completion": "c", "id": DIGITS}\n{"prompt": "q", "completion": "d"}\n'),
])
def test_integer_longer_than_python_converts_is_one_rejected_row(tmp_path: Path, suffix: str, text: str):
    """A 5,000-digit integer made json.loads raise ValueError (Python's int limit), which sank the whole file
    with a message naming neither file nor line; now only a row that needs that value is rejected."""
    path = tmp_path / f"rows{suffix}"
    path.write_text(text.replace("DIGITS", "1" * 5000), encoding="utf-8")
    result = read_source(path)
    assert result.read == 2 == len(result.records) + len(result.rejected)
    if "id" in text:  # an unused column: both rows read, the number not kept in meta
        assert not result.rejected and "id" not in result.records[0].meta
    else:
        [rejection] = result.rejected
        assert (rejection.line, rejection.reason, rejection.field) == (2, "wrong_type", "completion")
        assert "is an integer, expected a string" in rejection.detail


def test_csv_header_with_invalid_utf8_reads_rows_and_prints(tmp_path: Path):
    """An undecodable byte in a header name became a lone surrogate in the column name: in the record's meta
    (records.jsonl could not be written) and in the schema error (not valid UTF-8). It is now escaped."""
    path = tmp_path / "rows.csv"
    path.write_bytes(b"prompt,completion,note\xff\np,c,n\n")
    result = read_source(path)
    assert [r.meta for r in result.records] == [{"note\\xff": "n"}]
    path.write_bytes(b"\xfftext\xed\xa0\x80,b\nx,y\n")
    with pytest.raises(IngestError) as caught:
        read_source(path)
    assert "keys seen: \\xfftext\\xed\\xa0\\x80, b" in str(caught.value)
    str(caught.value).encode("utf-8")


def test_ingest_error_is_one_line():
    error = IngestError("f.parquet: unreadable Parquet file (Could not open\n  magic bytes\tnot found)")
    assert str(error) == "f.parquet: unreadable Parquet file (Could not open magic bytes not found)"


@pytest.mark.parametrize("suffix,text", [
    (".jsonl", '{"prompt": "p", "completion": "c", "\\ud800": "x"}\n{"prompt": "q", "completion": "d"}\n'),
    (".json", '[{"prompt": "p", "completion": "c", "meta": {"a\\udfffb": 1}}, {"prompt": "q", "completion": "d"}]'),
])
def test_json_key_with_lone_surrogate_is_rejected(tmp_path: Path, suffix: str, text: str):
    """A \\uD800 escape in a key (values were checked, keys were not) put a lone surrogate into the record's
    meta, so writing records.jsonl failed with UnicodeEncodeError."""
    import json

    path = tmp_path / f"rows{suffix}"
    path.write_text(text, encoding="utf-8")
    result = read_source(path)
    [rejection] = result.rejected
    assert (rejection.line, rejection.reason) == (1, "invalid_unicode")
    assert rejection.field in ("\\ud800", "meta.a\\udfffb")
    json.dumps([r.to_dict() for r in result.records] + [rejection.to_dict()], ensure_ascii=False).encode("utf-8")


def test_missing_unnamed_csv_column_is_named_by_position(tmp_path: Path):
    """A short row whose first missing column has an empty header name was rejected with no field at all."""
    path = tmp_path / "rows.csv"
    path.write_text("prompt,completion,,\np,c,x,y\nq,d\n", encoding="utf-8")
    result = read_source(path)
    [rejection] = result.rejected
    assert (rejection.line, rejection.reason, rejection.field) == (2, "missing_column", "column 3")
    assert rejection.detail == "2 of 4 columns; no 'column 3'"


@pytest.mark.parametrize("manifest", [
    '{"files": null}', '{"files": [{"file": "rows.jsonl", "sources": null}]}', '[1, 2]',
    '{"files": [{"file": "rows.jsonl", "sources": [{"license": ["MIT"]}]}]}', '{"files": 3}',
    '{"files": [' * 100_000,
])
def test_damaged_manifest_records_no_licence(tmp_path: Path, manifest: str):
    """raw.licence_of raised TypeError (None or a number where a list belongs, an unhashable licence) or
    RecursionError on a MANIFEST.json beside the data, failing raw_dataset; now the licence is just unknown."""
    from tuneline.data.raw import licence_of

    (tmp_path / "rows.jsonl").write_text("{}\n", encoding="utf-8")
    (tmp_path / "MANIFEST.json").write_text(manifest, encoding="utf-8")
    assert licence_of(tmp_path / "rows.jsonl") is None


def test_parquet_value_out_of_python_range(tmp_path: Path):
    """A Parquet timestamp past datetime's range made table.to_pylist() raise OverflowError out of
    read_source; now the cell cannot satisfy a field that needs it, and an unused one is ignored."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    when = pa.array([0, 2**62], pa.int64()).cast(pa.timestamp("ms"))
    pq.write_table(pa.table({"prompt": ["p", "q"], "completion": ["c", "d"], "when": when}), tmp_path / "a.parquet")
    result = read_source(tmp_path / "a.parquet")
    assert len(result.records) == 2 and not result.rejected
    pq.write_table(pa.table({"prompt": ["p", "q"], "completion": when}), tmp_path / "b.parquet")
    result = read_source(tmp_path / "b.parquet")
    assert result.read == 2
    reasons = sorted((r.line, r.reason, r.field) for r in result.rejected)
    assert reasons == [(1, "wrong_type", "completion"), (2, "wrong_type", "completion")]
    assert "timestamp[ms] value Python cannot represent" in result.rejected[1].detail


@pytest.mark.parametrize("column", ["", "  ", None, 3])
def test_field_mapped_to_an_empty_column_name_fails_at_load(column):
    """``fields: {instruction: ""}`` was accepted, and every row was then rejected as missing a field named ''."""
    from tuneline.params import DataSource, RecipeError

    with pytest.raises(RecipeError, match=r"fields\.instruction: the file column must be a non-empty string"):
        DataSource(path="rows.jsonl", fields={"instruction": column})
