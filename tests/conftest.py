"""Fixtures shared by several test modules (pytest finds them here; no test module imports
another's fixtures)."""

from __future__ import annotations

import http.server
import subprocess
import threading

import pytest
from support import png


@pytest.fixture
def figure(record_property):
    """Report a measured figure (workers, submits, downloads, rows…): printed, kept with the
    test's report and listed in a "figures" section at the end of the run — also under
    pytest-xdist, where a passing test's own output is not shown."""

    def report(text: str) -> None:
        print(text)
        record_property("figure", text.strip())

    return report


def pytest_terminal_summary(terminalreporter):
    figures = [
        (report.nodeid.split("::")[-1], value)
        for report in terminalreporter.stats.get("passed", [])
        for name, value in getattr(report, "user_properties", [])
        if name == "figure"
    ]
    if figures:
        terminalreporter.section("figures")
        for test, text in sorted(figures):
            terminalreporter.write_line(f"{text}  [{test}]")


class _Handler(http.server.BaseHTTPRequestHandler):
    routes: dict = {}

    def do_GET(self):
        status, headers, body = self.routes.get(self.path, (404, {}, b"not found"))
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        try:
            for part in body if isinstance(body, list) else [body]:
                self.wfile.write(part)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, *args):
        pass


@pytest.fixture(scope="session")
def http_images():
    """A loopback server: /ok.png, /huge (declares 60 MB), /endless (51 MB, no length), /text,
    /to-file (redirect to file://), /to-ok (redirect to /ok.png); anything else is 404."""
    chunk = bytes(1 << 20)
    _Handler.routes = {
        "/ok.png": (200, {"Content-Type": "image/png"}, png(seed=7)),
        "/ok.jpg": (200, {"Content-Type": "image/jpeg"}, png(seed=8)),
        "/huge": (200, {"Content-Length": "60000000"}, b""),
        "/endless": (200, {}, [b"\x89PNG\r\n\x1a\n"] + [chunk] * 51),
        "/text": (200, {"Content-Type": "text/plain"}, b"hello, not an image"),
        "/to-file": (302, {"Location": "file:///etc/passwd"}, b""),
        "/to-ok": (302, {"Location": "/ok.png"}, b""),
    }
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def tiny_disk(tmp_path):
    """A small tmpfs that really fills up (ENOSPC), where mounting is allowed (root)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if done.returncode:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)
