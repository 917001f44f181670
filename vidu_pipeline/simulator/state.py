"""Tasks, their schedule and their durable log.

A task holds one of ``concurrency`` slots from its start until it is done, and it is done only
when both its latency has elapsed and its video exists (or it failed): a slow render keeps the
slot, so clients never see more than ``concurrency`` tasks processing. Queued tasks take freed
slots in submit order. Times are exact: a task queued behind one that finished at t starts at
t, even if nobody looked at the clock then — ``advance(now)`` replays what happened since the
last look, so every poll sees the state the clock implies.

The log (``tasks.jsonl`` in the state folder) makes tasks outlive the process: a submit is
fsync'ed before its task id is returned; start/done events are flushed (they survive a killed
process, and a lost one is replayed from the clock anyway). A torn last line is ignored.
"""

from __future__ import annotations

import dataclasses
import fcntl
import heapq
import json
import math
import os
import threading
from collections import Counter, deque
from pathlib import Path
from typing import Any

from ..api.task_result import TaskStatus


@dataclasses.dataclass
class Task:
    task_id: str
    fingerprint: str
    seed: int
    prompt: str
    options: dict[str, Any]  # aspect_ratio, movement_amplitude, bgm, duration, resolution
    images: list[dict[str, Any]]  # per reference: {"sha256": …} and, for URLs, "url" (redacted)
    submit_t: float
    planned_finish_t: float  # the estimate behind a queued task's eta
    fail_reason: str = ""  # decided at submit: injected failure or an unusable image URL
    defect: str | None = None  # decided at submit: a render defect (faults.pick_defect)
    start_t: float | None = None
    finish_t: float | None = None  # start + latency: the earliest possible completion
    ready_t: float | None = None  # when the video was written (or the render gave up)
    render_error: str = ""
    done_t: float | None = None

    SUBMIT_FIELDS = (
        "task_id",
        "fingerprint",
        "seed",
        "prompt",
        "options",
        "images",
        "submit_t",
        "planned_finish_t",
        "fail_reason",
        "defect",
    )

    @property
    def needs_video(self) -> bool:
        return not self.fail_reason

    def status(self) -> str:
        if self.start_t is None:
            return TaskStatus.QUEUED.value
        if self.done_t is None:
            return TaskStatus.PROCESSING.value
        if self.fail_reason or self.render_error:
            return TaskStatus.FAILED.value
        return TaskStatus.SUCCEED.value

    def reason(self) -> str:
        if self.done_t is None:
            return ""
        return self.fail_reason or (f"render failed: {self.render_error}" if self.render_error else "")

    def eta_and_progress(self, now: float, latency_s: float) -> tuple[int, int]:
        """Seconds until the expected end (queue wait included) and percent done."""
        if self.done_t is not None:
            return 0, 100
        if self.start_t is None:
            return math.ceil(max(self.planned_finish_t - now, latency_s)), 0
        assert self.finish_t is not None
        if now >= self.finish_t:  # latency over, video still rendering
            return 1, 99
        span = max(self.finish_t - self.start_t, 1e-9)
        return max(1, math.ceil(self.finish_t - now)), min(99, int(100 * (now - self.start_t) / span))


