"""Stage 4: each request submitted to the paid API once, as a partition of ``video_tasks``.

Partitioned by request id with a single-run backfill policy: one run handles a whole batch of
partitions (a run costs seconds of process start), and each partition still gets its own
materialization with its own metadata.
"""

from dagster import AssetExecutionContext, AssetKey, AssetMaterialization, BackfillPolicy, asset
from dagster._core.definitions.data_version import (
    CODE_VERSION_TAG,
    DATA_VERSION_IS_USER_PROVIDED_TAG,
    DATA_VERSION_TAG,
    INPUT_DATA_VERSION_TAG_PREFIX,
    INPUT_EVENT_POINTER_TAG_PREFIX,
)

from .. import tasks
from .metadata import GROUP, sweep_metadata
from .partitions import requests_partitions
from .requests import API_POOL, BatchConfig, generation_requests
from .resources import SESSION_TAG, PipelineResource, ViduResource


@asset(
    group_name=GROUP,
    partitions_def=requests_partitions,
    backfill_policy=BackfillPolicy.single_run(),
    deps=[generation_requests],
    output_required=False,
    pool=API_POOL,
)
def video_tasks(context: AssetExecutionContext, config: BatchConfig, pipeline: PipelineResource, vidu: ViduResource):
    """Submit each partition's request unless it already has a live task: paid for once,
    whatever is re-run. Only the partitions submitted by this run are materialized (with
    their task id): a re-run that submits nothing changes no partition, so no video goes
    out of date."""
    keys = config.select(context.partition_keys)
    ledger = pipeline.ledger()
    with vidu.get_client(pipeline.simulator_state_dir) as (client, endpoint):
        context.log.info(f"submitting up to {len(keys)} request(s) to the {endpoint.describe()}")
        tasks.recover_abandoned(ledger, journal=pipeline.task_id_journal)
        outcomes = tasks.submit_requests(
            ledger,
            client,
            keys,
            data_uri_for=pipeline.image_cache().data_uri,
            caps=pipeline.caps(context.run.tags.get(SESSION_TAG) or context.run_id),
            owner=tasks.owner_id(context.run_id),
            retry_budget=pipeline.retry_budget,
            allow_unknown=pipeline.resubmit_unknown,
            policy=pipeline.polling(),
            workers=pipeline.submit_workers,
            journal=pipeline.task_id_journal,
        )
    provenance = _plan_provenance(context)
    submitted = 0
    for outcome in outcomes:
        if not outcome.submitted:
            context.log.info(f"{outcome.request_id}: {outcome.message}")
            continue
        submitted += 1
        row = ledger.get(outcome.request_id)
        yield AssetMaterialization(
            asset_key=context.asset_key,
            partition=outcome.request_id,
            metadata={
                **sweep_metadata(row),
                "task_id": outcome.task_id or "",
                "attempt": row.attempts if row else 0,
                "note": outcome.message,
            },
            tags={**provenance, DATA_VERSION_TAG: outcome.task_id or "", DATA_VERSION_IS_USER_PROVIDED_TAG: "true"},
        )
    held = [o for o in outcomes if not o.submitted and not o.task_id]
    context.log.info(
        f"{submitted} submitted, {sum(1 for o in outcomes if o.task_id and not o.submitted)} already had a task, "
        f"{len(held)} not submitted"
    )


def _plan_provenance(context: AssetExecutionContext) -> dict[str, str]:
    """The provenance tags Dagster records for an output, for ``video_tasks``' runtime
    materializations: with them the UI compares the plan's data version (constant, see
    ``generation_requests``) instead of timestamps, so a later plan leaves the tasks in sync."""
    records = context.instance.fetch_materializations(AssetKey("generation_requests"), limit=1).records
    plan = records[0].asset_materialization if records else None
    version = (plan.tags or {}).get(DATA_VERSION_TAG) if plan else None
    if not version:
        return {}
    return {
        CODE_VERSION_TAG: context.run_id,
        f"{INPUT_DATA_VERSION_TAG_PREFIX}/generation_requests": version,
        f"{INPUT_EVENT_POINTER_TAG_PREFIX}/generation_requests": str(records[0].storage_id),
    }
