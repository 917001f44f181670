"""Planning: inserting the requests not yet in the ledger."""

from __future__ import annotations

from collections.abc import Iterable

from .engine import LedgerBase
from .schema import _PLAN_CHUNK, PLANNED, PlannedRequest, requests_table


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
        """Insert the rows not yet present, in one statement that skips the ids already there
        (``INSERT … ON CONFLICT DO NOTHING``): planners racing on the same ids, on SQLite or
        Postgres, each insert what nobody else has and none fails. Returns how many were new."""
        now = self.clock()
        r = requests_table.c
        values = [
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
        ]
        stmt = self._insert(requests_table).on_conflict_do_nothing(index_elements=[r.request_id])
        with self._write() as conn:
            return len(conn.execute(stmt.returning(r.request_id), values).all())
