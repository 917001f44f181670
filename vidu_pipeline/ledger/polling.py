"""Polling: which tasks are due, and each answer, applied only to the task it is about."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

from sqlalchemy import bindparam, or_, select, update
from sqlalchemy.engine import Connection

from .engine import LedgerBase
from .schema import (
    _IN_CHUNK,
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


@dataclasses.dataclass(frozen=True)
class PollAnswer:
    """What one poll said about ``task_id``, to record with the answers polled beside it
    (:meth:`PollingMixin.record_poll_answers`). ``outcome``: SUBMITTED (still running: look
    again at ``next_poll_at``), SUCCEEDED or FAILED (with the service's ``reason``)."""

    request_id: str
    task_id: str
    outcome: str
    status: str | None = None
    eta_s: float | None = None
    progress: float | None = None
    next_poll_at: float | None = None
    effective_seed: int | None = None
    finished_at: float | None = None
    reason: str | None = None


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
        answer = PollAnswer(request_id, task_id, SUBMITTED, status, eta_s, progress, next_poll_at)
        return self._record_one(answer)

    def record_succeeded(
        self, request_id: str, *, task_id: str, effective_seed: int | None, finished_at: float
    ) -> bool:
        """``task_id`` succeeded: from ``submitted``, or from ``unknown`` with that task id (a
        late poll found it done). False if the request has moved on from that task."""
        answer = PollAnswer(request_id, task_id, SUCCEEDED, effective_seed=effective_seed, finished_at=finished_at)
        return self._record_one(answer)

    def record_failed(self, request_id: str, reason: str, *, task_id: str) -> bool:
        """``task_id`` ended FAILED: resubmittable while within the retry budget. False if the
        request has moved on from that task (an old task's failure must not end a new one).
        The reason is also kept on that task's attempt, so a resubmission does not erase why a
        paid attempt failed."""
        return self._record_one(PollAnswer(request_id, task_id, FAILED, reason=reason))

    def record_poll_answers(self, answers: Sequence[PollAnswer]) -> list[bool | None]:
        """Many poll answers (one per request) in one write transaction: one commit instead of
        one per answer. Each is applied exactly as :meth:`record_poll`, :meth:`record_succeeded`
        or :meth:`record_failed` applies it: only while its row holds its task in a state that
        allows it. Per answer: True (applied), False (stale: a no-op), None (the request is not
        in the ledger). All or nothing: if the transaction fails, none is recorded."""
        ids = [a.request_id for a in answers]
        if len(set(ids)) != len(ids):
            raise ValueError("record_poll_answers takes one answer per request")
        with self._write() as conn:
            holding = self._holding(conn, ids)  # locked: no other writer until the commit
            verdicts = [self._verdict(a, holding.get(a.request_id)) for a in answers]
            applied = [a for a, ok in zip(answers, verdicts) if ok]
            self._write_answers(conn, applied)
        return verdicts

    def _record_one(self, answer: PollAnswer) -> bool:
        """One answer in its own transaction; a request not in the ledger is a caller bug."""
        [applied] = self.record_poll_answers([answer])
        if applied is None:
            raise LedgerStateError(f"cannot {_WHAT[answer.outcome]}: {answer.request_id} is not in the ledger")
        return applied

    def _holding(self, conn: Connection, request_ids: list[str]) -> dict[str, Any]:
        """Each request's state, attempt and task, read (and on Postgres row-locked) inside
        the write transaction: what the answers are checked against."""
        r = requests_table.c
        found: dict[str, Any] = {}
        for i in range(0, len(request_ids), _IN_CHUNK):
            stmt = select(r.request_id, r.state, r.attempts, r.task_id).where(
                r.request_id.in_(request_ids[i : i + _IN_CHUNK])
            )
            found.update((row.request_id, row) for row in conn.execute(self._locked(stmt)))
        return found

    def _verdict(self, answer: PollAnswer, row) -> bool | None:
        """Whether the row still holds the answer's task in a state the answer may leave;
        a miss is a stale answer, logged at debug."""
        if answer.task_id is None:
            raise LedgerStateError(f"cannot {_WHAT[answer.outcome]}: no task id given for {answer.request_id}")
        if row is None:
            return None
        if row.task_id == answer.task_id and row.state in _FROM_STATES[answer.outcome]:
            return True
        self._stale(answer.request_id, answer.task_id, _WHAT[answer.outcome], row)
        return False

    def _write_answers(self, conn: Connection, answers: list[PollAnswer]) -> None:
        """One executemany per kind of answer. Each UPDATE is still conditioned on the task and
        the states, so it can only ever touch the rows :meth:`_verdict` found holding them."""
        for outcome, stmt in _ANSWER_UPDATES.items():
            params = [self._params(a) for a in answers if a.outcome == outcome]
            if params:
                res = conn.execute(stmt, params)
                if conn.dialect.supports_sane_multi_rowcount and res.rowcount != len(params):
                    raise LedgerStateError(f"{_WHAT[outcome]}: {res.rowcount} of {len(params)} rows updated")
        failures = [{"b_request_id": a.request_id, "b_task_id": a.task_id, "b_error": a.reason} for a in answers]
        failures = [f for f, a in zip(failures, answers) if a.outcome == FAILED]
        if failures:  # the reason stays with the paid attempt too: a resubmission must not erase it
            conn.execute(_ATTEMPT_ERROR_UPDATE, failures)

    def _params(self, answer: PollAnswer) -> dict[str, Any]:
        """The bound values of an answer's UPDATE (see :data:`_ANSWER_UPDATES`)."""
        now = self.clock()
        params: dict[str, Any] = {"b_request_id": answer.request_id, "b_task_id": answer.task_id, "b_updated_at": now}
        if answer.outcome == SUCCEEDED:
            params.update(b_effective_seed=answer.effective_seed, b_finished_at=answer.finished_at)
        elif answer.outcome == FAILED:
            params.update(b_last_error=answer.reason, b_finished_at=now)
        else:
            params.update(
                b_last_status=answer.status,
                b_eta_s=answer.eta_s,
                b_progress=answer.progress,
                b_next_poll_at=answer.next_poll_at,
            )
        return params

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


# Per outcome: the states an answer may be applied from, and what it does (for messages).
# A success or failure may also end an ``unknown`` row that holds the task (a late poll).
_FROM_STATES = {SUBMITTED: (SUBMITTED,), SUCCEEDED: (SUBMITTED, UNKNOWN), FAILED: (SUBMITTED, UNKNOWN)}
_WHAT = {SUBMITTED: "record a poll", SUCCEEDED: "record success", FAILED: "record failure"}


def _answer_update(outcome: str, **values):
    """The conditional UPDATE an answer of this outcome makes, with bound parameters (built
    once: building a statement per answer cost more than running it)."""
    r = requests_table.c
    return (
        update(requests_table)
        .where(
            r.request_id == bindparam("b_request_id"),
            r.task_id == bindparam("b_task_id"),
            or_(*(r.state == state for state in _FROM_STATES[outcome])),  # executemany takes no IN (…)
        )
        .values(updated_at=bindparam("b_updated_at"), **values)
    )


_ANSWER_UPDATES = {
    SUBMITTED: _answer_update(
        SUBMITTED,
        last_status=bindparam("b_last_status"),
        eta_s=bindparam("b_eta_s"),
        progress=bindparam("b_progress"),
        next_poll_at=bindparam("b_next_poll_at"),
        polls=requests_table.c.polls + 1,
    ),
    SUCCEEDED: _answer_update(
        SUCCEEDED,
        state=SUCCEEDED,
        effective_seed=bindparam("b_effective_seed"),
        finished_at=bindparam("b_finished_at"),
        next_poll_at=None,
        last_error=None,
    ),
    FAILED: _answer_update(
        FAILED,
        state=FAILED,
        last_error=bindparam("b_last_error"),
        finished_at=bindparam("b_finished_at"),
        next_poll_at=None,
    ),
}
_ATTEMPT_ERROR_UPDATE = (
    update(attempts_table)
    .where(attempts_table.c.request_id == bindparam("b_request_id"), attempts_table.c.task_id == bindparam("b_task_id"))
    .values(error=bindparam("b_error"))
)
