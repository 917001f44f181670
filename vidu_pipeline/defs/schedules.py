"""Scheduled dataset generation: re-ingest the catalog and plan what is new.

The schedule is off by default (turn it on in the UI). It plans; the task sensor then
submits the new requests (``auto_submit``), follows them and collects the videos. Its cron
comes from ``VIDU_SCHEDULE_CRON`` (default: daily at 03:00).
"""

import os

from dagster import AssetSelection, DefaultScheduleStatus, ScheduleDefinition, define_asset_job

plan_job = define_asset_job(
    "vidu_plan_job",
    selection=AssetSelection.assets("catalog", "reference_images", "rejections", "generation_requests"),
    description="Ingest and validate the catalog, then plan new generation requests.",
)

generation_schedule = ScheduleDefinition(
    name="vidu_generation_schedule",
    job=plan_job,
    cron_schedule=os.environ.get("VIDU_SCHEDULE_CRON", "0 3 * * *"),
    default_status=DefaultScheduleStatus.STOPPED,
)
