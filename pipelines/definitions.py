"""The Dagster code location: every asset, check, job, schedule, sensor and resource of tuneline."""

from __future__ import annotations

import dagster as dg

from assets import (classify, distill, dpo, evaluate, feedback, hpo, monitoring, prepare, pretrain, raw, registry, reward,
                    rl, sft, split)
from pipelines.jobs import ALL_JOBS
from pipelines.schedules import ALL_SCHEDULES
from pipelines.sensors import ALL_SENSORS
from resources import build_resources
from tuneline.settings import load_settings
from tuneline.tracking import fail_fast_defaults

ASSETS = [
    raw.raw_dataset,
    pretrain.base_model,
    prepare.prepared_dataset,
    split.dataset_splits,
    feedback.feedback_preferences,
    hpo.hpo_study,
    sft.sft_adapter,
    dpo.dpo_adapter,
    reward.reward_model,
    rl.rl_policy,
    distill.distilled_student,
    evaluate.evaluation_report,
    registry.registered_model,
]
# a recipe with a classifier section runs the classification path instead of SFT/DPO/distillation
CLASSIFIER_ASSETS = [
    raw.raw_dataset,
    pretrain.base_model,
    prepare.prepared_dataset,
    split.dataset_splits,
    classify.classifier_model,
    classify.classifier_ensemble,
    classify.classifier_template,
    classify.registered_classifier,
]
SPECS = [monitoring.served_traffic]
CHECKS = [
    prepare.prepared_dataset_passes_validation,
    split.dataset_splits_have_no_leakage,
    evaluate.serving_template_matches_training,
]
CLASSIFIER_CHECKS = [prepare.prepared_dataset_passes_validation, split.dataset_splits_have_no_leakage]


def graph_for(recipe) -> tuple[list, list]:
    """(assets, checks) ``tuneline run`` materializes for a recipe: the classification path or the chat path."""
    return (CLASSIFIER_ASSETS, CLASSIFIER_CHECKS) if recipe.classifier is not None else (ASSETS, CHECKS)

SETTINGS = load_settings()
fail_fast_defaults()  # a dead tracking server fails a step in seconds, not after minutes of retries

# Local: steps run in-process (a fresh Python per step costs 2-3 s here); training runs in its own process
# through Pipes. Production: each step in its own process (two at a time), so one run's long step does not
# hold the others and a crashed step takes nothing else down; the typed references cross processes through
# the IO manager's JSON files.
EXECUTOR = (dg.in_process_executor if SETTINGS.profile == "local"
            else dg.multiprocess_executor.configured({"max_concurrent": 2}))

defs = dg.Definitions(
    assets=[*ASSETS, *[a for a in CLASSIFIER_ASSETS if a not in ASSETS], *SPECS],
    asset_checks=CHECKS,
    jobs=ALL_JOBS,
    schedules=ALL_SCHEDULES,
    sensors=ALL_SENSORS,
    resources=build_resources(settings=SETTINGS),
    executor=EXECUTOR,
)
