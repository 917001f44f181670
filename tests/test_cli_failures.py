"""How ``vidu-pipeline`` ends when something is wrong, as a user meets it: the CLI in a
subprocess against a small loopback Vidu that answers as each test says (a refused key, a
wrong clip, a hostile task id), or the simulator; the ledger read back from SQLite.

Each failure gets one ``error:`` line and the right exit code, never a traceback; nothing is
left ``unknown`` or ``submitting`` by it; ``reproduce`` pays only through the ledger and caps.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import uuid
from fractions import Fraction
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import av
import numpy as np
import pytest
from support import fill, run_cli

from tests.test_cli import SAMPLE, SimProcess, cli_env, generate_args
from vidu_pipeline.api import contract
from vidu_pipeline.api import errors as errors_mod
from vidu_pipeline.ledger import Ledger
from vidu_pipeline.storage import StorageError

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]  # CLI subprocesses

FAKE_KEY = "sk-fake-key-distinctive-4711"


def tiny_mp4(path: Path, *, seconds: float = 1.0, size=(64, 64)) -> bytes:
    """A valid H.264 clip without audio: decodes fine, matches no 5 s request."""
    with av.open(str(path), "w", format="mp4") as out:
        video = out.add_stream("libx264", rate=24, options={"preset": "ultrafast"})
        video.width, video.height, video.pix_fmt = size[0], size[1], "yuv420p"
        video.codec_context.thread_count = 1
        video.codec_context.time_base = Fraction(1, 24)
        for i in range(round(seconds * 24)):
            frame = av.VideoFrame.from_ndarray(np.full((size[1], size[0], 3), 8 * i % 256, np.uint8), format="rgb24")
            out.mux(video.encode(frame))
        out.mux(video.encode())
    return path.read_bytes()


class FakeVidu:
    """A loopback Vidu answering ``submit_status``/``poll_status`` (401 …) or, with 200, a task
    id (``task_id`` or a fresh uuid) and a task that has SUCCEEDED with ``video`` as its clip."""

    def __init__(
        self,
        *,
        submit_status=200,
        poll_status=200,
        task_id: str | None = None,
        video: bytes = b"",
        status: str = "TASK_STATUS_SUCCEED",
    ):
        self.submit_status, self.poll_status, self.task_id, self.video = submit_status, poll_status, task_id, video
        self.status = status  # what every task reports; a test may change it
        self.accepted = 0
        self.requests = 0
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                fake.requests += 1
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if fake.submit_status != 200:
                    return self.refuse(fake.submit_status)
                fake.accepted += 1
                self.send_json(200, {"task_id": fake.task_id or str(uuid.uuid4())})

            def do_GET(self):
                fake.requests += 1
                url = urlparse(self.path)
                if url.path == "/video.mp4":
                    self.send_response(200)
                    self.send_header("Content-Type", "video/mp4")
                    self.send_header("Content-Length", str(len(fake.video)))
                    self.end_headers()
                    self.wfile.write(fake.video)
                    return
                if fake.poll_status != 200:
                    return self.refuse(fake.poll_status)
                task_id = parse_qs(url.query)["task_id"][0]
                done = fake.status == "TASK_STATUS_SUCCEED"
                self.send_json(
                    200,
                    {
                        "task": {
                            "task_id": task_id,
                            "task_type": contract.TASK_TYPE,
                            "status": fake.status,
                            "reason": "",
                            "eta": 0 if done else 2,
                            "progress_percent": 100 if done else 50,
                        },
                        "extra": {"seed": "7", "debug_info": {}},
                        "videos": [
                            {"video_url": f"{fake.base_url}/video.mp4", "video_url_ttl": "3600", "video_type": "mp4"}
                        ]
                        if done
                        else [],
                        "images": [],
                        "audios": [],
                    },
                )

            def refuse(self, status):
                self.send_json(status, {"code": status, "reason": "UNAUTHORIZED", "message": "invalid api key"})

            def send_json(self, status, body):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler


@pytest.fixture
def work(tmp_path):
    shutil.copytree(SAMPLE, tmp_path / "catalog")
    return tmp_path


def fake_env(work: Path, fake: FakeVidu, key: str = FAKE_KEY) -> dict:
    env = cli_env(work, None)
    env.update({"VIDU_API_KEY": key, "VIDU_API_BASE_URL": fake.base_url})
    return env


def run(work: Path, env: dict, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """The CLI with stdin not a terminal, bounded by ``timeout`` (a hang fails the test)."""
    return run_cli(*args, cwd=work, env=env, timeout=timeout, stdin=subprocess.DEVNULL)


def ledger_of(data: Path) -> Ledger:
    return Ledger(f"sqlite:///{data / 'ledger.sqlite'}")


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def assert_one_clean_error(result: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    out = result.stdout + result.stderr
    assert result.returncode == code, out
    assert "Traceback" not in out and "Stack Trace" not in out, out
    [line] = error_lines(result)
    for needle in needles:
        assert needle in line, (needle, line)
    return line


# --- a refused key (401) ----------------------------------------------------------------------


def test_refused_key_on_submit_stops_at_once_with_exit_2(work):
    """Needs tasks.submit_requests to raise AuthError (the tasks helper's change): before it,
    the requests went back to planned and the summary blamed a spend cap."""
    fake = FakeVidu(submit_status=401, poll_status=401)
    try:
        # --timeout: before the change it kept trying (and blamed a spend cap) until then.
        result = run(work, fake_env(work, fake), *generate_args(work, "--timeout", "20"), timeout=90)
    finally:
        fake.stop()
    line = assert_one_clean_error(result, 2, "refused the key", "HTTP 401", "VIDU_API_KEY")
    assert "spend cap" not in result.stdout + result.stderr
    assert FAKE_KEY not in result.stdout + result.stderr + line
    counts = ledger_of(work / "data").counts_by_state()
    assert counts.get("unknown", 0) == 0 and counts.get("submitting", 0) == 0, counts
    assert counts.get("planned", 0) == 10, counts
    assert fake.accepted == 0


def test_refused_key_on_poll_stops_with_exit_2_and_keeps_every_task_id(work):
    fake = FakeVidu(submit_status=200, poll_status=401)
    try:
        result = run(work, fake_env(work, fake), *generate_args(work, "--seeds", "1"), timeout=90)
    finally:
        fake.stop()
    assert_one_clean_error(result, 2, "refused the key", "HTTP 401", "check VIDU_API_KEY")
    assert FAKE_KEY not in result.stdout + result.stderr
    rows = ledger_of(work / "data").rows()
    assert len(rows) == 5 == fake.accepted
    assert {r.state for r in rows} == {"submitted"} and all(r.task_id for r in rows)


def test_key_with_a_non_ascii_character_is_refused_before_anything(work):
    fake = FakeVidu()
    try:
        result = run(work, fake_env(work, fake, key="sk-\u2013distinctive-4711"), *generate_args(work))
    finally:
        fake.stop()
    line = assert_one_clean_error(result, 2, "VIDU_API_KEY", "U+2013")
    assert "distinctive" not in result.stdout + result.stderr, line
    assert fake.requests == 0
    ledger = work / "data" / "ledger.sqlite"
    if ledger.exists():
        counts = ledger_of(work / "data").counts_by_state()
        assert not counts.get("unknown") and not counts.get("submitting"), counts


# --- catalog errors and a full disk -------------------------------------------------------------


def test_catalog_error_is_one_line_without_dagster_trace(work):
    (work / "catalog" / "sweep.yaml").write_text("seeds: [1]\ndefaults:\n  fps: 60\n")
    result = run(work, cli_env(work, None), *generate_args(work))
    line = assert_one_clean_error(result, 2, "sweep.yaml: defaults.fps is not an option")
    assert "CatalogError" not in line
    assert len(result.stderr.strip().splitlines()) <= 2, result.stderr
    assert "STEP_FAILURE" not in result.stderr


def test_full_disk_in_a_step_is_one_line_and_exit_1(work, tiny_disk):
    # The reports folder lives on a file system that is really full: the rejections step's
    # write (temp file, then rename) fails with ENOSPC.
    (tiny_disk / "reports").mkdir()
    fill(tiny_disk)
    (work / "data").mkdir(parents=True)
    (work / "data" / "reports").symlink_to(tiny_disk / "reports")
    result = run(work, cli_env(work, None), *generate_args(work))
    assert_one_clean_error(
        result, 1, "rejections.csv", "No space left on device", "free some space", "run the same command again"
    )
    assert len(result.stderr.strip().splitlines()) <= 3, result.stderr


def test_full_disk_in_the_driver_is_one_line_and_exit_1(work, tmp_path):
    sim = SimProcess(tmp_path / "sim", latency=0.3)
    try:
        (work / "data").mkdir()
        (work / "data" / "contact_sheet.png").symlink_to("/dev/full")
        result = run(work, cli_env(work, sim), *generate_args(work, "--seeds", "1"))
    finally:
        sim.stop()
    assert_one_clean_error(result, 1, "disk is full", "No space left on device", "free some space")
    assert len(list((work / "data" / "videos").glob("*.mp4"))) == 5  # what was done is kept


# --- a wrong clip is not a success ------------------------------------------------------------


def test_a_valid_but_wrong_video_fails_the_run(work, tmp_path):
    fake = FakeVidu(video=tiny_mp4(tmp_path / "wrong.mp4"))
    try:
        result = run(work, fake_env(work, fake), *generate_args(work, "--seeds", "1"))
    finally:
        fake.stop()
    assert result.returncode == 1, result.stdout + result.stderr
    assert "requests: 5  mismatched: 5\n" in result.stdout, result.stdout
    listed = [line for line in result.stdout.splitlines() if "does not match its request" in line]
    assert len(listed) == 5 and all("duration 1.000 s" in line for line in listed), result.stdout
    assert "mismatched 5" in result.stderr  # the progress line


# --- reproduce: through the ledger, under the caps, asked for ---------------------------------


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """A data folder with 5 finished requests (from the simulator), copied by each test."""
    base = tmp_path_factory.mktemp("generated")
    shutil.copytree(SAMPLE, base / "catalog")
    sim = SimProcess(base / "sim", latency=0.3)
    try:
        result = run(base, cli_env(base, sim), *generate_args(base, "--seeds", "7"))
        assert result.returncode == 0, result.stdout + result.stderr
    finally:
        sim.stop()
    return base / "data"


@pytest.fixture
def data(generated, tmp_path):
    shutil.copytree(generated, tmp_path / "data")
    return tmp_path / "data"


def first_request(data: Path) -> str:
    return sorted(r.request_id for r in ledger_of(data).rows())[0]


def all_files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def test_reproduce_never_uses_the_task_id_as_a_path(data, tmp_path):
    fake = FakeVidu(task_id="../../../../escaped", video=tiny_mp4(tmp_path / "clip.mp4"))
    outside_before = all_files(tmp_path) - all_files(data)
    rid = first_request(data)
    try:
        result = run(tmp_path, fake_env(tmp_path, fake), "reproduce", rid, "--yes", "--data-dir", str(data))
    finally:
        fake.stop()
    assert result.returncode == 1, result.stdout + result.stderr  # a different (and wrong) clip
    assert "DIFFERENT" in result.stdout
    assert all_files(tmp_path) - all_files(data) == outside_before
    assert sorted(p.name for p in (data / "reproductions").iterdir()) == [f"{rid}-r1.mp4"]
    ledger = ledger_of(data)
    row = ledger.get(f"{rid}-r1")
    assert row.task_id == "../../../../escaped" and row.video_path == str(data / "reproductions" / f"{rid}-r1.mp4")
    [attempt] = ledger.attempts_for(f"{rid}-r1")
    assert attempt.task_id == "../../../../escaped" and attempt.outcome == "submitted"
    assert fake.accepted == 1


def test_reproduce_without_yes_and_without_a_terminal_submits_nothing(data, tmp_path):
    fake = FakeVidu(video=b"")
    rid = first_request(data)
    try:
        result = run(tmp_path, fake_env(tmp_path, fake), "reproduce", rid, "--data-dir", str(data))
    finally:
        fake.stop()
    assert_one_clean_error(result, 2, "paid task", "--yes", "nothing was submitted")
    assert fake.requests == 0
    assert ledger_of(data).get(f"{rid}-r1") is None


@pytest.mark.parametrize("cap", [["--max-tasks-per-day", "0"], ["--max-tasks-per-day", "5"], ["--max-tasks", "0"]])
def test_reproduce_honours_the_spend_caps(data, tmp_path, cap):
    """5 tasks were submitted today for the original requests: a daily cap of 5 is used up."""
    fake = FakeVidu(video=b"")
    rid = first_request(data)
    try:
        result = run(tmp_path, fake_env(tmp_path, fake), "reproduce", rid, "--yes", *cap, "--data-dir", str(data))
    finally:
        fake.stop()
    out = result.stdout + result.stderr
    assert result.returncode == 3, out
    assert "cap reached" in out and "Traceback" not in out
    assert fake.requests == 0
    row = ledger_of(data).get(f"{rid}-r1")
    assert row.state == "planned" and row.attempts == 0


def test_an_interrupted_reproduction_is_resumed_not_paid_again(data, tmp_path):
    import signal
    import time

    fake = FakeVidu(video=tiny_mp4(tmp_path / "clip.mp4"), status="TASK_STATUS_PROCESSING")
    rid = first_request(data)
    env = fake_env(tmp_path, fake)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vidu_pipeline.cli", "reproduce", rid, "--yes", "--data-dir", str(data)],
            cwd=tmp_path,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            row = ledger_of(data).get(f"{rid}-r1")
            if row is not None and row.task_id:
                break
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 143, out + err
        assert ledger_of(data).get(f"{rid}-r1").state == "submitted"

        fake.status = "TASK_STATUS_SUCCEED"
        again = run(tmp_path, env, "reproduce", rid, "--data-dir", str(data))  # nothing to confirm: no payment
    finally:
        fake.stop()
    assert f"resuming {rid}-r1" in again.stderr, again.stdout + again.stderr
    assert again.returncode == 1 and "DIFFERENT" in again.stdout, again.stdout + again.stderr
    assert fake.accepted == 1
    assert ledger_of(data).get(f"{rid}-r1").video_sha256


@pytest.mark.parametrize("answer,submitted", [("n", 0), ("y", 1)])
def test_reproduce_asks_on_a_terminal(data, tmp_path, answer, submitted):
    import os

    fake = FakeVidu(video=tiny_mp4(tmp_path / "clip.mp4"))
    rid = first_request(data)
    master, slave = os.openpty()
    try:
        os.write(master, f"{answer}\n".encode())
        result = subprocess.run(
            [sys.executable, "-m", "vidu_pipeline.cli", "reproduce", rid, "--data-dir", str(data)],
            cwd=tmp_path,
            env=fake_env(tmp_path, fake),
            stdin=slave,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        os.close(slave)
        os.close(master)
        fake.stop()
    assert f"Submit 1 paid task to reproduce {rid}? [y/N]" in result.stdout
    assert fake.accepted == submitted
    if not submitted:
        assert_one_clean_error(result, 2, "not confirmed", "nothing was submitted")
        assert ledger_of(data).get(f"{rid}-r1") is None
    else:
        assert ledger_of(data).get(f"{rid}-r1").task_id


# --- which run failures stop generate (Dagster's serialized errors, via materialize) ------------


@pytest.mark.parametrize(
    "raised,expected,words",
    [
        (lambda: errors_mod.AuthError("invalid api key", status=401), "AuthError", "HTTP 401: invalid api key"),
        (lambda: StorageError("task t-1 kept in recovery.jsonl"), "StorageError", "kept in recovery.jsonl"),
        (
            lambda: errors_mod.ConfigurationError("VIDU_API_KEY has a bad character"),
            "ConfigurationError",
            "VIDU_API_KEY",
        ),
        (lambda: OSError(28, "No space left on device"), "StorageError", "step boom: [Errno 28] No space left"),
        (lambda: sqlite_full(), "StorageError", "step boom could not write the ledger (database or disk is full)"),
        (lambda: ValueError("an ordinary step failure"), None, None),
    ],
)
def test_run_failures_that_stop_generate(tmp_path, raised, expected, words):
    from dagster import DagsterInstance, asset, materialize

    from vidu_pipeline.cli.driver import raise_for_run

    @asset
    def boom():
        raise raised()

    with DagsterInstance.local_temp(str(tmp_path)) as instance:
        result = materialize([boom], instance=instance, raise_on_error=False)
    assert not result.success
    if expected is None:
        raise_for_run(result)  # left to the ledger: no exception
        return
    with pytest.raises(StorageError if expected == "StorageError" else getattr(errors_mod, expected)) as caught:
        raise_for_run(result)
    assert words in str(caught.value)


def sqlite_full():
    import sqlite3

    from sqlalchemy.exc import OperationalError

    return OperationalError("INSERT INTO requests …", {}, sqlite3.OperationalError("database or disk is full"))


def test_a_full_sqlite_database_reads_as_a_full_disk(tmp_path):
    """The real error SQLite gives when it cannot grow the file, as the CLI's main sees it."""
    import sqlalchemy as sa

    from vidu_pipeline.cli.signals import disk_full, disk_message

    engine = sa.create_engine(f"sqlite:///{tmp_path / 'full.sqlite'}")

    @sa.event.listens_for(engine, "connect")
    def _tiny(dbapi_connection, _record):
        dbapi_connection.execute("PRAGMA max_page_count=8")

    with pytest.raises(sa.exc.OperationalError) as caught, engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE t (x BLOB)")
        conn.exec_driver_sql("INSERT INTO t VALUES (zeroblob(100000))")
    assert disk_full(caught.value)
    assert disk_message(caught.value) == "the disk is full: the ledger could not be written (database or disk is full)"
    assert not disk_full(ValueError("database or disk is full"))
