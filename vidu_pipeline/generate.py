"""The headless driver behind ``vidu-pipeline generate``, ``status`` and ``reproduce``.

It runs the very definitions ``dagster dev`` loads, on the same instance (``DAGSTER_HOME``,
default ``.dagster_home`` in the working folder), so every run it makes shows up in the UI.
Runs execute in this process (tens of milliseconds each instead of seconds of process start).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from dagster import (
    AssetKey,
    DagsterInstance,
    build_sensor_context,
    materialize,
)

from . import catalog as catalog_mod
from . import plan, tasks
from .cli import DAGSTER_YAML, EXIT_CAPPED, EXIT_FAILED, EXIT_OK
from .defs.assets import ALL_ASSETS
from .defs.checks import ALL_CHECKS
from .defs.resources import SESSION_TAG, PipelineResource, vidu_resource_from_env
from .defs.sensors import batch_run_requests, vidu_task_sensor
from .ledger import FAILED, PLANNED, SUBMITTED, SUBMITTING, SUCCEEDED, UNKNOWN

CATALOG_ASSETS = ["catalog", "reference_images", "rejections", "generation_requests"]


class CatalogProblem(Exception):
    """The catalog or configuration cannot be used at all (message names file and field)."""


def check_endpoint_settings() -> None:
    """A key with a base URL that is not http(s) is a configuration error, said up front."""
    from . import runtime

    if os.environ.get(runtime.ENV_KEY, "").strip():
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
    return DagsterInstance.get()


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
    """Executes asset runs in-process with one set of resources and one session tag."""

    def __init__(self, instance: DagsterInstance, pipeline: PipelineResource):
        self.instance = instance
        self.pipeline = pipeline
        self.vidu = vidu_resource_from_env()
        self.session = uuid.uuid4().hex[:12]
        self.resources = {"pipeline": pipeline, "vidu": self.vidu}
        reap_dead_runs(instance)
        self.done_run_keys: set[str] = set()
        # Runs execute on a worker thread: Dagster captures SIGINT only on the main thread,
        # so Ctrl-C reaches us, and the step in flight still finishes and records its work.
        self._runner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dagster-run")
        self.pending: list = []

    def run(self, selection: list[str], *, tags=None, run_config=None, raise_on_error=True):
        future = self._runner.submit(self._materialize, selection, tags, run_config, raise_on_error)
        self.pending.append(future)
        try:
            return future.result()
        except KeyboardInterrupt:
            self.stop()
            raise

    def _materialize(self, selection, tags, run_config, raise_on_error):
        # Dagster's console logger would print every event; the progress line says enough.
        run_config = {**(run_config or {}), "loggers": {"console": {"config": {"log_level": "WARNING"}}}}
        return materialize(
            [*ALL_ASSETS, *ALL_CHECKS],
            selection=[AssetKey(k) for k in selection],
            instance=self.instance,
            resources=self.resources,
            tags={SESSION_TAG: self.session, OWNER_TAG: tasks.owner_id(), **(tags or {})},
            run_config=run_config,
            raise_on_error=raise_on_error,
        )

    def run_request(self, request) -> bool:
        """Queue what the sensor asked for, once per run key (the daemon's dedupe). The run
        executes on the runner thread while the next ticks keep polling."""
        if request.run_key in self.done_run_keys:
            return False
        self.done_run_keys.add(request.run_key)
        self.pending.append(self._runner.submit(
            self._materialize, [k.to_user_string() for k in request.asset_selection],
            dict(request.tags), request.run_config, False,
        ))
        return True

    def drain(self) -> None:
        """Wait for every queued run; on Ctrl-C, stop new work and let the step in flight finish."""
        try:
            for future in self.pending:
                future.result()
        except KeyboardInterrupt:
            self.stop()
            raise
        self.pending.clear()

    def stop(self) -> None:
        tasks.STOP.set()
        print("\nstopping: letting the step in flight record its work (Ctrl-C again to force)…",
              file=sys.stderr, flush=True)
        for future in self.pending:
            future.result()

    def tick(self) -> int:
        context = build_sensor_context(instance=self.instance, resources=self.resources)
        result = vidu_task_sensor(context)
        return sum(self.run_request(r) for r in (result.run_requests or []))


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
        raise CatalogProblem(f"data folder {pipeline.root} is not writable: {exc.strerror}") from None
    check_endpoint_settings()
    instance = dagster_instance()
    driver = Driver(instance, pipeline)
    progress = Progress()

    if args.dry_run:
        return dry_run(driver, args)

    result = driver.run(CATALOG_ASSETS, raise_on_error=False)
    if not result.success:
        raise CatalogProblem(_first_failure(result))
    requests = result.output_for_node("generation_requests")
    ids = list(requests["request_id"])
    rejected = result.output_for_node("rejections")
    if not ids:
        cat = result.output_for_node("catalog")
        raise CatalogProblem(
            f"catalog {pipeline.catalog_path} yields no request to generate: {len(cat.images)} valid image row(s) "
            f"in images.csv, {len(cat.prompts)} valid prompt row(s) in prompts.csv, {len(rejected)} input(s) "
            f"rejected (see {pipeline.reports_dir / 'rejections.csv'}); every request needs a subject with a "
            "valid image and a prompt"
        )
    print(f"catalog: {len(ids)} request(s) planned; {len(rejected)} input(s) rejected "
          f"(see {pipeline.reports_dir / 'rejections.csv'})", file=sys.stderr)
    if ids:
        context = build_sensor_context(instance=instance, resources=driver.resources)
        for start in range(0, len(ids), 2000):
            chunk = ids[start:start + 2000]
            for request in batch_run_requests(context, "video_tasks", chunk, f"session:{driver.session}:{start}"):
                driver.run(["video_tasks"], tags=dict(request.tags), run_config=request.run_config,
                           raise_on_error=False)

    ledger = pipeline.ledger()
    # Tasks that succeeded before an earlier run was killed still lack their video: the sensor
    # only collects fresh successes (or stuck ones after minutes), so collect them now.
    wanted = set(ids)
    orphans = [r.request_id for r in ledger.needing_video(max_video_attempts=pipeline.video_attempts)
               if r.request_id in wanted]
    if orphans:
        context = build_sensor_context(instance=instance, resources=driver.resources)
        for request in batch_run_requests(context, "videos", orphans, f"session:{driver.session}:videos"):
            driver.run(["videos"], tags=dict(request.tags), run_config=request.run_config, raise_on_error=False)

    deadline = time.monotonic() + args.timeout
    try:
        while True:
            driver.tick()
            rows = _rows(ledger, ids)
            state = session_state(rows, pipeline, ledger, driver.session)
            progress.show(state)
            if (state["open"] == 0 and all(f.done() for f in driver.pending)) or time.monotonic() > deadline:
                break
            time.sleep(next_wake(rows))
        driver.drain()
    except KeyboardInterrupt:
        driver.stop()
        raise
    progress.done()
    driver.run(["lineage"], raise_on_error=False)
    rows = _rows(ledger, ids)
    sheet = None if args.no_contact_sheet else write_contact_sheet(pipeline, rows)
    return summarize(pipeline, rows, rejected, sheet, timed_out=time.monotonic() > deadline)


def dry_run(driver: Driver, args) -> int:
    """Validate and plan without writing to the ledger or submitting anything."""
    result = driver.run(["catalog", "reference_images", "rejections"], raise_on_error=False)
    if not result.success:
        raise CatalogProblem(_first_failure(result))
    cat = result.output_for_node("catalog")
    validated = result.output_for_node("reference_images")
    rejected = result.output_for_node("rejections")
    prompts, _ = catalog_mod.valid_prompts(cat, validated)
    seeds = driver.pipeline.seeds or cat.sweep.seeds
    specs = plan.expand(prompts, validated.accepted, seeds)
    ledger = driver.pipeline.ledger()
    known = ledger.get_many([s.request_id for s in specs])
    new = [s for s in specs if s.request_id not in known or known[s.request_id].state == PLANNED]
    print(f"dry run: {len(specs)} request(s) from {prompts['subject_id'].nunique() if len(prompts) else 0} "
          f"subject(s) × prompts × {len(seeds)} seed(s); {len(new)} would be submitted, "
          f"{len(specs) - len(new)} already have a task; {len(rejected)} input(s) rejected")
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
    counts = {"planned": 0, "submitted": 0, "running": 0, "done": 0, "failed": 0, "unknown": 0, "open": 0}
    caps = pipeline.caps(session)
    capped = (caps.per_run is not None and ledger.submits_since(0, session) >= caps.per_run) or (
        caps.per_day is not None and ledger.submits_since(time.time() - 86_400) >= caps.per_day
    )
    for row in rows:
        if row is None:
            continue
        if row.state == SUCCEEDED:
            if row.video_sha256:
                counts["done"] += 1
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
        total = sum(s[k] for k in ("planned", "submitted", "running", "done", "failed", "unknown"))
        width = 24
        filled = int(width * (s["done"] + s["failed"] + s["unknown"]) / total) if total else width
        self.text = (f"[{'#' * filled}{'.' * (width - filled)}] submitted {s['submitted']} | running {s['running']} "
                     f"| done {s['done']} | failed {s['failed']} | unknown {s['unknown']} | planned {s['planned']}")
        now = time.monotonic()
        if self.tty:
            print("\r" + self.text, end="", file=sys.stderr, flush=True)
        elif now - self.last > 5:
            print(self.text, file=sys.stderr, flush=True)
            self.last = now

    def done(self) -> None:
        print(("\r" if self.tty else "") + self.text, file=sys.stderr, flush=True)


def write_contact_sheet(pipeline: PipelineResource, rows) -> Path | None:
    from .video import contact_sheet

    items = [
        (f"{r.subject_id} · {json.loads(r.spec_json)['options']['aspect_ratio']} · seed {r.seed}",
         _thumbnail_or_video(pipeline, r))
        for r in rows
        if r and r.video_sha256 and r.video_path and Path(r.video_path).exists()
    ]
    if not items:
        return None
    columns = min(len(items), max(1, math.ceil(math.sqrt(len(items)))))
    # At most ~4096 px wide: a sweep of thousands stays a viewable (and bounded-memory) PNG.
    image = contact_sheet(items, columns=columns, cell_width=max(64, min(320, 4096 // columns)))
    path = pipeline.root / "contact_sheet.png"
    image.save(path)
    return path


def _thumbnail_or_video(pipeline: PipelineResource, row) -> Path:
    """The frame the videos asset already saved (no second decode), else the video itself."""
    thumb = pipeline.root / "thumbnails" / f"{row.request_id}.png"
    return thumb if thumb.exists() else Path(row.video_path)


def summarize(pipeline: PipelineResource, rows, rejected, sheet: Path | None, *, timed_out: bool) -> int:
    by_state: dict[str, int] = {}
    failed = []
    for row in rows:
        if row is None:
            continue
        key = "succeeded" if row.state == SUCCEEDED and row.video_sha256 else row.state
        by_state[key] = by_state.get(key, 0) + 1
        if row.state in (FAILED, UNKNOWN) or (row.state == SUCCEEDED and not row.video_sha256):
            failed.append(f"  {row.request_id}: {row.state}: {row.last_error or 'no video yet'}")
    print("\nsummary")
    print(f"  requests: {len(rows)}  " + "  ".join(f"{k}: {v}" for k, v in sorted(by_state.items())))
    print(f"  rejected inputs: {len(rejected)}" + (f" (see {pipeline.reports_dir / 'rejections.csv'})" if len(rejected) else ""))
    print(f"  videos: {pipeline.videos_dir}")
    print(f"  lineage: {pipeline.root / 'lineage'}")
    if sheet:
        print(f"  contact sheet: {sheet}")
    if failed:
        print("not finished:")
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
        print(json.dumps({
            "counts": counts,
            "oldest_pending": oldest and {"request_id": oldest.request_id, "state": oldest.state,
                                          "task_id": oldest.task_id, "age_s": round(time.time() - oldest.created_at)},
            "unknown": [{"request_id": r.request_id, "task_id": r.task_id, "reason": r.last_error} for r in unknown],
        }, indent=2))
        return EXIT_OK
    print("  ".join(f"{k}: {v}" for k, v in counts.items()))
    if oldest:
        print(f"oldest pending: {oldest.request_id} ({oldest.state}, task {oldest.task_id or '-'}, "
              f"{time.time() - oldest.created_at:.0f} s old)")
    for row in unknown:
        print(f"unknown: {row.request_id} (task {row.task_id or '?'}): {row.last_error}")
    return EXIT_OK


def reproduce(args) -> int:
    """Rebuild a request from its lineage row, submit it as a new task, compare the video."""
    from .client import ViduClient
    from .plan import RequestSpec

    pipeline = PipelineResource(data_dir=str(Path(args.data_dir).resolve()))
    table = pipeline.lineage().read()
    match = table[table["request_id"] == args.request_id]
    if match.empty:
        raise CatalogProblem(f"no lineage row for request {args.request_id!r}")
    row = match.iloc[0]
    if row["state"] != "succeeded" or not row["video_sha256"]:
        raise CatalogProblem(f"request {args.request_id} has no video to compare (state {row['state']})")
    spec = RequestSpec(
        request_id=row["request_id"], subject_id=row["subject_id"], prompt=row["prompt"],
        seed=int(row["seed_effective"] if row["seed_effective"] is not None else row["seed_requested"]),
        options={k: row[k] for k in ("aspect_ratio", "movement_amplitude", "resolution")}
        | {"bgm": bool(row["bgm"]), "duration": int(row["duration"])},
        image_sha256s=tuple(row["reference_sha256s"]), original_sha256s=tuple(row["reference_original_sha256s"]),
        image_mimes=(),
    )
    cache = pipeline.image_cache()
    try:
        request = spec.to_request(cache.data_uri)
    except (KeyError, FileNotFoundError, OSError) as exc:
        raise CatalogProblem(f"a reference image of {args.request_id} is missing from the cache: {exc}") from None
    endpoint = vidu_resource_from_env().endpoint(pipeline.simulator_state_dir)
    with ViduClient(endpoint.api_key, endpoint.base_url) as client:
        task_id = client.submit(request)
        print(f"submitted {args.request_id} again as task {task_id}; waiting…", file=sys.stderr)
        result = client.wait(task_id, timeout_s=args.timeout)
        out = pipeline.root / "reproductions" / f"{args.request_id}-{task_id}.mp4"
        download = client.download(result, out)
    same = download.sha256 == row["video_sha256"]
    print(f"original  {row['video_sha256']}\nreproduced {download.sha256}\n"
          f"{'MATCH' if same else 'DIFFERENT'}: {out}")
    return EXIT_OK if same else EXIT_FAILED


def _first_failure(result) -> str:
    for event in result.all_events:
        if event.is_step_failure:
            err = event.step_failure_data.error
            cause = err.cause or err
            return f"{event.step_key}: {cause.message.strip()}"
    return "a catalog step failed"
