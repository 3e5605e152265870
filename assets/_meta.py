"""Small helpers that turn stage results into Dagster metadata."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any, Mapping

import dagster as dg


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
            out[f"{prefix}{key}"] = dg.MetadataValue.text(value)
    return out


def mlflow_link(run_id: str, tracking_uri: str) -> dict[str, Any]:
    return {
        "mlflow_run_id": dg.MetadataValue.text(run_id),
        "mlflow_tracking_uri": dg.MetadataValue.text(tracking_uri),
    }
