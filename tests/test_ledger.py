"""The ledger: every transition, every Skip reason, caps under concurrency, recovery, scale."""

from __future__ import annotations

import json
import multiprocessing
import sqlite3

import pytest
from sqlalchemy import create_mock_engine, event
from sqlalchemy.exc import OperationalError

from vidu_pipeline import ledger as L
from vidu_pipeline.ledger import Claim, Ledger, LedgerStateError, PlannedRequest, Skip, SpendCaps
from vidu_pipeline.ledger.polling import PollAnswer

NO_CAPS = SpendCaps(per_run=None, per_day=None, run_id="run-1")


class Clock:
    def __init__(self, t: float = 1_700_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def spec(i: int) -> str:
    return json.dumps({"images": [f"sha256:{i:064x}"], "prompt": f"subject {i}", "seed": i}, sort_keys=True)


def planned(i: int) -> PlannedRequest:
    return PlannedRequest(f"req-{i:05d}", f"subj-{i % 7}", i, f"{i:064x}", spec(i))


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def url(tmp_path):
    return f"sqlite:///{tmp_path / 'ledger.sqlite'}"


@pytest.fixture
def ledger(url, clock):
    led = Ledger(url, clock=clock)
    led.plan(planned(i) for i in range(5))
    yield led
    led.close()


def claim(led, rid="req-00000", *, caps=NO_CAPS, budget=3, **kw) -> Claim | Skip:
    return led.claim_for_submit(rid, owner="pid-1@host", retry_budget=budget, caps=caps, **kw)


def submit(led, rid="req-00000", task="task-1", clock=None) -> Claim:
    c = claim(led, rid)
    assert isinstance(c, Claim), c
    led.record_submitted(rid, c.attempt, task, first_poll_at=(clock.t if clock else 0) + 5)
    return c


# --- setup and planning ----------------------------------------------------------------------


def test_sqlite_is_wal_and_tables_exist(ledger, tmp_path):
    con = sqlite3.connect(tmp_path / "ledger.sqlite")
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"requests", "attempts", "ledger_locks"} <= tables


def test_schema_compiles_for_postgres():
    ddl = []
    engine = create_mock_engine(
        "postgresql+psycopg2://", lambda sql, *a, **k: ddl.append(str(sql.compile(dialect=engine.dialect)))
    )
    L.metadata.create_all(engine, checkfirst=False)
    text = "\n".join(ddl)
    assert "CREATE TABLE requests" in text and "CREATE TABLE attempts" in text


def test_plan_is_insert_if_absent_and_never_touches_existing(ledger, clock):
    assert ledger.get("req-00000").state == "planned"
    submit(ledger, clock=clock)
    changed = PlannedRequest("req-00000", "other", 99, "0" * 64, "{}")
    assert ledger.plan([changed, planned(5), planned(5)]) == 1
    row = ledger.get("req-00000")
    assert (row.state, row.subject_id, row.spec_json) == ("submitted", "subj-0", spec(0))
    assert ledger.counts_by_state()["planned"] == 5


def test_get_many_returns_known_rows_across_chunks(ledger):
    ledger.plan(planned(i) for i in range(1200))  # more than two IN-chunks of 500
    submit(ledger, "req-00007", "task-7")
    wanted = [f"req-{i:05d}" for i in range(0, 1200, 2)] + ["no-such-request"]
    found = ledger.get_many(wanted)
    assert set(found) == set(wanted) - {"no-such-request"}
    assert found["req-00000"].state == "planned"
    assert ledger.get_many(["req-00007"])["req-00007"].task_id == "task-7"
    assert ledger.get_many([]) == {}


def test_spec_json_stored_verbatim(ledger):
    for i in range(5):
        assert ledger.get(f"req-{i:05d}").spec_json == spec(i)
    assert "data:" not in "".join(r.spec_json for r in ledger.rows())


def test_retryable_failed_leaves_out_failures_that_are_final(ledger, clock):
    """Only failed requests within the retry budget and once accepted (a task id) come back,
    oldest first, and the limit counts those only: final failures ahead of them take no room."""
    for rid, failures in (("req-00000", 3), ("req-00001", 1), ("req-00002", 2), ("req-00003", 1)):
        for n in range(1, failures + 1):
            submit(ledger, rid, task=f"task-{rid}-{n}", clock=clock)
            assert ledger.record_failed(rid, "TASK_STATUS_FAILED", task_id=f"task-{rid}-{n}")
    refused = claim(ledger, "req-00004")
    ledger.record_submit_rejected("req-00004", refused.attempt, "400: bad image")  # failed, no task id
    assert (ledger.get("req-00004").state, ledger.get("req-00004").attempts) == ("failed", 1)
    assert [r.request_id for r in ledger.retryable_failed(3, limit=10)] == ["req-00001", "req-00002", "req-00003"]
    assert [r.request_id for r in ledger.retryable_failed(2, limit=10)] == ["req-00001", "req-00003"]
    assert [r.request_id for r in ledger.retryable_failed(3, limit=1)] == ["req-00001"]


