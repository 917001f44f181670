"""The Dagster instance the CLI runs on (the one ``dagster dev`` shows), with the CLI's
overrides, and the runs a killed ``generate`` left behind."""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from dagster import DagsterInstance
from dagster._core.instance.ref import InstanceRef
from sqlalchemy.exc import DBAPIError

from .. import tasks
from ..defs.partitions import REQUESTS_PARTITIONS_NAME

DAGSTER_YAML = """\
# Written by vidu-pipeline. Pools cap how many API-calling steps run at once across runs.
concurrency:
  pools:
    default_limit: 2
telemetry:
  enabled: false
"""


def dagster_instance() -> DagsterInstance:
    home = Path(os.environ.setdefault("DAGSTER_HOME", str(Path(".dagster_home").resolve())))
    # One "planned" event per batch run instead of one per partition: measured ~10 ms per
    # partition on SQLite, the largest part of start-up for big sweeps. Trade-off: a failed
    # batch run does not mark its partitions failed; the ledger and asset checks do.
    os.environ.setdefault("DAGSTER_EMIT_PARTITION_SUBSET_IN_PLANNED_EVENTS", "true")
    home.mkdir(parents=True, exist_ok=True)
    # Dagster creates and migrates its storage when an instance first opens it, and processes
    # doing that at once on a fresh storage fail ("table … already exists", an alembic version
    # mismatch). On one machine (SQLite in the home) a lock in the home serializes the first
    # opens; processes on several machines sharing one PostgreSQL instance database cannot
    # share that lock, so a creation that lost the race is tried again (the winner's tables
    # are then there).
    with open(home / ".vidu-instance.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        config = home / "dagster.yaml"
        if not config.exists():
            config.write_text(DAGSTER_YAML)
        for tries_left in range(4, -1, -1):
            try:
                return _open_instance(home)
            except DBAPIError:
                if not tries_left:
                    raise
                time.sleep(0.5)
    raise AssertionError("unreachable")


def _open_instance(home: Path) -> DagsterInstance:
    """The instance, with every storage created and migrated (not left for the first run)."""
    instance = DagsterInstance.from_ref(InstanceRef.from_dir(str(home), overrides=CLI_INSTANCE_OVERRIDES))
    instance.get_runs(limit=1)
    instance.get_dynamic_partitions(REQUESTS_PARTITIONS_NAME)
    instance.all_instigator_state()
    return instance


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
