"""Videos and lineage: which tasks still need their video or lineage row, and recording them."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

from sqlalchemy import bindparam, delete, or_, select, update
from sqlalchemy.engine import Connection

from .engine import LedgerBase
from .schema import (
    _IN_CHUNK,
    FAILED,
    SUCCEEDED,
    UNKNOWN,
    VIDEO_CLAIM_LEASE_S,
    TaskRow,
    requests_table,
    video_claims_table,
)


class VideosMixin(LedgerBase):
    """Videos and lineage: which tasks still need their video or lineage row, and recording them."""

    def needing_video(self, limit: int | None = None, *, max_video_attempts: int | None = None) -> list[TaskRow]:
        r = requests_table.c
        stmt = select(requests_table).where(r.state == SUCCEEDED, r.video_sha256.is_(None))
        if max_video_attempts is not None:
            stmt = stmt.where(r.video_attempts < max_video_attempts)
        stmt = stmt.order_by(r.finished_at, r.request_id)
        if limit is not None:
            stmt = stmt.limit(limit)
        return self._select(stmt)

    def claim_video(
        self,
        request_id: str,
        *,
        task_id: str,
        collector: str,
        lease_s: float = VIDEO_CLAIM_LEASE_S,
        collector_alive: Callable[[str], bool] | None = None,
    ) -> str | None:
        """Take the download of ``task_id``'s video for ``collector`` before downloading it, so
        workers sharing the ledger download each video once. None when the claim is ours (new,
        renewed, or taken over from a claim older than ``lease_s`` or whose holder
        ``collector_alive`` says is gone); otherwise why not (held by another, collected, or
        no longer this task). Decided and written in one transaction, the write conditional
        on the claim it replaces, so of two racing collectors exactly one gets it."""
        r, c = requests_table.c, video_claims_table.c
        with self._write() as conn:
            row = conn.execute(
                self._locked(select(r.state, r.task_id, r.video_sha256).where(r.request_id == request_id))
            ).first()
            if row is None or row.state != SUCCEEDED or row.task_id != task_id:
                return f"task {task_id} is no longer the succeeded task of {request_id}"
            if row.video_sha256:
                return "its video is already collected"
            held = conn.execute(select(video_claims_table).where(c.request_id == request_id)).first()
            now = self.clock()
            if held is None:
                new = self._insert(video_claims_table).values(
                    request_id=request_id, task_id=task_id, collector=collector, claimed_at=now
                )
                won = conn.execute(new.on_conflict_do_nothing().returning(c.request_id)).first() is not None
            elif held.collector == collector or _claim_expired(held, now, lease_s, collector_alive):
                take = (
                    update(video_claims_table)
                    .where(c.request_id == request_id, c.collector == held.collector, c.claimed_at == held.claimed_at)
                    .values(task_id=task_id, collector=collector, claimed_at=now)
                )
                won = conn.execute(take).rowcount == 1
            else:
                return f"being collected by {held.collector} (claimed {now - held.claimed_at:.0f} s ago)"
            return None if won else "claimed by another collector at the same moment"

    def release_video_claim(self, request_id: str, *, collector: str) -> None:
        """Give the download back (it failed here): another worker, or a later run, may try."""
        c = video_claims_table.c
        with self._write() as conn:
            conn.execute(delete(video_claims_table).where(c.request_id == request_id, c.collector == collector))

    def record_video(
        self, request_id: str, *, path: str, sha256: str, size_bytes: int, probe: dict, task_id: str | None = None
    ) -> None:
        """The verified video of a succeeded task (its download claim ends with it). Given
        ``task_id`` (the task downloaded), the row must still hold it."""
        with self._write() as conn:
            self._update_from(
                conn,
                request_id,
                (SUCCEEDED,),
                "record a video",
                task_id_is=task_id,
                video_path=str(path),
                video_sha256=sha256,
                video_bytes=size_bytes,
                probe_json=json.dumps(probe, sort_keys=True),
                last_error=None,
            )
            _drop_claim(conn, request_id)

    def record_video_error(self, request_id: str, error: str, *, task_id: str | None = None) -> None:
        """A failed download or verification; the claim ends so the next attempt may be anyone's."""
        r = requests_table.c
        with self._write() as conn:
            self._update_from(
                conn,
                request_id,
                (SUCCEEDED,),
                "record a video error",
                task_id_is=task_id,
                video_attempts=r.video_attempts + 1,
                last_error=error,
            )
            _drop_claim(conn, request_id)

    def needing_lineage(self, limit: int | None = None) -> list[TaskRow]:
        """Rows whose current outcome is not yet in the lineage table: succeeded with a video,
        failed, or unknown, and ``lineage_state`` differing from ``state``."""
        r = requests_table.c
        stmt = (
            select(requests_table)
            .where(
                # Written so that SQLite searches the partial index ix_requests_lineage_due alone;
                # as "(succeeded with a video) OR failed OR unknown" it walked every stored video.
                or_(r.lineage_state.is_(None), r.lineage_state != r.state),
                r.state.in_((SUCCEEDED, FAILED, UNKNOWN)),
                or_(r.state != SUCCEEDED, r.video_sha256.is_not(None)),
            )
            .order_by(r.updated_at, r.request_id)
        )
        if limit is not None:
            stmt = stmt.limit(limit)
        return self._select(stmt)

    def mark_lineage(self, rows: Sequence[TaskRow]) -> None:
        """Note that the lineage table now holds these rows, as they were read. A row that has
        moved on since (resubmitted and succeeded while its failure was being written) is left
        unmarked, so its new outcome gets a lineage row of its own."""
        r = requests_table.c
        stmt = (
            update(requests_table)
            .where(r.request_id == bindparam("rid"), r.state == bindparam("seen_state"))
            .where(r.updated_at == bindparam("seen_at"))
            .values(lineage_state=bindparam("seen_state"))
        )
        params = [{"rid": row.request_id, "seen_state": row.state, "seen_at": row.updated_at} for row in rows]
        with self._write() as conn:
            for i in range(0, len(params), _IN_CHUNK):
                conn.execute(stmt, params[i : i + _IN_CHUNK])


def _drop_claim(conn: Connection, request_id: str) -> None:
    conn.execute(delete(video_claims_table).where(video_claims_table.c.request_id == request_id))


def _claim_expired(held, now: float, lease_s: float, collector_alive: Callable[[str], bool] | None) -> bool:
    """A claim another may take over: older than the lease, or its holder is known to be gone."""
    if now - held.claimed_at > lease_s:
        return True
    return collector_alive is not None and not collector_alive(held.collector)
