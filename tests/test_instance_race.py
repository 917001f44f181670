"""Several ``generate``s started at once on a fresh DAGSTER_HOME (a cron job and a user, two
shells) must not collide in Dagster's first-start creation of its SQLite storage.

Without the lock in ``cli.instance.dagster_instance`` 2 of 6 rounds of 3 processes failed here
("table asset_daemon_asset_evaluations already exists", an alembic version mismatch)."""

from __future__ import annotations

import multiprocessing
import os

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def open_instance(home: str, results) -> None:
    os.environ["DAGSTER_HOME"] = home
    try:
        from vidu_pipeline.cli.instance import dagster_instance
        from vidu_pipeline.defs.partitions import REQUESTS_PARTITIONS_NAME

        instance = dagster_instance()
        instance.add_dynamic_partitions(REQUESTS_PARTITIONS_NAME, [f"k{os.getpid()}"])
        results.put("ok")
    except Exception as exc:  # reported to the test, which names it
        results.put(f"{type(exc).__name__}: {str(exc)[:300]}")


def test_processes_opening_one_fresh_instance_at_once_all_succeed(tmp_path):
    spawn = multiprocessing.get_context("spawn")
    for round_ in range(6):
        home = tmp_path / f"home{round_}"
        results = spawn.Queue()
        procs = [spawn.Process(target=open_instance, args=(str(home), results)) for _ in range(3)]
        for p in procs:
            p.start()
        outcomes = [results.get(timeout=120) for _ in procs]
        for p in procs:
            p.join(timeout=60)
        assert outcomes == ["ok"] * 3, f"round {round_}: {outcomes}"
