"""Following submitted tasks to their end: poll those due, record each answer against the task
that was polled, and stop at the time budget so a sensor tick ends in time.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import logging
import statistics
import time

from sqlalchemy.exc import SQLAlchemyError

from ..api import errors
from ..api.client import ViduClient, poll_delay
from ..api.task_result import TaskResult
from ..ledger import Ledger, LedgerStateError
from ..storage import StorageError
from .halting import STOP, db_reason

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PollingPolicy:
    min_interval_s: float = 1.0
    max_interval_s: float = 60.0
    first_poll_default_s: float = 2.0  # before any task has finished, how soon to look
    deadline_s: float = 3600.0  # no terminal status by then: reported as unknown


@dataclasses.dataclass
class PollReport:
    polled: int = 0
    succeeded: list[str] = dataclasses.field(default_factory=list)
    failed: list[str] = dataclasses.field(default_factory=list)
    unknown: list[str] = dataclasses.field(default_factory=list)
    errors: list[str] = dataclasses.field(default_factory=list)
    stale: list[str] = dataclasses.field(default_factory=list)  # answers another poller overtook
    out_of_time: bool = False


def first_poll_delay(ledger: Ledger, policy: PollingPolicy) -> float:
    """Median latency of recently finished tasks, so the first poll usually finds them done."""
    recent = [
        r.finished_at - r.submitted_at
        for r in ledger.rows(states=["succeeded"], newest_first=True, limit=50)
        if r.finished_at and r.submitted_at
    ]
    guess = statistics.median(recent) if recent else policy.first_poll_default_s
    return max(policy.min_interval_s, min(policy.max_interval_s, guess))


def poll_due(
    ledger: Ledger,
    client: ViduClient,
    *,
    limit: int = 2000,
    time_budget_s: float = 30.0,
    workers: int = 16,
    policy: PollingPolicy = PollingPolicy(),
    now: float | None = None,
) -> PollReport:
    """Poll the tasks that are due, record what they say, and stop at the time budget."""
    poller = _Poller(ledger, client, policy, time_budget_s)
    now = time.time() if now is None else now
    rows = ledger.due_for_poll(now, limit)
    if rows:
        with cf.ThreadPoolExecutor(max_workers=max(1, min(workers, len(rows)))) as pool:
            for future in [pool.submit(poller.one, row) for row in rows]:
                future.result()
    report = poller.report
    if report.errors:
        log.warning(
            "%d of %d poll(s) failed and were rescheduled, e.g. %s",
            len(report.errors),
            report.polled,
            "; ".join(report.errors[:3]),
        )
    return report


class _Poller:
    """One call of :func:`poll_due`: what its polls share — the report and the time budget."""

    def __init__(self, ledger: Ledger, client: ViduClient, policy: PollingPolicy, time_budget_s: float) -> None:
        self.started = time.monotonic()
        self.ledger, self.client, self.policy = ledger, client, policy
        self.time_budget_s = time_budget_s
        self.report = PollReport()

    def one(self, row) -> None:
        try:
            self._record(row)
        except LedgerStateError as exc:
            log.debug("%s moved on while polling: %s", row.request_id, exc)
        except SQLAlchemyError as exc:  # e.g. disk full: nothing is lost, the task is polled again
            raise StorageError(
                f"could not record the poll of task {row.task_id} (request {row.request_id}) in the ledger "
                f"({db_reason(exc)}); it will be polled again"
            ) from None

    def _noted(self, applied: bool, bucket: list[str], row) -> None:
        """Another poller (a second generate, the daemon's sensor) may have recorded this task
        and resubmitted the request: its stale answer was not applied."""
        if applied:
            bucket.append(row.request_id)
        else:
            self.report.stale.append(row.request_id)

    def _record(self, row) -> None:
        if STOP.is_set():
            return
        if time.monotonic() - self.started > self.time_budget_s:
            self.report.out_of_time = True
            return
        t = time.time()
        if row.submitted_at and t - row.submitted_at > self.policy.deadline_s:
            reason = (
                f"no terminal status {self.policy.deadline_s:.0f} s after submit "
                f"(last status {row.last_status or 'none'}); task {row.task_id} may still finish"
            )
            self._noted(
                self.ledger.record_unknown(row.request_id, reason, task_id=row.task_id), self.report.unknown, row
            )
            return
        result = self._ask(row, t)
        if result is not None:
            self._apply(row, result)

    def _ask(self, row, t: float) -> TaskResult | None:
        """The task's result, or None when the poll told nothing (already recorded)."""
        task = row.task_id
        try:
            return self.client.get_task_result(task)
        except errors.RateLimited as exc:
            _reschedule(self.ledger, row, t + (exc.retry_after or self.policy.max_interval_s / 2))
            self.report.errors.append(f"{row.request_id}: rate limited")
        except errors.TaskNotFound as exc:
            reason = f"the service no longer knows task {task}: {exc}"
            self._noted(self.ledger.record_unknown(row.request_id, reason, task_id=task), self.report.unknown, row)
        except errors.AuthError:
            raise
        except errors.ViduError as exc:
            backoff = min(self.policy.max_interval_s, self.policy.min_interval_s * 2 ** min(6, row.polls or 0))
            _reschedule(self.ledger, row, t + backoff)
            self.report.errors.append(f"{row.request_id}: {exc}")
        finally:
            self.report.polled += 1
        return None

    def _apply(self, row, result: TaskResult) -> None:
        """Record a terminal answer, or when to look again."""
        task, ledger = row.task_id, self.ledger
        if result.succeeded:
            finished = _finished_at(result) or time.time()
            applied = ledger.record_succeeded(
                row.request_id, task_id=task, effective_seed=result.seed, finished_at=finished
            )
            self._noted(applied, self.report.succeeded, row)
        elif result.failed:
            applied = ledger.record_failed(row.request_id, result.reason or "the service gave no reason", task_id=task)
            self._noted(applied, self.report.failed, row)
        else:
            if not result.known_status:
                log.warning(
                    "task %s reports unfamiliar status %r; still polling until its deadline", task, result.status
                )
            delay = poll_delay(result, self.policy.min_interval_s, self.policy.max_interval_s)
            ledger.record_poll(
                row.request_id,
                task_id=task,
                status=result.status,
                eta_s=result.eta_seconds,
                progress=result.progress_percent,
                next_poll_at=time.time() + delay,
            )


def _reschedule(ledger: Ledger, row, at: float) -> None:
    """A poll that told us nothing new (rate limited, a transient error): look again at ``at``,
    keeping what we last knew of the task."""
    ledger.record_poll(
        row.request_id,
        task_id=row.task_id,
        status=row.last_status,
        eta_s=row.eta_s,
        progress=row.progress,
        next_poll_at=at,
    )


def _finished_at(result: TaskResult) -> float | None:
    ms = result.debug_times_ms.get("complete_time_ms")
    return ms / 1000.0 if ms else None
