"""``vidu-pipeline generate``: plan, submit, then tick the task sensor until every request
of the catalog has ended."""

from __future__ import annotations

import errno
import os
import time

from dagster import AssetKey, DagsterInstance, build_sensor_context

from ..defs.jobs import lineage_job
from ..defs.resources import PipelineResource
from ..defs.sensors import batch_run_requests
from ..ledger import FAILED, PLANNED, SUBMITTED, SUBMITTING, SUCCEEDED, UNKNOWN
from .driver import Driver
from .instance import dagster_instance
from .planning import dry_run, plan_requests
from .progress import Progress, summarize, video_problems, write_contact_sheet
from .regenerate import plan_replacements
from .settings import CatalogProblem, check_endpoint_settings, pipeline_from_args


def generate(args) -> int:
    pipeline = pipeline_from_args(args)
    if not pipeline.catalog_path.is_dir():
        raise CatalogProblem(f"catalog folder {pipeline.catalog_path} does not exist")
    try:
        pipeline.root.mkdir(parents=True, exist_ok=True)
        probe = pipeline.root / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise CatalogProblem(f"data folder {pipeline.root} is not writable: {exc.strerror}") from None
    check_endpoint_settings()
    driver = Driver(dagster_instance(), pipeline)
    try:
        return dry_run(driver, args) if args.dry_run else run_to_end(driver, args)
    except KeyboardInterrupt:
        driver.close(interrupted=True)
        raise
    finally:
        driver.close(interrupted=False)


def run_to_end(driver: Driver, args) -> int:
    """Plan, submit, then tick the sensor until every request of the catalog has ended."""
    pipeline, progress = driver.pipeline, Progress()
    ids, rejected = plan_requests(driver)
    if args.regenerate_failed_quality:
        ids += plan_replacements(driver, ids, args.regeneration_rounds)
    context = build_sensor_context(instance=driver.instance)
    ledger = pipeline.ledger()
    to_submit = unsubmitted(ledger, ids)
    for start in range(0, len(to_submit), 2000):
        chunk = to_submit[start : start + 2000]
        for request in batch_run_requests(context, "video_tasks", chunk, f"session:{driver.session}:{start}"):
            driver.run_now(request)

    # Tasks that succeeded before an earlier run was killed still lack their video: the sensor
    # only collects fresh successes (or stuck ones after minutes), so collect them now.
    wanted = set(ids)
    orphans = [
        r.request_id for r in ledger.needing_video(max_video_attempts=pipeline.video_attempts) if r.request_id in wanted
    ]
    for request in batch_run_requests(context, "videos", orphans, f"session:{driver.session}:videos"):
        driver.run_now(request)

    deadline = time.monotonic() + args.timeout
    while True:
        driver.tick()
        idle = driver.check_finished()
        rows = _rows(ledger, ids)
        state = session_state(rows, pipeline, ledger, driver.session)
        progress.show(state)
        if (state["open"] == 0 and idle) or time.monotonic() > deadline:
            break
        time.sleep(next_wake(rows))
    driver.drain()
    progress.done()
    if lineage_behind(driver.instance, ledger):
        driver.start(lineage_job.name)  # runs while the contact sheet is drawn
    sheet = None if args.no_contact_sheet else write_contact_sheet(pipeline)
    driver.drain()
    rows = _rows(ledger, ids)
    return summarize(pipeline, rows, rejected, sheet, timed_out=time.monotonic() > deadline)


def unsubmitted(ledger, ids: list[str]) -> list[str]:
    """The requests a submit run could act on: not those whose task is live or succeeded
    (the asset would only skip them, in a run that changes nothing)."""
    rows = ledger.get_many(ids)
    return [i for i in ids if i not in rows or rows[i].state not in (SUBMITTED, SUCCEEDED)]


def lineage_behind(instance: DagsterInstance, ledger) -> bool:
    """True when the lineage table lacks an outcome, or a video was stored after its last
    materialization (its checks would then speak of an older batch)."""
    if ledger.needing_lineage():
        return True
    videos = instance.fetch_materializations(AssetKey("videos"), limit=1).records
    table = instance.fetch_materializations(AssetKey("lineage"), limit=1).records
    return bool(videos) and (not table or videos[0].storage_id > table[0].storage_id)


def _rows(ledger, ids: list[str]) -> list:
    """The session's rows in catalog order (None for an id the ledger lacks)."""
    found = ledger.get_many(ids)
    return [found.get(i) for i in ids]


def session_state(rows, pipeline: PipelineResource, ledger, session: str) -> dict:
    """Counts for the progress line, and how many requests may still move."""
    counts = {
        "planned": 0,
        "submitted": 0,
        "running": 0,
        "done": 0,
        "mismatched": 0,
        "failed": 0,
        "unknown": 0,
        "open": 0,
    }
    caps = pipeline.caps(session)
    capped = (caps.per_run is not None and ledger.submits_since(0, session) >= caps.per_run) or (
        caps.per_day is not None and ledger.submits_since(time.time() - 86_400) >= caps.per_day
    )
    for row in rows:
        if row is None:
            continue
        if row.state == SUCCEEDED:
            if row.video_sha256:
                counts["mismatched" if video_problems(row) else "done"] += 1
            elif row.video_attempts >= pipeline.video_attempts:
                counts["failed"] += 1
            else:
                counts["running"] += 1
                counts["open"] += 1
        elif row.state in (SUBMITTING, SUBMITTED):
            counts["running" if row.last_status else "submitted"] += 1
            counts["open"] += 1
        elif row.state == FAILED:
            counts["failed"] += 1
            if row.attempts < pipeline.retry_budget and row.task_id:
                counts["open"] += 1
        elif row.state == UNKNOWN:
            counts["unknown"] += 1
        elif row.state == PLANNED:
            counts["planned"] += 1
            if not capped:
                counts["open"] += 1
    counts["capped"] = capped
    return counts


def next_wake(rows) -> float:
    """Sleep until the earliest task is due, within [0.05 s, 2 s]."""
    due = [r.next_poll_at for r in rows if r and r.state == SUBMITTED and r.next_poll_at]
    if not due:
        return 0.5
    return max(0.05, min(2.0, min(due) - time.time()))
