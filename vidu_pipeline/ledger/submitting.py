"""Submitting: the committed intent before a paid submit, and each attempt's outcome."""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import func, insert, or_, select, update

from .engine import LedgerBase
from .schema import (
    _CLAIM_LOCK,
    DAY_S,
    FAILED,
    OUTCOME_REFUSED,
    OUTCOME_REJECTED,
    OUTCOME_SUBMITTED,
    OUTCOME_UNKNOWN,
    PLANNED,
    SUBMITTED,
    SUBMITTING,
    SUCCEEDED,
    UNKNOWN,
    Claim,
    LedgerStateError,
    Skip,
    SpendCaps,
    _billable,
    _counted,
    attempts_table,
    locks_table,
    requests_table,
)


class SubmittingMixin(LedgerBase):
    """Submitting: the committed intent before a paid submit, and each attempt's outcome."""

    def claim_for_submit(
        self,
        request_id: str,
        *,
        owner: str,
        retry_budget: int,
        caps: SpendCaps,
        allow_unknown: bool = False,
    ) -> Claim | Skip:
        """Commit the intent to submit, or say why not — state, budget and caps in ONE transaction.

        ``retry_budget`` is the number of attempts a request may use: every attempt counts
        except those provably never accepted and put back to ``planned`` (429, connection
        refused, a refused key). Caps count attempts that may have cost money: every attempt
        row except those the service provably created no task for.
        """
        r, a = requests_table.c, attempts_table.c
        with self._write() as conn:
            if not self._sqlite:
                conn.execute(select(locks_table).where(locks_table.c.name == _CLAIM_LOCK).with_for_update())
            row = conn.execute(self._locked(select(requests_table).where(r.request_id == request_id))).first()
            if row is None:
                return Skip(request_id, "not in the ledger")
            counted = conn.scalar(select(func.count()).where(a.request_id == request_id, _counted(a)))
            skip = _state_skip(row, counted, retry_budget, allow_unknown)
            if skip:
                return Skip(request_id, skip)
            now = self.clock()
            billable = _billable(a)
            if caps.per_run is not None:
                used = conn.scalar(select(func.count()).where(a.run_id == caps.run_id, billable))
                if used >= caps.per_run:
                    return Skip(request_id, f"cap reached: per-run {caps.per_run}")
            if caps.per_day is not None:
                used = conn.scalar(select(func.count()).where(a.started_at > now - DAY_S, billable))
                if used >= caps.per_day:
                    return Skip(request_id, f"cap reached: per-day {caps.per_day}")
            attempt = row.attempts + 1
            conn.execute(
                update(requests_table)
                .where(r.request_id == request_id)
                .values(
                    state=SUBMITTING,
                    attempts=attempt,
                    owner=owner,
                    submitting_at=now,
                    updated_at=now,
                    task_id=None,
                    submitted_at=None,
                    finished_at=None,
                    next_poll_at=None,
                    last_status=None,
                    eta_s=None,
                    progress=None,
                    polls=0,
                    effective_seed=None,
                )
            )
            conn.execute(
                insert(attempts_table).values(
                    request_id=request_id, attempt=attempt, run_id=caps.run_id, owner=owner, started_at=now
                )
            )
        return Claim(request_id, attempt, row.spec_json, row.seed, row.fingerprint)

    def record_submitted(self, request_id: str, attempt: int, task_id: str, *, first_poll_at: float) -> bool:
        """Store the task id the service returned. Always recorded on the attempt row (money was
        spent) unless that row already holds another task id; the request row follows only if
        it is still at this attempt without a task id (``submitting``, or ``unknown`` after a
        stale-intent recovery). Returns whether the request row follows it."""
        now = self.clock()
        r, a = requests_table.c, attempts_table.c
        with self._write() as conn:
            conn.execute(
                update(attempts_table)
                .where(a.request_id == request_id, a.attempt == attempt, or_(a.task_id.is_(None), a.task_id == task_id))
                .values(task_id=task_id, ended_at=now, outcome=OUTCOME_SUBMITTED, error=None)
            )
            res = conn.execute(
                update(requests_table)
                .where(
                    r.request_id == request_id,
                    r.attempts == attempt,
                    r.task_id.is_(None),
                    r.state.in_((SUBMITTING, UNKNOWN)),
                )
                .values(
                    state=SUBMITTED,
                    task_id=task_id,
                    submitted_at=now,
                    next_poll_at=first_poll_at,
                    last_error=None,
                    updated_at=now,
                )
            )
            return res.rowcount == 1

    def record_submit_rejected(self, request_id: str, attempt: int, error: str, *, retryable: bool = False) -> None:
        """The service provably created no task (400, 401, 404, 429, refused connection).

        ``retryable`` (429, refused connection, refused key): the attempt was never accepted;
        the request goes back to ``planned`` and the attempt counts against nothing.
        Otherwise (400, another 4xx) the request is ``failed`` with the service's words and the
        attempt counts against the retry budget (not against the spend caps).
        """
        if retryable:
            self._end_attempt(request_id, attempt, OUTCOME_REJECTED, error, PLANNED)
        else:
            self._end_attempt(request_id, attempt, OUTCOME_REFUSED, error, FAILED)

    def record_submit_unknown(self, request_id: str, attempt: int, error: str) -> None:
        """The body may have reached the service: a paid task may exist. Never resubmitted."""
        self._end_attempt(request_id, attempt, OUTCOME_UNKNOWN, error, UNKNOWN)

    def _end_attempt(self, request_id: str, attempt: int, outcome: str, error: str, state: str) -> None:
        now = self.clock()
        r, a = requests_table.c, attempts_table.c
        with self._write() as conn:
            conn.execute(
                update(attempts_table)
                .where(a.request_id == request_id, a.attempt == attempt)
                .values(ended_at=now, outcome=outcome, error=error)
            )
            res = conn.execute(
                update(requests_table)
                .where(r.request_id == request_id, r.attempts == attempt, r.state == SUBMITTING)
                .values(state=state, last_error=error, updated_at=now)
            )
            if res.rowcount != 1:
                raise LedgerStateError(self._describe(conn, request_id, f"end attempt {attempt} as {outcome}"))

    def recover_stale_submitting(
        self,
        older_than_s: float,
        now: float | None = None,
        *,
        owner_alive: Callable[[str | None], bool] | None = None,
    ) -> list[str]:
        """Intents without a task id whose submitter is gone become ``unknown`` (a paid task may
        exist): those older than ``older_than_s``, and, given ``owner_alive``, those whose owner
        it reports dead. Decided and updated in one transaction. Returns their ids."""
        now = self.clock() if now is None else now
        r, a = requests_table.c, attempts_table.c
        with self._write() as conn:
            pending = conn.execute(
                self._locked(select(r.request_id, r.attempts, r.owner, r.submitting_at).where(r.state == SUBMITTING))
            ).all()
            stale = []
            for rid, attempt, owner, since in pending:
                if now - since > older_than_s:
                    why = f"stale after {older_than_s:.0f} s"
                elif owner_alive is not None and not owner_alive(owner):
                    why = "its owner is gone"
                else:
                    continue
                stale.append(rid)
                reason = f"submit outcome unknown: intent by {owner} at {since:.0f} never recorded a task id ({why})"
                conn.execute(
                    update(attempts_table)
                    .where(a.request_id == rid, a.attempt == attempt, a.outcome.is_(None))
                    .values(ended_at=now, outcome=OUTCOME_UNKNOWN, error=reason)
                )
                conn.execute(
                    update(requests_table)
                    .where(r.request_id == rid, r.attempts == attempt, r.state == SUBMITTING)
                    .values(state=UNKNOWN, last_error=reason, updated_at=now)
                )
        return stale


def _state_skip(row, counted: int, retry_budget: int, allow_unknown: bool) -> str | None:
    """Why a request in this state may not be submitted now, or None if it may. ``counted``:
    its attempts that use up the budget."""
    state = row.state
    if state == SUBMITTING:
        return f"submit in progress (attempt {row.attempts} by {row.owner})"
    if state == SUBMITTED:
        return f"already submitted (task {row.task_id})"
    if state == SUCCEEDED:
        return f"already succeeded (task {row.task_id})"
    if state == UNKNOWN and not allow_unknown:
        return "unknown outcome: not resubmitted"
    if counted >= retry_budget:
        return f"retry budget exhausted ({counted} of {retry_budget} attempts)"
    return None
