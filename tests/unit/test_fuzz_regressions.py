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