def test_plan_100k_rows(tmp_path):
    led = Ledger(f"sqlite:///{tmp_path / 'big.sqlite'}")
    rows = [PlannedRequest(f"r{i}", f"s{i % 100}", i, "f" * 64, "{}") for i in range(100_000)]
    assert led.plan(rows) == 100_000
    assert led.plan(rows[:1000] + [PlannedRequest("new", "s", None, "f" * 64, "{}")]) == 1
    assert led.counts_by_state()["planned"] == 100_001
    led.close()


# --- claims ----------------------------------------------------------------------------------


def test_claim_commits_intent_and_attempt_row(ledger, clock, url):
    c = claim(ledger)
    assert c == Claim("req-00000", 1, spec(0), 0, f"{0:064x}")
    # Visible to another connection: committed before the caller POSTs.
    other = Ledger(url)
    row = other.get("req-00000")
    assert (row.state, row.attempts, row.owner, row.submitting_at) == ("submitting", 1, "pid-1@host", clock.t)
    [a] = other.attempts_for("req-00000")
    assert (a.attempt, a.run_id, a.outcome, a.task_id, a.started_at) == (1, "run-1", None, None, clock.t)
    other.close()


def test_skip_reasons(ledger, clock):
    assert claim(ledger, "nope") == Skip("nope", "not in the ledger")
    c = claim(ledger)
    assert claim(ledger).reason == "submit in progress (attempt 1 by pid-1@host)"
    ledger.record_submitted("req-00000", c.attempt, "task-9", first_poll_at=0)
    assert claim(ledger).reason == "already submitted (task task-9)"
    ledger.record_succeeded("req-00000", task_id="task-9", effective_seed=5, finished_at=clock.t)
    assert claim(ledger).reason == "already succeeded (task task-9)"

    c = claim(ledger, "req-00001")
    ledger.record_submit_unknown("req-00001", c.attempt, "connection dropped after send")
    assert claim(ledger, "req-00001").reason == "unknown outcome: not resubmitted"

    c = claim(ledger, "req-00002", budget=1)
    ledger.record_submitted("req-00002", c.attempt, "task-2", first_poll_at=0)
    ledger.record_failed("req-00002", "TASK_STATUS_FAILED: moderation", task_id="task-2")
    assert claim(ledger, "req-00002", budget=1).reason == "retry budget exhausted (1 of 1 attempts)"


def test_failed_is_resubmittable_within_budget(ledger, clock):
    for attempt in (1, 2):
        c = claim(ledger, budget=2)
        assert c.attempt == attempt
        ledger.record_submitted(c.request_id, c.attempt, f"task-{attempt}", first_poll_at=0)
        ledger.record_failed(c.request_id, "boom", task_id=f"task-{attempt}")
    assert isinstance(claim(ledger, budget=2), Skip)
    assert [(a.attempt, a.task_id, a.outcome) for a in ledger.attempts_for("req-00000")] == [
        (1, "task-1", "submitted"),
        (2, "task-2", "submitted"),
    ]
    row = ledger.get("req-00000")
    assert (row.state, row.attempts, row.last_error) == ("failed", 2, "boom")


def test_unknown_resubmitted_only_when_allowed(ledger):
    c = claim(ledger)
    ledger.record_submit_unknown(c.request_id, c.attempt, "timeout")
    assert isinstance(claim(ledger), Skip)
    c2 = claim(ledger, allow_unknown=True)
    assert isinstance(c2, Claim) and c2.attempt == 2
    c = claim(ledger, "req-00001", budget=1)
    ledger.record_submit_unknown(c.request_id, c.attempt, "timeout")
    assert claim(ledger, "req-00001", budget=1, allow_unknown=True).reason.startswith("retry budget exhausted")


def test_per_run_cap(ledger):
    caps = SpendCaps(per_run=2, per_day=None, run_id="run-A")
    assert isinstance(claim(ledger, "req-00000", caps=caps), Claim)
    assert isinstance(claim(ledger, "req-00001", caps=caps), Claim)
    assert claim(ledger, "req-00002", caps=caps).reason == "cap reached: per-run 2"
    assert isinstance(claim(ledger, "req-00002", caps=SpendCaps(2, None, "run-B")), Claim)


def test_per_day_cap_is_a_rolling_24h_window(ledger, clock):
    caps = SpendCaps(per_run=None, per_day=2, run_id="r")
    claim(ledger, "req-00000", caps=caps)
    clock.t += 3600
    claim(ledger, "req-00001", caps=caps)
    assert claim(ledger, "req-00002", caps=caps).reason == "cap reached: per-day 2"
    clock.t += 86_400 - 3600 + 1  # the first submit left the window
    assert isinstance(claim(ledger, "req-00002", caps=caps), Claim)
    assert claim(ledger, "req-00003", caps=caps).reason == "cap reached: per-day 2"


