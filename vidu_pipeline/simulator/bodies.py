"""The JSON bodies the simulator answers with: a task result and the admin stats.

Pure shaping, apart from the service and the HTTP code: the task-result body must match the
contract document field for field (strings where the real service sends strings), and the
stats are what tests and drills read to check what was paid for and collected.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..api import contract
from ..api.task_result import TaskStatus
from .state import Task


def task_result_body(
    task: Task, now: float, latency_s: float, video_url: Callable[[], str], url_ttl_s: int
) -> dict[str, Any]:
    """The task-result body; ``video_url()`` signs a download URL, asked only once the task succeeded."""
    status = task.status()
    eta, progress = task.eta_and_progress(now, latency_s)
    debug = {"submit_time_ms": str(int(task.submit_t * 1000))}
    if task.start_t is not None:
        debug["execute_time_ms"] = str(int(task.start_t * 1000))
    if task.done_t is not None:
        debug["complete_time_ms"] = str(int(task.done_t * 1000))
    videos = []
    if status == TaskStatus.SUCCEED.value:
        videos.append({"video_url": video_url(), "video_url_ttl": str(url_ttl_s), "video_type": "mp4"})
    return {
        "task": {
            "task_id": task.task_id,
            "task_type": contract.TASK_TYPE,
            "status": status,
            "reason": task.reason(),
            "eta": eta,
            "progress_percent": progress,
        },
        "extra": {"seed": str(task.seed), "debug_info": debug},
        "videos": videos,
        "images": [],
        "audios": [],
    }


def task_list(tasks: list[Task]) -> list[dict[str, Any]]:
    """Per task, for drills that check what was paid for and what was collected."""
    return [
        {"task_id": t.task_id, "fingerprint": t.fingerprint, "status": t.status(), "submit_t": t.submit_t}
        for t in tasks
    ]


def stats_body(
    counts: dict[str, int],
    summary: dict[str, Any],
    tasks: list[dict[str, Any]],
    rendering: int,
    faults: dict[str, Any],
    config: dict[str, Any],
) -> dict[str, Any]:
    """Counters since the process started, task facts from the durable log, and the settings."""

    def group(prefix: str) -> dict[str, int]:
        return {k[len(prefix) :]: v for k, v in sorted(counts.items()) if k.startswith(prefix)}

    return {
        "submits": {
            "accepted": summary["accepted"],
            "accepted_by_fingerprint": summary["accepted_by_fingerprint"],
            "accepted_this_process": counts.get("submit.accepted", 0),
            "rejected": group("submit.rejected."),
        },
        "polls": {
            "total": counts.get("poll.total", 0),
            "ok": counts.get("poll.ok", 0),
            "rejected": group("poll.rejected."),
        },
        "downloads": {
            k: counts.get(f"download.{k}", 0)
            for k in ("ok", "expired", "bad_signature", "not_found", "truncated", "bytes")
        },
        "faults": faults,
        "tasks": {"total": summary["accepted"], "by_status": summary["tasks_by_status"], "list": tasks},
        "max_concurrent_processing": summary["max_concurrent_processing"],
        "renders": {
            "done": counts.get("renders.done", 0),
            "failed": counts.get("renders.failed", 0),
            "milliseconds_total": counts.get("renders.milliseconds", 0),
            "in_progress_or_waiting": rendering,
        },
        "config": config,
    }
