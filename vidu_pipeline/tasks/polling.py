"""Following submitted tasks to their end: poll those due, record each answer against the task
that was polled, and stop at the time budget so a sensor tick ends in time.

The pool's threads only ask; the calling thread records the answers in chunks, one ledger
transaction each (a commit per answer serialized every thread behind the ledger's write lock).
A crash loses at most one chunk of answers, which costs a re-poll, never a payment.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import dataclasses
import logging
import statistics
import time

from sqlalchemy.exc import SQLAlchemyError

from ..api import errors
from ..api.client import ViduClient, poll_delay
from ..api.task_result import TaskResult
from ..ledger import FAILED, SUBMITTED, SUCCEEDED, Ledger, LedgerStateError
from ..ledger.polling import PollAnswer
from ..storage import StorageError
from .halting import STOP, db_reason

log = logging.getLogger(__name__)

ANSWERS_PER_WRITE = 250  # poll answers recorded in one ledger transaction, at most


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
            futures = [pool.submit(poller.one, row) for row in rows]
            try:
                for future in cf.as_completed(futures):
                    poller.keep(future.result())
            except Exception:  # e.g. the key was refused: what was read before it is still true
                with contextlib.suppress(StorageError):
                    poller.write()
                raise
        poller.write()
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
    """One call of :func:`poll_due`: what its polls share — the report, the time budget, and
    the answers waiting to be recorded."""

    def __init__(self, ledger: Ledger, client: ViduClient, policy: PollingPolicy, time_budget_s: float) -> None:
        self.started = time.monotonic()
        self.ledger, self.client, self.policy = ledger, client, policy
        self.time_budget_s = time_budget_s
        self.report = PollReport()
        self.answers: list[PollAnswer] = []

    def one(self, row) -> PollAnswer | None:
        """Poll one task (in a pool thread): its answer to record, or None."""
        try:
            return self._poll(row)
        except LedgerStateError as exc:
            log.debug("%s moved on while polling: %s", row.request_id, exc)
        except SQLAlchemyError as exc:  # e.g. disk full: nothing is lost, the task is polled again
            raise StorageError(
                f"could not record the poll of task {row.task_id} (request {row.request_id}) in the ledger "
                f"({db_reason(exc)}); it will be polled again"
            ) from None
        return None

    def keep(self, answer: PollAnswer | None) -> None:
        """Queue an answer; record the queue once it is a full chunk."""
        if answer is not None:
            self.answers.append(answer)
        if len(self.answers) >= ANSWERS_PER_WRITE:
            self.write()

    def write(self) -> None:
        """Record the queued answers in one transaction and note what each one did."""
        chunk, self.answers = self.answers, []
        if not chunk:
            return
        try:
            applied = self.ledger.record_poll_answers(chunk)
        except SQLAlchemyError as exc:  # e.g. disk full: nothing is lost, the tasks are polled again
            first = chunk[0]
            raise StorageError(
                f"could not record {len(chunk)} poll answer(s) (e.g. task {first.task_id} of request "
                f"{first.request_id}) in the ledger ({db_reason(exc)}); they will be polled again"
            ) from None
        buckets = {SUCCEEDED: self.report.succeeded, FAILED: self.report.failed}
        for answer, done in zip(chunk, applied):
            if done is None:
                log.debug("%s moved on while polling: it is no longer in the ledger", answer.request_id)
            elif answer.outcome in buckets:  # a non-terminal answer that was overtaken is not counted
                (buckets[answer.outcome] if done else self.report.stale).append(answer.request_id)

    def _noted(self, applied: bool, bucket: list[str], row) -> None:
        """Another poller (a second generate, the daemon's sensor) may have recorded this task
        and resubmitted the request: its stale answer was not applied."""
        if applied:
            bucket.append(row.request_id)
        else:
            self.report.stale.append(row.request_id)

    def _poll(self, row) -> PollAnswer | None:
        if STOP.is_set():
            return None
        if time.monotonic() - self.started > self.time_budget_s:
            self.report.out_of_time = True
            return None
        t = time.time()
        if row.submitted_at and t - row.submitted_at > self.policy.deadline_s:
            reason = (
                f"no terminal status {self.policy.deadline_s:.0f} s after submit "
                f"(last status {row.last_status or 'none'}); task {row.task_id} may still finish"
            )
            self._noted(
                self.ledger.record_unknown(row.request_id, reason, task_id=row.task_id), self.report.unknown, row
            )
            return None
        try:
            result = self.client.get_task_result(row.task_id)
        except errors.ViduError as exc:
            return self._not_answered(row, t, exc)
        finally:
            self.report.polled += 1
        return _answer(row, result, self.policy)

    def _not_answered(self, row, t: float, exc: errors.ViduError) -> PollAnswer | None:
        """A poll that told nothing new: look again later, keeping what we last knew of the
        task; or the service no longer knows the task (recorded as unknown at once)."""
        if isinstance(exc, errors.RateLimited):
            self.report.errors.append(f"{row.request_id}: rate limited")
            return _again(row, t + (exc.retry_after or self.policy.max_interval_s / 2))
        if isinstance(exc, errors.TaskNotFound):
            reason = f"the service no longer knows task {row.task_id}: {exc}"
            applied = self.ledger.record_unknown(row.request_id, reason, task_id=row.task_id)
            self._noted(applied, self.report.unknown, row)
            return None
        if isinstance(exc, errors.AuthError):
            raise exc
        self.report.errors.append(f"{row.request_id}: {exc}")
        backoff = min(self.policy.max_interval_s, self.policy.min_interval_s * 2 ** min(6, row.polls or 0))
        return _again(row, t + backoff)


def _answer(row, result: TaskResult, policy: PollingPolicy) -> PollAnswer:
    """A terminal answer, or when to look again."""
    task = row.task_id
    if result.succeeded:
        finished = _finished_at(result) or time.time()
        return PollAnswer(row.request_id, task, SUCCEEDED, effective_seed=result.seed, finished_at=finished)
    if result.failed:
        return PollAnswer(row.request_id, task, FAILED, reason=result.reason or "the service gave no reason")
    if not result.known_status:
        log.warning("task %s reports unfamiliar status %r; still polling until its deadline", task, result.status)
    delay = poll_delay(result, policy.min_interval_s, policy.max_interval_s)
    return PollAnswer(
        row.request_id,
        task,
        SUBMITTED,
        status=result.status,
        eta_s=result.eta_seconds,
        progress=result.progress_percent,
        next_poll_at=time.time() + delay,
    )


def _again(row, at: float) -> PollAnswer:
    """Look again at ``at``, keeping what we last knew of the task."""
    return PollAnswer(
        row.request_id,
        row.task_id,
        SUBMITTED,
        status=row.last_status,
        eta_s=row.eta_s,
        progress=row.progress,
        next_poll_at=at,
    )


def _finished_at(result: TaskResult) -> float | None:
    ms = result.debug_times_ms.get("complete_time_ms")
    return ms / 1000.0 if ms else None