def test_rejected_attempts_do_not_count_against_caps(ledger):
    caps = SpendCaps(per_run=1, per_day=1, run_id="r")
    c = claim(ledger, caps=caps)
    ledger.record_submit_rejected(c.request_id, c.attempt, "HTTP 429 RATE_LIMIT_EXCEEDED", retryable=True)
    assert isinstance(claim(ledger, "req-00001", caps=caps), Claim)
    assert ledger.submits_since(0) == 1 and ledger.submits_since(0, run_id="other") == 0


# --- submit outcomes -------------------------------------------------------------------------


def test_rejected_retryable_goes_back_to_planned(ledger):
    c = claim(ledger)
    ledger.record_submit_rejected(c.request_id, c.attempt, "HTTP 429", retryable=True)
    row = ledger.get(c.request_id)
    assert (row.state, row.attempts, row.last_error) == ("planned", 1, "HTTP 429")
    assert ledger.attempts_for(c.request_id)[0].outcome == "rejected"
    assert claim(ledger).attempt == 2


def test_rejected_for_good_is_failed(ledger):
    c = claim(ledger)
    ledger.record_submit_rejected(c.request_id, c.attempt, "HTTP 400 INVALID_REQUEST_BODY")
    assert ledger.get(c.request_id).state == "failed"


def test_submit_unknown(ledger):
    c = claim(ledger)
    ledger.record_submit_unknown(c.request_id, c.attempt, "read timeout after send")
    row = ledger.get(c.request_id)
    assert (row.state, row.last_error) == ("unknown", "read timeout after send")
    assert ledger.attempts_for(c.request_id)[0].outcome == "unknown"


def test_ending_an_attempt_twice_is_an_error(ledger):
    c = claim(ledger)
    ledger.record_submit_unknown(c.request_id, c.attempt, "x")
    with pytest.raises(LedgerStateError, match="is unknown"):
        ledger.record_submit_rejected(c.request_id, c.attempt, "y")


def test_record_submitted(ledger, clock):
    c = claim(ledger)
    clock.t += 2
    assert ledger.record_submitted(c.request_id, c.attempt, "task-1", first_poll_at=clock.t + 10)
    row = ledger.get(c.request_id)
    assert (row.state, row.task_id, row.submitted_at, row.next_poll_at) == (
        "submitted",
        "task-1",
        clock.t,
        clock.t + 10,
    )
    [a] = ledger.attempts_for(c.request_id)
    assert (a.task_id, a.outcome, a.ended_at) == ("task-1", "submitted", clock.t)


def test_late_task_id_after_a_newer_attempt_is_kept_on_the_attempt_row(ledger):
    c1 = claim(ledger)
    ledger.record_submit_unknown(c1.request_id, c1.attempt, "timeout")
    c2 = claim(ledger, allow_unknown=True)
    assert not ledger.record_submitted(c1.request_id, c1.attempt, "late-task", first_poll_at=0)
    assert ledger.get(c1.request_id).state == "submitting"
    assert ledger.attempts_for(c1.request_id)[0].task_id == "late-task"
    assert ledger.record_submitted(c2.request_id, c2.attempt, "task-2", first_poll_at=0)


# --- polling and terminal states -------------------------------------------------------------


def test_due_for_poll_orders_by_next_poll_at(ledger, clock):
    for i, when in [(0, 30), (1, 10), (2, 20), (3, 999)]:
        c = claim(ledger, f"req-{i:05d}")
        ledger.record_submitted(c.request_id, c.attempt, f"t{i}", first_poll_at=clock.t + when)
    due = ledger.due_for_poll(clock.t + 30, limit=10)
    assert [r.request_id for r in due] == ["req-00001", "req-00002", "req-00000"]
    assert [r.request_id for r in ledger.due_for_poll(clock.t + 30, limit=1)] == ["req-00001"]


def test_record_poll(ledger, clock):
    submit(ledger, clock=clock)
    ledger.record_poll(
        "req-00000",
        task_id="task-1",
        status="TASK_STATUS_PROCESSING",
        eta_s=12.0,
        progress=40.0,
        next_poll_at=clock.t + 12,
    )
    ledger.record_poll(
        "req-00000",
        task_id="task-1",
        status="TASK_STATUS_PROCESSING",
        eta_s=3.0,
        progress=90.0,
        next_poll_at=clock.t + 15,
    )
    row = ledger.get("req-00000")
    assert (row.last_status, row.eta_s, row.progress, row.polls, row.next_poll_at) == (
        "TASK_STATUS_PROCESSING",
        3.0,
        90.0,
        2,
        clock.t + 15,
    )
    # A row that holds no such task is left alone, and the caller is told so.
    assert not ledger.record_poll(
        "req-00001", task_id="task-1", status="x", eta_s=None, progress=None, next_poll_at=None
    )
    assert ledger.get("req-00001").polls == 0
    with pytest.raises(LedgerStateError, match="not in the ledger"):
        ledger.record_poll("nope", task_id="task-1", status="x", eta_s=None, progress=None, next_poll_at=None)


def test_succeeded(ledger, clock):
    submit(ledger, clock=clock)
    ledger.record_succeeded("req-00000", task_id="task-1", effective_seed=158881667, finished_at=clock.t + 60)
    row = ledger.get("req-00000")
    assert (row.state, row.effective_seed, row.finished_at, row.next_poll_at) == (
        "succeeded",
        158881667,
        clock.t + 60,
        None,
    )
    assert ledger.due_for_poll(clock.t + 1e6, 10) == []


