"""Sending requests as paid tasks, each at most once per claim, and recording what each answer
proves: accepted (the task id), not accepted (back to ``planned``), or maybe paid (``unknown``,
never resent).
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError

from ..api import errors
from ..api.client import ViduClient
from ..api.contract import GenerationRequest
from ..generation_requests import RequestSpec
from ..ledger import Claim, Ledger, LedgerStateError, SpendCaps
from ..storage import StorageError
from .halting import STOP, db_reason
from .polling import PollingPolicy, first_poll_delay
from .recovery import journal_task_id

log = logging.getLogger(__name__)

# Submit answers that prove no task was created and allow trying again later: the request
# goes back to ``planned``, counting against nothing. (A connection that never opened is a
# TransientError without a status.)
_NOT_ACCEPTED = (errors.RateLimited, errors.ConfigurationError)

_DEFAULT_POLICY = PollingPolicy()

# Records how one claimed submit ended: ``end(ledger.record_…, *args, **kw)``.
Ender = Callable[..., None]


@dataclasses.dataclass(frozen=True)
class SubmitOutcome:
    request_id: str
    submitted: bool
    task_id: str | None
    message: str


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
    policy: PollingPolicy = _DEFAULT_POLICY,
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
                    f"({db_reason(exc)}); nothing was sent"
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
    end = _ender(request_id, attempt, halted)
    if halted or STOP.is_set():
        end(ledger.record_submit_rejected, "not sent: submitting was stopped", retryable=True)
        return SubmitOutcome(request_id, False, None, "not attempted: stopping")
    try:
        request = RequestSpec.from_json(claim.spec_json).to_request(data_uri_for)
    except (KeyError, OSError) as exc:
        end(ledger.record_submit_rejected, f"not sent: a reference image is unreadable ({exc})", retryable=True)
        return SubmitOutcome(request_id, False, None, f"not sent: {exc}")
    sent = _post(ledger, client, request, request_id, end, halted)
    if isinstance(sent, SubmitOutcome):
        return sent
    task_id = sent
    try:
        ledger.record_submitted(request_id, attempt, task_id, first_poll_at=first_poll_at())
    except Exception as exc:  # whatever failed, the paid task id must survive
        halted.append(_keep_task_id(journal, request_id, attempt, task_id, exc))
        return SubmitOutcome(request_id, True, task_id, f"submitted as task {task_id}; {halted[-1]}")
    return SubmitOutcome(request_id, True, task_id, f"submitted as task {task_id}")


def _ender(request_id: str, attempt: int, halted: list) -> Ender:
    """How a claimed submit's end is recorded: a row recovered meanwhile stays as it is, and
    a ledger that cannot be written halts submitting (the row stays ``submitting``)."""

    def end(record, *args, **kw) -> None:
        try:
            record(request_id, attempt, *args, **kw)
        except LedgerStateError as exc:  # recovered as unknown meanwhile (it stays so)
            log.warning("%s: %s", request_id, exc)
        except SQLAlchemyError as exc:  # e.g. disk full: the row stays `submitting`
            halted.append(
                StorageError(
                    f"could not record the outcome of submitting {request_id} (attempt {attempt}) in the ledger "
                    f"({db_reason(exc)}); it stays 'submitting' and is listed unknown after the next start"
                )
            )

    return end


def _post(
    ledger: Ledger, client: ViduClient, request: GenerationRequest, request_id: str, end: Ender, halted: list
) -> str | SubmitOutcome:
    """The POST: the task id, or the outcome of an answer that gave none (already recorded)."""
    try:
        return client.submit(request)
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


def _keep_task_id(journal: Path | None, request_id: str, attempt: int, task_id: str, exc: Exception) -> StorageError:
    """The ledger refused a paid task id: log it, journal it, and say so in one line."""
    log.error(
        "task %s (request %s, attempt %d) was accepted and paid for, but the ledger write failed: %s",
        task_id,
        request_id,
        attempt,
        db_reason(exc),
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
        f"({db_reason(exc)}); the task id is {where}"
    )
