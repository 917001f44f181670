"""HTTP plumbing under the simulator's endpoints: the server and the ways a handler answers.

The standard library's ThreadingHTTPServer with HTTP/1.1 keep-alive, so a client's connection
pool is reused and hundreds of polls per second fit on two cores; it tracks its connections so
stop() can end idle ones. The handler base knows how to answer — JSON, the API's error shape,
S3's XML errors, a byte-at-a-time drip, a dropped connection — and nothing about endpoints.
"""

from __future__ import annotations

import hmac
import json
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .service import Simulator

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 128_000_000  # 7 images × 10 MB decoded, base64-inflated, plus slack


class SimulatorHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], sim: Simulator, handler: type[BaseHTTPRequestHandler]) -> None:
        self.sim = sim
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, handler)

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


class AnsweringHandler(BaseHTTPRequestHandler):
    """Ways to answer one request; the endpoints subclass it."""

    protocol_version = "HTTP/1.1"
    server_version = "vidu-simulator"
    timeout = 120  # idle keep-alive connections are closed after this
    # Headers and body go out in separate writes; with Nagle on, a keep-alive client's delayed
    # ACK stalls every answer by ~40 ms.
    disable_nagle_algorithm = True
    server: SimulatorHTTPServer

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
            if self.server.sim.stopping.wait(every_s):
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

    def _admin_ok(self) -> bool:
        if self._authorised():
            return True
        self._error(401, "FAILED_TO_AUTH", "missing or wrong API key")
        return False

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