def test_failed_and_unknown(ledger, clock):
    submit(ledger, "req-00000", clock=clock)
    ledger.record_failed("req-00000", "TASK_STATUS_FAILED: content policy", task_id="task-1")
    submit(ledger, "req-00001", clock=clock)
    ledger.record_unknown("req-00001", "deadline passed; last status TASK_STATUS_CANCELED", task_id="task-1")
    assert ledger.get("req-00000").state == "failed"
    u = ledger.get("req-00001")
    assert (u.state, u.last_error) == ("unknown", "deadline passed; last status TASK_STATUS_CANCELED")
    # A late poll that finds the unknown task done is still recorded.
    ledger.record_succeeded("req-00001", task_id="task-1", effective_seed=1, finished_at=clock.t)
    assert ledger.get("req-00001").state == "succeeded"


def test_terminal_transitions_require_the_task(ledger):
    assert not ledger.record_succeeded("req-00000", task_id="task-1", effective_seed=1, finished_at=0)
    assert ledger.get("req-00000").state == "planned"
    c = claim(ledger, "req-00001")
    ledger.record_submit_unknown(c.request_id, c.attempt, "timeout")
    # unknown without a task id: nothing to have succeeded
    assert not ledger.record_succeeded("req-00001", task_id="task-1", effective_seed=1, finished_at=0)
    assert ledger.get("req-00001").state == "unknown"
    with pytest.raises(LedgerStateError, match="no task id"):
        ledger.record_succeeded("req-00001", task_id=None, effective_seed=1, finished_at=0)


# --- videos, lineage, reading ----------------------------------------------------------------


def test_video_lifecycle(ledger, clock):
    submit(ledger, clock=clock)
    ledger.record_succeeded("req-00000", task_id="task-1", effective_seed=7, finished_at=clock.t)
    assert [r.request_id for r in ledger.needing_video()] == ["req-00000"]
    ledger.record_video_error("req-00000", "download truncated")
    ledger.record_video_error("req-00000", "download truncated")
    assert ledger.get("req-00000").video_attempts == 2
    assert ledger.needing_video(max_video_attempts=2) == []
    probe = {"width": 192, "height": 108, "frames": 120}
    ledger.record_video("req-00000", path="/data/v.mp4", sha256="ab" * 32, size_bytes=1234, probe=probe)
    row = ledger.get("req-00000")
    assert (row.video_path, row.video_bytes, row.probe) == ("/data/v.mp4", 1234, probe)
    assert ledger.needing_video() == []
    with pytest.raises(LedgerStateError):
        ledger.record_video("req-00001", path="x", sha256="0", size_bytes=1, probe={})


def test_lineage_marks(ledger, clock):
    submit(ledger, "req-00000", clock=clock)
    ledger.record_succeeded("req-00000", task_id="task-1", effective_seed=7, finished_at=clock.t)
    submit(ledger, "req-00001", clock=clock)
    ledger.record_failed("req-00001", "x", task_id="task-1")
    assert [r.request_id for r in ledger.needing_lineage()] == ["req-00001"]  # no video yet
    ledger.record_video("req-00000", path="p", sha256="s", size_bytes=1, probe={})
    assert {r.request_id for r in ledger.needing_lineage()} == {"req-00000", "req-00001"}
    ledger.mark_lineage(ledger.needing_lineage())
    assert ledger.needing_lineage() == []
    ledger.claim_for_submit("req-00001", owner="o", retry_budget=3, caps=NO_CAPS)
    assert ledger.needing_lineage() == []  # submitting again: nothing final to record
    assert ledger.get("req-00001").lineage_state == "failed"


def test_a_row_that_moved_on_while_its_lineage_was_written_is_not_marked(ledger, clock):
    """The lineage sync read a failure; before it marked the row, the request was resubmitted
    and succeeded. Marking it must not swallow the success: it still needs its lineage row."""
    submit(ledger, "req-00000", clock=clock)
    ledger.record_failed("req-00000", "x", task_id="task-1")
    (read,) = ledger.needing_lineage()  # the sync reads the failure and writes it to the table
    clock.t += 1
    submit(ledger, "req-00000", task="task-2", clock=clock)
    ledger.record_succeeded("req-00000", task_id="task-2", effective_seed=7, finished_at=clock.t)
    ledger.record_video("req-00000", path="p", sha256="s", size_bytes=1, probe={})
    ledger.mark_lineage([read])  # the sync marks what it wrote
    assert [(r.request_id, r.state) for r in ledger.needing_lineage()] == [("req-00000", "succeeded")]


