"""The task-result answer as code: the statuses a task reports and the parsed body.

Kept apart from the request side of the contract: the client reads it on every poll, parses
it defensively (gateways send numbers as strings) and keeps unknown statuses rather than
failing on them.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from typing import Any

from .image_refs import redact_url


class TaskStatus(str, enum.Enum):
    QUEUED = "TASK_STATUS_QUEUED"
    PROCESSING = "TASK_STATUS_PROCESSING"
    SUCCEED = "TASK_STATUS_SUCCEED"
    FAILED = "TASK_STATUS_FAILED"


TERMINAL_STATUSES = (TaskStatus.SUCCEED.value, TaskStatus.FAILED.value)


@dataclasses.dataclass(frozen=True)
class Video:
    url: str
    ttl_seconds: int | None
    type: str

    def __repr__(self) -> str:  # the signed URL is a bearer credential for the file
        return f"Video(url={redact_url(self.url)!r}, ttl_seconds={self.ttl_seconds}, type={self.type!r})"


@dataclasses.dataclass(frozen=True)
class TaskResult:
    """A parsed task-result body. ``status`` keeps the raw string: unknown values are kept."""

    task_id: str
    status: str
    reason: str = ""
    eta_seconds: float | None = None
    progress_percent: float | None = None
    seed: int | None = None
    videos: tuple[Video, ...] = ()
    debug_times_ms: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def succeeded(self) -> bool:
        return self.status == TaskStatus.SUCCEED.value

    @property
    def failed(self) -> bool:
        return self.status == TaskStatus.FAILED.value

    @property
    def terminal(self) -> bool:
        """Only the two documented end states are terminal; anything unknown keeps polling."""
        return self.status in TERMINAL_STATUSES

    @property
    def known_status(self) -> bool:
        return self.status in {s.value for s in TaskStatus}

    @classmethod
    def from_json(cls, body: Any) -> TaskResult:
        """Parse defensively; raise ValueError naming the field when the shape is wrong."""
        if not isinstance(body, Mapping):
            raise ValueError(f"task-result body is {type(body).__name__}, not an object")
        task = body.get("task")
        if not isinstance(task, Mapping):
            raise ValueError("task-result body has no 'task' object")
        task_id = task.get("task_id")
        status = task.get("status")
        if not isinstance(task_id, str) or not task_id:
            raise ValueError("task.task_id is missing or not a string")
        if not isinstance(status, str) or not status:
            raise ValueError("task.status is missing or not a string")
        raw_extra = body.get("extra")
        extra: Mapping[str, Any] = raw_extra if isinstance(raw_extra, Mapping) else {}
        videos = []
        raw_videos = body.get("videos") or []
        if not isinstance(raw_videos, list):
            raise ValueError("videos is not a list")
        for i, v in enumerate(raw_videos):
            if not isinstance(v, Mapping) or not isinstance(v.get("video_url"), str):
                raise ValueError(f"videos[{i}].video_url is missing or not a string")
            videos.append(
                Video(
                    url=v["video_url"],
                    ttl_seconds=_as_int(v.get("video_url_ttl")),
                    type=str(v.get("video_type") or "mp4"),
                )
            )
        raw_debug = extra.get("debug_info")
        debug: Mapping[str, Any] = raw_debug if isinstance(raw_debug, Mapping) else {}
        debug_times = {
            k: n
            for k in ("submit_time_ms", "execute_time_ms", "complete_time_ms")
            if (n := _as_int(debug.get(k))) is not None
        }
        return cls(
            task_id=task_id,
            status=status,
            reason=str(task.get("reason") or ""),
            eta_seconds=_as_float(task.get("eta")),
            progress_percent=_as_float(task.get("progress_percent")),
            seed=_as_int(extra.get("seed")),
            videos=tuple(videos),
            debug_times_ms=debug_times,
        )


def _as_int(value: Any) -> int | None:
    """Gateways send numbers as strings or ints; accept both, ignore anything else."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            return None
    return None


def _as_float(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None
