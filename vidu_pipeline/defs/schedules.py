"""Scheduled dataset generation: re-ingest the catalog and plan what is new.

The schedule is off by default (turn it on in the UI). It plans; the task sensor then
submits the new requests (``auto_submit``), follows them and collects the videos. Its cron
comes from ``VIDU_SCHEDULE_CRON`` (default: daily at 03:00).
"""

import os

from dagster import DefaultScheduleStatus, RunRequest, ScheduleEvaluationContext, schedule

from .jobs import CATALOG_TAG, SEEDS_TAG, plan_job
from .resources import PipelineResource

__all__ = ["generation_schedule", "plan_job"]


@schedule(
    name="vidu_generation_schedule",
    job=plan_job,
    cron_schedule=os.environ.get("VIDU_SCHEDULE_CRON", "0 3 * * *"),
    default_status=DefaultScheduleStatus.STOPPED,
    description="Re-ingest the catalog and plan new requests; the task sensor takes it from there.",
)
def generation_schedule(context: ScheduleEvaluationContext, pipeline: PipelineResource):
    """One plan run per tick, tagged with the catalog it reads and any seed override."""
    tags = {CATALOG_TAG: str(pipeline.catalog_path)}
    if pipeline.seeds:
        tags[SEEDS_TAG] = ",".join(map(str, pipeline.seeds))
    return RunRequest(tags=tags)
