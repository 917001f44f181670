"""Videos and lineage: which tasks still need their video or lineage row, and recording them."""

from __future__ import annotations

import json
from collections.abc import Sequence

from sqlalchemy import and_, or_, select, update

from .engine import LedgerBase
from .schema import _IN_CHUNK, FAILED, SUCCEEDED, UNKNOWN, TaskRow, requests_table


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

    def record_video(
        self, request_id: str, *, path: str, sha256: str, size_bytes: int, probe: dict, task_id: str | None = None
    ) -> None:
        """The verified video of a succeeded task. Given ``task_id`` (the task downloaded), the
        row must still hold it."""
        self._transition(
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

    def record_video_error(self, request_id: str, error: str, *, task_id: str | None = None) -> None:
        r = requests_table.c
        self._transition(
            request_id,
            (SUCCEEDED,),
            "record a video error",
            task_id_is=task_id,
            video_attempts=r.video_attempts + 1,
            last_error=error,
        )

    def needing_lineage(self, limit: int | None = None) -> list[TaskRow]:
        """Rows whose current outcome is not yet in the lineage table: succeeded with a video,
        failed, or unknown, and ``lineage_state`` differing from ``state``."""
        r = requests_table.c
        stmt = (
            select(requests_table)
            .where(
                or_(
                    and_(r.state == SUCCEEDED, r.video_sha256.is_not(None)),
                    r.state.in_((FAILED, UNKNOWN)),
                ),
                or_(r.lineage_state.is_(None), r.lineage_state != r.state),
            )
            .order_by(r.updated_at, r.request_id)
        )
        if limit is not None:
            stmt = stmt.limit(limit)
        return self._select(stmt)

    def mark_lineage(self, request_ids: Sequence[str]) -> None:
        """Note that the lineage table now holds each row's current state."""
        r = requests_table.c
        with self._write() as conn:
            for i in range(0, len(request_ids), _IN_CHUNK):
                conn.execute(
                    update(requests_table)
                    .where(r.request_id.in_(request_ids[i : i + _IN_CHUNK]))
                    .values(lineage_state=r.state)
                )
