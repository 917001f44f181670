"""The polling sensor: follows every live task and asks for the runs that collect results.

One tick polls the due tasks (bounded pool, inside a time budget well under Dagster's 60 s
tick limit; the rest wait for the next tick), then asks for at most three runs of the named
jobs: ``vidu_collect_job`` downloads every video that finished, ``vidu_submit_job``
resubmits failed tasks within their retry budget, and ``vidu_lineage_job`` records
failed/unknown outcomes in the lineage table. A run handles a whole batch as a partition
range narrowed by config, because a run costs seconds of process start and a video download
far less. Each tick that changed something also records a progress view on ``video_tasks``
(per-state counts and the tasks in flight), where a user looks in the UI.
"""

import hashlib
import json
import threading
import time

from dagster import (
    AssetKey,
    AssetObservation,
    DefaultSensorStatus,
    MetadataValue,
    RunRequest,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    TableColumn,
    TableRecord,
    TableSchema,
    sensor,
)

from .. import decisions, tasks
from ..ledger import PLANNED, SUBMITTED, SUBMITTING
from .jobs import BATCH_SIZE_TAG, collect_job, lineage_job, submit_job
from .partitions import REQUESTS_PARTITIONS_NAME
from .resources import PipelineResource, ViduResource

MAX_RANGE_GAP = 64  # partitions between two requests of one run, at most
RANGE_START = "dagster/asset_partition_range_start"
RANGE_END = "dagster/asset_partition_range_end"
JOB_FOR_ASSET = {"video_tasks": submit_job.name, "videos": collect_job.name}
PROGRESS_ASSET = AssetKey("video_tasks")
PROGRESS_ROWS = 50  # in-flight tasks listed in the progress table (the oldest), at most
IN_FLIGHT_SCHEMA = TableSchema(
    columns=[
        TableColumn("request_id", "string"),
        TableColumn("state", "string", description="the service's word (queued, processing…), else the ledger's"),
        TableColumn("eta_s", "float", description="seconds left, as the service estimates (-1: unknown)"),
        TableColumn("progress_pct", "float", description="-1: not reported yet"),
        TableColumn("age_s", "int", description="seconds since submission"),
    ]
)


def batch_run_requests(
    context: SensorEvaluationContext, asset: str, request_ids: list[str], key_material: str
) -> list[RunRequest]:
    """Runs of the asset's job over partition ranges holding ``request_ids``, each narrowed to
    them by config (see :func:`decisions.split_batches` for where a batch is cut)."""
    order = partition_order(context.instance).positions(context.instance, request_ids)
    digest = hashlib.sha256(key_material.encode()).hexdigest()[:20]
    return [
        RunRequest(
            run_key=f"{asset}:{digest}:{n}",
            job_name=JOB_FOR_ASSET[asset],
            tags={RANGE_START: group[0], RANGE_END: group[-1], BATCH_SIZE_TAG: str(len(group))},
            run_config={"ops": {asset: {"config": {"request_ids": group}}}},
        )
        for n, group in enumerate(decisions.split_batches(request_ids, order, MAX_RANGE_GAP))
    ]


class PartitionOrder:
    """Where each request partition stands in Dagster's order, kept between ticks: a tick
    reads only the keys added since the last one (one indexed query past a storage-id cursor)
    and checks its batch's keys, instead of reading every key of a dataset that grows with
    each plan. Keys are only ever appended by planning; should the storage change under it
    otherwise (a key deleted, the instance wiped and planned again), it reads everything again."""

    PAGE = 10_000

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._forget()

    def positions(self, instance, request_ids: list[str]) -> dict[str, int]:
        """The position of each of ``request_ids`` that has a partition."""
        with self.lock:
            self._catch_up(instance)
            if not self._holds(instance, request_ids):
                self._forget()
                self._catch_up(instance)
            return {r: self.index[r] for r in request_ids if r in self.index}

    def _forget(self) -> None:
        self.keys: list[str] = []
        self.index: dict[str, int] = {}
        self.cursor: str | None = None

    def _catch_up(self, instance) -> None:
        """Append the keys added since the cursor, in storage order."""
        while True:
            page = instance.get_paginated_dynamic_partitions(
                REQUESTS_PARTITIONS_NAME, limit=self.PAGE, ascending=True, cursor=self.cursor
            )
            for key in page.results:
                self.index[key] = len(self.keys)
                self.keys.append(key)
            self.cursor = page.cursor
            if not page.has_more:
                return

    def _holds(self, instance, request_ids: list[str]) -> bool:
        """Every id of the batch is kept, and each of them and the first key ever kept still
        exist (one query): else the storage changed under the kept order."""
        wanted = list(dict.fromkeys(request_ids))
        if any(r not in self.index for r in wanted):
            return False
        probe = list(dict.fromkeys(wanted + self.keys[:1]))
        return len(instance.get_existing_dynamic_partitions(REQUESTS_PARTITIONS_NAME, probe)) == len(probe)


_ORDERS: dict[object, PartitionOrder] = {}
_ORDERS_LOCK = threading.Lock()


