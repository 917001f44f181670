"""One collector per video (issue 13, item 2): a worker claims a succeeded task's download in
the ledger before downloading; others skip it until the claim ends (video or error), expires
(older than the lease) or its holder is gone. On SQLite and, given a server, on PostgreSQL.
"""

from __future__ import annotations

import contextlib
import threading

import pytest
from postgres_db import fresh_database

from vidu_pipeline.ledger import Ledger, PlannedRequest, SpendCaps

CAPS = SpendCaps(per_run=None, per_day=None, run_id="run")


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def ledger_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'ledger.sqlite'}"
    else:
        with fresh_database() as url:
            yield url


@contextlib.contextmanager
def ledger_with_success(url: str, clock: Clock, request_id: str = "r1", task_id: str = "t1"):
    ledger = Ledger(url, clock=clock)
    try:
        ledger.plan([PlannedRequest(request_id, "s", 1, "f" * 64, "{}")])
        claim = ledger.claim_for_submit(request_id, owner="host:1:-", retry_budget=3, caps=CAPS)
        assert not hasattr(claim, "reason"), claim
        ledger.record_submitted(request_id, 1, task_id, first_poll_at=clock())
        assert ledger.record_succeeded(request_id, task_id=task_id, effective_seed=1, finished_at=clock())
        yield ledger
    finally:
        ledger.close()


def test_a_claimed_video_is_not_collected_by_another_worker(ledger_url):
    clock = Clock()
    with ledger_with_success(ledger_url, clock) as ledger:
        assert ledger.claim_video("r1", task_id="t1", collector="a") is None
        held = ledger.claim_video("r1", task_id="t1", collector="b")
        assert held is not None and "being collected by a" in held
        assert ledger.claim_video("r1", task_id="t1", collector="a") is None  # the holder renews it
        assert ledger.claim_video("r1", task_id="other-task", collector="b") is not None


def test_a_claim_ends_with_the_video_or_its_error(ledger_url):
    clock = Clock()
    with ledger_with_success(ledger_url, clock) as ledger:
        assert ledger.claim_video("r1", task_id="t1", collector="a") is None
        ledger.record_video_error("r1", "truncated", task_id="t1")
        assert ledger.claim_video("r1", task_id="t1", collector="b") is None  # free again: b may retry
        ledger.record_video("r1", path="/v/r1.mp4", sha256="0" * 64, size_bytes=1, probe={}, task_id="t1")
        assert ledger.claim_video("r1", task_id="t1", collector="c") == "its video is already collected"


def test_a_released_claim_can_be_taken_and_only_by_its_holder(ledger_url):
    clock = Clock()
    with ledger_with_success(ledger_url, clock) as ledger:
        assert ledger.claim_video("r1", task_id="t1", collector="a") is None
        ledger.release_video_claim("r1", collector="b")  # not b's: nothing happens
        assert ledger.claim_video("r1", task_id="t1", collector="b") is not None
        ledger.release_video_claim("r1", collector="a")
        assert ledger.claim_video("r1", task_id="t1", collector="b") is None


def test_a_claim_older_than_the_lease_or_of_a_dead_holder_expires(ledger_url):
    clock = Clock()
    with ledger_with_success(ledger_url, clock) as ledger:
        assert ledger.claim_video("r1", task_id="t1", collector="a", lease_s=60) is None
        clock.now += 59
        assert ledger.claim_video("r1", task_id="t1", collector="b", lease_s=60) is not None
        clock.now += 2
        assert ledger.claim_video("r1", task_id="t1", collector="b", lease_s=60) is None  # a's lease ran out
        alive = {"b": False, "c": True}
        assert ledger.claim_video("r1", task_id="t1", collector="c", collector_alive=alive.__getitem__) is None
        assert ledger.claim_video("r1", task_id="t1", collector="b", collector_alive=alive.__getitem__) is not None


def test_of_many_racing_collectors_exactly_one_gets_each_video(ledger_url):
    """Eight threads, each with its own ledger connection, claim the same ten videos at once."""
    clock = Clock()
    ids = [f"r{i}" for i in range(10)]
    with ledger_with_success(ledger_url, clock, "r0", "t0") as first:
        for i in ids[1:]:
            first.plan([PlannedRequest(i, "s", 1, "f" * 64, "{}")])
            first.claim_for_submit(i, owner="host:1:-", retry_budget=3, caps=CAPS)
            first.record_submitted(i, 1, f"t{i[1:]}", first_poll_at=clock())
            first.record_succeeded(i, task_id=f"t{i[1:]}", effective_seed=1, finished_at=clock())
        won: list[tuple[str, str]] = []
        start = threading.Barrier(8)

        def collector(name: str) -> None:
            ledger = Ledger(ledger_url, clock=clock)
            try:
                start.wait()
                for i in ids:
                    if ledger.claim_video(i, task_id=f"t{i[1:]}", collector=name) is None:
                        won.append((i, name))
            finally:
                ledger.close()

        threads = [threading.Thread(target=collector, args=(f"w{n}",)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert sorted(i for i, _ in won) == sorted(ids)  # every video claimed once, none twice


def test_a_videos_run_works_a_few_videos_at_once_in_order_and_claims_only_what_it_starts():
    """The videos asset downloads and verifies on a pool: results come back in partition order,
    one failure is returned (not raised) beside the others, and a key is drawn (claimed) only
    when the pool has room, so a stop leaves the unclaimed ones to the next run."""
    import concurrent.futures as cf
    import time

    from vidu_pipeline.defs.videos import in_order

    drawn: list[str] = []
    running, most = set(), [0]
    lock = threading.Lock()

    def keys():
        for key in [f"k{i}" for i in range(10)]:
            drawn.append(key)
            yield key

    def work(key: str) -> str:
        with lock:
            running.add(key)
            most[0] = max(most[0], len(running))
        time.sleep(0.02 if key != "k0" else 0.1)  # the first finishes last
        with lock:
            running.discard(key)
        if key == "k3":
            raise OSError("disk full")
        return key.upper()

    with cf.ThreadPoolExecutor(4) as pool:
        results = in_order(pool, work, keys(), ahead=4)
        first = next(results)
        assert first == ("k0", "K0") and len(drawn) == 4  # nothing claimed beyond the window
        rest = list(results)
    assert [k for k, _ in rest] == [f"k{i}" for i in range(1, 10)]
    assert isinstance(dict(rest)["k3"], OSError) and dict(rest)["k9"] == "K9"
    assert 1 < most[0] <= 4
