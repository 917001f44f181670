"""The headless driver: the code location's named jobs and the task sensor executed in this
process, and the run failures that must stop ``generate`` turned into the CLI's errors.

It runs the very definitions ``dagster dev`` loads, on the same instance (``DAGSTER_HOME``,
default ``.dagster_home`` in the working folder), so every run it makes shows up in the UI.
Runs execute in this process (tens of milliseconds each instead of seconds of process start).
The tests and the drills drive the pipeline through it too (:meth:`Driver.drive`,
:meth:`Driver.evaluate`): one loop of sensor ticks and runs, not one per caller.
"""

from __future__ import annotations

import concurrent.futures as cf
import errno
import sys
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from dagster import DagsterInstance, RunRequest, build_sensor_context

from .. import tasks
from ..api import errors
from ..defs.jobs import CATALOG_TAG, SEEDS_TAG, collect_job
from ..defs.resources import SESSION_TAG, PipelineResource, ViduResource, vidu_resource_from_env
from ..defs.sensors import batch_run_requests, vidu_task_sensor
from ..storage import StorageError
from .instance import OWNER_TAG, reap_dead_runs


class Driver:
    """Executes the code location's named jobs and the task sensor in-process, with one set of
    resources and one session tag: the runs show in the UI as ``vidu_plan_job``,
    ``vidu_submit_job``… exactly like the daemon's.

    Every Dagster call runs on a worker thread, never on the main thread: Dagster swaps the
    SIGINT/SIGTERM handlers around user code only on the main thread, which would replace the
    CLI's stop handlers. The main thread only waits, so a signal reaches it at once.
    """

    def __init__(self, instance: DagsterInstance, pipeline: PipelineResource, vidu: ViduResource | None = None):
        from ..definitions import build_definitions

        self.instance = instance
        self.pipeline = pipeline
        self.vidu = vidu or vidu_resource_from_env()
        self.session = uuid.uuid4().hex[:12]
        # Dagster's default IO manager (this DAGSTER_HOME): a generate runs every step in this
        # process, and two generates sharing one object-store root must not overwrite each
        # other's catalog values mid-read (see docs/deploy.md).
        self.resources = {"pipeline": pipeline, "vidu": self.vidu}
        self.definitions = build_definitions(resources=self.resources)
        reap_dead_runs(instance)
        self.jobs_by_run_key: dict[str, str] = {}  # every run the sensor asked for
        self.repeated_run_keys: list[str] = []  # asked for again: dropped, as the daemon does
        self.failed_runs: list[str] = []  # "<job>: <step>: <error>" of each run that failed
        self._runner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dagster-run")
        self._collect_lock = threading.Lock()
        self._collect_waiting: list[str] = []  # videos asked for while the runner is busy
        self._collect_queued = False  # a collect run for them is queued on the runner
        self._ticker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sensor-tick")
        self.pending: list[cf.Future] = []
        tasks.STOP.clear()

    def run(self, job: str, *, tags=None, run_config=None):
        """One run of a named job, waited for; a failure that must stop ``generate`` is raised
        (see raise_for_run)."""
        future = self.start(job, tags=tags, run_config=run_config)
        result = future.result()
        self.pending.remove(future)
        raise_for_run(result)
        return result

    def start(self, job: str, *, tags=None, run_config=None) -> cf.Future:
        """Queue one run of a named job on the runner thread; :meth:`drain` waits for it."""
        future = self._runner.submit(self._execute, job, tags, run_config)
        self.pending.append(future)
        return future

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
        if request.run_key in self.jobs_by_run_key:
            self.repeated_run_keys.append(request.run_key)
            return False
        self.jobs_by_run_key[request.run_key] = request.job_name
        if request.job_name == collect_job.name:
            self._queue_collect(request.run_config["ops"]["videos"]["config"]["request_ids"])
        else:
            self.start(request.job_name, tags=dict(request.tags), run_config=request.run_config)
        return True

    def _queue_collect(self, request_ids: list[str]) -> None:
        """Videos the sensor asks for while the runner is busy wait together for one collect
        run (a run's own cost is ~0.2 s: one run per tick fell behind a wave of finishes)."""
        with self._collect_lock:
            self._collect_waiting.extend(request_ids)
            if self._collect_queued:
                return
            self._collect_queued = True
        self.pending.append(self._runner.submit(self._collect_waiting_videos))

    def _collect_waiting_videos(self) -> list:
        with self._collect_lock:
            waiting, self._collect_waiting, self._collect_queued = self._collect_waiting, [], False
        context = build_sensor_context(instance=self.instance)
        batches = batch_run_requests(context, "videos", list(dict.fromkeys(waiting)), uuid.uuid4().hex)
        return [self._execute(collect_job.name, dict(r.tags), r.run_config) for r in batches]

    def check_finished(self) -> bool:
        """Forget the runs that ended, raising the first failure that must stop ``generate``.
        True when no run is left."""
        for future in [f for f in self.pending if f.done()]:
            self.pending.remove(future)
            outcome = future.result()
            for result in outcome if isinstance(outcome, list) else [outcome]:
                if not result.success:
                    self.failed_runs.append(f"{result.job_def.name}: {first_failure(result)}")
                raise_for_run(result)
        return not self.pending

    def drain(self) -> None:
        """Wait for every queued run."""
        while self.pending:
            cf.wait(self.pending, return_when=cf.FIRST_COMPLETED)
            self.check_finished()

    def tick(self) -> int:
        """Evaluate the task sensor once and queue the runs it asks for."""
        return sum(self.run_request(r) for r in (self.evaluate().run_requests or []))

    def evaluate(self):
        """Evaluate the task sensor once (on the ticker thread): it polls, records its progress
        view, and returns the runs it asks for (not queued)."""
        return self._ticker.submit(self._evaluate_sensor).result()

    def drive(self, finished: Callable[[], bool], *, timeout_s: float, pause_s: float = 0.3) -> bool:
        """The daemon's loop with each tick's runs done before the next tick, until
        ``finished()`` or ``timeout_s``: True when finished. A run the sensor asks for again
        after it ran is in ``repeated_run_keys``; a failed run in ``failed_runs``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.tick()
            self.drain()
            if finished():
                return True
            time.sleep(pause_s)
        return False

    def _evaluate_sensor(self):
        with build_sensor_context(instance=self.instance, resources=self.resources) as context:
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
        text = error_text(err)
        if err.cls_name == "AuthError":
            return errors.AuthError(text)
        if err.cls_name == "ConfigurationError":
            return errors.ConfigurationError(text)
        if err.cls_name == "StorageError":
            return StorageError(text)
        if err.cls_name == "OperationalError" and "disk is full" in text:
            return StorageError(f"the disk is full: step {step} could not write the ledger (database or disk is full)")
        if f"[Errno {errno.ENOSPC}]" in text or f"[Errno {errno.EDQUOT}]" in text:
            return StorageError(f"the disk is full: step {step}: {text}")
    return None


def _error_chain(error):
    while error is not None:
        yield error
        yield from _error_chain(error.context)
        error = error.cause


def error_text(err) -> str:
    """A serialized error's own words, without the ``module.Class:`` prefix."""
    message = err.message.strip()
    head, sep, rest = message.partition(": ")
    return rest.strip() if sep and head.rsplit(".", 1)[-1] == err.cls_name else message


def first_failure(result) -> str:
    for event in result.all_events:
        if event.is_step_failure:
            err = event.step_failure_data.error
            return f"{event.step_key}: {error_text(err.cause or err)}"
    return "a catalog step failed"