def test_the_sensors_reads_use_indexes_also_on_a_ledger_made_before_them(url, tmp_path):
    """needing_video, needing_lineage and retryable_failed run every tick: they must search an
    index, never scan every request (the dataset may hold 20,000 finished ones). A ledger
    created before these indexes existed gets them when it is opened."""
    from sqlalchemy import event

    led = Ledger(url)
    led.plan(planned(i) for i in range(5))
    led.close()
    con = sqlite3.connect(tmp_path / "ledger.sqlite")
    for name in ("ix_requests_state_video", "ix_requests_lineage_due", "ix_requests_state_attempts"):
        con.execute(f"DROP INDEX {name}")
    con.commit()

    led = Ledger(url)  # reopened: the missing indexes are made
    statements: list[tuple[str, tuple]] = []
    event.listen(
        led.engine, "before_cursor_execute", lambda c, cur, sql, params, ctx, many: statements.append((sql, params))
    )
    led.needing_video(max_video_attempts=3)
    led.needing_lineage()
    led.retryable_failed(retry_budget=3, limit=100)
    led.close()
    selects = [(sql, params) for sql, params in statements if sql.lstrip().upper().startswith("SELECT")]
    assert len(selects) == 3
    for sql, params in selects:
        plan = " | ".join(row[3] for row in con.execute("EXPLAIN QUERY PLAN " + sql, params))
        assert "USING INDEX" in plan and "SCAN requests" not in plan, f"{sql}\n{plan}"
    con.close()


def test_needing_lineage_reads_only_the_rows_the_lineage_lacks(tmp_path):
    """On a ledger made with its indexes, the per-tick lineage query searches the partial index
    of the rows whose outcome the lineage lacks, not every stored video (8 ms a tick at 20,000
    stored videos, 0.2 ms on the partial index)."""
    from sqlalchemy import event

    led = Ledger(f"sqlite:///{tmp_path / 'ledger.sqlite'}")
    led.plan(planned(i) for i in range(5))
    statements: list[tuple[str, tuple]] = []
    event.listen(
        led.engine, "before_cursor_execute", lambda c, cur, sql, params, ctx, many: statements.append((sql, params))
    )
    led.needing_lineage()
    led.close()
    [(sql, params)] = [(q, p) for q, p in statements if q.lstrip().upper().startswith("SELECT")]
    con = sqlite3.connect(tmp_path / "ledger.sqlite")
    plan = " | ".join(row[3] for row in con.execute("EXPLAIN QUERY PLAN " + sql, params))
    con.close()
    assert "ix_requests_lineage_due" in plan and "ix_requests_state_video" not in plan, plan


def test_reading(ledger, clock):
    assert ledger.get("missing") is None
    assert ledger.oldest_pending().request_id == "req-00000"
    submit(ledger, "req-00000", clock=clock)
    ledger.record_succeeded("req-00000", task_id="task-1", effective_seed=1, finished_at=clock.t)
    assert ledger.oldest_pending().request_id == "req-00001"
    assert [r.request_id for r in ledger.rows(["succeeded"])] == ["req-00000"]
    assert len(ledger.rows()) == 5
    assert [r.request_id for r in ledger.rows(["planned"], limit=2)] == ["req-00001", "req-00002"]
    assert len(ledger.rows(["planned"], updated_before=clock.t)) == 0
    assert len(ledger.rows(["planned"], updated_before=clock.t + 1)) == 4
    assert ledger.counts_by_state() == {
        "planned": 4,
        "submitting": 0,
        "submitted": 0,
        "succeeded": 1,
        "failed": 0,
        "unknown": 0,
    }


# --- crash recovery --------------------------------------------------------------------------


def test_recover_stale_submitting(ledger, clock):
    old = claim(ledger, "req-00000")
    clock.t += 600
    fresh = claim(ledger, "req-00001")
    assert ledger.recover_stale_submitting(older_than_s=300) == ["req-00000"]
    row = ledger.get("req-00000")
    assert row.state == "unknown" and "never recorded a task id" in row.last_error
    assert ledger.attempts_for("req-00000")[0].outcome == "unknown"
    assert ledger.get("req-00001").state == "submitting"
    assert claim(ledger, "req-00000").reason == "unknown outcome: not resubmitted"
    assert ledger.recover_stale_submitting(older_than_s=300, now=clock.t + 301) == ["req-00001"]
    # The crashed submitter's late answer still lands.
    assert ledger.record_submitted(old.request_id, old.attempt, "late", first_poll_at=0)
    assert ledger.record_submitted(fresh.request_id, fresh.attempt, "late2", first_poll_at=0)


def test_recover_submitting_whose_owner_is_gone(ledger, clock):
    ledger.claim_for_submit("req-00000", owner="pid-1@host", retry_budget=3, caps=NO_CAPS)
    ledger.claim_for_submit("req-00001", owner="pid-2@host", retry_budget=3, caps=NO_CAPS)
    alive = {"pid-2@host"}
    assert ledger.recover_stale_submitting(3600, owner_alive=lambda owner: owner in alive) == ["req-00000"]
    assert "its owner is gone" in ledger.get("req-00000").last_error
    assert ledger.get("req-00001").state == "submitting"


