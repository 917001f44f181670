"""Issue 15: poll answers are recorded in chunks, one ledger transaction each, not one per poll.

Real parts: a small loopback service answering task-result polls over HTTP, the ledger on real
SQLite, ``tasks.poll_due`` with its thread pool. The service holds back every poll past the
first chunk until the test has seen that chunk in the ledger (read through a second ``Ledger``,
as another process would): answers are written as soon as a chunk is full, so a crash in the
middle of a tick loses at most one chunk (a re-poll), never the whole tick's answers.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest
from sqlalchemy import event

from vidu_pipeline import tasks
from vidu_pipeline.api.client import ViduClient
from vidu_pipeline.ledger import Ledger, PlannedRequest
from vidu_pipeline.tasks import polling

KEY = "batch-key"
FAR = 10**10  # "now" for poll_due: every submitted task is due


class Service:
    """Answers polls: tasks whose number ends in 0 succeeded, in 1 failed, the rest run on.
    Polls after the first ``hold_after`` wait until ``release`` is set."""

    def __init__(self, hold_after: int) -> None:
        self.hold_after, self.answered, self.release = hold_after, 0, threading.Event()
        self.lock = threading.Lock()
        service = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                with service.lock:
                    service.answered += 1
                    hold = service.answered > service.hold_after
                if hold:
                    service.release.wait(60)
                task_id = parse_qs(urlsplit(self.path).query)["task_id"][0]
                status = {"0": "SUCCEED", "1": "FAILED"}.get(task_id[-1], "PROCESSING")
                body = json.dumps(
                    {
                        "task": {"task_id": task_id, "status": f"TASK_STATUS_{status}", "reason": "", "eta": 5},
                        "extra": {"seed": "3"},
                        "videos": [],
                    }
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def submitted_ledger(url: str, n: int) -> Ledger:
    """``n`` requests, each submitted once as task ``t-<i>``."""
    ledger = Ledger(url)
    ledger.plan(PlannedRequest(f"r-{i:04d}", "s", i, f"{i:064x}", "{}") for i in range(n))
    for i in range(n):
        claim = ledger.claim_for_submit(f"r-{i:04d}", owner="o:1:t", retry_budget=3, caps=_NO_CAPS)
        ledger.record_submitted(claim.request_id, claim.attempt, f"t-{i:04d}", first_poll_at=0)
    return ledger


def _no_caps():
    from vidu_pipeline.ledger import SpendCaps

    return SpendCaps(per_run=None, per_day=None, run_id="batch")


_NO_CAPS = _no_caps()


def answered_in_ledger(ledger: Ledger) -> int:
    """Rows some poll answer has reached: ended, or polled at least once."""
    return sum(1 for r in ledger.rows() if r.state != "submitted" or r.polls > 0)


@pytest.mark.timeout(120)
def test_poll_answers_are_written_a_chunk_at_a_time_while_polling_goes_on(tmp_path, monkeypatch):
    monkeypatch.setattr(polling, "ANSWERS_PER_WRITE", 20)
    url = f"sqlite:///{tmp_path / 'ledger.sqlite'}"
    ledger, observer = submitted_ledger(url, 50), Ledger(url)
    service = Service(hold_after=25)  # the first chunk (20) can fill; the rest wait
    writes: list[str] = []  # write transactions (BEGIN IMMEDIATE) the polling ledger opened
    event.listen(
        ledger.engine,
        "before_cursor_execute",
        lambda conn, cur, sql, *a: writes.append(sql) if "IMMEDIATE" in sql else None,
    )
    reports: list = []
    try:
        with ViduClient(KEY, service.url) as client:
            poller = threading.Thread(target=lambda: reports.append(tasks.poll_due(ledger, client, now=FAR, workers=8)))
            poller.start()
            deadline = time.monotonic() + 30
            while answered_in_ledger(observer) < 20 and time.monotonic() < deadline:
                time.sleep(0.05)
            seen_mid_tick = answered_in_ledger(observer)
            service.release.set()
            poller.join(60)
    finally:
        service.stop()
    assert 20 <= seen_mid_tick < 50, "the first full chunk must be in the ledger while polls are still held"

    [report] = reports
    assert report.polled == 50 and not report.errors and not report.stale
    assert sorted(report.succeeded) == [f"r-{i:04d}" for i in range(0, 50, 10)]
    assert sorted(report.failed) == [f"r-{i:04d}" for i in range(1, 50, 10)]
    assert len(writes) == 3  # 50 answers in chunks of 20: not one transaction per answer
    counts = observer.counts_by_state()
    assert (counts["succeeded"], counts["failed"], counts["submitted"]) == (5, 5, 40)
    running = [r for r in observer.rows(states=["submitted"])]
    assert all(r.polls == 1 and r.last_status == "TASK_STATUS_PROCESSING" and r.next_poll_at for r in running)
    assert all(r.effective_seed == 3 for r in observer.rows(states=["succeeded"]))
    observer.close()
    ledger.close()


@pytest.mark.timeout(60)
def test_a_chunk_the_ledger_cannot_take_is_one_clear_storage_error(tmp_path, monkeypatch):
    """Disk full while recording a chunk: one line naming how many answers and an example
    task; nothing in the chunk is recorded, so those tasks are simply polled again."""
    from sqlalchemy.exc import OperationalError

    from vidu_pipeline.storage import StorageError

    url = f"sqlite:///{tmp_path / 'ledger.sqlite'}"
    ledger = submitted_ledger(url, 3)
    service = Service(hold_after=10**6)

    def full(answers):
        raise OperationalError("UPDATE requests", {}, Exception("database or disk is full"))

    monkeypatch.setattr(ledger, "record_poll_answers", full)
    try:
        with ViduClient(KEY, service.url) as client, pytest.raises(StorageError) as info:
            tasks.poll_due(ledger, client, now=FAR)
    finally:
        service.stop()
    message = str(info.value)
    assert "could not record 3 poll answer(s) (e.g. task t-" in message and "will be polled again" in message
    assert "\n" not in message
    assert all(r.polls == 0 and r.state == "submitted" for r in ledger.rows())
    ledger.close()
