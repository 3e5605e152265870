"""Small helpers that turn stage results into Dagster metadata."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import dagster as dg

from tuneline.storage import redact


def image(path: str | Path, title: str = "") -> dg.MetadataValue:
    """A PNG shown inline on the asset page (and its path, for the file itself)."""
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return dg.MetadataValue.md(f"![{title}](data:image/png;base64,{data})\n\n`{path}`")


def scalars(prefix: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """Numbers and short strings as individual metadata entries (so they chart in the UI)."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, bool) or value is None:
            out[f"{prefix}{key}"] = dg.MetadataValue.text(str(value))
        elif isinstance(value, int):
            out[f"{prefix}{key}"] = dg.MetadataValue.int(value)
        elif isinstance(value, float):
            out[f"{prefix}{key}"] = dg.MetadataValue.float(value)
        elif isinstance(value, str):
            out[f"{prefix}{key}"] = dg.MetadataValue.text(redact(value))
    return out


def mlflow_link(run_id: Optional[str], tracking_uri: str) -> dict[str, Any]:
    return {
        "mlflow_run_id": dg.MetadataValue.text(run_id or "none"),
        "mlflow_tracking_uri": dg.MetadataValue.text(redact(tracking_uri)),
    }


def file_table(files: Sequence[Any]) -> dg.MetadataValue:
    """A Markdown table of input files (role, URI, bytes, sha256, licence)."""
    rows = "\n".join(f"| {f.role} | `{f.uri}` | {f.bytes:,} | `{f.sha256[:16]}` | {f.licence or '-'} |" for f in files)
    return dg.MetadataValue.md("| role | uri | bytes | sha256 | licence |\n|---|---|---:|---|---|\n" + rows)
