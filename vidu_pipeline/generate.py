"""The headless driver behind ``vidu-pipeline generate``, ``status`` and ``reproduce``.

It runs the very definitions ``dagster dev`` loads, on the same instance (``DAGSTER_HOME``,
default ``.dagster_home`` in the working folder), so every run it makes shows up in the UI.
Runs execute in this process (tens of milliseconds each instead of seconds of process start).
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import errno
import json
import os
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
from dagster import AssetKey, DagsterInstance, RunRequest, build_sensor_context
from dagster._core.instance.ref import InstanceRef

from . import catalog as catalog_mod
from . import collect, errors, plan, quality, tasks
from .cli import DAGSTER_YAML, EXIT_CAPPED, EXIT_FAILED, EXIT_OK
from .defs.jobs import CATALOG_TAG, PLAN_DIGEST, SEEDS_TAG, lineage_job, plan_digest, plan_job
from .defs.partitions import REQUESTS_PARTITIONS_NAME
from .defs.resources import SESSION_TAG, PipelineResource, vidu_resource_from_env
from .defs.sensors import batch_run_requests, vidu_task_sensor
from .ledger import FAILED, PLANNED, SUBMITTED, SUBMITTING, SUCCEEDED, UNKNOWN, PlannedRequest
from .video import VideoInvalid


class CatalogProblem(Exception):
    """The catalog or configuration cannot be used at all (message names file and field)."""


def check_endpoint_settings() -> None:
    """A key no HTTP header can carry, or a base URL that is not http(s), is a configuration
    error said up front (:class:`errors.ConfigurationError`), before anything is recorded."""
    from . import runtime
    from .client import check_api_key

    key = os.environ.get(runtime.ENV_KEY, "").strip()
    if key:
        check_api_key(key)
        url = os.environ.get(runtime.ENV_BASE_URL, "").strip()
        if url and not url.startswith(("http://", "https://")):
            raise CatalogProblem(f"{runtime.ENV_BASE_URL} must start with http:// or https://, got {url[:80]!r}")


def dagster_instance() -> DagsterInstance:
    home = Path(os.environ.setdefault("DAGSTER_HOME", str(Path(".dagster_home").resolve())))
    # One "planned" event per batch run instead of one per partition: measured ~10 ms per
    # partition on SQLite, the largest part of start-up for big sweeps. Trade-off: a failed
    # batch run does not mark its partitions failed; the ledger and asset checks do.
    os.environ.setdefault("DAGSTER_EMIT_PARTITION_SUBSET_IN_PLANNED_EVENTS", "true")
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    if not config.exists():
        config.write_text(DAGSTER_YAML)
    return DagsterInstance.from_ref(InstanceRef.from_dir(str(home), overrides=CLI_INSTANCE_OVERRIDES))


# Runs executed by the CLI do not capture stdout/stderr (Dagster's documented way to turn
# compute-log capture off). Capture redirects the whole process's fds 1 and 2 into a file and
# mirrors it back through a ``tail -F`` child per stream: in this process that would swallow the
# progress line the main thread prints, and each run would start 4 helper processes whose
# shutdown waits up to 30 s on a tail that inherited an ignored SIGTERM. The event log (logs,
# failures with their traces, materializations) still goes to the instance the UI shows; runs
# that ``dagster dev`` launches keep the dagster.yaml setting.
CLI_INSTANCE_OVERRIDES = {
    "compute_logs": {"module": "dagster._core.storage.noop_compute_log_manager", "class": "NoOpComputeLogManager"},
}


def pipeline_from_args(args) -> PipelineResource:
    return PipelineResource(
        data_dir=str(Path(args.data_dir).resolve()),
        catalog_dir=str(Path(args.catalog).resolve()) if getattr(args, "catalog", None) else "",
        strict_images=getattr(args, "strict_images", False),
        allow_outside_paths=getattr(args, "allow_outside_paths", False),
        retry_budget=getattr(args, "retry_budget", 3),
        max_tasks_per_run=getattr(args, "max_tasks", None),
        max_tasks_per_day=getattr(args, "max_tasks_per_day", None),
        resubmit_unknown=getattr(args, "resubmit_unknown", False),
        seeds=getattr(args, "seeds", None) or [],
    )


OWNER_TAG = "vidu/owner"  # host:pid of the generate process executing the run


def reap_dead_runs(instance: DagsterInstance) -> list[str]:
    """Runs a killed ``generate`` left STARTED still hold pool slots, and every later run would
    wait for them forever. Mark them failed and free their slots (the daemon's run monitoring
    does this under ``dagster dev``; a headless CLI must do it itself)."""
    from dagster import DagsterRunStatus, RunsFilter

    reaped = []
    for run in instance.get_runs(filters=RunsFilter(statuses=[DagsterRunStatus.STARTED, DagsterRunStatus.STARTING])):
        owner = run.tags.get(OWNER_TAG)
        if owner and not tasks.owner_alive(owner):
            instance.report_run_failed(run, f"the generate process that ran it ({owner}) is gone")
            instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
            reaped.append(run.run_id)
    return reaped


class Driver:
    """Executes the code location's named jobs and the task sensor in-process, with one set of
    resources and one session tag: the runs show in the UI as ``vidu_plan_job``,
    ``vidu_submit_job``… exactly like the daemon's.

    Every Dagster call runs on a worker thread, never on the main thread: Dagster swaps the
    SIGINT/SIGTERM handlers around user code only on the main thread, which would replace the
    CLI's stop handlers. The main thread only waits, so a signal reaches it at once.
    """

    def __init__(self, instance: DagsterInstance, pipeline: PipelineResource):
        from .definitions import build_definitions

        self.instance = instance
        self.pipeline = pipeline
        self.definitions = build_definitions(pipeline)
        self.vidu = vidu_resource_from_env()
        self.session = uuid.uuid4().hex[:12]
        self.resources = {"pipeline": pipeline, "vidu": self.vidu}
        reap_dead_runs(instance)
        self.done_run_keys: set[str] = set()
        self._runner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dagster-run")
        self._ticker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sensor-tick")
        self.pending: list[cf.Future] = []
        tasks.STOP.clear()

    def run(self, job: str, *, tags=None, run_config=None):
        """One run of a named job, waited for; a failure that must stop ``generate`` is raised
        (see raise_for_run)."""
        future = self._runner.submit(self._execute, job, tags, run_config)
        self.pending.append(future)
        result = future.result()
        self.pending.remove(future)
        raise_for_run(result)
        return result

    def run_now(self, request: RunRequest):
        """A run the sensor's rules asked for, executed at once (see :meth:`run`)."""
        assert request.job_name, request
        return self.run(request.job_name, tags=dict(request.tags), run_config=request.run_config)

    def run_tags(self) -> dict[str, str]:
        """What every run of this session says about itself (the job adds its stage)."""
        tags = {SESSION_TAG: self.session, OWNER_TAG: tasks.owner_id(), CATALOG_TAG: str(self.pipeline.catalog_path)}
        if self.pipeline.seeds:
            tags[SEEDS_TAG] = ",".join(map(str, self.pipeline.seeds))
        return tags

    def _execute(self, job: str, tags, run_config):
        # Dagster's console logger would print every event, and a failed step's whole trace:
        # on the command line the progress line, the summary and one error line say what
        # matters; the details stay in the run's event log for the UI.
        run_config = {**(run_config or {}), "loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}
        return self.definitions.resolve_job_def(job).execute_in_process(
            instance=self.instance,
            tags={**self.run_tags(), **(tags or {})},
            run_config=run_config,
            raise_on_error=False,
        )

    def run_request(self, request) -> bool:
        """Queue what the sensor asked for, once per run key (the daemon's dedupe). The run
        executes on the runner thread while the next ticks keep polling."""
        if request.run_key in self.done_run_keys:
            return False
        self.done_run_keys.add(request.run_key)
        self.pending.append(
            self._runner.submit(self._execute, request.job_name, dict(request.tags), request.run_config)
        )
        return True

    def check_finished(self) -> bool:
        """Forget the runs that ended, raising the first failure that must stop ``generate``.
        True when no run is left."""
        for future in [f for f in self.pending if f.done()]:
            self.pending.remove(future)
            raise_for_run(future.result())
        return not self.pending

    def drain(self) -> None:
        """Wait for every queued run."""
        while self.pending:
            cf.wait(self.pending, return_when=cf.FIRST_COMPLETED)
            self.check_finished()

    def tick(self) -> int:
        """Evaluate the task sensor once (on the ticker thread) and queue the runs it asks for."""
        result = self._ticker.submit(self._evaluate_sensor).result()
        return sum(self.run_request(r) for r in (result.run_requests or []))

    def _evaluate_sensor(self):
        context = build_sensor_context(instance=self.instance, resources=self.resources)
        result = vidu_task_sensor(context)
        for event in result.asset_events or []:  # the progress view, recorded as the daemon would
            self.instance.report_runless_asset_event(event)
        return result

    def close(self, *, interrupted: bool) -> None:
        """Stop taking new work: queued runs are dropped, the step (and tick) in flight finish
        and record what they submitted."""
        if interrupted:
            print(
                "\nstopping: letting the step in flight record its work (a second signal forces the exit)…",
                file=sys.stderr,
                flush=True,
            )
        if interrupted or self.pending:
            tasks.STOP.set()
        for future in self.pending:
            future.cancel()
        self._runner.shutdown(wait=True, cancel_futures=True)
        self._ticker.shutdown(wait=True, cancel_futures=True)


def raise_for_run(result) -> None:
    """Re-raise, as the CLI's one-line error, a run failure that must stop ``generate``: the
    API refused the key, settings that cannot work, or a full disk. Other step failures are
    left to the ledger (they end as failed or are retried)."""
    if result.success:
        return
    for event in result.all_events:
        if event.is_step_failure:
            stop = stopping_error(event.step_key, event.step_failure_data.error)
            if stop:
                raise stop


def stopping_error(step: str, error) -> Exception | None:
    """The CLI-level exception for a failed step's serialized error chain, or None."""
    for err in _error_chain(error):
        text = _error_text(err)
        if err.cls_name == "AuthError":
            return errors.AuthError(text)
        if err.cls_name == "ConfigurationError":
            return errors.ConfigurationError(text)
        if err.cls_name == "StorageError":
            return errors.StorageError(text)
        if err.cls_name == "OperationalError" and "disk is full" in text:
            return errors.StorageError(
                f"the disk is full: step {step} could not write the ledger (database or disk is full)"
            )
        if f"[Errno {errno.ENOSPC}]" in text or f"[Errno {errno.EDQUOT}]" in text:
            return errors.StorageError(f"the disk is full: step {step}: {text}")
    return None


def _error_chain(error):
    while error is not None:
        yield error
        yield from _error_chain(error.context)
        error = error.cause


def _error_text(err) -> str:
    """A serialized error's own words, without the ``module.Class:`` prefix."""
    message = err.message.strip()
    head, sep, rest = message.partition(": ")
    return rest.strip() if sep and head.rsplit(".", 1)[-1] == err.cls_name else message


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
        driver.run(lineage_job.name)
    rows = _rows(ledger, ids)
    sheet = None if args.no_contact_sheet else write_contact_sheet(pipeline, rows)
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


@dataclasses.dataclass(frozen=True)
class PlanPreview:
    """What the plan job would produce, computed by the domain functions alone (no run)."""

    catalog: catalog_mod.Catalog
    specs: list
    rejected: pd.DataFrame
    digest: str


def preview_plan(pipeline: PipelineResource) -> PlanPreview:
    """Load and validate the catalog and expand the sweep, exactly as the plan job's assets do."""
    try:
        cat = catalog_mod.load_catalog(pipeline.catalog_path, allow_outside_paths=pipeline.allow_outside_paths)
    except catalog_mod.CatalogError as exc:
        raise CatalogProblem(f"catalog: {exc}") from None
    try:
        validated = catalog_mod.validate_images(cat, pipeline.image_cache(), strict=pipeline.strict_images)
    except catalog_mod.CatalogError as exc:
        raise CatalogProblem(f"reference_images: {exc}") from None
    prompts, prompt_rejections = catalog_mod.valid_prompts(cat, validated)
    rejected = catalog_mod.rejections_frame([*cat.rejections, *validated.rejections, *prompt_rejections])
    specs = plan.expand(prompts, validated.accepted, pipeline.seeds or cat.sweep.seeds)
    return PlanPreview(cat, specs, rejected, plan_digest(specs, rejected))


def plan_is_current(driver: Driver, preview: PlanPreview) -> bool:
    """The last plan recorded this very plan, and every request is in the ledger and has its
    partition: a plan run would change nothing, so none is made (the assets stay as they are)."""
    records = driver.instance.fetch_materializations(AssetKey("generation_requests"), limit=1).records
    last = records[0].asset_materialization if records else None
    entry = last.metadata.get(PLAN_DIGEST) if last else None
    if getattr(entry, "value", None) != preview.digest:
        return False
    ids = [s.request_id for s in preview.specs]
    partitions = set(driver.instance.get_dynamic_partitions(REQUESTS_PARTITIONS_NAME))
    return len(driver.pipeline.ledger().get_many(ids)) == len(set(ids)) and partitions.issuperset(ids)


def plan_requests(driver: Driver) -> tuple[list[str], pd.DataFrame]:
    """The request ids to generate and the rejected inputs, running the plan job only when
    the catalog (or the seeds) changed since the last plan."""
    pipeline = driver.pipeline
    preview = preview_plan(pipeline)
    ids = [s.request_id for s in preview.specs]
    if not ids:
        cat, rejected = preview.catalog, preview.rejected
        raise CatalogProblem(
            f"catalog {pipeline.catalog_path} yields no request to generate: {len(cat.images)} valid image row(s) "
            f"in images.csv, {len(cat.prompts)} valid prompt row(s) in prompts.csv, {len(rejected)} input(s) "
            f"rejected (see {pipeline.reports_dir / 'rejections.csv'}); every request needs a subject with a "
            "valid image and a prompt"
        )
    if plan_is_current(driver, preview):
        note = "unchanged since the last plan"
    else:
        result = driver.run(plan_job.name)
        if not result.success:
            raise CatalogProblem(_first_failure(result))
        ids, note = list(result.output_for_node("generation_requests")["request_id"]), "planned"
    print(
        f"catalog: {len(ids)} request(s) {note}; {len(preview.rejected)} input(s) rejected "
        f"(see {pipeline.reports_dir / 'rejections.csv'})",
        file=sys.stderr,
    )
    return ids, preview.rejected


def dry_run(driver: Driver, args) -> int:
    """Validate and plan without a run, a ledger write or a submit: no asset changes."""
    preview = preview_plan(driver.pipeline)
    specs, rejected = preview.specs, preview.rejected
    seeds = driver.pipeline.seeds or preview.catalog.sweep.seeds
    known = driver.pipeline.ledger().get_many([s.request_id for s in specs])
    new = [s for s in specs if s.request_id not in known or known[s.request_id].state == PLANNED]
    subjects = len({s.subject_id for s in specs})
    print(
        f"dry run: {len(specs)} request(s) from {subjects} "
        f"subject(s) × prompts × {len(seeds)} seed(s); {len(new)} would be submitted, "
        f"{len(specs) - len(new)} already have a task; {len(rejected)} input(s) rejected"
    )
    if args.price_per_task is not None:
        print(f"estimated cost: {len(new)} × {args.price_per_task:g} = {len(new) * args.price_per_task:.2f}")
    cap = driver.pipeline.caps("-").per_run
    if cap is not None and cap < len(new):
        print(f"the per-run cap ({cap}) would hold back {len(new) - cap} request(s)")
    print("nothing was submitted")
    return EXIT_OK


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


class Progress:
    """One status line: rewritten in place on a terminal, printed now and then otherwise."""

    def __init__(self):
        self.tty = sys.stderr.isatty()
        self.last = 0.0
        self.text = ""

    def show(self, s: dict) -> None:
        total = sum(s[k] for k in ("planned", "submitted", "running", "done", "mismatched", "failed", "unknown"))
        width = 24
        ended = s["done"] + s["mismatched"] + s["failed"] + s["unknown"]
        filled = int(width * ended / total) if total else width
        self.text = (
            f"[{'#' * filled}{'.' * (width - filled)}] submitted {s['submitted']} | running {s['running']} "
            f"| done {s['done']} | "
            + (f"mismatched {s['mismatched']} | " if s["mismatched"] else "")
            + f"failed {s['failed']} | unknown {s['unknown']} | planned {s['planned']}"
        )
        now = time.monotonic()
        if self.tty:
            print("\r" + self.text, end="", file=sys.stderr, flush=True)
        elif now - self.last > 5:
            print(self.text, file=sys.stderr, flush=True)
            self.last = now

    def done(self) -> None:
        print(("\r" if self.tty else "") + self.text, file=sys.stderr, flush=True)


def write_contact_sheet(pipeline: PipelineResource, rows=None) -> Path | None:
    """The dataset's contact sheet: every current video of the data dir (``rows`` is ignored:
    the sheet shows the dataset, not one run), paged past ``sheets.TILES_PER_PAGE`` tiles
    (contact_sheet.png, contact_sheet-2.png, …), each tile labelled with its request id and
    quality flags. Returns the first page, or None when there is no video yet."""
    from . import sheets
    from .export import ExportProblem, thresholds_for

    try:
        thresholds = thresholds_for(pipeline.catalog_path)
    except ExportProblem:  # a broken sweep.yaml is reported by the catalog asset
        thresholds = quality.Thresholds()
    current = sheets.current_rows(pipeline.ledger().rows(states=[SUCCEEDED]), pipeline.videos_dir)
    items = [(sheets.tile_label(r, thresholds), _thumbnail_or_video(pipeline, r)) for r in current]
    pages = sheets.write_pages(pipeline.root, items) if items else []
    return pages[0] if pages else None


def _thumbnail_or_video(pipeline: PipelineResource, row) -> Path:
    """The frame the videos asset already saved (no second decode), else the video itself."""
    thumb = pipeline.root / "thumbnails" / f"{row.request_id}.png"
    return thumb if thumb.exists() else Path(row.video_path)


def video_problems(row) -> list[str]:
    """How a stored video differs from its request (size, duration, audio), from its probe."""
    return list((row.probe or {}).get("problems") or [])


def summarize(pipeline: PipelineResource, rows, rejected, sheet: Path | None, *, timed_out: bool) -> int:
    """Print the summary; exit 0 only when every request has a video that matches it."""
    by_state: dict[str, int] = {}
    failed = []
    for row in rows:
        if row is None:
            continue
        stored = row.state == SUCCEEDED and row.video_sha256
        problems = video_problems(row) if stored else []
        key = ("mismatched" if problems else "succeeded") if stored else row.state
        by_state[key] = by_state.get(key, 0) + 1
        if problems:
            failed.append(f"  {row.request_id}: mismatched: video does not match its request: {'; '.join(problems)}")
        elif row.state in (FAILED, UNKNOWN) or (row.state == SUCCEEDED and not row.video_sha256):
            failed.append(f"  {row.request_id}: {row.state}: {row.last_error or 'no video yet'}")
    print("\nsummary")
    print(f"  requests: {len(rows)}  " + "  ".join(f"{k}: {v}" for k, v in sorted(by_state.items())))
    print(
        f"  rejected inputs: {len(rejected)}"
        + (f" (see {pipeline.reports_dir / 'rejections.csv'})" if len(rejected) else "")
    )
    print(f"  videos: {pipeline.videos_dir}")
    print(f"  lineage: {pipeline.root / 'lineage'}")
    if sheet:
        print(f"  contact sheet: {sheet}")
    if failed:
        print("not succeeded:")
        print("\n".join(failed[:50]))
    planned = by_state.get(PLANNED, 0)
    if planned:
        print(f"  {planned} request(s) held back by a spend cap: they stay planned; run again to continue")
    if timed_out:
        print("  stopped at --timeout; run again to continue")
    if failed or timed_out:
        return EXIT_FAILED
    return EXIT_CAPPED if planned else EXIT_OK


def status(args) -> int:
    pipeline = PipelineResource(data_dir=str(Path(args.data_dir).resolve()))
    if not (pipeline.root / "ledger.sqlite").exists() and not pipeline.ledger_url:
        print(f"no ledger in {pipeline.root}: nothing generated yet")
        return EXIT_OK
    ledger = pipeline.read_only_ledger()  # looking writes nothing: works on a read-only folder
    try:
        counts = ledger.counts_by_state()
        oldest = ledger.oldest_pending()
        unknown = ledger.rows(states=[UNKNOWN])
    finally:
        ledger.close()
    if args.json:
        print(
            json.dumps(
                {
                    "counts": counts,
                    "oldest_pending": oldest
                    and {
                        "request_id": oldest.request_id,
                        "state": oldest.state,
                        "task_id": oldest.task_id,
                        "age_s": round(time.time() - oldest.created_at),
                    },
                    "unknown": [
                        {"request_id": r.request_id, "task_id": r.task_id, "reason": r.last_error} for r in unknown
                    ],
                },
                indent=2,
            )
        )
        return EXIT_OK
    print("  ".join(f"{k}: {v}" for k, v in counts.items()))
    if oldest:
        print(
            f"oldest pending: {oldest.request_id} ({oldest.state}, task {oldest.task_id or '-'}, "
            f"{time.time() - oldest.created_at:.0f} s old)"
        )
    for row in unknown:
        print(f"unknown: {row.request_id} (task {row.task_id or '?'}): {row.last_error}")
    return EXIT_OK


def reproduce(args) -> int:
    """Submit a finished request again as its own ledger row ``<request_id>-r<N>`` (same spec,
    the effective seed), under the spend caps and after confirmation, then compare videos.

    Paid for once like any request: an interrupted reproduction is resumed by the next
    ``reproduce``, not submitted again. Files are named after request ids, never task ids.
    """
    pipeline = pipeline_from_args(args)
    if not (pipeline.root / "ledger.sqlite").exists() and not pipeline.ledger_url:
        raise CatalogProblem(f"no ledger in {pipeline.root}: nothing generated yet")
    ledger = pipeline.ledger()
    original = ledger.get(args.request_id)
    if original is None:
        raise CatalogProblem(f"no request {args.request_id!r} in the ledger of {pipeline.root}")
    if original.state != SUCCEEDED or not original.video_sha256:
        raise CatalogProblem(f"request {args.request_id} has no video to compare (state {original.state})")
    check_endpoint_settings()
    tasks.recover_abandoned(ledger)
    client, endpoint = vidu_resource_from_env().client(pipeline.simulator_state_dir)
    with client:
        row, number = open_reproduction(ledger, original)
        if row is None or row.state == PLANNED:
            confirm_paid_submit(args, endpoint, original.request_id)
            row = row or plan_reproduction(ledger, original, number)
            code = submit_reproduction(pipeline, ledger, client, row.request_id)
            if code is not None:
                return code
        elif row.state == SUBMITTING:
            raise CatalogProblem(f"{row.request_id} is being submitted by {row.owner}; wait for it and run again")
        else:
            print(f"resuming {row.request_id} (task {row.task_id}): nothing new is submitted", file=sys.stderr)
        row = wait_for_reproduction(ledger, client, ledger.get(row.request_id), args.timeout)
        if row.state != SUCCEEDED:
            print(f"{row.request_id}: {row.state}: {row.last_error}", file=sys.stderr)
            return EXIT_FAILED
        if not row.video_sha256:
            try:
                collect.collect_video(
                    ledger,
                    client,
                    row.request_id,
                    videos_dir=pipeline.root / "reproductions",
                    render_scale=endpoint.render_scale,
                )
            except (VideoInvalid, errors.ViduError) as exc:
                print(
                    f"error: {row.request_id}: no good video ({exc}); run reproduce again to retry the "
                    "download (nothing new is submitted)",
                    file=sys.stderr,
                )
                return EXIT_FAILED
        row = _must_get(ledger, row.request_id)
    pipeline.lineage().append([collect.lineage_row(row)])
    ledger.mark_lineage([row.request_id])
    same = row.video_sha256 == original.video_sha256
    for problem in video_problems(row):
        print(f"{row.request_id}: video does not match its request: {problem}", file=sys.stderr)
    print(
        f"original   {original.video_sha256}\nreproduced {row.video_sha256}\n"
        f"{'MATCH' if same else 'DIFFERENT'}: {row.video_path}"
    )
    return EXIT_OK if same else EXIT_FAILED


def open_reproduction(ledger, original):
    """The latest reproduction if it is still open (planned, in flight, or succeeded without
    its video), else None; and the number a new one would take."""
    n, latest = 1, None
    while (row := ledger.get(f"{original.request_id}-r{n}")) is not None:
        latest, n = row, n + 1
    if latest is not None and (
        latest.state in (PLANNED, SUBMITTING, SUBMITTED) or (latest.state == SUCCEEDED and not latest.video_sha256)
    ):
        return latest, n
    return None, n


def plan_reproduction(ledger, original, n: int):
    """A planned ledger row ``<request_id>-r<n>``: the original's spec with its effective seed."""
    spec = plan.RequestSpec.from_json(original.spec_json)
    seed = original.effective_seed if original.effective_seed is not None else spec.seed
    spec = dataclasses.replace(spec, request_id=f"{original.request_id}-r{n}", seed=seed)
    ledger.plan(
        [
            PlannedRequest(
                request_id=spec.request_id,
                subject_id=spec.subject_id,
                seed=seed,
                fingerprint=spec.fingerprint(),
                spec_json=spec.to_json(),
            )
        ]
    )
    return ledger.get(spec.request_id)


def confirm_paid_submit(args, endpoint, request_id: str) -> None:
    """Ask before paying: on a terminal, a y/N question; otherwise ``--yes`` is required."""
    if endpoint.simulated:
        print(f"reproducing {request_id} on the {endpoint.describe()}: nothing is paid", file=sys.stderr)
        return
    if args.yes:
        return
    if not sys.stdin.isatty():
        raise CatalogProblem(
            f"reproducing {request_id} submits 1 paid task to the {endpoint.describe()}; "
            "stdin is not a terminal, so pass --yes to confirm (nothing was submitted)"
        )
    answer = input(f"Submit 1 paid task to reproduce {request_id}? [y/N] ")
    if answer.strip().lower() not in ("y", "yes"):
        raise CatalogProblem("not confirmed: nothing was submitted")


def submit_reproduction(pipeline: PipelineResource, ledger, client, request_id: str) -> int | None:
    """Claim (caps checked in the claim) and submit; an exit code when nothing was submitted."""
    [outcome] = tasks.submit_requests(
        ledger,
        client,
        [request_id],
        data_uri_for=pipeline.image_cache().data_uri,
        caps=pipeline.caps(uuid.uuid4().hex[:12]),
        owner=tasks.owner_id(),
        retry_budget=pipeline.retry_budget,
        policy=pipeline.polling(),
        workers=1,
    )
    if outcome.submitted:
        print(f"submitted {request_id} as task {outcome.task_id}; waiting…", file=sys.stderr)
        return None
    print(f"error: {request_id} not submitted: {outcome.message}", file=sys.stderr)
    return EXIT_CAPPED if outcome.message.startswith("cap reached") else EXIT_FAILED


def wait_for_reproduction(ledger, client, row, timeout_s: float):
    """Poll the reproduction's task to its end and record the outcome in the ledger."""
    if row.state != SUBMITTED:
        return row
    try:
        result = client.wait(row.task_id, timeout_s=timeout_s)
    except errors.TaskFailed as exc:
        ledger.record_failed(row.request_id, exc.reason or str(exc), task_id=row.task_id)
    except TimeoutError as exc:
        raise CatalogProblem(f"{exc}; run reproduce again to keep waiting (nothing new is submitted)") from None
    else:
        finished = (result.debug_times_ms.get("complete_time_ms") or time.time() * 1000) / 1000.0
        ledger.record_succeeded(row.request_id, task_id=row.task_id, effective_seed=result.seed, finished_at=finished)
    return ledger.get(row.request_id)


def _first_failure(result) -> str:
    for event in result.all_events:
        if event.is_step_failure:
            err = event.step_failure_data.error
            return f"{event.step_key}: {_error_text(err.cause or err)}"
    return "a catalog step failed"


def _must_get(ledger, request_id: str):
    """A row this command planned itself: its absence is a broken ledger, said plainly."""
    row = ledger.get(request_id)
    if row is None:
        raise CatalogProblem(f"{request_id} vanished from the ledger while reproducing it")
    return row
