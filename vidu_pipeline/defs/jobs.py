"""One named job per stage, so the Jobs, Runs and timeline pages read as the pipeline does.

``vidu_plan_job`` ingests and plans, ``vidu_submit_job`` pays for tasks, ``vidu_collect_job``
downloads and verifies videos, ``vidu_lineage_job`` records outcomes in the Parquet table.
Each run carries ``vidu/stage``; whoever launches a batch adds ``vidu/batch_size`` (and the
partition-range tags). ``lineage`` also re-materializes by itself after new videos:
:data:`LINEAGE_AFTER_VIDEOS` is its automation condition, evaluated by
:data:`vidu_automation_sensor` in the daemon.
"""

from dagster import (
    AssetSelection,
    AutomationCondition,
    AutomationConditionSensorDefinition,
    DefaultSensorStatus,
    define_asset_job,
)

STAGE_TAG = "vidu/stage"
BATCH_SIZE_TAG = "vidu/batch_size"
CATALOG_TAG = "vidu/catalog"
SEEDS_TAG = "vidu/seeds"

PLAN_DIGEST = "plan_digest"  # generation_requests metadata: what the plan was made of


PLAN_ASSETS = ("catalog", "reference_images", "rejections", "generation_requests")
REFRESHED_AFTER_VIDEOS = ("lineage", "dataset_export")  # with their checks

plan_job = define_asset_job(
    "vidu_plan_job",
    selection=AssetSelection.assets(*PLAN_ASSETS),
    description="Ingest and validate the catalog, then plan new generation requests.",
    tags={STAGE_TAG: "plan"},
)

submit_job = define_asset_job(
    "vidu_submit_job",
    selection=AssetSelection.assets("video_tasks"),
    description="Submit planned requests (one paid task each, never twice); partitioned by request.",
    tags={STAGE_TAG: "submit"},
)

# videos yields one AssetMaterialization per collected partition and no output, so a check in
# the same run would always be skipped: videos_verified runs after the batch instead (the
# automation sensor, and vidu_lineage_job).
collect_job = define_asset_job(
    "vidu_collect_job",
    selection=AssetSelection.assets("videos").without_checks(),
    description="Download, verify and store the videos of finished tasks; partitioned by request.",
    tags={STAGE_TAG: "collect"},
)

lineage_job = define_asset_job(
    "vidu_lineage_job",
    selection=AssetSelection.assets(*REFRESHED_AFTER_VIDEOS) | AssetSelection.checks_for_assets("videos"),
    description="Append new outcomes to the Parquet lineage table, compact it, export the dataset, and run "
    "the lineage, videos and quality checks.",
    tags={STAGE_TAG: "lineage"},
)

ALL_JOBS = [plan_job, submit_job, collect_job, lineage_job]

# Like Dagster's eager(), with two changes for a dynamically partitioned upstream:
# - no "any dependency missing" guard: most videos partitions are missing until the sweep
#   ends, so eager() would wait for ever;
# - a videos update wins over a reset seen on the same tick: eager() forgets an update that
#   lands between its request and the next tick (or while its run is going), and the last
#   batch of a sweep would then never reach the lineage checks. The cost is at most one extra
#   lineage run per batch.
# Never while a videos run or a lineage run is going (the checks would see half a batch).
_VIDEOS_UPDATED = AutomationCondition.newly_missing() | AutomationCondition.any_deps_updated()
_HANDLED = (AutomationCondition.newly_requested() | AutomationCondition.initial_evaluation()) & ~_VIDEOS_UPDATED
AFTER_VIDEOS_BATCH = (_VIDEOS_UPDATED.since(_HANDLED) & ~AutomationCondition.any_deps_in_progress()).with_label(
    "after each videos batch"
)
LINEAGE_AFTER_VIDEOS = (AFTER_VIDEOS_BATCH & ~AutomationCondition.in_progress()).with_label(
    "after each videos batch, not while running"
)

# The lineage checks run in the same run as the lineage materialization the sensor asks for.
WITH_ITS_ASSET = AutomationCondition.any_deps_match(AutomationCondition.will_be_requested()).with_label(
    "with its asset"
)

vidu_automation_sensor = AutomationConditionSensorDefinition(
    "vidu_automation_sensor",
    target=AssetSelection.assets(*REFRESHED_AFTER_VIDEOS) | AssetSelection.checks_for_assets("videos"),
    default_status=DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=15,
    run_tags={STAGE_TAG: "lineage"},
    emit_backfills=False,
    description="After each batch of new videos: re-materializes the lineage table and the "
    "dataset export (with their checks, the quality gates among them) and runs the videos check.",
)
