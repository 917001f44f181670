"""The sensor's rules on their own: ledger rows in, a TickPlan out (no Dagster, no HTTP)."""

from __future__ import annotations

import dataclasses

import pytest

from vidu_pipeline import decisions
from vidu_pipeline.decisions import TickRules
from vidu_pipeline.ledger import FAILED, PLANNED, SUBMITTED, SUCCEEDED, UNKNOWN, TaskRow

NOW = 1_000_000.0
RULES = TickRules()


def row(rid: str, state: str = SUCCEEDED, *, age_s: float = 1.0, **kw) -> TaskRow:
    base = dict(
        request_id=rid,
        subject_id="cat",
        seed=1,
        fingerprint="f" * 64,
        spec_json="{}",
        state=state,
        task_id=f"task-{rid}",
        attempts=1,
        last_error=None,
        effective_seed=None,
        created_at=NOW - 1000,
        updated_at=NOW - age_s,
        submitting_at=None,
        submitted_at=None,
        finished_at=None,
        next_poll_at=None,
        last_status=None,
        eta_s=None,
        progress=None,
        polls=0,
        owner=None,
        video_path=None,
        video_sha256=None,
        video_bytes=None,
        probe_json=None,
        video_attempts=0,
        lineage_state=None,
    )
    return TaskRow(**{**base, **kw})


# --- collecting videos -------------------------------------------------------------------------


def test_a_video_is_collected_when_its_task_finished_this_tick():
    rows = [row("a"), row("b")]
    assert [r.request_id for r in decisions.videos_to_collect(rows, {"a"}, NOW, RULES)] == ["a"]


def test_a_video_another_run_is_fetching_is_left_alone_until_that_run_is_presumed_dead():
    working = row("a", age_s=RULES.stuck_after_s - 1)
    dead = row("b", age_s=RULES.stuck_after_s + 1)
    assert [r.request_id for r in decisions.videos_to_collect([working, dead], set(), NOW, RULES)] == ["b"]


def test_a_failed_download_is_retried_after_a_backoff_that_grows_with_its_attempts():
    once_recent = row("a", video_attempts=1, age_s=RULES.video_retry_after_s - 1)
    once_due = row("b", video_attempts=1, age_s=RULES.video_retry_after_s + 1)
    twice_not_due = row("c", video_attempts=2, age_s=RULES.video_retry_after_s + 1)
    twice_due = row("d", video_attempts=2, age_s=2 * RULES.video_retry_after_s + 1)
    chosen = decisions.videos_to_collect([once_recent, once_due, twice_not_due, twice_due], set(), NOW, RULES)
    assert [r.request_id for r in chosen] == ["b", "d"]


def test_one_tick_collects_at_most_a_batch():
    rows = [row(f"r{i}") for i in range(30)]
    rules = dataclasses.replace(RULES, max_batch=7)
    chosen = decisions.videos_to_collect(rows, {r.request_id for r in rows}, NOW, rules)
    assert [r.request_id for r in chosen] == [f"r{i}" for i in range(7)]


# --- submitting ----------------------------------------------------------------------------------


def test_a_task_that_failed_this_tick_is_resubmitted_within_its_budget_only():
    within = row("a", FAILED, attempts=RULES.retry_budget - 1)
    spent = row("b", FAILED, attempts=RULES.retry_budget)
    chosen = decisions.requests_to_submit([within, spent], [], {"a", "b"}, NOW, RULES)
    assert [r.request_id for r in chosen] == ["a"]


def test_a_request_the_service_rejected_is_never_resubmitted():
    rejected = row("a", FAILED, task_id=None, attempts=1)
    assert decisions.requests_to_submit([rejected], [], {"a"}, NOW + 10_000, RULES) == []


def test_an_old_failure_is_resubmitted_only_once_its_run_is_presumed_dead():
    fresh = row("a", FAILED, age_s=RULES.stuck_after_s - 1)
    stale = row("b", FAILED, age_s=RULES.stuck_after_s + 1)
    chosen = decisions.requests_to_submit([fresh, stale], [], set(), NOW, RULES)
    assert [r.request_id for r in chosen] == ["b"]


def test_planned_requests_are_auto_submitted_after_a_grace_period_and_only_when_enabled():
    young = row("a", PLANNED, task_id=None, attempts=0, age_s=RULES.auto_submit_after_s - 1)
    old = row("b", PLANNED, task_id=None, attempts=0, age_s=RULES.auto_submit_after_s + 1)
    assert [r.request_id for r in decisions.requests_to_submit([], [young, old], set(), NOW, RULES)] == ["b"]
    off = dataclasses.replace(RULES, auto_submit=False)
    assert decisions.requests_to_submit([], [young, old], set(), NOW, off) == []


def test_a_row_that_is_not_failed_any_more_is_not_resubmitted():
    # Another poller resubmitted it between the ledger read and this decision.
    moved_on = row("a", SUBMITTED, attempts=2)
    assert decisions.requests_to_submit([moved_on], [], {"a"}, NOW, RULES) == []


# --- lineage and the whole tick --------------------------------------------------------------------


def test_only_ended_outcomes_not_about_to_be_retried_go_to_lineage():
    rows = [row("f", FAILED), row("u", UNKNOWN), row("s", SUCCEEDED), row("retry", FAILED)]
    ended = decisions.ended_needing_lineage(rows, {"retry"})
    assert [r.request_id for r in ended] == ["f", "u"]


def test_plan_tick_combines_the_rules():
    plan = decisions.plan_tick(
        now=NOW,
        succeeded_now={"ok"},
        failed_now={"again"},
        needing_video=[row("ok"), row("busy")],
        failed=[row("again", FAILED), row("spent", FAILED, attempts=3)],
        planned=[],
        needing_lineage=[row("again", FAILED), row("spent", FAILED, attempts=3), row("lost", UNKNOWN)],
    )
    assert plan == decisions.TickPlan(collect=["ok"], submit=["again"], lineage=["spent", "lost"])
    assert not plan.empty
    assert decisions.plan_tick(
        now=NOW, succeeded_now=set(), failed_now=set(), needing_video=[], failed=[], planned=[], needing_lineage=[]
    ).empty


# --- batches ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("positions", "max_gap", "expected"),
    [
        ([0, 1, 2], 64, [[0, 1, 2]]),
        ([0, 64, 128], 64, [[0, 64, 128]]),
        ([0, 65], 64, [[0], [65]]),
        ([200, 3, 100, 4], 10, [[3, 4], [100], [200]]),
        ([], 64, []),
    ],
)
def test_batches_are_cut_where_partitions_lie_far_apart(positions, max_gap, expected):
    order = {f"k{i}": i for i in range(300)}
    groups = decisions.split_batches([f"k{p}" for p in positions], order, max_gap)
    assert groups == [[f"k{p}" for p in g] for g in expected]


def test_batches_leave_out_ids_without_a_partition_and_repeat_none():
    order = {"a": 0, "b": 1}
    assert decisions.split_batches(["b", "ghost", "a", "b"], order, 64) == [["a", "b"]]
