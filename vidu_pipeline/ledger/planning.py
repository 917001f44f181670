"""Planning: inserting the requests not yet in the ledger."""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import insert, select
from sqlalchemy.exc import IntegrityError

from .engine import LedgerBase
from .schema import _IN_CHUNK, _PLAN_CHUNK, PLANNED, PlannedRequest, requests_table


class PlanningMixin(LedgerBase):
    """Planning: inserting the requests not yet in the ledger."""

    def plan(self, rows: Iterable[PlannedRequest]) -> int:
        """Insert the requests not yet in the ledger; existing rows are never touched.

        Returns how many were new. Chunked executemany, one short write transaction per chunk.
        """
        new = 0
        chunk: dict[str, PlannedRequest] = {}
        for row in rows:
            chunk.setdefault(row.request_id, row)
            if len(chunk) >= _PLAN_CHUNK:
                new += self._plan_chunk(list(chunk.values()))
                chunk = {}
        if chunk:
            new += self._plan_chunk(list(chunk.values()))
        return new

    def _plan_chunk(self, rows: list[PlannedRequest]) -> int:
        """Insert the rows not yet present. SQLite's write lock serializes planners; elsewhere a
        planner that loses the race to insert the same ids reads again and inserts the rest."""
        for tries_left in (2, 1, 0):
            try:
                return self._insert_new(rows)
            except IntegrityError:
                if not tries_left:
                    raise
        raise AssertionError("unreachable")

    def _insert_new(self, rows: list[PlannedRequest]) -> int:
        now = self.clock()
        r = requests_table.c
        with self._write() as conn:
            existing: set[str] = set()
            for i in range(0, len(rows), _IN_CHUNK):
                ids = [p.request_id for p in rows[i : i + _IN_CHUNK]]
                existing.update(conn.scalars(select(r.request_id).where(r.request_id.in_(ids))))
            fresh = [
                {
                    "request_id": p.request_id,
                    "subject_id": p.subject_id,
                    "seed": p.seed,
                    "fingerprint": p.fingerprint,
                    "spec_json": p.spec_json,
                    "state": PLANNED,
                    "attempts": 0,
                    "polls": 0,
                    "video_attempts": 0,
                    "created_at": now,
                    "updated_at": now,
                }
                for p in rows
                if p.request_id not in existing
            ]
            if fresh:
                conn.execute(insert(requests_table), fresh)
        return len(fresh)
