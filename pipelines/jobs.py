"""Jobs: named selections of the asset graph."""

from __future__ import annotations

import dagster as dg

prepare_data_job = dg.define_asset_job(
    "prepare_data_job",
    selection=dg.AssetSelection.groups("data", "model"),
    description="Provision the base model and turn the raw files into validated, split data.",
)

train_model_job = dg.define_asset_job(
    "train_model_job",
    selection=dg.AssetSelection.groups("data", "model", "training", "evaluation", "deployment"),
    description="The whole chain: data, base model, search, SFT, DPO, distillation, evaluation, registration.",
    tags={"dagster/max_runtime": str(4 * 3600)},
)

ALL_JOBS = [prepare_data_job, train_model_job]
