"""The polling sensor: follows every live task and asks for the runs that collect results.

One tick polls the due tasks (bounded pool, inside a time budget well under Dagster's 60 s
tick limit; the rest wait for the next tick), then asks for at most three runs: one that
downloads every video that finished, one that resubmits failed tasks within their retry
budget, and one that records failed/unknown outcomes in the lineage table. A run handles a
whole batch as a partition range narrowed by config, because a run costs seconds of process
start and a video download far less.
"""

import hashlib
import json
import time

from dagster import (
    AssetKey,
    AssetSelection,
    DefaultSensorStatus,
    RunRequest,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)

from .. import decisions, tasks
from ..ledger import FAILED, PLANNED
from .partitions import REQUESTS_PARTITIONS_NAME
from .resources import PipelineResource, ViduResource

MAX_RANGE_GAP = 64  # partitions between two requests of one run, at most
RANGE_START = "dagster/asset_partition_range_start"
RANGE_END = "dagster/asset_partition_range_end"


def batch_run_requests(
    context: SensorEvaluationContext, asset: str, request_ids: list[str], key_material: str
) -> list[RunRequest]:
    """Runs over partition ranges holding ``request_ids``, each narrowed to them by config
    (see :func:`decisions.split_batches` for where a batch is cut)."""
    order = {k: i for i, k in enumerate(context.instance.get_dynamic_partitions(REQUESTS_PARTITIONS_NAME))}
    digest = hashlib.sha256(key_material.encode()).hexdigest()[:20]
    return [
        RunRequest(
            run_key=f"{asset}:{digest}:{n}",
            asset_selection=[AssetKey(asset)],
            tags={RANGE_START: group[0], RANGE_END: group[-1], "vidu/batch_size": str(len(group)), "vidu/stage": asset},
            run_config={"ops": {asset: {"config": {"request_ids": group}}}},
        )
        for n, group in enumerate(decisions.split_batches(request_ids, order, MAX_RANGE_GAP))
    ]


def evaluate_tick(context: SensorEvaluationContext, pipeline: PipelineResource, vidu: ViduResource):
    """The sensor body, callable directly (the CLI drives it in-process)."""
    ledger = pipeline.ledger()
    client, _ = vidu.client(pipeline.simulator_state_dir)
    abandoned = tasks.recover_abandoned(ledger, journal=pipeline.task_id_journal)
    report = tasks.poll_due(
        ledger,
        client,
        time_budget_s=pipeline.poll_time_budget_s,
        workers=pipeline.poll_workers,
        policy=pipeline.polling(),
    )
    now = time.time()
    rules = decisions.TickRules(retry_budget=pipeline.retry_budget, auto_submit=pipeline.auto_submit)
    plan = decisions.plan_tick(
        now=now,
        succeeded_now=set(report.succeeded),
        failed_now=set(report.failed),
        needing_video=ledger.needing_video(max_video_attempts=pipeline.video_attempts),
        failed=ledger.rows(states=[FAILED], limit=10 * rules.max_batch),
        planned=ledger.rows(states=[PLANNED], updated_before=now - rules.auto_submit_after_s, limit=rules.max_batch)
        if pipeline.auto_submit
        else [],
        needing_lineage=ledger.needing_lineage(),
        rules=rules,
    )
    rows = ledger.get_many(plan.collect + plan.submit + plan.lineage)
    requests: list[RunRequest] = []
    if plan.collect:
        material = ",".join(sorted(f"{r}@{rows[r].updated_at}" for r in plan.collect))
        requests += batch_run_requests(context, "videos", plan.collect, material)
    if plan.submit:
        material = ",".join(sorted(f"{r}@{rows[r].attempts}@{rows[r].updated_at}" for r in plan.submit))
        requests += batch_run_requests(context, "video_tasks", plan.submit, material)
    if plan.lineage:
        material = ",".join(sorted(f"{r}@{rows[r].state}@{rows[r].updated_at}" for r in plan.lineage))
        requests.append(
            RunRequest(
                run_key="lineage:" + hashlib.sha256(material.encode()).hexdigest()[:20],
                asset_selection=[AssetKey("lineage")],
                tags={"vidu/stage": "lineage"},
            )
        )

    counts = ledger.counts_by_state()
    summary = {
        "polled": report.polled,
        "succeeded": len(report.succeeded),
        "failed": len(report.failed),
        "unknown": len(report.unknown) + len(abandoned),
        "stale_answers": len(report.stale),
        "out_of_time": report.out_of_time,
        "states": {k: v for k, v in counts.items() if v},
    }
    context.log.debug(f"tick: {json.dumps(summary)}")
    cursor = json.dumps({"t": round(now, 1), "polled": report.polled})  # small high-water mark
    if not requests:
        return SensorResult(skip_reason=SkipReason(f"nothing finished; {json.dumps(summary)}"), cursor=cursor)
    return SensorResult(run_requests=requests, cursor=cursor)


@sensor(
    name="vidu_task_sensor",
    target=AssetSelection.assets("video_tasks", "videos", "lineage"),
    minimum_interval_seconds=15,
    default_status=DefaultSensorStatus.RUNNING,
    description="Polls live Vidu tasks (guided by their eta) and asks for the runs that download "
    "finished videos, resubmit failed tasks within budget, and record outcomes in the lineage.",
)
def vidu_task_sensor(context: SensorEvaluationContext, pipeline: PipelineResource, vidu: ViduResource):
    return evaluate_tick(context, pipeline, vidu)