def test_record_unknown_on_a_submitting_row_closes_its_attempt(ledger):
    c = claim(ledger)
    ledger.record_unknown(c.request_id, "submitter stopped", task_id=None)
    assert ledger.get(c.request_id).state == "unknown"
    assert ledger.attempts_for(c.request_id)[0].outcome == "unknown"
    assert not ledger.record_unknown("req-00001", "x", task_id=None)  # planned: nothing to be unknown
    assert ledger.get("req-00001").state == "planned"


# --- concurrency -----------------------------------------------------------------------------


def _claim_all(url: str, worker: str, ids: list[str], out) -> None:
    led = Ledger(url)
    caps = SpendCaps(per_run=None, per_day=20, run_id=f"run-{worker}")
    got = []
    for rid in ids:
        c = led.claim_for_submit(rid, owner=worker, retry_budget=3, caps=caps)
        if isinstance(c, Claim):
            got.append(rid)
    led.close()
    out.put((worker, got))


def test_two_processes_respect_caps_and_never_double_claim(url):
    led = Ledger(url)
    ids = [p.request_id for p in (planned(i) for i in range(50))]
    led.plan(planned(i) for i in range(50))
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_claim_all, args=(url, w, order, out)) for w, order in (("A", ids), ("B", ids[::-1]))]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    claimed = results["A"] + results["B"]
    assert len(claimed) == 20
    assert len(set(claimed)) == 20
    assert led.counts_by_state()["submitting"] == 20
    assert led.submits_since(0) == 20
    assert all(len(led.attempts_for(rid)) == 1 for rid in claimed)
    led.close()


# --- answers about a task the request no longer holds (issue 10, case 1) ------------------------


def test_a_late_answer_about_an_old_task_is_a_reported_no_op(ledger, clock):
    """Task 1 failed; a fast poller recorded it and the request was resubmitted (task 2). The
    slow poller's answers about task 1 arrive now: none may touch the row."""
    submit(ledger, task="task-1", clock=clock)
    assert ledger.record_failed("req-00000", "TASK_STATUS_FAILED", task_id="task-1")
    submit(ledger, task="task-2", clock=clock)
    before = ledger.get("req-00000")
    assert (before.state, before.task_id, before.attempts) == ("submitted", "task-2", 2)

    assert ledger.record_failed("req-00000", "TASK_STATUS_FAILED", task_id="task-1") is False
    assert ledger.record_succeeded("req-00000", task_id="task-1", effective_seed=1, finished_at=clock.t) is False
    assert (
        ledger.record_poll(
            "req-00000", task_id="task-1", status="TASK_STATUS_PROCESSING", eta_s=1.0, progress=5.0, next_poll_at=0
        )
        is False
    )
    assert ledger.record_unknown("req-00000", "deadline", task_id="task-1") is False
    assert ledger.get("req-00000") == before

    # The answers about task 2 do apply.
    assert ledger.record_succeeded("req-00000", task_id="task-2", effective_seed=3, finished_at=clock.t)
    assert ledger.get("req-00000").state == "succeeded"


def test_a_failed_tasks_reason_stays_on_its_attempt_after_resubmission(ledger, clock):
    """The request's last_error is cleared when it is resubmitted and succeeds; why the paid
    first attempt failed must still be in the ledger (and a stale answer must not write it)."""
    submit(ledger, task="task-1", clock=clock)
    assert ledger.record_failed("req-00000", "TASK_STATUS_FAILED: moderation", task_id="task-1")
    submit(ledger, task="task-2", clock=clock)
    assert not ledger.record_failed("req-00000", "stale", task_id="task-1")
    assert ledger.record_succeeded("req-00000", task_id="task-2", effective_seed=3, finished_at=clock.t)
    assert ledger.get("req-00000").last_error is None
    errors = {a.task_id: a.error for a in ledger.attempts_for("req-00000")}
    assert errors == {"task-1": "TASK_STATUS_FAILED: moderation", "task-2": None}


def test_a_late_failure_between_record_and_resubmit_is_a_no_op(ledger, clock):
    """The slow answer lands while the request is failed (or being resubmitted)."""
    submit(ledger, task="task-1", clock=clock)
    assert ledger.record_failed("req-00000", "first", task_id="task-1")
    assert not ledger.record_failed("req-00000", "second", task_id="task-1")  # already failed
    assert ledger.get("req-00000").last_error == "first"
    c = claim(ledger)
    assert not ledger.record_failed("req-00000", "late", task_id="task-1")  # submitting, no task yet
    assert not ledger.record_unknown("req-00000", "late", task_id="task-1")
    assert ledger.get("req-00000").state == "submitting"
    assert ledger.record_submitted("req-00000", c.attempt, "task-2", first_poll_at=0)


# --- poll answers recorded in batches (issue 15) -------------------------------------------------


def commits(led: Ledger) -> list[int]:
    """A list that grows by one for every transaction the ledger commits."""
    seen: list[int] = []
    event.listen(led.engine, "commit", lambda conn: seen.append(1))
    return seen


