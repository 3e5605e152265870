"""Jobs: named selections of the asset graph."""

from __future__ import annotations

import dagster as dg

prepare_data_job = dg.define_asset_job(
    "prepare_data_job",
    selection=dg.AssetSelection.groups("data", "model"),
    description="Provision the base model and turn the raw files into validated, split data.",
)

ALL_JOBS = [prepare_data_job]
