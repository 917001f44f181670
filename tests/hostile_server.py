"""A small hostile HTTP server on loopback: answers scripted per (method, path), byte by byte.

It answers what a well-behaved service never would — a 202 with a task id, a redirect on a
submit, a body cut off mid-way, headers or a body dripped one byte at a time — so the client's
handling of each can be tested over real HTTP. Every request is recorded in ``seen`` and every
accepted connection counted; ``stop()`` ends any drip still running.

    server.on("POST", "/path", drip_headers(200, b'{"task_id": "t"}', every_s=0.2))
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

Script = Callable[["_Handler"], None]


class HostileServer:
    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], Script] = {}
        self.seen: list[dict] = []
        self.connections = 0
        self.stopping = threading.Event()
        hostile = self

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def process_request(self, request, client_address) -> None:
                hostile.connections += 1
                super().process_request(request, client_address)

        class Handler(_Handler):
            server_of = hostile

        self._server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def on(self, method: str, path: str, script: Script) -> None:
        self.routes[method, path] = script

    def count(self, method: str, path: str | None = None) -> int:
        return sum(1 for r in self.seen if r["method"] == method and path in (None, r["path"]))

    def stop(self) -> None:
        self.stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def __enter__(self) -> HostileServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_of: HostileServer

    def _handle(self) -> None:
        path, _, query = self.path.partition("?")
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        self.server_of.seen.append(
            {"method": self.command, "path": path, "query": query, "headers": dict(self.headers), "body": body}
        )
        script = self.server_of.routes.get((self.command, path), reply(404, b'{"message": "no route"}'))
        self.close_connection = True  # unless the script keeps the connection alive
        try:
            script(self)
        except OSError:
            self.close_connection = True  # the client hung up (e.g. its deadline cut the connection)

    do_GET = do_POST = _handle

    def log_message(self, *args) -> None:
        pass

    def write(self, data: bytes) -> None:
        self.wfile.write(data)
        self.wfile.flush()

    def drip(self, data: bytes, every_s: float) -> None:
        """One byte every ``every_s`` seconds, until done or the server stops."""
        for i in range(len(data)):
            if self.server_of.stopping.wait(every_s):
                return
            self.write(data[i : i + 1])


def head(
    status: int, headers: dict[str, str] | None = None, length: int | None = None, keep_alive: bool = False
) -> bytes:
    """A status line and headers; Content-Length only when given."""
    lines = [f"HTTP/1.1 {status} Whatever"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    if not keep_alive:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def as_bytes(body: bytes | dict | str) -> bytes:
    if isinstance(body, dict):
        return json.dumps(body).encode()
    return body.encode() if isinstance(body, str) else body


def reply(
    status: int, body: bytes | dict | str = b"", headers: dict[str, str] | None = None, keep_alive: bool = False
) -> Script:
    """A complete answer (Content-Length set); ``keep_alive`` leaves the connection open for
    the client's next request."""
    data = as_bytes(body)

    def script(h: _Handler) -> None:
        h.write(head(status, {"Content-Type": "application/json", **(headers or {})}, len(data), keep_alive) + data)
        h.close_connection = not keep_alive

    return script


def raw(data: bytes) -> Script:
    """Exactly these bytes, then the connection closes."""
    return lambda h: h.write(data)


def truncated(status: int, body: bytes | dict | str, keep: int) -> Script:
    """Announces the whole body, sends its first ``keep`` bytes, then hangs up."""
    data = as_bytes(body)
    return lambda h: h.write(head(status, {"Content-Type": "application/json"}, len(data)) + data[:keep])


def drip_headers(status: int, body: bytes | dict | str = b"{}", every_s: float = 0.2) -> Script:
    """The whole answer, status line and headers included, one byte at a time."""
    data = as_bytes(body)
    return lambda h: h.drip(head(status, {"Content-Type": "application/json"}, len(data)) + data, every_s)


def drip_body(status: int, body: bytes | dict | str, every_s: float = 0.2, *, length: bool = True) -> Script:
    """Headers at once, then the body one byte at a time (close-delimited if not ``length``)."""
    data = as_bytes(body)

    def script(h: _Handler) -> None:
        h.write(head(status, {"Content-Type": "application/json"}, len(data) if length else None))
        h.drip(data, every_s)

    return script
