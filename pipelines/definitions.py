"""The Dagster code location: every asset, check, job, schedule, sensor and resource of tuneline."""

from __future__ import annotations

import dagster as dg

from assets import data, deploy, evaluation, models, monitoring, training
from pipelines.jobs import ALL_JOBS
from pipelines.schedules import ALL_SCHEDULES
from pipelines.sensors import ALL_SENSORS
from resources import build_resources

ASSETS = [
    data.raw_dataset,
    models.base_model,
    data.prepared_dataset,
    data.dataset_splits,
    training.hpo_study,
    training.sft_adapter,
    training.dpo_adapter,
    training.distilled_student,
    evaluation.evaluation_report,
    deploy.registered_model,
]
SPECS = [monitoring.served_traffic]
CHECKS = [
    data.prepared_dataset_passes_validation,
    data.dataset_splits_have_no_leakage,
    evaluation.serving_template_matches_training,
    evaluation.candidate_passes_promotion_gate,
]

# One machine: steps run in-process (a fresh Python per step costs 2-3 s here); training runs in its
# own process through Pipes. A production profile swaps in a distributed executor.
defs = dg.Definitions(
    assets=[*ASSETS, *SPECS],
    asset_checks=CHECKS,
    jobs=ALL_JOBS,
    schedules=ALL_SCHEDULES,
    sensors=ALL_SENSORS,
    resources=build_resources(),
    executor=dg.in_process_executor,
)
