"""Requests → paid tasks, exactly once; then following each task to its end.

Submission order of durable writes is the whole trick: the ledger commits the intent
(``submitting``) before the POST and the task id right after it. A crash in between leaves a
``submitting`` row whose owner is gone, which :func:`recover_abandoned` turns into
``unknown`` — listed for the user, never resubmitted behind their back.

Polling follows the service's ``eta``: each task is polled when the ledger says it is due,
many at once from a bounded thread pool, inside a time budget so a Dagster sensor tick with
thousands of pending tasks ends in time and carries the rest over.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import logging
import os
import socket
import statistics
import threading
import time
from collections.abc import Callable, Iterable

from . import errors
from .client import ViduClient, poll_delay
from .ledger import Claim, Ledger, LedgerStateError, SpendCaps
from .plan import RequestSpec

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


def recover_abandoned(ledger: Ledger, *, max_submit_s: float = 900.0) -> list[str]:
    """``submitting`` rows whose owner died (or that are older than any submit can take)
    become ``unknown``: the POST may have been paid for. Returns their ids."""
    dead = ledger.recover_stale_submitting(max_submit_s, owner_alive=owner_alive)
    if dead:
        log.warning("%d interrupted submission(s) marked unknown: %s", len(dead), ", ".join(dead[:10]))
    return dead


def first_poll_delay(ledger: Ledger, policy: PollingPolicy) -> float:
    """Median latency of recently finished tasks, so the first poll usually finds them done."""
    recent = [
        r.finished_at - r.submitted_at
        for r in ledger.rows(states=["succeeded"], newest_first=True, limit=50)
        if r.finished_at and r.submitted_at
    ]
    guess = statistics.median(recent) if recent else policy.first_poll_default_s
    return max(policy.min_interval_s, min(policy.max_interval_s, guess))


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
) -> list[SubmitOutcome]:
    """Submit every listed request that has no live task, each at most once per claim."""
    first_poll_s = first_poll_delay(ledger, policy)
    stop = False

    def one(request_id: str) -> SubmitOutcome:
        nonlocal stop
        if stop:
            return SubmitOutcome(request_id, False, None, "not attempted: the API refused our key")
        if STOP.is_set():
            return SubmitOutcome(request_id, False, None, "not attempted: stopping")
        claim = ledger.claim_for_submit(
            request_id, owner=owner, retry_budget=retry_budget, caps=caps, allow_unknown=allow_unknown
        )
        if not isinstance(claim, Claim):
            row = ledger.get(request_id)
            return SubmitOutcome(request_id, False, row.task_id if row else None, claim.reason)
        spec = RequestSpec.from_json(claim.spec_json)
        try:
            request = spec.to_request(data_uri_for)
            task_id = client.submit(request)
        except errors.SubmitOutcomeUnknown as exc:
            ledger.record_submit_unknown(request_id, claim.attempt, str(exc))
            return SubmitOutcome(request_id, False, None, f"outcome unknown: {exc}")
        except errors.AuthError as exc:
            stop = True
            ledger.record_submit_rejected(request_id, claim.attempt, str(exc), retryable=True)
            return SubmitOutcome(request_id, False, None, f"refused: {exc}")
        except errors.InvalidRequest as exc:
            ledger.record_submit_rejected(request_id, claim.attempt, str(exc), retryable=False)
            return SubmitOutcome(request_id, False, None, f"invalid: {exc}")
        except (errors.ViduError, OSError, KeyError) as exc:
            # Not sent (connection refused, 429 after retries) or the image is gone from the
            # cache: nothing was created, so the request may be tried again later.
            ledger.record_submit_rejected(request_id, claim.attempt, str(exc), retryable=True)
            return SubmitOutcome(request_id, False, None, f"not sent: {exc}")
        except BaseException:
            # Interrupted mid-POST (Ctrl-C): we cannot know whether it was paid for.
            ledger.record_submit_unknown(request_id, claim.attempt, "interrupted during submit")
            raise
        ledger.record_submitted(request_id, claim.attempt, task_id, first_poll_at=time.time() + first_poll_s)
        return SubmitOutcome(request_id, True, task_id, f"submitted as task {task_id}")

    ids = list(request_ids)
    if not ids:
        return []
    with cf.ThreadPoolExecutor(max_workers=max(1, min(workers, len(ids)))) as pool:
        return list(pool.map(one, ids))


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
            # Another poller (a second process, the daemon's sensor) recorded it first.
            log.debug("%s moved on while polling: %s", row.request_id, exc)

    def record(row) -> None:
        if STOP.is_set():
            return
        if time.monotonic() - started > time_budget_s:
            report.out_of_time = True
            return
        t = time.time()
        if row.submitted_at and t - row.submitted_at > policy.deadline_s:
            ledger.record_unknown(
                row.request_id,
                f"no terminal status {policy.deadline_s:.0f} s after submit "
                f"(last status {row.last_status or 'none'}); task {row.task_id} may still finish",
            )
            report.unknown.append(row.request_id)
            return
        try:
            result = client.get_task_result(row.task_id)
        except errors.RateLimited as exc:
            wait = exc.retry_after or policy.max_interval_s / 2
            ledger.record_poll(row.request_id, status=row.last_status, eta_s=row.eta_s,
                               progress=row.progress, next_poll_at=t + wait)
            report.errors.append(f"{row.request_id}: rate limited")
            return
        except errors.TaskNotFound as exc:
            ledger.record_unknown(row.request_id, f"the service no longer knows task {row.task_id}: {exc}")
            report.unknown.append(row.request_id)
            return
        except errors.AuthError:
            raise
        except errors.ViduError as exc:
            backoff = min(policy.max_interval_s, policy.min_interval_s * 2 ** min(6, row.polls or 0))
            ledger.record_poll(row.request_id, status=row.last_status, eta_s=row.eta_s,
                               progress=row.progress, next_poll_at=t + backoff)
            report.errors.append(f"{row.request_id}: {exc}")
            return
        finally:
            report.polled += 1
        if result.succeeded:
            finished = _finished_at(result) or time.time()
            ledger.record_succeeded(row.request_id, effective_seed=result.seed, finished_at=finished)
            report.succeeded.append(row.request_id)
        elif result.failed:
            ledger.record_failed(row.request_id, result.reason or "the service gave no reason")
            report.failed.append(row.request_id)
        else:
            if not result.known_status:
                log.warning("task %s reports unfamiliar status %r; still polling until its deadline",
                            row.task_id, result.status)
            delay = poll_delay(result, policy.min_interval_s, policy.max_interval_s)
            ledger.record_poll(row.request_id, status=result.status, eta_s=result.eta_seconds,
                               progress=result.progress_percent, next_poll_at=time.time() + delay)

    if rows:
        with cf.ThreadPoolExecutor(max_workers=max(1, min(workers, len(rows)))) as pool:
            for future in [pool.submit(one, row) for row in rows]:
                future.result()
    if report.errors:
        log.warning("%d of %d poll(s) failed and were rescheduled, e.g. %s",
                    len(report.errors), report.polled, "; ".join(report.errors[:3]))
    return report


def _finished_at(result) -> float | None:
    ms = result.debug_times_ms.get("complete_time_ms")
    return ms / 1000.0 if ms else None
