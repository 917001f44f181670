"""Issue 10, case 4: the ledger write after an accepted submit fails (disk full).

Before the fix ``generate`` died with a raw traceback and the paid task id was lost: the next
run listed the request as unknown while the service had finished it. Now the task id is logged,
appended (fsync'ed) to the recovery journal, the error is one clear line (StorageError), and
the next start gives the task id back to its row, which is then polled and downloaded.

The ledger is a real SQLite file that really fills: ``PRAGMA max_page_count`` is set to its
size on every connection opened after the claim, so the write that needs a new page fails
with SQLITE_FULL ("database or disk is full"); and, where mounting is allowed (root), the data
folder sits on a small tmpfs that fills up during the POST (ENOSPC).
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import time
from pathlib import Path

import pytest
from sqlalchemy import event
from support import fill, plan_catalog

from vidu_pipeline import tasks
from vidu_pipeline.api.client import ViduClient
from vidu_pipeline.ledger import Ledger, PlannedRequest, SpendCaps
from vidu_pipeline.simulator import Simulator, SimulatorConfig
from vidu_pipeline.storage import StorageError

KEY = "disk-full-key"
CAPS = SpendCaps(per_run=None, per_day=None, run_id="disk-full")


def freeze_size(ledger: Ledger) -> None:
    """From now on the ledger file may not grow by a single page (SQLITE_FULL past that).

    VACUUM first packs every page full, so a row that grows needs a new page."""

    def cap(dbapi_connection, _record):
        cur = dbapi_connection.cursor()
        pages = cur.execute("PRAGMA page_count").fetchone()[0]
        cur.execute(f"PRAGMA max_page_count = {pages}")
        cur.close()

    ledger.engine.dispose()  # pooled connections opened before are closed; new ones are capped
    con = sqlite3.connect(ledger.url.split(":///", 1)[1])
    con.execute("VACUUM")
    con.close()
    event.listen(ledger.engine, "connect", cap)


class FillsTheDiskOnSubmit(ViduClient):
    """The real client; while the POST is out, the disk under the ledger fills up. The
    service's task ids here are long (up to the 256 characters the client accepts), so recording
    one makes its row outgrow its packed page."""

    def __init__(self, *a, ledger: Ledger, **kw):
        super().__init__(*a, **kw)
        self.ledger = ledger
        self.task_ids: list[str] = []

    def submit(self, request):
        freeze_size(self.ledger)
        task_id = super().submit(request)
        self.task_ids.append(task_id)
        return task_id


@pytest.fixture
def planned(tmp_path, monkeypatch):
    monkeypatch.setenv("VIDU_SIMULATOR_RENDER_SCALE", "0.1")
    pipeline, [rid] = plan_catalog(tmp_path)
    return pipeline, rid


def submit(ledger, client, pipeline, rid, journal):
    return tasks.submit_requests(
        ledger,
        client,
        [rid],
        data_uri_for=pipeline.image_cache().data_uri,
        caps=CAPS,
        owner=tasks.owner_id("disk-full"),
        retry_budget=3,
        journal=journal,
    )


@pytest.mark.timeout(120)
def test_a_task_id_the_full_ledger_cannot_take_is_journaled_and_restored(planned, caplog):
    """SQLITE_FULL from ``max_page_count`` (no privileges needed). Small rows planned after
    the request pack its page; the service's ids are long here, so recording one needs a page."""
    from test_paid_once_submit_answers import AnsweringServer

    pipeline, rid = planned
    url = f"sqlite:///{pipeline.root / 'ledger.sqlite'}"
    journal = pipeline.task_id_journal
    assert journal == pipeline.root / "state" / "submitted-task-ids.jsonl"
    with AnsweringServer() as server:
        server.task_id_padding = "-" + "7" * 240
        ledger = Ledger(url)
        ledger.plan(PlannedRequest(f"filler-{i:04d}", "f", i, f"{i:064x}", "{}") for i in range(300))
        with (
            FillsTheDiskOnSubmit(KEY, server.base_url, ledger=ledger) as client,
            caplog.at_level(logging.ERROR, logger="vidu_pipeline.tasks"),
            pytest.raises(StorageError) as info,
        ):
            submit(ledger, client, pipeline, rid, journal)
        [task_id] = client.task_ids
        assert server.posts == 1
    ledger.close()
    message = str(info.value)
    assert "\n" not in message
    assert message == (
        f"could not record task {task_id} of request {rid} in the ledger (database or disk "
        f"is full); the task id is kept in {journal}; the next run restores it"
    )
    assert task_id in caplog.text and "database or disk is full" in caplog.text
    [line] = journal.read_text().splitlines()
    entry = json.loads(line)
    assert (entry["request_id"], entry["attempt"], entry["task_id"]) == (rid, 1, task_id)
    assert abs(entry["time"] - time.time()) < 600

    # The process died here: its row is still `submitting`, without the task id. The next
    # start replays the journal before retiring dead submitters, so the request is followed
    # instead of being listed unknown.
    fresh = Ledger(url)
    assert (fresh.get(rid).state, fresh.get(rid).task_id) == ("submitting", None)
    assert tasks.recover_abandoned(fresh, max_submit_s=0, journal=journal) == []
    row = fresh.get(rid)
    assert (row.state, row.task_id, row.attempts) == ("submitted", task_id, 1)
    assert [(a.task_id, a.outcome) for a in fresh.attempts_for(rid)] == [(task_id, "submitted")]
    assert tasks.replay_journal(fresh, journal) == []  # again: nothing changes
    fresh.close()


