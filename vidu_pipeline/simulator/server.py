"""The simulator's HTTP server: the contract's two endpoints, signed downloads, admin stats.

Built on the standard library's ThreadingHTTPServer with HTTP/1.1 keep-alive, so a client's
connection pool is reused and hundreds of polls per second fit on two cores. A poll only takes
the task book's lock and formats a dict — rendering happens in a small background pool.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import logging
import os
import secrets
import socket
import tempfile
import threading
import time
import urllib.parse
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from ..api import contract
from ..images import inspect_image_bytes
from .faults import FaultConfig, FaultDice, Roll, pick_defect
from .intake import ImageStore, collect_images
from .render import RenderSpec, render_video
from .state import Task, TaskBook

log = logging.getLogger(__name__)

VIDEO_PREFIX = "/_simulator/videos/"
STATS_PATH = "/_simulator/stats"
FAULTS_PATH = "/_simulator/faults"
MAX_BODY_BYTES = 128_000_000  # 7 images × 10 MB decoded, base64-inflated, plus slack
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
        self._server: _Server | None = None
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._counts: Counter[str] = Counter()
        self.last_request_at = time.monotonic()  # for the standalone server's --idle-exit
        self._counts_lock = threading.Lock()
        self._rendering: set[str] = set()
        self.dice = FaultDice(self.config.faults)

    # --- lifecycle --------------------------------------------------------------------------

    def start(self) -> Simulator:
        if self.config.state_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="vidu-sim-")
            state_dir = Path(self._tmp.name)
        else:
            state_dir = Path(self.config.state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        self.videos_dir = state_dir / "videos"
        self.videos_dir.mkdir(exist_ok=True)
        self.images = ImageStore(state_dir / "images")
        self._secret = _url_secret(state_dir / "url-secret")
        self.book = TaskBook(state_dir, concurrency=self.config.concurrency, latency_s=self.config.latency_s)
        self._pool = ThreadPoolExecutor(
            max_workers=max(1, min(2, self.config.render_workers)), thread_name_prefix="vidu-sim-render"
        )
        for task in list(self.book.tasks.values()):
            if task.done_t is not None and task.needs_video and not task.render_error:
                if not self.video_path(task.task_id).exists():
                    self.book.forget_video(task.task_id)
        try:
            self._server = _Server((self.config.host, self.config.port), self)
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

    def stop(self) -> None:
        if self._server is None:
            return
        self._stop.set()
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
        while not self._stop.wait(TICK_S):
            self.advance()

    def _dispatch(self, task: Task) -> None:
        with self.book.lock:
            if self._stop.is_set() or task.task_id in self._rendering:
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
                entry["url"] = contract.redact_url(ref)
            refs.append(entry)
        if not fail_reason and roll.hit("fail_task", roll.config.fail_tasks):
            fail_reason = FAIL_REASONS[int(roll.uniform("fail_reason") * len(FAIL_REASONS))]
        if not fail_reason and roll.hit("echo_auth_in_reason", roll.config.echo_auth_in_reason):
            fail_reason = (
                f"simulated failure: upstream refused 'Authorization: {authorization}' "
                f"(as received: {urllib.parse.quote(authorization)})"
            )
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

    def task_result(self, task: Task) -> dict[str, Any]:
        now = time.time()
        status = task.status()
        eta, progress = task.eta_and_progress(now, self.config.latency_s)
        debug = {"submit_time_ms": str(int(task.submit_t * 1000))}
        if task.start_t is not None:
            debug["execute_time_ms"] = str(int(task.start_t * 1000))
        if task.done_t is not None:
            debug["complete_time_ms"] = str(int(task.done_t * 1000))
        videos = []
        if status == contract.TaskStatus.SUCCEED.value:
            videos.append(
                {
                    "video_url": self.signed_url(task.task_id, now),
                    "video_url_ttl": str(self.config.url_ttl_s),
                    "video_type": "mp4",
                }
            )
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

    # --- signed download URLs ---------------------------------------------------------------

    def signed_url(self, task_id: str, now: float) -> str:
        expires = int(now) + 1 + self.config.url_ttl_s  # never shorter than the ttl
        return f"{self.base_url}{VIDEO_PREFIX}{task_id}.mp4?expires={expires}&sig={self._sign(task_id, expires)}"

    def _sign(self, task_id: str, expires: int) -> str:
        return hmac.new(self._secret, f"{task_id}:{expires}".encode(), hashlib.sha256).hexdigest()

    def check_signature(self, task_id: str, expires: str, sig: str) -> bool:
        return expires.isdigit() and hmac.compare_digest(self._sign(task_id, int(expires)), sig)

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
            # Per task, for drills that check what was paid for and what was collected.
            task_list = [
                {"task_id": t.task_id, "fingerprint": t.fingerprint, "status": t.status(), "submit_t": t.submit_t}
                for t in self.book.tasks.values()
            ]

        def group(prefix: str) -> dict[str, int]:
            return {k[len(prefix) :]: v for k, v in sorted(counts.items()) if k.startswith(prefix)}

        summary = self.book.summary()
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
            "faults": self.dice.snapshot(),
            "tasks": {"total": summary["accepted"], "by_status": summary["tasks_by_status"], "list": task_list},
            "max_concurrent_processing": summary["max_concurrent_processing"],
            "renders": {
                "done": counts.get("renders.done", 0),
                "failed": counts.get("renders.failed", 0),
                "milliseconds_total": counts.get("renders.milliseconds", 0),
                "in_progress_or_waiting": rendering,
            },
            "config": {
                "latency_s": self.config.latency_s,
                "concurrency": self.config.concurrency,
                "render_scale": self.config.render_scale,
                "url_ttl_s": self.config.url_ttl_s,
                "fps": self.config.fps,
                "faults": dataclasses.asdict(self.dice.config),
            },
        }


def _fingerprint(body: Any, raw: bytes) -> str:
    """The request's fingerprint; a body too broken to have one is keyed by its bytes."""
    try:
        return contract.payload_fingerprint(body)
    except (AttributeError, TypeError, ValueError):
        return hashlib.sha256(raw).hexdigest()


