"""The ledger on a real PostgreSQL server, raced by real processes (issue 13, items 1 and 2).

Each test gets a database of its own (``postgres_db.fresh_database``). Before the fix, two
processes creating the schema at once could fail with ``DuplicateTable`` (no lock around
``CREATE TABLE``), and two planning the same catalog failed with ``UniqueViolation`` (read the
existing ids, then insert the rest, without a lock).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from postgres_db import fresh_database
from sqlalchemy import event, inspect
from sqlalchemy.engine import Engine

from vidu_pipeline.ledger import SUCCEEDED, Ledger, PlannedRequest

pytestmark = [pytest.mark.postgres, pytest.mark.slow]  # starts processes, needs a server

ROWS = 300
ROUNDS = 3  # fresh databases per case: the race is not won the same way every time

# One racer: imports and connects first, then waits for the start signal, so that all of them
# hit the server within milliseconds (a cold driver import alone takes ~0.1 s).
RACER = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from sqlalchemy import create_engine, event
    from sqlalchemy.engine import Engine
    from vidu_pipeline.ledger import Ledger, PlannedRequest
    url, go, what = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    errors = []  # every statement the server refused, also those a retry papered over
    event.listen(Engine, "handle_error", lambda ctx: errors.append(type(ctx.original_exception).__name__))
    rows = [PlannedRequest(f"req-{i:04d}", f"s{i % 7}", i, "f" * 64, "{}") for i in range(ROWS)]
    with create_engine(url).connect():  # the driver imported and the server reached before the start
        pass
    while not go.exists():
        time.sleep(0.005)
    ledger = Ledger(url)
    new = ledger.plan(rows) if what == "plan" else 0
    print(json.dumps({"new": new, "errors": errors}))
    """
).replace("ROWS", str(ROWS))


def race(url: str, what: str, processes: int, tmp: Path) -> list[dict]:
    """Start ``processes`` racers, release them at once; their JSON answers (all must exit 0)."""
    go = tmp / f"go-{time.monotonic_ns()}"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, url, str(go), what], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(processes)
    ]
    time.sleep(3.0)  # let every racer finish importing (the machine is slow and shared)
    go.touch()
    answers = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"a racer failed:\n{err[-3000:]}"
        answers.append(json.loads(out.strip().splitlines()[-1]))
    return answers


@pytest.mark.parametrize("processes", [2, 4])
def test_processes_creating_the_schema_at_once_all_succeed(processes, tmp_path, figure):
    for _ in range(ROUNDS):
        with fresh_database() as url:
            answers = race(url, "create", processes, tmp_path)
            assert [a["errors"] for a in answers] == [[]] * processes  # not even one retried error
            ledger = Ledger(url)
            try:
                assert ledger.exists() and ledger.counts_by_state()[SUCCEEDED] == 0
            finally:
                ledger.close()
    figure(f"schema race: {processes} processes x {ROUNDS} fresh databases, 0 errors")


@pytest.mark.parametrize("processes", [2, 4])
def test_processes_planning_the_same_catalog_at_once_insert_each_row_once(processes, tmp_path, figure):
    for _ in range(ROUNDS):
        with fresh_database() as url:
            answers = race(url, "plan", processes, tmp_path)
            ledger = Ledger(url)
            try:
                rows = len(ledger.rows())
            finally:
                ledger.close()
            assert [a["errors"] for a in answers] == [[]] * processes  # not even one retried error
            assert sum(a["new"] for a in answers) == ROWS, answers  # each row new for exactly one
            assert rows == ROWS
    figure(f"planning race: {processes} processes, {ROWS} requests, {rows} rows, 0 errors")


class OtherProcessFirst:
    """Deterministic interleaving: just before this thread's statement starting with ``prefix``
    runs, ``other()`` runs on another thread (a second ledger: its own connection and
    transaction), given up to a few seconds, which is ample unless a lock holds it back.
    Records every statement error of this thread, including those a retry papered over."""

    def __init__(self, prefix: str, other):
        self.prefix, self.other = prefix, other
        self.me = threading.current_thread()
        self.thread: threading.Thread | None = None
        self.errors: list[str] = []

    def before(self, conn, cursor, statement, parameters, context, executemany):
        if threading.current_thread() is self.me and self.thread is None and statement.lstrip().startswith(self.prefix):
            self.thread = threading.Thread(target=self.other)
            self.thread.start()
            self.thread.join(timeout=5)

    def failed(self, ctx):
        if threading.current_thread() is self.me:
            self.errors.append(f"{type(ctx.original_exception).__name__}: {ctx.original_exception}"[:200])

    def __enter__(self):
        event.listen(Engine, "before_cursor_execute", self.before)
        event.listen(Engine, "handle_error", self.failed)
        return self

    def __exit__(self, *exc):
        event.remove(Engine, "before_cursor_execute", self.before)
        event.remove(Engine, "handle_error", self.failed)
        if self.thread is not None:
            self.thread.join(timeout=60)


def test_schema_creation_that_another_process_overtakes_raises_nothing():
    """Between our look for the tables and our CREATE TABLE, another ledger creates them.
    Before the fix our CREATE TABLE failed (DuplicateTable; a retry hid it)."""
    with fresh_database() as url:
        theirs: list[Ledger] = []
        with OtherProcessFirst("CREATE TABLE", lambda: theirs.append(Ledger(url))) as race:
            ours = Ledger(url)
        assert race.thread is not None, "the interleaving did not happen"
        assert race.errors == []
        assert len(theirs) == 1 and inspect(ours.engine).has_table("requests")
        ours.close()
        theirs[0].close()


def test_planning_that_another_process_overtakes_raises_nothing():
    """Between our look for existing ids and our INSERT, another ledger plans a third of the
    same rows. Before the fix our INSERT failed (UniqueViolation; a retry hid it)."""
    rows = [PlannedRequest(f"req-{i:04d}", "s", i, "f" * 64, "{}") for i in range(ROWS)]
    with fresh_database() as url:
        ours, theirs = Ledger(url), Ledger(url)
        theirs_new: list[int] = []
        with OtherProcessFirst("INSERT INTO requests", lambda: theirs_new.append(theirs.plan(rows[::3]))) as race:
            ours_new = ours.plan(rows)
        assert race.thread is not None, "the interleaving did not happen"
        assert race.errors == []
        assert theirs_new == [ROWS // 3] and ours_new == ROWS - ROWS // 3
        assert len(ours.rows()) == ROWS
        ours.close()
        theirs.close()


def test_a_second_plan_inserts_nothing_and_keeps_the_rows():
    with fresh_database() as url:
        ledger = Ledger(url)
        try:
            rows = [PlannedRequest(f"r{i}", "s", i, "f" * 64, "{}") for i in range(10)]
            assert ledger.plan(rows[:4]) == 4
            assert ledger.plan(rows) == 6
            assert ledger.plan(rows) == 0
            assert len(ledger.rows()) == 10
        finally:
            ledger.close()