class FillsTheRealDisk(ViduClient):
    def __init__(self, *a, disk: Path, **kw):
        super().__init__(*a, **kw)
        self.disk = disk
        self.task_ids: list[str] = []

    def submit(self, request):
        self.filler = fill(self.disk)
        self.task_ids.append(super().submit(request))
        return self.task_ids[-1]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("journal_on", ["another disk", "the full disk"])
def test_a_really_full_disk_end_to_end(tmp_path, tiny_disk, monkeypatch, caplog, journal_on):
    """The data folder on a tmpfs that fills during the POST: the simulator's task is paid,
    the ledger write fails with ENOSPC. With the journal on another disk the next start
    restores the task id and the video is downloaded; with the journal on the full disk too,
    the error says the id is only in the log, and the log line holds it."""
    monkeypatch.setenv("VIDU_SIMULATOR_RENDER_SCALE", "0.1")
    journal = tmp_path / "elsewhere" / "journal.jsonl" if journal_on == "another disk" else None
    pipeline, [rid] = plan_catalog(tmp_path, data_dir=str(tiny_disk / "data"), task_id_journal_path=str(journal or ""))
    url = f"sqlite:///{pipeline.root / 'ledger.sqlite'}"
    config = SimulatorConfig(api_key=KEY, latency_s=0.2, render_scale=0.1, state_dir=tmp_path / "sim")
    with Simulator(config) as sim:
        ledger = Ledger(url)
        with (
            FillsTheRealDisk(KEY, sim.base_url, disk=tiny_disk) as client,
            caplog.at_level(logging.ERROR, logger="vidu_pipeline.tasks"),
            pytest.raises(StorageError) as info,
        ):
            submit(ledger, client, pipeline, rid, pipeline.task_id_journal)
        [task_id] = client.task_ids
        message = str(info.value)
        assert (
            f"could not record task {task_id} of request {rid} in the ledger (database or disk is full)" in message
            and "\n" not in message
        )
        assert f"task {task_id} (request {rid}, attempt 1) was accepted and paid for" in caplog.text
        with contextlib.suppress(Exception):  # the full disk may refuse the final checkpoint
            ledger.close()
        client.filler.unlink()
        if journal is None:
            assert message.endswith(
                f"the task id is only in this log: the recovery journal "
                f"{pipeline.task_id_journal} failed too (No space left on device)"
            )
            return
        assert message.endswith(f"kept in {journal}; the next run restores it")

        # The next start, with space again: restored, polled, downloaded; paid once.
        fresh = Ledger(url)
        tasks.recover_abandoned(fresh, max_submit_s=0, journal=pipeline.task_id_journal)
        assert (fresh.get(rid).state, fresh.get(rid).task_id) == ("submitted", task_id)
        with ViduClient(KEY, sim.base_url) as plain:
            deadline = time.monotonic() + 60
            while fresh.get(rid).state == "submitted" and time.monotonic() < deadline:
                tasks.poll_due(fresh, plain, now=10**10)
                time.sleep(0.2)
            assert fresh.get(rid).state == "succeeded"
            from vidu_pipeline.videos import collect_video

            collect_video(fresh, plain, rid, videos_dir=pipeline.videos_dir, render_scale=0.1)
        assert fresh.get(rid).video_sha256
        assert sim.stats()["submits"]["accepted"] == 1
        fresh.close()


def test_the_journal_is_replayed_onto_an_unknown_row_but_never_over_another_task(planned, tmp_path):
    """A journaled id reaches a row that recovery already called unknown (same attempt, no
    task id); an entry for an older attempt only reaches its attempt row."""
    pipeline, rid = planned
    ledger = Ledger(f"sqlite:///{pipeline.root / 'ledger.sqlite'}")
    journal = tmp_path / "journal.jsonl"
    claim = ledger.claim_for_submit(rid, owner="gone:1:x", retry_budget=3, caps=CAPS)
    assert ledger.recover_stale_submitting(0, now=time.time() + 10) == [rid]
    tasks.journal_task_id(journal, rid, claim.attempt, "task-A")
    with open(journal, "a") as f:
        f.write('{"request_id": "torn')  # a torn last line is skipped
    assert tasks.replay_journal(ledger, journal) == [rid]
    row = ledger.get(rid)
    assert (row.state, row.task_id, row.last_error) == ("submitted", "task-A", None)
    assert tasks.replay_journal(ledger, journal) == []
    ledger.close()
