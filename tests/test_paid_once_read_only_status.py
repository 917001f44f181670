"""Issue 10, case 12: ``vidu-pipeline status`` on a read-only data folder.

Before the fix it crashed: opening the ledger ran ``create_all``, the WAL pragma and the lock
row insert, all writes. Tests run as root, who ignores permission bits, so the copy is made
read-only with ``chattr -R +i`` (immutable files and folders: even root cannot write or create
the WAL's side files there); where chattr is refused the test is skipped.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from vidu_pipeline.ledger import Ledger, PlannedRequest, SpendCaps

pytestmark = pytest.mark.slow  # starts processes (CLI, simulator, drills)

CAPS = SpendCaps(per_run=None, per_day=None, run_id="ro")


def make_data(data):
    data.mkdir(parents=True)
    ledger = Ledger(f"sqlite:///{data / 'ledger.sqlite'}")
    ledger.plan(PlannedRequest(f"req-{i}", "s", i, f"{i:064x}", "{}") for i in range(4))
    c = ledger.claim_for_submit("req-0", owner="o", retry_budget=3, caps=CAPS)
    ledger.record_submitted("req-0", c.attempt, "task-0", first_poll_at=0)
    c = ledger.claim_for_submit("req-1", owner="o", retry_budget=3, caps=CAPS)
    ledger.record_submit_unknown("req-1", c.attempt, "dropped after send")
    ledger.close()


@pytest.fixture
def immutable(tmp_path):
    made = []

    def freeze(path):
        done = subprocess.run(["chattr", "-R", "+i", str(path)], capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"chattr +i is not available here: {done.stderr.strip()}")
        made.append(path)
        probe = path / "probe"
        with pytest.raises(OSError):
            probe.write_text("x")  # really read-only, also for root

    yield freeze
    for path in made:
        subprocess.run(["chattr", "-R", "-i", str(path)], capture_output=True)


def status(data, *extra):
    return subprocess.run(
        [sys.executable, "-m", "vidu_pipeline.cli", "status", "--data-dir", str(data), *extra],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.timeout(180)
@pytest.mark.parametrize("wal_files", ["closed cleanly", "left by a killed writer"])
def test_status_on_a_read_only_copy(tmp_path, immutable, wal_files):
    data = tmp_path / "data"
    make_data(data)
    copy = tmp_path / "copy"
    if wal_files == "left by a killed writer":
        # A writer killed mid-run leaves -wal/-shm beside the database; copy them along.
        import sqlite3

        con = sqlite3.connect(data / "ledger.sqlite")
        con.execute("PRAGMA wal_autocheckpoint=0")
        con.execute("UPDATE requests SET last_error='x' WHERE request_id='req-3'")
        con.commit()
        shutil.copytree(data, copy)  # while the connection holds the WAL open
        con.close()
        assert (copy / "ledger.sqlite-wal").exists()
    else:
        shutil.copytree(data, copy)
        assert not (copy / "ledger.sqlite-wal").exists()
    before = sorted((p.name, p.stat().st_size) for p in copy.iterdir())
    immutable(copy)

    done = status(copy, "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["counts"]["planned"] == 2 and report["counts"]["submitted"] == 1
    assert report["unknown"] == [{"request_id": "req-1", "task_id": None, "reason": "dropped after send"}]
    assert report["oldest_pending"]["request_id"] == "req-0"

    text = status(copy)
    assert text.returncode == 0, text.stderr[-2000:]
    assert "unknown: req-1 (task ?): dropped after send" in text.stdout
    assert sorted((p.name, p.stat().st_size) for p in copy.iterdir()) == before  # nothing written


def test_read_only_open_uses_mode_ro(tmp_path):
    """Without chattr: the read-only ledger's connections refuse writes at SQLite's level."""
    import sqlite3

    data = tmp_path / "data"
    make_data(data)
    ledger = Ledger(f"sqlite:///{data / 'ledger.sqlite'}", read_only=True)
    with ledger.engine.connect() as conn:
        raw = conn.connection.dbapi_connection
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            raw.execute("UPDATE requests SET last_error='x'")
    assert ledger.counts_by_state()["unknown"] == 1
    ledger.close()
