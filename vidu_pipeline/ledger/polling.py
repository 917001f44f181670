"""Polling: which tasks are due, and each answer, applied only to the task it is about."""

from __future__ import annotations

import logging

from sqlalchemy import select, update

from .engine import LedgerBase
from .schema import (
    FAILED,
    OUTCOME_UNKNOWN,
    SUBMITTED,
    SUBMITTING,
    SUCCEEDED,
    UNKNOWN,
    LedgerStateError,
    TaskRow,
    attempts_table,
    requests_table,
)

# The ledger's logger, whichever module of the package logs.
log = logging.getLogger("vidu_pipeline.ledger")


class PollingMixin(LedgerBase):
    """Polling: which tasks are due, and each answer, applied only to the task it is about."""

    def due_for_poll(self, now: float, limit: int) -> list[TaskRow]:
        r = requests_table.c
        stmt = (
            select(requests_table)
            .where(r.state == SUBMITTED, r.next_poll_at <= now)
            .order_by(r.next_poll_at, r.request_id)
            .limit(limit)
        )
        return self._select(stmt)

    def record_poll(
        self,
        request_id: str,
        *,
        task_id: str,
        status: str | None,
        eta_s: float | None,
        progress: float | None,
        next_poll_at: float | None,
    ) -> bool:
        """A non-terminal answer about ``task_id``: when to look again. False (nothing
        written) if the request has moved on from that task."""
        r = requests_table.c
        return self._answer(
            request_id,
            task_id,
            (SUBMITTED,),
            "record a poll",
            last_status=status,
            eta_s=eta_s,
            progress=progress,
            next_poll_at=next_poll_at,
            polls=r.polls + 1,
        )

    def record_succeeded(
        self, request_id: str, *, task_id: str, effective_seed: int | None, finished_at: float
    ) -> bool:
        """``task_id`` succeeded: from ``submitted``, or from ``unknown`` with that task id (a
        late poll found it done). False if the request has moved on from that task."""
        return self._answer(
            request_id,
            task_id,
            (SUBMITTED, UNKNOWN),
            "record success",
            state=SUCCEEDED,
            effective_seed=effective_seed,
            finished_at=finished_at,
            next_poll_at=None,
            last_error=None,
        )

    def record_failed(self, request_id: str, reason: str, *, task_id: str) -> bool:
        """``task_id`` ended FAILED: resubmittable while within the retry budget. False if the
        request has moved on from that task (an old task's failure must not end a new one).
        The reason is also kept on that task's attempt, so a resubmission does not erase why a
        paid attempt failed."""
        return self._answer(
            request_id,
            task_id,
            (SUBMITTED, UNKNOWN),
            "record failure",
            attempt_error=reason,
            state=FAILED,
            last_error=reason,
            finished_at=self.clock(),
            next_poll_at=None,
        )

    def record_unknown(self, request_id: str, reason: str, *, task_id: str | None) -> bool:
        """E.g. the deadline passed with a non-terminal or unfamiliar status: report, never drop.

        ``task_id`` is the task the caller looked at; None for a ``submitting`` row (its
        submitter is gone), whose in-flight attempt is then closed as unknown too. Prefer
        :meth:`recover_stale_submitting` for those. False if the request has moved on.
        """
        r, a = requests_table.c, attempts_table.c
        with self._write() as conn:
            row = conn.execute(
                self._locked(select(r.state, r.attempts, r.task_id).where(r.request_id == request_id))
            ).first()
            if row is None:
                raise LedgerStateError(f"cannot record unknown: {request_id} is not in the ledger")
            if row.state not in (SUBMITTED, SUBMITTING) or row.task_id != task_id:
                self._stale(request_id, task_id, "record unknown", row)
                return False
            if row.state == SUBMITTING:
                conn.execute(
                    update(attempts_table)
                    .where(a.request_id == request_id, a.attempt == row.attempts, a.outcome.is_(None))
                    .values(ended_at=self.clock(), outcome=OUTCOME_UNKNOWN, error=reason)
                )
            conn.execute(
                update(requests_table)
                .where(r.request_id == request_id, r.attempts == row.attempts)
                .values(state=UNKNOWN, last_error=reason, next_poll_at=None, updated_at=self.clock())
            )
            return True

    def _answer(
        self,
        request_id: str,
        task_id: str | None,
        from_states: tuple[str, ...],
        what: str,
        attempt_error: str | None = None,
        **values,
    ) -> bool:
        """Apply a poll's answer only while the row holds ``task_id`` in one of ``from_states``
        (one conditional UPDATE, so no other writer can slip in between). A miss is a stale
        answer: logged at debug and reported as False."""
        r = requests_table.c
        if task_id is None:
            raise LedgerStateError(f"cannot {what}: no task id given for {request_id}")
        with self._write() as conn:
            res = conn.execute(
                update(requests_table)
                .where(r.request_id == request_id, r.task_id == task_id, r.state.in_(from_states))
                .values(updated_at=self.clock(), **values)
            )
            if res.rowcount == 1:
                if attempt_error is not None:
                    a = attempts_table.c
                    conn.execute(
                        update(attempts_table)
                        .where(a.request_id == request_id, a.task_id == task_id)
                        .values(error=attempt_error)
                    )
                return True
            row = conn.execute(select(r.state, r.attempts, r.task_id).where(r.request_id == request_id)).first()
        if row is None:
            raise LedgerStateError(f"cannot {what}: {request_id} is not in the ledger")
        self._stale(request_id, task_id, what, row)
        return False

    @staticmethod
    def _stale(request_id: str, task_id: str | None, what: str, row) -> None:
        log.debug(
            "stale answer ignored: cannot %s for %s about task %s: the row is %s (attempt %s, task %s)",
            what,
            request_id,
            task_id,
            row.state,
            row.attempts,
            row.task_id,
        )