def test_a_batch_of_poll_answers_applies_each_like_a_single_answer_in_one_commit(ledger, clock):
    """Succeeded, failed and still-processing rows in one batch, beside a stale answer (the
    request moved on to task 2), an ``unknown`` row a late poll finds done, and a request the
    ledger does not hold: each gets the verdict and the write a single call would give."""
    for i in range(4):
        submit(ledger, f"req-{i:05d}", task="task-1", clock=clock)
    assert ledger.record_failed("req-00003", "TASK_STATUS_FAILED: first", task_id="task-1")
    submit(ledger, "req-00003", task="task-2", clock=clock)  # resubmitted: answers about task 1 are stale
    submit(ledger, "req-00004", task="task-4", clock=clock)
    assert ledger.record_unknown("req-00004", "deadline", task_id="task-4")
    stale_before = ledger.get("req-00003")
    clock.t += 60
    written = commits(ledger)
    verdicts = ledger.record_poll_answers(
        [
            PollAnswer("req-00000", "task-1", "succeeded", effective_seed=7, finished_at=clock.t - 1),
            PollAnswer("req-00001", "task-1", "failed", reason="TASK_STATUS_FAILED: moderation"),
            PollAnswer("req-00002", "task-1", "submitted", "TASK_STATUS_PROCESSING", 9.0, 50.0, clock.t + 9),
            PollAnswer("req-00003", "task-1", "failed", reason="stale"),
            PollAnswer("req-00004", "task-4", "succeeded", effective_seed=3, finished_at=clock.t),
            PollAnswer("nope", "task-1", "succeeded", effective_seed=1, finished_at=clock.t),
        ]
    )
    assert verdicts == [True, True, True, False, True, None]
    assert len(written) == 1

    done, failed, running = (ledger.get(f"req-{i:05d}") for i in range(3))
    assert (done.state, done.effective_seed, done.finished_at, done.next_poll_at) == ("succeeded", 7, clock.t - 1, None)
    assert (failed.state, failed.last_error, failed.finished_at) == (
        "failed",
        "TASK_STATUS_FAILED: moderation",
        clock.t,
    )
    assert ledger.attempts_for("req-00001")[0].error == "TASK_STATUS_FAILED: moderation"
    assert (running.state, running.last_status, running.eta_s, running.progress, running.polls) == (
        "submitted",
        "TASK_STATUS_PROCESSING",
        9.0,
        50.0,
        1,
    )
    assert (running.next_poll_at, running.updated_at) == (clock.t + 9, clock.t)
    assert ledger.get("req-00003") == stale_before  # the stale answer wrote nothing
    assert [a.error for a in ledger.attempts_for("req-00003")] == ["TASK_STATUS_FAILED: first", None]
    assert ledger.get("req-00004").state == "succeeded"


def test_a_batch_of_only_stale_answers_changes_nothing(ledger, clock):
    """Another poller recorded these tasks' ends first: the whole batch is a reported no-op."""
    for i in range(3):
        submit(ledger, f"req-{i:05d}", task=f"task-{i}", clock=clock)
        assert ledger.record_succeeded(f"req-{i:05d}", task_id=f"task-{i}", effective_seed=i, finished_at=clock.t)
    before = [ledger.get(f"req-{i:05d}") for i in range(3)]
    clock.t += 5
    answers = [
        PollAnswer("req-00000", "task-0", "failed", reason="late"),
        PollAnswer("req-00001", "task-1", "succeeded", effective_seed=99, finished_at=clock.t),
        PollAnswer("req-00002", "task-2", "submitted", "TASK_STATUS_PROCESSING", 1.0, 1.0, clock.t),
    ]
    assert ledger.record_poll_answers(answers) == [False, False, False]
    assert [ledger.get(f"req-{i:05d}") for i in range(3)] == before
    assert all(a.error is None for i in range(3) for a in ledger.attempts_for(f"req-{i:05d}"))


def test_a_batch_takes_one_answer_per_request_each_naming_its_task(ledger, clock):
    submit(ledger, "req-00000", task="task-1", clock=clock)
    submit(ledger, "req-00001", task="task-1", clock=clock)
    twice = PollAnswer("req-00000", "task-1", "failed", reason="x")
    with pytest.raises(ValueError, match="one answer per request"):
        ledger.record_poll_answers([twice, twice])
    with pytest.raises(LedgerStateError, match="no task id"):
        ledger.record_poll_answers([twice, PollAnswer("req-00001", None, "failed", reason="x")])  # type: ignore[arg-type]
    assert ledger.counts_by_state()["submitted"] == 2
    assert ledger.record_poll_answers([]) == []


def test_record_submitted_never_replaces_a_task_id(ledger, clock):
    """Replaying a journaled task id is idempotent and cannot overwrite another task."""
    c = claim(ledger)
    assert ledger.record_submitted(c.request_id, c.attempt, "task-1", first_poll_at=0)
    assert not ledger.record_submitted(c.request_id, c.attempt, "task-1", first_poll_at=0)
    assert not ledger.record_submitted(c.request_id, c.attempt, "task-X", first_poll_at=0)
    assert ledger.get(c.request_id).task_id == "task-1"
    assert [a.task_id for a in ledger.attempts_for(c.request_id)] == ["task-1"]
    # An unknown row (deadline passed) that holds its task is not taken over either.
    assert ledger.record_unknown(c.request_id, "deadline", task_id="task-1")
    assert not ledger.record_submitted(c.request_id, c.attempt, "task-X", first_poll_at=0)
    assert ledger.get(c.request_id).task_id == "task-1"