def partition_order(instance) -> PartitionOrder:
    """The kept order of this instance's event storage (the daemon builds a new instance object
    every tick, so it is keyed by the storage's configuration); a fresh one for an ephemeral
    instance, which has nothing stable to key on."""
    if instance.is_ephemeral:
        return PartitionOrder()
    key = instance.get_ref().event_storage_data
    with _ORDERS_LOCK:
        return _ORDERS.setdefault(key, PartitionOrder())


def lineage_run_request(rows: dict, request_ids: list[str]) -> RunRequest:
    """One lineage run for the failed/unknown outcomes the table lacks."""
    material = ",".join(sorted(f"{r}@{rows[r].state}@{rows[r].updated_at}" for r in request_ids))
    return RunRequest(
        run_key="lineage:" + hashlib.sha256(material.encode()).hexdigest()[:20],
        job_name=lineage_job.name,
        tags={BATCH_SIZE_TAG: str(len(request_ids))},
    )


def evaluate_tick(context: SensorEvaluationContext, pipeline: PipelineResource, vidu: ViduResource):
    """The sensor body, callable directly (the CLI drives it in-process)."""
    ledger = pipeline.ledger()
    with vidu.get_client(pipeline.simulator_state_dir) as (client, _):
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
        failed=ledger.retryable_failed(rules.retry_budget, limit=10 * rules.max_batch),
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
        requests.append(lineage_run_request(rows, plan.lineage))

    counts = {k: v for k, v in ledger.counts_by_state().items() if v}
    in_flight = ledger.rows(states=[SUBMITTING, SUBMITTED], limit=PROGRESS_ROWS)  # the oldest ones
    events = progress_events(context, counts, in_flight, now)
    line = tick_line(report, len(abandoned), counts)
    context.log.debug(f"tick: {line}")
    cursor = json.dumps({"t": round(now, 1), "polled": report.polled})  # small high-water mark
    if not requests:
        return SensorResult(skip_reason=SkipReason(f"nothing to run: {line}"), cursor=cursor, asset_events=events)
    return SensorResult(run_requests=requests, cursor=cursor, asset_events=events)


def tick_line(report, abandoned: int, counts: dict[str, int]) -> str:
    """The tick in one readable line: what the poll saw, then where every request stands."""
    seen = f"polled {report.polled}"
    for word, n in (
        ("finished", len(report.succeeded)),
        ("failed", len(report.failed)),
        ("unknown", len(report.unknown) + abandoned),
        ("stale answers", len(report.stale)),
    ):
        if n:
            seen += f", {n} {word}"
    if report.out_of_time:
        seen += ", out of time (the rest next tick)"
    states = ", ".join(f"{n} {state}" for state, n in counts.items()) or "no requests"
    return f"{seen}; requests: {states}"


def progress_events(context: SensorEvaluationContext, counts: dict[str, int], in_flight, now: float) -> list:
    """The progress view as an observation on ``video_tasks``, or nothing when it says what the
    last one said (ages, etas and progress within 10 % aside): one event per change."""
    table = [
        {
            "request_id": r.request_id,
            "state": (r.last_status or r.state).removeprefix("TASK_STATUS_").lower(),
            "eta_s": round(r.eta_s, 1) if r.eta_s is not None else -1.0,
            "progress_pct": round(r.progress, 1) if r.progress is not None else -1.0,
            "age_s": int(now - (r.submitted_at or r.created_at)),
        }
        for r in in_flight
    ]
    # Progress counts in steps of 10 %: a long render does not record an event every tick.
    changes = [counts, [(t["request_id"], t["state"], int(t["progress_pct"] // 10)) for t in table]]
    digest = hashlib.sha256(json.dumps(changes).encode()).hexdigest()[:16]
    if digest == last_progress_digest(context):
        return []
    metadata: dict[str, MetadataValue] = {
        "states": MetadataValue.md(
            " · ".join(f"**{state}** {n}" for state, n in counts.items()) or "_no requests yet_"
        ),
        "in_flight": MetadataValue.table([TableRecord(t) for t in table], schema=IN_FLIGHT_SCHEMA),
        "in_flight_count": MetadataValue.int(counts.get(SUBMITTING, 0) + counts.get(SUBMITTED, 0)),
        "progress_digest": MetadataValue.text(digest),
    }
    return [AssetObservation(asset_key=PROGRESS_ASSET, metadata=metadata)]


def last_progress_digest(context: SensorEvaluationContext) -> str | None:
    """The digest of the latest progress observation the instance holds."""
    records = context.instance.fetch_observations(PROGRESS_ASSET, limit=1).records
    if not records or records[0].asset_observation is None:
        return None
    entry = records[0].asset_observation.metadata.get("progress_digest")
    return getattr(entry, "value", None)


@sensor(
    name="vidu_task_sensor",
    jobs=[submit_job, collect_job, lineage_job],
    minimum_interval_seconds=15,
    default_status=DefaultSensorStatus.RUNNING,
    description="Polls live Vidu tasks (guided by their eta) and asks for the runs that download "
    "finished videos, resubmit failed tasks within budget, and record outcomes in the lineage. "
    "Records the progress (states, tasks in flight) as an observation on video_tasks.",
)
def vidu_task_sensor(context: SensorEvaluationContext, pipeline: PipelineResource, vidu: ViduResource):
    return evaluate_tick(context, pipeline, vidu)