def _url_secret(path: Path) -> bytes:
    """The key that signs download URLs, kept in the state folder so URLs survive restarts."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return bytes.fromhex(path.read_text().strip())
    secret = secrets.token_bytes(32)
    with os.fdopen(fd, "w") as f:
        f.write(secret.hex())
        f.flush()
        os.fsync(f.fileno())
    return secret


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], sim: Simulator) -> None:
        self.sim = sim
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def process_request_thread(self, request, client_address) -> None:
        with self._connections_lock:
            self._connections.add(request)
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._connections_lock:
                self._connections.discard(request)

    def close_connections(self) -> None:
        """End idle keep-alive connections so no handler outlives stop()."""
        with self._connections_lock:
            for conn in self._connections:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def handle_error(self, request, client_address) -> None:
        log.debug("connection from %s ended with an error", client_address, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "vidu-simulator"
    timeout = 120  # idle keep-alive connections are closed after this
    # Headers and body go out in separate writes; with Nagle on, a keep-alive client's delayed
    # ACK stalls every answer by ~40 ms.
    disable_nagle_algorithm = True
    server: _Server

    # --- plumbing ---------------------------------------------------------------------------

    def version_string(self) -> str:
        return self.server_version

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet by default; the path only, never the query (signatures) or a body."""
        log.debug("%s %s", self.command, getattr(self, "path", "").split("?", 1)[0])

    def _send(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj, ensure_ascii=False).encode("utf-8"), "application/json", headers)

    def _error(
        self,
        status: int,
        reason: str,
        message: str,
        metadata: dict | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        body = {"code": status, "reason": reason, "message": message, "metadata": metadata or {}}
        self._json(status, body, headers)

    def _drip(self, status: int, obj: Any, every_s: float) -> None:
        """The whole answer, status line included, one byte every ``every_s`` seconds, until
        sent, the client hangs up or the simulator stops."""
        body = json.dumps(obj).encode("utf-8")
        answer = (
            f"HTTP/1.1 {status} OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        ).encode("ascii") + body
        self.close_connection = True
        for i in range(len(answer)):
            if self.server.sim._stop.wait(every_s):
                return
            try:
                self.wfile.write(answer[i : i + 1])
                self.wfile.flush()
            except OSError:
                return

    def _drop(self) -> None:
        """Answer nothing: the client sees the connection close."""
        self.close_connection = True

    def _authorised(self) -> bool:
        expected = f"Bearer {self.server.sim.config.api_key}".encode()
        return hmac.compare_digest(self.headers.get("Authorization", "").encode(), expected)

    def _read_body(self) -> bytes | None:
        """The request body, or None after answering why it cannot be read."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            self._error(411, "LENGTH_REQUIRED", "send the body with a Content-Length")
            return None
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_BODY_BYTES:
            self.close_connection = True
            self._error(413, "REQUEST_TOO_LARGE", f"body must be 0..{MAX_BODY_BYTES:,} bytes")
            return None
        return self.rfile.read(length)

    # --- routing ----------------------------------------------------------------------------

    def do_POST(self) -> None:
        self._guarded(self._route_post)

    def do_GET(self) -> None:
        self._guarded(self._route_get)

    def _guarded(self, route) -> None:
        """A bug answers 500 and is logged, rather than looking like a dropped connection."""
        self.server.sim.last_request_at = time.monotonic()
        try:
            route()
        except Exception:
            log.exception("simulator error on %s %s", self.command, self.path.split("?", 1)[0])
            self.close_connection = True
            try:
                self._error(500, "INTERNAL_ERROR", "simulator error (see its log)")
            except OSError:
                pass

    def _route_post(self) -> None:
        path = self.path.split("?", 1)[0]
        body = self._read_body()
        if body is None:
            return
        if path == contract.SUBMIT_PATH:
            self._submit(body)
        elif path == FAULTS_PATH:
            self._set_faults(body)
        else:
            self._error(404, "NOT_FOUND", f"no such endpoint: POST {path}")

    def _route_get(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query))
        if url.path == contract.TASK_RESULT_PATH:
            self._poll(query.get("task_id", ""))
        elif url.path.startswith(VIDEO_PREFIX) and url.path.endswith(".mp4"):
            self._download(url.path[len(VIDEO_PREFIX) : -len(".mp4")], query)
        elif url.path == STATS_PATH:
            if self._admin_ok():
                self._json(200, self.server.sim.stats())
        elif url.path == FAULTS_PATH:
            if self._admin_ok():
                self._json(200, dataclasses.asdict(self.server.sim.dice.config))
        else:
            self._error(404, "NOT_FOUND", f"no such endpoint: GET {url.path}")

    def _admin_ok(self) -> bool:
        if self._authorised():
            return True
        self._error(401, "FAILED_TO_AUTH", "missing or wrong API key")
        return False

    # --- endpoints --------------------------------------------------------------------------

    def _common_faults(self, roll: Roll, prefix: str, rate_limit: float, server_error: float) -> str:
        """Slow, 429 and 5xx shared by submit and poll.

        Returns "answered" when a fault has answered, "5xx_after_accept" when a submit must
        create its task and then answer 5xx, "" otherwise.
        """
        sim = self.server.sim
        faults = roll.config
        if roll.hit("slow", faults.slow):
            time.sleep(faults.slow_s)
        if roll.hit("rate_limit", rate_limit):
            headers = {}
            if not roll.hit("rate_limit_without_retry_after", faults.rate_limit_without_retry_after):
                headers["Retry-After"] = str(faults.retry_after_s)
            sim.count(f"{prefix}.rejected.RATE_LIMIT_EXCEEDED")
            self._error(429, "RATE_LIMIT_EXCEEDED", "simulated rate limit, slow down", headers=headers)
            return "answered"
        if roll.hit("server_error", server_error):
            if prefix == "submit" and roll.hit("server_error_after_accept", faults.server_error_after_accept):
                return "5xx_after_accept"
            sim.count(f"{prefix}.rejected.SERVER_ERROR")
            self._server_error(roll)
            return "answered"
        return ""

    def _server_error(self, roll: Roll) -> None:
        status = (500, 502, 503)[int(roll.uniform("server_error_status") * 3)]
        if status == 502:  # what a proxy in front of the service answers: not JSON
            self._send(502, b"<html><body><h1>502 Bad Gateway</h1></body></html>", "text/html")
        else:
            self._error(status, "SERVER_ERROR", "simulated server error")

    def _submit(self, raw: bytes) -> None:
        sim = self.server.sim
        if not self._authorised():
            sim.count("submit.rejected.FAILED_TO_AUTH")
            return self._error(401, "FAILED_TO_AUTH", "missing or wrong API key")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            body, problems = None, [f"body: not valid JSON ({exc})"]
        fingerprint = _fingerprint(body, raw)
        roll = sim.dice.roll("submit", fingerprint)
        faults = roll.config
        outcome = self._common_faults(roll, "submit", faults.submit_rate_limit, faults.submit_server_error)
        if outcome == "answered":
            return
        drop_after = False
        if not outcome and roll.hit("drop", faults.submit_drop):
            drop_after = roll.hit("drop_after_accept", faults.drop_after_accept)
            if not drop_after:
                sim.count("submit.rejected.CONNECTION_DROPPED")
                return self._drop()
        if body is not None:
            problems = contract.validate_payload(body, inspect=inspect_image_bytes)
        if problems:
            sim.count("submit.rejected.INVALID_REQUEST_BODY")
            return self._error(400, "INVALID_REQUEST_BODY", "; ".join(problems), metadata={"problems": problems})
        task = sim.create_task(body, fingerprint, roll, self.headers.get("Authorization", ""))
        sim.count("submit.accepted")
        if drop_after:
            return self._drop()
        if outcome == "5xx_after_accept":
            return self._server_error(roll)
        if roll.hit("drip", faults.drip):
            return self._drip(200, {"task_id": task.task_id}, faults.drip_s)
        self._json(200, {"task_id": task.task_id})

    def _poll(self, task_id: str) -> None:
        sim = self.server.sim
        sim.count("poll.total")
        if not self._authorised():
            sim.count("poll.rejected.FAILED_TO_AUTH")
            return self._error(401, "FAILED_TO_AUTH", "missing or wrong API key")
        if not task_id:
            sim.count("poll.rejected.INVALID_REQUEST")
            return self._error(400, "INVALID_REQUEST", "task_id: required query parameter")
        roll = sim.dice.roll("poll", task_id)
        faults = roll.config
        if self._common_faults(roll, "poll", faults.poll_rate_limit, faults.poll_server_error):
            return  # polls never draw "5xx_after_accept"
        if roll.hit("drop", faults.poll_drop):
            sim.count("poll.rejected.CONNECTION_DROPPED")
            return self._drop()
        sim.advance()
        with sim.book.lock:
            task = sim.book.tasks.get(task_id)
            result = sim.task_result(task) if task is not None else None
        if result is None:
            sim.count("poll.rejected.TASK_NOT_FOUND")
            return self._error(404, "TASK_NOT_FOUND", f"no task with id {task_id[:100]!r}")
        sim.count("poll.ok")
        if roll.hit("drip", faults.drip):
            return self._drip(200, result, faults.drip_s)
        self._json(200, result)

    def _download(self, task_id: str, query: dict[str, str]) -> None:
        sim = self.server.sim
        expires, sig = query.get("expires", ""), query.get("sig", "")
        if not sim.check_signature(task_id, expires, sig):
            sim.count("download.bad_signature")
            return self._s3_error(403, "SignatureDoesNotMatch", "The request signature is not valid.")
        if time.time() >= int(expires):
            sim.count("download.expired")
            return self._s3_error(403, "AccessDenied", "Request has expired", expires=expires)
        path = sim.video_path(task_id)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            sim.count("download.not_found")
            return self._s3_error(404, "NoSuchKey", "The specified key does not exist.")
        roll = sim.dice.roll("download", task_id)
        faults = roll.config
        if roll.hit("slow", faults.slow):
            time.sleep(faults.slow_s)
        if roll.hit("truncate", faults.truncate):
            sim.count("download.truncated")
            short = data[: max(1, int(len(data) * (0.1 + 0.8 * roll.uniform("truncate_at"))))]
            announced = (
                len(short) if roll.hit("truncate_matching_length", faults.truncate_matching_length) else len(data)
            )
            self.send_response(200)
            self.send_header("Content-Type", "video/mp4")
            self.send_header("Content-Length", str(announced))
            self.end_headers()
            self.wfile.write(short)
            self.close_connection = True
            return
        sim.count("download.ok")
        sim.count("download.bytes", len(data))
        self._send(200, data, "video/mp4")

    def _s3_error(self, status: int, code: str, message: str, expires: str | None = None) -> None:
        """Storage errors look like S3's: XML, not the API's JSON."""
        extra = ""
        if expires is not None:
            extra = f"<Expires>{expires}</Expires><ServerTime>{int(time.time())}</ServerTime>"
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{code}</Code><Message>{message}</Message>{extra}</Error>"
        )
        self._send(status, body.encode(), "application/xml")

    def _set_faults(self, raw: bytes) -> None:
        if not self._admin_ok():
            return
        try:
            faults = FaultConfig.from_dict(json.loads(raw))
        except (ValueError, TypeError) as exc:
            return self._error(400, "INVALID_REQUEST_BODY", str(exc))
        self.server.sim.set_faults(faults)
        self._json(200, dataclasses.asdict(faults))
