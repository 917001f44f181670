"""What the next sensor tick does, decided from ledger rows alone (no Dagster, no HTTP).

The task sensor polls, reads the ledger, and asks this module what to run: which finished
videos to collect, which requests to (re)submit, which ended requests still need a lineage
run, and how to cut a batch into partition ranges. Keeping these rules here means each one
has a unit test of its own, and the sensor is only the glue that turns a :class:`TickPlan`
into Dagster ``RunRequest``\\ s.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Iterable, Mapping, Sequence

from .ledger import FAILED, UNKNOWN, TaskRow


@dataclasses.dataclass(frozen=True)
class TickRules:
    """The timings and sizes the rules use; the sensor's defaults are the documented ones."""

    retry_budget: int = 3
    auto_submit: bool = True
    stuck_after_s: float = 300.0  # a batch whose run died is asked for again after this
    video_retry_after_s: float = 10.0  # × attempts: a failed download is tried again after this
    auto_submit_after_s: float = 30.0  # leave fresh plans to the run that planned them
    max_batch: int = 500  # requests per run asked for in one tick


@dataclasses.dataclass(frozen=True)
class TickPlan:
    """Request ids per kind of run; empty lists mean no run of that kind this tick."""

    collect: list[str]
    submit: list[str]
    lineage: list[str]

    @property
    def empty(self) -> bool:
        return not (self.collect or self.submit or self.lineage)


def videos_to_collect(
    needing_video: Iterable[TaskRow], fresh: Collection[str], now: float, rules: TickRules
) -> list[TaskRow]:
    """Succeeded tasks without a stored video that no live run is working on: those that
    finished this tick, those whose run died (stuck), and those whose last attempt recorded
    an error (after a back-off that grows with the attempts)."""
    due = [
        r
        for r in needing_video
        if r.request_id in fresh
        or now - r.updated_at > rules.stuck_after_s
        or (r.video_attempts > 0 and now - r.updated_at > rules.video_retry_after_s * r.video_attempts)
    ]
    return due[: rules.max_batch]


def requests_to_submit(
    failed: Iterable[TaskRow],
    planned: Iterable[TaskRow],
    newly_failed: Collection[str],
    now: float,
    rules: TickRules,
) -> list[TaskRow]:
    """Failed tasks within the retry budget (at once when they failed this tick, else once
    the run that should have resubmitted them is presumed dead), then planned requests that
    nobody submitted (the schedule planned them, or a spend cap held them back)."""
    chosen = [
        r
        for r in failed
        if r.state == FAILED
        and r.attempts < rules.retry_budget
        and r.task_id is not None  # rejected by the service: resubmitting would be refused again
        and (r.request_id in newly_failed or now - r.updated_at > rules.stuck_after_s)
    ]
    if rules.auto_submit:
        chosen += [r for r in planned if now - r.updated_at > rules.auto_submit_after_s]
    return chosen[: rules.max_batch]


def ended_needing_lineage(needing_lineage: Iterable[TaskRow], resubmitting: Collection[str]) -> list[TaskRow]:
    """Failed or unknown outcomes the lineage table lacks, except those about to be retried
    (their row would be superseded at once)."""
    return [r for r in needing_lineage if r.state in (FAILED, UNKNOWN) and r.request_id not in resubmitting]


def plan_tick(
    *,
    now: float,
    succeeded_now: Collection[str],
    failed_now: Collection[str],
    needing_video: Iterable[TaskRow],
    failed: Iterable[TaskRow],
    planned: Iterable[TaskRow],
    needing_lineage: Iterable[TaskRow],
    rules: TickRules = TickRules(),
) -> TickPlan:
    """The whole tick's decision from what the poll just saw and what the ledger holds."""
    collect = videos_to_collect(needing_video, succeeded_now, now, rules)
    submit = requests_to_submit(failed, planned, failed_now, now, rules)
    resubmitting = {r.request_id for r in submit}
    ended = ended_needing_lineage(needing_lineage, resubmitting)
    return TickPlan(
        collect=[r.request_id for r in collect],
        submit=[r.request_id for r in submit],
        lineage=[r.request_id for r in ended],
    )


def split_batches(request_ids: Sequence[str], order: Mapping[str, int], max_gap: int) -> list[list[str]]:
    """Cut a batch into runs over compact partition ranges.

    A run over a partition range writes an event for every partition in it, so requests far
    apart in partition order (tasks finishing out of order) go to separate runs whenever the
    gap between neighbours exceeds ``max_gap``. Ids unknown to ``order`` (no partition yet)
    are left out; each group is in partition order.
    """
    ids = sorted((r for r in dict.fromkeys(request_ids) if r in order), key=order.__getitem__)
    groups: list[list[str]] = []
    for rid in ids:
        if groups and order[rid] - order[groups[-1][-1]] <= max_gap:
            groups[-1].append(rid)
        else:
            groups.append([rid])
    return groups
