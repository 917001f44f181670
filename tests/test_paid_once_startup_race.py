"""Issue 10, case 9: two planners start at once on a fresh DAGSTER_HOME and data folder.

Before the fix the second died with an ``IntegrityError`` on the dynamic partitions table
(``generation_requests`` read the keys, then inserted the missing ones; so does Dagster's own
``add_dynamic_partitions``), reported as a catalog error.
"""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest
from dagster import AssetKey, DagsterInstance, materialize
from dagster._core.instance.ref import InstanceRef
from sqlalchemy import event
from sqlalchemy.engine import Engine

from drills.run_drill import make_catalog
from vidu_pipeline.defs.assets import ALL_ASSETS
from vidu_pipeline.defs.partitions import REQUESTS_PARTITIONS_NAME
from vidu_pipeline.defs.requests import register_partitions
from vidu_pipeline.defs.resources import PipelineResource, ViduResource

pytestmark = pytest.mark.slow  # starts processes (CLI, simulator, drills)

PLAN = [AssetKey(k) for k in ("catalog", "reference_images", "generation_requests")]


def open_instance(home: Path) -> DagsterInstance:
    home.mkdir(parents=True, exist_ok=True)
    return DagsterInstance.from_ref(InstanceRef.from_dir(str(home)))


def test_a_planner_that_loses_the_insert_race_adds_only_what_is_missing(tmp_path):
    """Deterministic interleaving on real storage: between Dagster's read of the existing keys
    and its INSERT, another instance on the same DAGSTER_HOME inserts some of them."""
    home = tmp_path / "home"
    keys = [f"req-{i:03d}" for i in range(30)]
    inserts: list[str] = []

    def other_planner_first(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith("INSERT INTO DYNAMIC_PARTITIONS"):
            inserts.append(statement)
            if len(inserts) == 1:
                theirs.add_dynamic_partitions(REQUESTS_PARTITIONS_NAME, keys[::3])

    with open_instance(home) as ours, open_instance(home) as theirs:
        ours.get_dynamic_partitions(REQUESTS_PARTITIONS_NAME)  # storage tables exist
        event.listen(Engine, "before_cursor_execute", other_planner_first)
        try:
            added, total = register_partitions(ours, keys)
        finally:
            event.remove(Engine, "before_cursor_execute", other_planner_first)
        assert len(inserts) >= 3, "our first INSERT should have collided with theirs"
        assert sorted(added) == [k for k in keys if k not in keys[::3]] and total == 30
        assert sorted(theirs.get_dynamic_partitions(REQUESTS_PARTITIONS_NAME)) == keys
        assert register_partitions(ours, keys) == ([], 30)  # again: nothing to add


def _plan(home: str, data: str, catalog: str, barrier, out) -> None:
    """One ``generate``'s planning step, in its own process."""
    try:
        instance = open_instance(Path(home))
        pipeline = PipelineResource(data_dir=data, catalog_dir=catalog)
        barrier.wait(60)
        result = materialize(
            ALL_ASSETS,
            selection=PLAN,
            instance=instance,
            raise_on_error=False,
            resources={"pipeline": pipeline, "vidu": ViduResource()},
        )
        errors = [str(e.step_failure_data.error.message).strip() for e in result.all_events if e.is_step_failure]
        out.put(
            (
                "ok" if result.success else "failed",
                errors,
                len(result.output_for_node("generation_requests")) if result.success else 0,
            )
        )
    except Exception as exc:  # reported to the parent
        out.put(("error", [f"{type(exc).__name__}: {exc}"], 0))


@pytest.mark.timeout(300)
def test_two_processes_plan_one_fresh_catalog_at_once(tmp_path):
    """Two processes materialize the planning assets at once, each with its own instance, on
    one fresh DAGSTER_HOME and data folder: both succeed, every key is registered once and
    every request is in the ledger once."""
    catalog = tmp_path / "catalog"
    n = make_catalog(catalog, subjects=5, prompts=8, seeds=2)
    ctx = multiprocessing.get_context("spawn")
    for round_ in range(2):
        home, data = tmp_path / f"home{round_}", tmp_path / f"data{round_}"
        open_instance(home).dispose()  # the instance folder exists; its storage is still empty
        barrier, out = ctx.Barrier(2), ctx.Queue()
        procs = [ctx.Process(target=_plan, args=(str(home), str(data), str(catalog), barrier, out)) for _ in range(2)]
        for p in procs:
            p.start()
        results = [out.get(timeout=240) for _ in procs]
        for p in procs:
            p.join(timeout=30)
        assert results == [("ok", [], n)] * 2, results
        with open_instance(home) as instance:
            keys = instance.get_dynamic_partitions(REQUESTS_PARTITIONS_NAME)
        assert len(keys) == len(set(keys)) == n
        from vidu_pipeline.ledger import Ledger

        ledger = Ledger(f"sqlite:///{data / 'ledger.sqlite'}")
        assert ledger.counts_by_state()["planned"] == n
        ledger.close()
