"""Schedules: cadence. Signals (drift) are sensors."""

import dagster as dg

from pipelines.jobs import retrain_job
from resources.recipe import RecipeResource


@dg.schedule(job=retrain_job, cron_schedule="0 3 * * 1", execution_timezone="UTC",
             name="weekly_retrain_schedule", default_status=dg.DefaultScheduleStatus.STOPPED)
def weekly_retrain_schedule(context: dg.ScheduleEvaluationContext, recipe: RecipeResource):
    """Every Monday 03:00 UTC: retrain on the newly labelled rows of the incoming folder plus a replay of the
    previous training data; skipped, with the reason, when nothing new was labelled since the last retrain."""
    from tuneline.data.raw import incoming_dir, incoming_files

    r = recipe.load()
    waiting = incoming_files(r)
    if not waiting:
        return dg.SkipReason(f"no newly labelled rows in {incoming_dir(r)}: nothing to retrain on this week")
    when = context.scheduled_execution_time
    return dg.RunRequest(run_key=f"weekly-{when:%Y-%m-%d}" if when else None,
                         tags={"tuneline/trigger": "schedule", "tuneline/incoming_files": str(len(waiting))})


ALL_SCHEDULES = [weekly_retrain_schedule]
