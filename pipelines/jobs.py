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
    tags={"dagster/max_runtime": str(4 * 3600), "tuneline/gpu": "true"},
)

# Run config that switches the recipe resource to retraining (incoming rows + replay of previous data).
RETRAIN_CONFIG = {"resources": {"recipe": {"config": {"retrain": True}}}}

retrain_job = dg.define_asset_job(
    "retrain_job",
    selection=dg.AssetSelection.groups("data", "model", "training", "evaluation", "deployment"),
    description="Retrain from data to registered_model on new rows plus a replay sample of the previous "
    "training data; the promotion gate still decides.",
    config=RETRAIN_CONFIG,
    tags={"dagster/max_runtime": str(4 * 3600), "tuneline/gpu": "true"},
)

train_classifier_job = dg.define_asset_job(
    "train_classifier_job",
    selection=dg.AssetSelection.groups("data", "model", "classification"),
    description="The classification path: data, base model (the template arm's LM), classifier, its ensemble, "
    "the prompt-template arm, and the registered classifier the macro-F1 gate let through.",
    tags={"dagster/max_runtime": str(2 * 3600)},
)

ALL_JOBS = [prepare_data_job, train_model_job, retrain_job, train_classifier_job]
