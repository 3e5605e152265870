"""Schedules: cadence. Signals (drift) are sensors."""

import dagster as dg

from pipelines.jobs import retrain_job

weekly_retrain_schedule = dg.ScheduleDefinition(
    name="weekly_retrain_schedule",
    job=retrain_job,
    cron_schedule="0 3 * * 1",  # Mondays 03:00
    execution_timezone="UTC",
    description="Retrain every week on the recipe's data plus whatever newly labelled rows arrived.",
)

ALL_SCHEDULES = [weekly_retrain_schedule]