class TaskBook:
    """All tasks of a state folder: the FIFO schedule over the slots, and the log."""

    def __init__(self, state_dir: Path, *, concurrency: int, latency_s: float) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.concurrency = concurrency
        self.latency_s = latency_s
        self.lock = threading.RLock()
        self.tasks: dict[str, Task] = {}
        self._queue: deque[str] = deque()
        self._processing: set[str] = set()
        self._free: list[float] = []  # times at which the idle slots became free
        self._plan: list[float] = []  # planned finish per slot, for eta estimates
        self._log_path = state_dir / "tasks.jsonl"
        self._log_lock = threading.Lock()
        self._log = open(self._log_path, "a", encoding="utf-8")
        try:  # one live simulator per state folder; the kernel drops the lock of a killed one
            fcntl.flock(self._log.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._log.close()
            raise RuntimeError(f"{state_dir} is in use by another running simulator") from None
        self._load()

    # --- log --------------------------------------------------------------------------------

    def _load(self) -> None:
        line = "\n"
        with open(self._log_path, encoding="utf-8") as f:
            for line in f:
                try:
                    event = json.loads(line)
                except json.JSONDecodeError:
                    continue  # the torn tail of a killed writer
                self._replay(event)
        if not line.endswith("\n"):  # end the torn line, or the next event would join it
            self._log.write("\n")
            self._log.flush()
        done = sorted(t.done_t for t in self.tasks.values() if t.done_t is not None)
        for task in self.tasks.values():
            if task.start_t is None:
                self._queue.append(task.task_id)
            elif task.done_t is None:
                self._processing.add(task.task_id)
        self._queue = deque(sorted(self._queue, key=lambda i: self.tasks[i].submit_t))
        idle = max(0, self.concurrency - len(self._processing))
        self._free = ([0.0] * idle + done)[-idle:] if idle else []
        heapq.heapify(self._free)
        finishes = sorted(t.planned_finish_t for t in self.tasks.values())
        self._plan = ([0.0] * self.concurrency + finishes)[-self.concurrency :]
        heapq.heapify(self._plan)

    def _replay(self, event: dict[str, Any]) -> None:
        kind = event.pop("event", None)
        if kind == "submit":
            # Logs written before a field existed still load (it keeps its default).
            task = Task(**{k: event[k] for k in Task.SUBMIT_FIELDS if k in event})
            self.tasks[task.task_id] = task
            return
        known = self.tasks.get(event.get("task_id", ""))
        if known is None:
            return
        task = known
        if kind == "start":
            task.start_t, task.finish_t = event["start_t"], event["finish_t"]
            if not task.needs_video:
                task.ready_t = task.finish_t
        elif kind == "done":
            task.done_t, task.ready_t = event["done_t"], event["done_t"]
            task.render_error = event.get("render_error", "")

    def _append(self, event: dict[str, Any], *, durable: bool) -> None:
        line = json.dumps(event, separators=(",", ":"), ensure_ascii=False) + "\n"
        with self._log_lock:
            self._log.write(line)
            self._log.flush()
            if durable:
                os.fsync(self._log.fileno())

    def close(self) -> None:
        with self._log_lock:
            self._log.close()

    # --- schedule ---------------------------------------------------------------------------

    def add(self, task: Task) -> None:
        """Queue a new task; durable once this returns."""
        self._append({"event": "submit", **{k: getattr(task, k) for k in Task.SUBMIT_FIELDS}}, durable=True)
        with self.lock:
            self.tasks[task.task_id] = task
            self._queue.append(task.task_id)

    def plan_finish(self, now: float) -> float:
        """Reserve the estimated finish of a task submitted now (FIFO over the slots)."""
        with self.lock:
            finish = max(now, heapq.heappop(self._plan)) + self.latency_s
            heapq.heappush(self._plan, finish)
            return finish

    def mark_ready(self, task_id: str, at: float, render_error: str = "") -> None:
        with self.lock:
            task = self.tasks[task_id]
            task.ready_t, task.render_error = at, render_error

    def forget_video(self, task_id: str) -> None:
        """The video of a finished task is gone from disk: render it again, done again later."""
        with self.lock:
            task = self.tasks[task_id]
            task.ready_t = task.done_t = None
            self._processing.add(task_id)

    def advance(self, now: float) -> list[Task]:
        """Apply completions and starts up to ``now``; return the tasks that started."""
        started: list[Task] = []
        with self.lock:
            while True:
                for task_id in list(self._processing):
                    task = self.tasks[task_id]
                    if task.finish_t is not None and task.finish_t <= now and task.ready_t is not None:
                        task.done_t = done_t = max(task.finish_t, task.ready_t)
                        self._processing.discard(task_id)
                        if len(self._free) + len(self._processing) < self.concurrency:
                            heapq.heappush(self._free, done_t)
                        event = {"event": "done", "task_id": task_id, "done_t": task.done_t}
                        if task.render_error:
                            event["render_error"] = task.render_error
                        self._append(event, durable=False)
                if not (self._queue and self._free):
                    return started
                while self._queue and self._free:
                    task = self.tasks[self._queue.popleft()]
                    task.start_t = max(task.submit_t, heapq.heappop(self._free))
                    task.finish_t = task.start_t + self.latency_s
                    if not task.needs_video:
                        task.ready_t = task.finish_t
                    self._processing.add(task.task_id)
                    self._append(
                        {"event": "start", "task_id": task.task_id, "start_t": task.start_t, "finish_t": task.finish_t},
                        durable=False,
                    )
                    started.append(task)

    def awaiting_video(self) -> list[Task]:
        """Started tasks that still need their video (after a restart, say)."""
        with self.lock:
            return [
                self.tasks[i] for i in self._processing if self.tasks[i].needs_video and self.tasks[i].ready_t is None
            ]

    # --- stats ------------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        with self.lock:
            tasks = list(self.tasks.values())
        by_status = Counter(t.status() for t in tasks)
        return {
            "accepted": len(tasks),
            "accepted_by_fingerprint": dict(Counter(t.fingerprint for t in tasks)),
            "tasks_by_status": {s.value: by_status.get(s.value, 0) for s in TaskStatus},
            "max_concurrent_processing": _max_overlap(tasks),
        }


def _max_overlap(tasks: list[Task]) -> int:
    """Most tasks processing at one instant, from the recorded start/done times."""
    edges = []
    for t in tasks:
        if t.start_t is not None:
            edges.append((t.start_t, 1))
            edges.append((t.done_t if t.done_t is not None else math.inf, -1))
    best = current = 0
    for _, step in sorted(edges):  # at equal times -1 sorts first: a freed slot is reused
        current += step
        best = max(best, current)
    return best
