"""Reading: rows, counts and attempts, for reports and status."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from sqlalchemy import func, select

from .engine import LedgerBase
from .schema import (
    _IN_CHUNK,
    FAILED,
    PENDING_STATES,
    STATES,
    AttemptRow,
    TaskRow,
    _billable,
    attempts_table,
    requests_table,
)


class ReadingMixin(LedgerBase):
    """Reading: rows, counts and attempts, for reports and status."""

    def get(self, request_id: str) -> TaskRow | None:
        rows = self._select(select(requests_table).where(requests_table.c.request_id == request_id))
        return rows[0] if rows else None

    def get_many(self, request_ids: Sequence[str]) -> dict[str, TaskRow]:
        """The rows of these ids (absent ones left out), in chunked ``IN`` queries: one
        round trip per 500 ids instead of one per id."""
        r = requests_table.c
        found: dict[str, TaskRow] = {}
        for i in range(0, len(request_ids), _IN_CHUNK):
            stmt = select(requests_table).where(r.request_id.in_(request_ids[i : i + _IN_CHUNK]))
            found.update((row.request_id, row) for row in self._select(stmt))
        return found

    def rows(
        self,
        states: Iterable[str] | None = None,
        *,
        updated_before: float | None = None,
        limit: int | None = None,
        newest_first: bool = False,
    ) -> list[TaskRow]:
        """Rows oldest first (or most recently updated first). Filter in SQL: reading all 100k
        rows takes over a second."""
        r = requests_table.c
        order = (r.updated_at.desc(), r.request_id) if newest_first else (r.created_at, r.request_id)
        stmt = select(requests_table).order_by(*order)
        if states is not None:
            stmt = stmt.where(r.state.in_(list(states)))
        if updated_before is not None:
            stmt = stmt.where(r.updated_at < updated_before)
        if limit is not None:
            stmt = stmt.limit(limit)
        return self._select(stmt)

    def retryable_failed(self, retry_budget: int, limit: int) -> list[TaskRow]:
        """Failed requests a resubmission may still follow, oldest first: within the retry
        budget and accepted by the service once (a task id). Filtered in SQL, so a dataset
        full of failures that are final costs the sensor nothing per tick."""
        r = requests_table.c
        stmt = (
            select(requests_table)
            .where(r.state == FAILED, r.attempts < retry_budget, r.task_id.is_not(None))
            .order_by(r.created_at, r.request_id)
            .limit(limit)
        )
        return self._select(stmt)

    def counts_by_state(self) -> dict[str, int]:
        r = requests_table.c
        with self._read() as conn:
            found = dict(conn.execute(select(r.state, func.count()).group_by(r.state)).all())
        return {s: found.get(s, 0) for s in STATES}

    def oldest_pending(self) -> TaskRow | None:
        """The longest-waiting request not yet finished (planned, submitting or submitted)."""
        r = requests_table.c
        rows = self._select(
            select(requests_table).where(r.state.in_(PENDING_STATES)).order_by(r.created_at, r.request_id).limit(1)
        )
        return rows[0] if rows else None

    def attempts_for(self, request_id: str) -> list[AttemptRow]:
        a = attempts_table.c
        with self._read() as conn:
            rows = conn.execute(select(attempts_table).where(a.request_id == request_id).order_by(a.attempt)).all()
        return [AttemptRow(**row._mapping) for row in rows]

    def submits_since(self, since: float, run_id: str | None = None) -> int:
        """Billable attempts started after ``since`` (optionally for one run): what caps count."""
        a = attempts_table.c
        stmt = select(func.count()).where(a.started_at > since, _billable(a))
        if run_id is not None:
            stmt = stmt.where(a.run_id == run_id)
        with self._read() as conn:
            return conn.scalar(stmt)