def test_video_recording_is_conditioned_on_the_task(ledger, clock):
    submit(ledger, task="task-1", clock=clock)
    ledger.record_succeeded("req-00000", task_id="task-1", effective_seed=1, finished_at=clock.t)
    with pytest.raises(LedgerStateError):
        ledger.record_video("req-00000", path="p", sha256="s", size_bytes=1, probe={}, task_id="task-0")
    ledger.record_video("req-00000", path="p", sha256="s", size_bytes=1, probe={}, task_id="task-1")
    assert ledger.get("req-00000").video_sha256 == "s"


def test_recovery_does_not_touch_a_newer_attempt(ledger, clock):
    """recover_stale_submitting decides and updates per attempt, in one transaction."""
    c = claim(ledger)
    clock.t += 1000
    assert ledger.recover_stale_submitting(older_than_s=300) == [c.request_id]
    c2 = claim(ledger, allow_unknown=True)
    assert c2.attempt == 2
    assert ledger.recover_stale_submitting(older_than_s=300) == []
    assert ledger.get(c.request_id).state == "submitting"


# --- the retry budget and the caps count what may have cost money (issue 10, case 2) ------------


def test_unsent_attempts_count_against_nothing_refused_ones_against_the_budget(ledger):
    caps = SpendCaps(per_run=2, per_day=None, run_id="r")
    for _ in range(4):  # 429s / refused keys / connection refused: back to planned, counted nowhere
        c = claim(ledger, caps=caps, budget=2)
        ledger.record_submit_rejected(c.request_id, c.attempt, "HTTP 429", retryable=True)
    c = claim(ledger, caps=caps, budget=2)
    assert isinstance(c, Claim) and c.attempt == 5
    ledger.record_submit_rejected(c.request_id, c.attempt, "HTTP 404 NOT_FOUND: no such route")
    row = ledger.get(c.request_id)
    assert (row.state, row.last_error) == ("failed", "HTTP 404 NOT_FOUND: no such route")
    assert ledger.attempts_for(c.request_id)[-1].outcome == "refused"
    assert ledger.submits_since(0) == 0  # refused: no task, no money
    c = claim(ledger, caps=caps, budget=2)  # within the budget: one refused attempt so far
    ledger.record_submit_rejected(c.request_id, c.attempt, "HTTP 404 again")
    assert claim(ledger, caps=caps, budget=2).reason == "retry budget exhausted (2 of 2 attempts)"


def test_unknown_submits_count_against_caps_and_budget(ledger):
    caps = SpendCaps(per_run=1, per_day=None, run_id="r")
    c = claim(ledger, caps=caps)
    ledger.record_submit_unknown(c.request_id, c.attempt, "HTTP 202 without a task id")
    assert claim(ledger, "req-00001", caps=caps).reason == "cap reached: per-run 1"
    assert claim(ledger, budget=1, allow_unknown=True).reason == "retry budget exhausted (1 of 1 attempts)"


# --- read-only and concurrent creation (issue 10, cases 12 and 9) -----------------------------------


def test_read_only_ledger_reads_and_refuses_writes(ledger, url, tmp_path):
    submit(ledger)
    ledger.close()
    ro = Ledger(url, read_only=True)
    try:
        assert ro.counts_by_state()["submitted"] == 1
        assert ro.get("req-00000").task_id == "task-1"
        with pytest.raises(LedgerStateError, match="read-only"):
            ro.plan([planned(99)])
    finally:
        ro.close()
    assert Ledger(url).get("req-00099") is None


def test_read_only_ledger_on_a_missing_file_creates_nothing(tmp_path):
    path = tmp_path / "absent.sqlite"
    ro = Ledger(f"sqlite:///{path}", read_only=True)
    with pytest.raises(OperationalError):
        ro.counts_by_state()
    ro.close()
    assert not path.exists()


def _create_and_plan(url: str, barrier, out) -> None:
    try:
        barrier.wait(30)
        led = Ledger(url)
        led.plan(planned(i) for i in range(20))
        out.put(("ok", led.counts_by_state()["planned"]))
        led.close()
    except Exception as exc:  # reported to the parent
        out.put(("error", f"{type(exc).__name__}: {exc}"))


@pytest.mark.timeout(120)
def test_two_processes_create_one_fresh_ledger_at_once(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    for round_ in range(3):
        url = f"sqlite:///{tmp_path / f'fresh-{round_}.sqlite'}"
        barrier, out = ctx.Barrier(3), ctx.Queue()
        procs = [ctx.Process(target=_create_and_plan, args=(url, barrier, out)) for _ in range(3)]
        for p in procs:
            p.start()
        results = [out.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(timeout=30)
        assert results == [("ok", 20)] * 3, results
