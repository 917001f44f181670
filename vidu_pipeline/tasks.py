"""Requests → paid tasks, exactly once; then following each task to its end.

Submission order of durable writes is the whole trick: the ledger commits the intent
(``submitting``) before the POST and the task id right after it. A crash in between leaves a
``submitting`` row whose owner is gone, which :func:`recover_abandoned` turns into
``unknown`` — listed for the user, never resubmitted behind their back. A task id the ledger
cannot take (disk full) goes to an fsync'ed recovery journal and the log, and the next start
gives it back to its row (:func:`replay_journal`).

Polling follows the service's ``eta``: each task is polled when the ledger says it is due,
many at once from a bounded thread pool, inside a time budget so a Dagster sensor tick with
thousands of pending tasks ends in time and carries the rest over. Every answer is recorded
against the task that was polled, so a slow poller's answer about an old task never touches the
request's new one.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import json
import logging
import os
import socket
import statistics
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError

from .api import errors
from .api.client import ViduClient, poll_delay
from .generation_requests import RequestSpec
from .ledger import Claim, Ledger, LedgerStateError, SpendCaps
from .storage import StorageError

log = logging.getLogger(__name__)

# Set on Ctrl-C: submits and polls not yet started are skipped; those in flight finish and
# are recorded, so the ledger stays exact.
STOP = threading.Event()


@dataclasses.dataclass(frozen=True)
class PollingPolicy:
    min_interval_s: float = 1.0
    max_interval_s: float = 60.0
    first_poll_default_s: float = 2.0  # before any task has finished, how soon to look
    deadline_s: float = 3600.0  # no terminal status by then: reported as unknown


@dataclasses.dataclass(frozen=True)
class SubmitOutcome:
    request_id: str
    submitted: bool
    task_id: str | None
    message: str


@dataclasses.dataclass
class PollReport:
    polled: int = 0
    succeeded: list[str] = dataclasses.field(default_factory=list)
    failed: list[str] = dataclasses.field(default_factory=list)
    unknown: list[str] = dataclasses.field(default_factory=list)
    errors: list[str] = dataclasses.field(default_factory=list)
    stale: list[str] = dataclasses.field(default_factory=list)  # answers another poller overtook
    out_of_time: bool = False


def owner_id(run_id: str | None = None) -> str:
    """Who holds a claim: host and pid, so a dead owner can be told from a live one."""
    return f"{socket.gethostname()}:{os.getpid()}:{run_id or '-'}"


def owner_alive(owner: str | None) -> bool:
    try:
        host, pid, _ = (owner or "").split(":", 2)
        pid_n = int(pid)
    except ValueError:
        return False
    if host != socket.gethostname():
        return True  # another machine's claim: only the age rule may retire it
    try:
        os.kill(pid_n, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_abandoned(ledger: Ledger, *, max_submit_s: float = 900.0, journal: Path | None = None) -> list[str]:
    """First the task ids a failed ledger write left in ``journal`` reach their rows; then
    ``submitting`` rows whose owner died (or that are older than any submit can take)
    become ``unknown``: the POST may have been paid for. Returns the ids made unknown."""
    if journal is not None:
        replay_journal(ledger, journal)
    dead = ledger.recover_stale_submitting(max_submit_s, owner_alive=owner_alive)
    if dead:
        log.warning("%d interrupted submission(s) marked unknown: %s", len(dead), ", ".join(dead[:10]))
    return dead


# --- the recovery journal: paid task ids the ledger could not take -----------------------------


def journal_task_id(journal: Path, request_id: str, attempt: int, task_id: str) -> None:
    """Append one line and fsync it: the only durable copy of a paid task id when the
    ledger write failed (disk full). Raises OSError when this fails too."""
    journal = Path(journal)
    journal.parent.mkdir(parents=True, exist_ok=True)
    line = (
        json.dumps(
            {"request_id": request_id, "attempt": attempt, "task_id": task_id, "time": time.time()}, sort_keys=True
        )
        + "\n"
    )
    fd = os.open(journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def replay_journal(ledger: Ledger, journal: Path) -> list[str]:
    """Give every journaled task id to its attempt: a ``submitting``/``unknown`` row still at
    that attempt without a task id becomes ``submitted`` (polled, downloaded), instead of
    being left unknown. Idempotent: rows that already hold a task id are not touched.
    Returns the request ids that became ``submitted``."""
    try:
        lines = Path(journal).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    restored = []
    for line in lines:
        try:
            entry = json.loads(line)
            request_id, attempt, task_id = entry["request_id"], int(entry["attempt"]), str(entry["task_id"])
        except (ValueError, KeyError, TypeError):
            continue  # a torn last line
        if ledger.record_submitted(request_id, attempt, task_id, first_poll_at=time.time()):
            restored.append(request_id)
    if restored:
        log.warning("%d task id(s) restored from %s: %s", len(restored), journal, ", ".join(restored[:10]))
    return restored


def first_poll_delay(ledger: Ledger, policy: PollingPolicy) -> float:
    """Median latency of recently finished tasks, so the first poll usually finds them done."""
    recent = [
        r.finished_at - r.submitted_at
        for r in ledger.rows(states=["succeeded"], newest_first=True, limit=50)
        if r.finished_at and r.submitted_at
    ]
    guess = statistics.median(recent) if recent else policy.first_poll_default_s
    return max(policy.min_interval_s, min(policy.max_interval_s, guess))


# Submit answers that prove no task was created and allow trying again later: the request
# goes back to ``planned``, counting against nothing. (A connection that never opened is a
# TransientError without a status.)
_NOT_ACCEPTED = (errors.RateLimited, errors.ConfigurationError)


def submit_requests(
    ledger: Ledger,
    client: ViduClient,
    request_ids: Iterable[str],
    *,
    data_uri_for: Callable[[str], str],
    caps: SpendCaps,
    owner: str,
    retry_budget: int,
    allow_unknown: bool = False,
    policy: PollingPolicy = PollingPolicy(),
    workers: int = 4,
    journal: Path | None = None,
) -> list[SubmitOutcome]:
    """Submit every listed request that has no live task, each at most once per claim.

    Raises :class:`errors.AuthError` once the service refuses the key (after recording every
    submit in flight; nothing more is sent), and :class:`StorageError` when a task id
    could not be written to the ledger (it is then in ``journal`` and the log).
    """
    first_poll_s = first_poll_delay(ledger, policy)
    halted: list[Exception] = []  # AuthError / StorageError: submit nothing more

    def one(request_id: str) -> SubmitOutcome:
        if halted:
            return SubmitOutcome(request_id, False, None, f"not attempted: {halted[0]}")
        if STOP.is_set():
            return SubmitOutcome(request_id, False, None, "not attempted: stopping")
        try:
            claim = ledger.claim_for_submit(
                request_id, owner=owner, retry_budget=retry_budget, caps=caps, allow_unknown=allow_unknown
            )
        except SQLAlchemyError as exc:
            halted.append(
                StorageError(
                    f"could not record the intent to submit {request_id} in the ledger {ledger.url} "
                    f"({_db_reason(exc)}); nothing was sent"
                )
            )
            return SubmitOutcome(request_id, False, None, f"not attempted: {halted[-1]}")
        if not isinstance(claim, Claim):
            row = ledger.get(request_id)
            return SubmitOutcome(request_id, False, row.task_id if row else None, claim.reason)
        return _submit_claimed(
            ledger, client, claim, data_uri_for, halted, journal, first_poll_at=lambda: time.time() + first_poll_s
        )

    ids = list(request_ids)
    if not ids:
        return []
    with cf.ThreadPoolExecutor(max_workers=max(1, min(workers, len(ids)))) as pool:
        outcomes = list(pool.map(one, ids))
    if halted:
        raise next((e for e in halted if isinstance(e, StorageError)), halted[0])
    return outcomes


def _submit_claimed(
    ledger: Ledger,
    client: ViduClient,
    claim: Claim,
    data_uri_for,
    halted: list,
    journal: Path | None,
    *,
    first_poll_at: Callable[[], float],
) -> SubmitOutcome:
    """POST one claimed request and record what the answer proves. Only answers that prove
    nothing was accepted put it back to ``planned``; anything that may have been paid for
    ends ``unknown`` (never resent)."""
    request_id, attempt = claim.request_id, claim.attempt

    def end(record, *args, **kw) -> None:
        try:
            record(request_id, attempt, *args, **kw)
        except LedgerStateError as exc:  # recovered as unknown meanwhile (it stays so)
            log.warning("%s: %s", request_id, exc)
        except SQLAlchemyError as exc:  # e.g. disk full: the row stays `submitting`
            halted.append(
                StorageError(
                    f"could not record the outcome of submitting {request_id} (attempt {attempt}) in the ledger "
                    f"({_db_reason(exc)}); it stays 'submitting' and is listed unknown after the next start"
                )
            )

    if halted or STOP.is_set():
        end(ledger.record_submit_rejected, "not sent: submitting was stopped", retryable=True)
        return SubmitOutcome(request_id, False, None, "not attempted: stopping")
    try:
        request = RequestSpec.from_json(claim.spec_json).to_request(data_uri_for)
    except (KeyError, OSError) as exc:
        end(ledger.record_submit_rejected, f"not sent: a reference image is unreadable ({exc})", retryable=True)
        return SubmitOutcome(request_id, False, None, f"not sent: {exc}")
    try:
        task_id = client.submit(request)
    except errors.SubmitOutcomeUnknown as exc:
        end(ledger.record_submit_unknown, str(exc))
        return SubmitOutcome(request_id, False, None, f"outcome unknown: {exc}")
    except errors.AuthError as exc:
        halted.append(exc)
        end(ledger.record_submit_rejected, str(exc), retryable=True)
        return SubmitOutcome(request_id, False, None, f"refused: {exc}")
    except (errors.InvalidRequest, errors.SubmitRejected) as exc:
        end(ledger.record_submit_rejected, str(exc), retryable=False)
        return SubmitOutcome(request_id, False, None, f"rejected: {exc}")
    except errors.TransientError as exc:
        if exc.status is None:  # the client says so only when the connection never opened
            end(ledger.record_submit_rejected, str(exc), retryable=True)
            return SubmitOutcome(request_id, False, None, f"not sent: {exc}")
        end(ledger.record_submit_unknown, f"{exc}; a paid task may exist")
        return SubmitOutcome(request_id, False, None, f"outcome unknown: {exc}")
    except _NOT_ACCEPTED as exc:
        end(ledger.record_submit_rejected, f"not accepted: {exc}", retryable=True)
        return SubmitOutcome(request_id, False, None, f"not accepted: {exc}")
    except Exception as exc:  # recorded, never resent
        # Any other answer (a redirect, 202, an unexpected status, a broken connection) does
        # not prove that no task was created: count it as maybe paid, and never resend it.
        why = str(exc) if isinstance(exc, errors.ViduError) else f"{type(exc).__name__}: {exc}"
        end(ledger.record_submit_unknown, f"submit answered unexpectedly ({why}); a paid task may exist")
        return SubmitOutcome(request_id, False, None, f"outcome unknown: {why}")
    except BaseException:
        # Interrupted mid-POST (Ctrl-C, SIGTERM) or a bug: we cannot know whether it was paid for.
        end(ledger.record_submit_unknown, "interrupted during submit")
        raise
    try:
        ledger.record_submitted(request_id, attempt, task_id, first_poll_at=first_poll_at())
    except Exception as exc:  # whatever failed, the paid task id must survive
        halted.append(_keep_task_id(journal, request_id, attempt, task_id, exc))
        return SubmitOutcome(request_id, True, task_id, f"submitted as task {task_id}; {halted[-1]}")
    return SubmitOutcome(request_id, True, task_id, f"submitted as task {task_id}")


def _keep_task_id(journal: Path | None, request_id: str, attempt: int, task_id: str, exc: Exception) -> StorageError:
    """The ledger refused a paid task id: log it, journal it, and say so in one line."""
    log.error(
        "task %s (request %s, attempt %d) was accepted and paid for, but the ledger write failed: %s",
        task_id,
        request_id,
        attempt,
        _db_reason(exc),
    )
    where = "only in this log (no recovery journal configured)"
    if journal is not None:
        try:
            journal_task_id(journal, request_id, attempt, task_id)
            where = f"kept in {journal}; the next run restores it"
        except OSError as jexc:
            where = f"only in this log: the recovery journal {journal} failed too ({jexc.strerror or jexc})"
    return StorageError(
        f"could not record task {task_id} of request {request_id} in the ledger "
        f"({_db_reason(exc)}); the task id is {where}"
    )


def _db_reason(exc: BaseException) -> str:
    """The database's own words (e.g. 'database or disk is full'), without SQL or parameters."""
    orig = getattr(exc, "orig", None)
    return str(orig or exc).splitlines()[0][:200] if str(orig or exc) else type(exc).__name__


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
    started = time.monotonic()
    now = time.time() if now is None else now
    report = PollReport()
    rows = ledger.due_for_poll(now, limit)

    def one(row) -> None:
        try:
            record(row)
        except LedgerStateError as exc:
            log.debug("%s moved on while polling: %s", row.request_id, exc)
        except SQLAlchemyError as exc:  # e.g. disk full: nothing is lost, the task is polled again
            raise StorageError(
                f"could not record the poll of task {row.task_id} (request {row.request_id}) in the ledger "
                f"({_db_reason(exc)}); it will be polled again"
            ) from None

    def noted(applied: bool, bucket: list[str], row) -> None:
        """Another poller (a second generate, the daemon's sensor) may have recorded this task
        and resubmitted the request: its stale answer was not applied."""
        if applied:
            bucket.append(row.request_id)
        else:
            report.stale.append(row.request_id)

    def record(row) -> None:
        if STOP.is_set():
            return
        if time.monotonic() - started > time_budget_s:
            report.out_of_time = True
            return
        t = time.time()
        task = row.task_id
        if row.submitted_at and t - row.submitted_at > policy.deadline_s:
            noted(
                ledger.record_unknown(
                    row.request_id,
                    f"no terminal status {policy.deadline_s:.0f} s after submit "
                    f"(last status {row.last_status or 'none'}); task {task} may still finish",
                    task_id=task,
                ),
                report.unknown,
                row,
            )
            return
        try:
            result = client.get_task_result(task)
        except errors.RateLimited as exc:
            _reschedule(ledger, row, t + (exc.retry_after or policy.max_interval_s / 2))
            report.errors.append(f"{row.request_id}: rate limited")
            return
        except errors.TaskNotFound as exc:
            noted(
                ledger.record_unknown(row.request_id, f"the service no longer knows task {task}: {exc}", task_id=task),
                report.unknown,
                row,
            )
            return
        except errors.AuthError:
            raise
        except errors.ViduError as exc:
            backoff = min(policy.max_interval_s, policy.min_interval_s * 2 ** min(6, row.polls or 0))
            _reschedule(ledger, row, t + backoff)
            report.errors.append(f"{row.request_id}: {exc}")
            return
        finally:
            report.polled += 1
        if result.succeeded:
            finished = _finished_at(result) or time.time()
            noted(
                ledger.record_succeeded(row.request_id, task_id=task, effective_seed=result.seed, finished_at=finished),
                report.succeeded,
                row,
            )
        elif result.failed:
            noted(
                ledger.record_failed(row.request_id, result.reason or "the service gave no reason", task_id=task),
                report.failed,
                row,
            )
        else:
            if not result.known_status:
                log.warning(
                    "task %s reports unfamiliar status %r; still polling until its deadline", task, result.status
                )
            delay = poll_delay(result, policy.min_interval_s, policy.max_interval_s)
            ledger.record_poll(
                row.request_id,
                task_id=task,
                status=result.status,
                eta_s=result.eta_seconds,
                progress=result.progress_percent,
                next_poll_at=time.time() + delay,
            )

    if rows:
        with cf.ThreadPoolExecutor(max_workers=max(1, min(workers, len(rows)))) as pool:
            for future in [pool.submit(one, row) for row in rows]:
                future.result()
    if report.errors:
        log.warning(
            "%d of %d poll(s) failed and were rescheduled, e.g. %s",
            len(report.errors),
            report.polled,
            "; ".join(report.errors[:3]),
        )
    return report


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


def _finished_at(result) -> float | None:
    ms = result.debug_times_ms.get("complete_time_ms")
    return ms / 1000.0 if ms else None
