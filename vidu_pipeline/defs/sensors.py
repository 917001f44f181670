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

from .. import tasks
from ..ledger import FAILED, PLANNED, UNKNOWN
from .partitions import REQUESTS_PARTITIONS_NAME
from .resources import PipelineResource, ViduResource

RETRY_STUCK_AFTER_S = 300.0  # a batch whose run died is asked for again after this
VIDEO_RETRY_AFTER_S = 10.0  # a video whose download/verification failed is tried again after this
MAX_BATCH = 500  # requests per run asked for in one tick
MAX_RANGE_GAP = 64  # partitions between two requests of one run, at most
AUTO_SUBMIT_AFTER_S = 30.0  # leave fresh plans to the run that planned them
RANGE_START = "dagster/asset_partition_range_start"
RANGE_END = "dagster/asset_partition_range_end"


def batch_run_requests(
    context: SensorEvaluationContext, asset: str, request_ids: list[str], key_material: str
) -> list[RunRequest]:
    """Runs over partition ranges holding ``request_ids``, each narrowed to them by config.

    A run writes a "planned" event for every partition of its range, so a batch whose requests
    lie far apart in partition order (tasks finishing out of order) is split wherever the gap
    exceeds ``MAX_RANGE_GAP``: a range never spans much more than its batch.
    """
    order = {k: i for i, k in enumerate(context.instance.get_dynamic_partitions(REQUESTS_PARTITIONS_NAME))}
    ids = sorted((r for r in request_ids if r in order), key=order.__getitem__)
    groups: list[list[str]] = []
    for rid in ids:
        if groups and order[rid] - order[groups[-1][-1]] <= MAX_RANGE_GAP:
            groups[-1].append(rid)
        else:
            groups.append([rid])
    digest = hashlib.sha256(key_material.encode()).hexdigest()[:20]
    return [
        RunRequest(
            run_key=f"{asset}:{digest}:{n}",
            asset_selection=[AssetKey(asset)],
            tags={RANGE_START: group[0], RANGE_END: group[-1], "vidu/batch_size": str(len(group)),
                  "vidu/stage": asset},
            run_config={"ops": {asset: {"config": {"request_ids": group}}}},
        )
        for n, group in enumerate(groups)
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
    requests: list[RunRequest] = []

    fresh = set(report.succeeded)
    need_video = [
        r for r in ledger.needing_video(max_video_attempts=pipeline.video_attempts)
        if r.request_id in fresh
        or now - r.updated_at > RETRY_STUCK_AFTER_S
        # its last attempt ended with a recorded error: no run holds it, try again soon
        or (r.video_attempts > 0 and now - r.updated_at > VIDEO_RETRY_AFTER_S * r.video_attempts)
    ]
    need_video = need_video[:MAX_BATCH]
    if need_video:
        material = ",".join(sorted(f"{r.request_id}@{r.updated_at}" for r in need_video))
        requests += batch_run_requests(context, "videos", [r.request_id for r in need_video], material)

    # Failed tasks within their retry budget, and planned requests nobody has submitted yet
    # (e.g. planned by the schedule, or held back by a spend cap earlier).
    newly_failed = set(report.failed)
    resubmit = [
        r for r in ledger.rows(states=[FAILED], limit=10 * MAX_BATCH)
        if r.attempts < pipeline.retry_budget
        and r.task_id is not None
        and (r.request_id in newly_failed or now - r.updated_at > RETRY_STUCK_AFTER_S)
    ]
    if pipeline.auto_submit:
        resubmit += ledger.rows(states=[PLANNED], updated_before=now - AUTO_SUBMIT_AFTER_S, limit=MAX_BATCH)
    resubmit = resubmit[:MAX_BATCH]
    if resubmit:
        material = ",".join(sorted(f"{r.request_id}@{r.attempts}@{r.updated_at}" for r in resubmit))
        requests += batch_run_requests(context, "video_tasks", [r.request_id for r in resubmit], material)

    resubmitting = {r.request_id for r in resubmit}
    ended = [r for r in ledger.needing_lineage() if r.state in (FAILED, UNKNOWN) and r.request_id not in resubmitting]
    if ended:
        material = ",".join(sorted(f"{r.request_id}@{r.state}@{r.updated_at}" for r in ended))
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
