"""The simulator's endpoints: submit and poll as the contract has them, signed video downloads,
and the admin stats/faults pages — each with the faults it can be asked to show.

Routing and the per-endpoint decisions live here; how an answer is written is in transport.py,
what a task result looks like in bodies.py, and what the service does in service.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
import urllib.parse
from collections.abc import Callable
from typing import Any

from ..api import contract
from ..images import inspect_image_bytes
from .faults import FaultConfig, Roll
from .signing import VIDEO_PREFIX
from .transport import AnsweringHandler

log = logging.getLogger(__name__)

STATS_PATH = "/_simulator/stats"
FAULTS_PATH = "/_simulator/faults"


class Handler(AnsweringHandler):
    def do_POST(self) -> None:
        self._guarded(self._route_post)

    def do_GET(self) -> None:
        self._guarded(self._route_get)

    def _guarded(self, route: Callable[[], None]) -> None:
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

    # --- faults shared by submit and poll ---------------------------------------------------

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

    # --- the contract's endpoints -----------------------------------------------------------

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
        result = sim.task_result(task_id)
        if result is None:
            sim.count("poll.rejected.TASK_NOT_FOUND")
            return self._error(404, "TASK_NOT_FOUND", f"no task with id {task_id[:100]!r}")
        sim.count("poll.ok")
        if roll.hit("drip", faults.drip):
            return self._drip(200, result, faults.drip_s)
        self._json(200, result)

    # --- downloads and admin ----------------------------------------------------------------

    def _download(self, task_id: str, query: dict[str, str]) -> None:
        sim = self.server.sim
        expires, sig = query.get("expires", ""), query.get("sig", "")
        if not sim.signer.check(task_id, expires, sig):
            sim.count("download.bad_signature")
            return self._s3_error(403, "SignatureDoesNotMatch", "The request signature is not valid.")
        if time.time() >= int(expires):
            sim.count("download.expired")
            return self._s3_error(403, "AccessDenied", "Request has expired", expires=expires)
        try:
            data = sim.video_path(task_id).read_bytes()
        except FileNotFoundError:
            sim.count("download.not_found")
            return self._s3_error(404, "NoSuchKey", "The specified key does not exist.")
        roll = sim.dice.roll("download", task_id)
        faults = roll.config
        if roll.hit("slow", faults.slow):
            time.sleep(faults.slow_s)
        if roll.hit("truncate", faults.truncate):
            return self._truncated(data, roll)
        sim.count("download.ok")
        sim.count("download.bytes", len(data))
        self._send(200, data, "video/mp4")

    def _truncated(self, data: bytes, roll: Roll) -> None:
        """Part of the video, announced with its full length or (sometimes) the short one."""
        self.server.sim.count("download.truncated")
        short = data[: max(1, int(len(data) * (0.1 + 0.8 * roll.uniform("truncate_at"))))]
        matching = roll.hit("truncate_matching_length", roll.config.truncate_matching_length)
        self.send_response(200)
        self.send_header("Content-Type", "video/mp4")
        self.send_header("Content-Length", str(len(short) if matching else len(data)))
        self.end_headers()
        self.wfile.write(short)
        self.close_connection = True

    def _set_faults(self, raw: bytes) -> None:
        if not self._admin_ok():
            return
        try:
            faults = FaultConfig.from_dict(json.loads(raw))
        except (ValueError, TypeError) as exc:
            return self._error(400, "INVALID_REQUEST_BODY", str(exc))
        self.server.sim.set_faults(faults)
        self._json(200, dataclasses.asdict(faults))


def _fingerprint(body: Any, raw: bytes) -> str:
    """The request's fingerprint; a body too broken to have one is keyed by its bytes."""
    try:
        return contract.payload_fingerprint(body)
    except (AttributeError, TypeError, ValueError):
        return hashlib.sha256(raw).hexdigest()
