"""The simulated service itself: its lifecycle, the task schedule, rendering, and what a submit
creates. ``Simulator`` is what tests, drills and the standalone server start.

The HTTP side (endpoints.py, transport.py) only decides how to answer; everything that changes
or reads the service's state goes through here, so a poll only takes the task book's lock and
formats a dict — rendering happens in a small background pool.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import tempfile
import threading
import time
import urllib.parse
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ..api import contract
from ..api.image_refs import redact_url
from .bodies import stats_body, task_list, task_result_body
from .endpoints import Handler
from .faults import FaultConfig, FaultDice, Roll, pick_defect
from .intake import ImageStore, collect_images
from .render import RenderSpec, render_video
from .signing import UrlSigner
from .state import Task, TaskBook
from .transport import SimulatorHTTPServer

log = logging.getLogger(__name__)

FAIL_REASONS = (
    "simulated failure: content moderation",
    "simulated failure: internal render error",
    "simulated failure: upstream model timeout",
)
TICK_S = 0.1  # how often queued tasks are moved on when nobody polls


@dataclasses.dataclass(frozen=True)
class SimulatorConfig:
    api_key: str = "sim-key"
    latency_s: float = 2.0
    concurrency: int = 5
    render_scale: float = 1.0
    url_ttl_s: int = 3600
    state_dir: Path | None = None  # None: a temporary folder, removed on stop()
    faults: FaultConfig = dataclasses.field(default_factory=FaultConfig)
    host: str = "127.0.0.1"
    port: int = 0
    fps: int = 24
    render_workers: int = 2


class Simulator:
    """A local Vidu Q1 reference-to-video service; ``start()`` serves in a background thread."""

    def __init__(self, config: SimulatorConfig | None = None) -> None:
        self.config = config or SimulatorConfig()
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._server: SimulatorHTTPServer | None = None
        self._threads: list[threading.Thread] = []
        self.stopping = threading.Event()
        self._counts: Counter[str] = Counter()
        self.last_request_at = time.monotonic()  # for the standalone server's --idle-exit
        self._counts_lock = threading.Lock()
        self._rendering: set[str] = set()
        self.dice = FaultDice(self.config.faults)

    # --- lifecycle --------------------------------------------------------------------------

    def start(self) -> Simulator:
        state_dir = self._open_state()
        try:
            self._server = SimulatorHTTPServer((self.config.host, self.config.port), self, Handler)
        except OSError:
            self._pool.shutdown()
            self.book.close()
            raise
        host, port = self._server.server_address[:2]
        host = host.decode() if isinstance(host, bytes) else str(host)
        self.base_url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
        for target, name in ((self._server.serve_forever, "http"), (self._tick, "tick")):
            thread = threading.Thread(target=target, name=f"vidu-sim-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        self.advance()
        for task in self.book.awaiting_video():
            self._dispatch(task)
        log.info("Vidu simulator serving on %s (state in %s)", self.base_url, state_dir)
        return self

    def _open_state(self) -> Path:
        """The state folder with its videos, images, URL key and task book; a finished task
        whose video went missing is rendered again."""
        if self.config.state_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="vidu-sim-")
            state_dir = Path(self._tmp.name)
        else:
            state_dir = Path(self.config.state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        self.videos_dir = state_dir / "videos"
        self.videos_dir.mkdir(exist_ok=True)
        self.images = ImageStore(state_dir / "images")
        self.signer = UrlSigner(state_dir / "url-secret")
        self.book = TaskBook(state_dir, concurrency=self.config.concurrency, latency_s=self.config.latency_s)
        self._pool = ThreadPoolExecutor(
            max_workers=max(1, min(2, self.config.render_workers)), thread_name_prefix="vidu-sim-render"
        )
        for task in list(self.book.tasks.values()):
            if task.done_t is not None and task.needs_video and not task.render_error:
                if not self.video_path(task.task_id).exists():
                    self.book.forget_video(task.task_id)
        return state_dir

    def stop(self) -> None:
        if self._server is None:
            return
        self.stopping.set()
        self._server.shutdown()
        self._server.close_connections()
        self._server.server_close()
        for thread in self._threads:
            thread.join()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.book.close()
        self._server = None
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> Simulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def set_faults(self, faults: FaultConfig) -> None:
        self.dice.set_config(faults)

    # --- schedule and rendering -------------------------------------------------------------

    def advance(self) -> None:
        for task in self.book.advance(time.time()):
            if task.needs_video:
                self._dispatch(task)

    def _tick(self) -> None:
        while not self.stopping.wait(TICK_S):
            self.advance()

    def _dispatch(self, task: Task) -> None:
        with self.book.lock:
            if self.stopping.is_set() or task.task_id in self._rendering:
                return
            self._rendering.add(task.task_id)
        self._pool.submit(self._render, task)

    def _render(self, task: Task) -> None:
        began = time.monotonic()
        error = ""
        try:
            spec = RenderSpec(
                images=tuple(self.images.get(ref["sha256"]) for ref in task.images),
                prompt=task.prompt,
                seed=task.seed,
                aspect_ratio=task.options["aspect_ratio"],
                movement_amplitude=task.options["movement_amplitude"],
                bgm=task.options["bgm"],
                render_scale=self.config.render_scale,
                fps=self.config.fps,
                defect=task.defect,
            )
            render_video(spec, self.video_path(task.task_id))
        except Exception as exc:  # a task must end, whatever went wrong
            log.exception("render of task %s failed", task.task_id)
            error = f"{type(exc).__name__}: {exc}"
        self.count("renders.failed" if error else "renders.done")
        self.count("renders.milliseconds", round(1000 * (time.monotonic() - began)))
        self.book.mark_ready(task.task_id, time.time(), error)
        with self.book.lock:
            self._rendering.discard(task.task_id)
        self.advance()

    def video_path(self, task_id: str) -> Path:
        return self.videos_dir / f"{task_id}.mp4"

    # --- tasks ------------------------------------------------------------------------------

    def create_task(self, body: dict[str, Any], fingerprint: str, roll: Roll, authorization: str = "") -> Task:
        """Accept a validated body: keep its images, pick the seed, queue the task durably.
        ``authorization`` is the request's header, for the echo_auth_in_reason fault."""
        request = contract.GenerationRequest.from_payload(body)
        images, fail_reason = collect_images(list(request.images))
        refs = []
        for i, ref in enumerate(request.images):
            entry: dict[str, Any] = {"sha256": self.images.put(images[i]) if images else None}
            if not ref.startswith("data:"):
                entry["url"] = redact_url(ref)
            refs.append(entry)
        fail_reason = fail_reason or _injected_failure(roll, authorization)
        defect = None if fail_reason else pick_defect(roll.config, body)
        if defect:
            roll.dice.count("submit", f"defect_{defect}")
        now = time.time()
        task = Task(
            task_id=str(uuid.uuid4()),
            fingerprint=fingerprint,
            seed=request.seed if request.seed is not None else secrets.randbelow(2**31),
            prompt=request.prompt,
            options=request.options(),
            images=refs,
            submit_t=now,
            planned_finish_t=self.book.plan_finish(now),
            fail_reason=fail_reason,
            defect=defect,
        )
        self.book.add(task)
        self.advance()
        return task

    def task_result(self, task_id: str) -> dict[str, Any] | None:
        """The task-result body as of now, or None for an unknown task id."""
        self.advance()
        with self.book.lock:
            task = self.book.tasks.get(task_id)
            if task is None:
                return None
            now = time.time()
            return task_result_body(
                task,
                now,
                self.config.latency_s,
                lambda: self.signed_url(task.task_id, now),
                self.config.url_ttl_s,
            )

    def signed_url(self, task_id: str, now: float) -> str:
        return self.signer.video_url(self.base_url, task_id, now, self.config.url_ttl_s)

    # --- stats ------------------------------------------------------------------------------

    def count(self, key: str, n: int = 1) -> None:
        with self._counts_lock:
            self._counts[key] += n

    def stats(self) -> dict[str, Any]:
        """Counters since this process started, plus task facts read from the durable log."""
        self.advance()
        with self._counts_lock:
            counts = dict(self._counts)
        with self.book.lock:
            rendering = len(self._rendering)
            tasks = task_list(list(self.book.tasks.values()))
        config = {
            "latency_s": self.config.latency_s,
            "concurrency": self.config.concurrency,
            "render_scale": self.config.render_scale,
            "url_ttl_s": self.config.url_ttl_s,
            "fps": self.config.fps,
            "faults": dataclasses.asdict(self.dice.config),
        }
        summary = self.book.summary()
        return stats_body(counts, summary, tasks, rendering, self.dice.snapshot(), config)


def _injected_failure(roll: Roll, authorization: str) -> str:
    """A failure the fault settings ask for at submit, or "": a random failure reason, or one
    that echoes the Authorization header (for the tests that check it is scrubbed)."""
    if roll.hit("fail_task", roll.config.fail_tasks):
        return FAIL_REASONS[int(roll.uniform("fail_reason") * len(FAIL_REASONS))]
    if roll.hit("echo_auth_in_reason", roll.config.echo_auth_in_reason):
        return (
            f"simulated failure: upstream refused 'Authorization: {authorization}' "
            f"(as received: {urllib.parse.quote(authorization)})"
        )
    return ""
