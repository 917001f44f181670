"""Fault and crash drills, CI-sized (the long version: ``python drills/run_drill.py``).

A standalone simulator subprocess (it outlives every kill) injects at once 20 % 5xx and 10 % 429
(with Retry-After) on submits and polls, 5 % dropped connections (half of the dropped submits
after the task was created), 5 % failing tasks, 5 % truncated downloads, a 3 s URL TTL, 0.7 s
latency and render scale 0.1, concurrency 5. ``vidu-pipeline generate`` runs against it in
subprocesses; the invariants are checked by ``drills.run_drill.check_invariants``.
"""

from __future__ import annotations

import http.server
import json
import logging
import random
import shutil
import threading
from pathlib import Path

import pytest
import requests
from support import plan_catalog

from drills.run_drill import (
    FAULT_FLAGS,
    SimulatorProcess,
    attempts_by_request,
    check_invariants,
    check_readable,
    finish,
    kill_at_random,
    kill_mid_submit,
    leaked_pool_slots,
    ledger_states,
    make_catalog,
    race_pollers,
    run_generate,
    terminal_snapshot,
)

pytestmark = pytest.mark.slow  # starts processes (CLI, simulator, drills)


@pytest.fixture
def faulty_sim(tmp_path):
    sim = SimulatorProcess(tmp_path / "sim", faults=FAULT_FLAGS, fault_seed=11, latency=0.7, url_ttl=3)
    try:
        yield sim.start()
    finally:
        sim.stop()


def assert_report(report):
    assert report.ok, "\n" + report.text() + "\n" + json.dumps(report.counts, indent=1)
    assert report.counts["duplicates"] == 0 and report.counts["lost"] == 0


@pytest.mark.timeout(240)
def test_fault_drill_50_requests(tmp_path, faulty_sim):
    """Every request ends; no hidden duplicate payment; each success has one verified video and
    one lineage row; a second run submits nothing for requests that already ended."""
    n = make_catalog(tmp_path / "catalog", subjects=5, prompts=5, seeds=2, rng_seed=1)
    assert n == 50
    env = faulty_sim.env(tmp_path / "dagster_home")
    runs = finish(tmp_path / "catalog", tmp_path / "data", env, timeout=200)
    assert runs[-1].returncode in (0, 1), runs[-1].stdout[-2000:] + runs[-1].stderr[-2000:]

    report = check_invariants(tmp_path / "data", faulty_sim, env, expected_requests=n)
    assert_report(report)
    faults = report.counts["injected_faults"]
    for kind in ("submit.server_error", "submit.rate_limit", "poll.server_error", "poll.rate_limit"):
        assert faults.get(kind, 0) > 0, f"the drill injected no {kind}: {faults}"
    assert report.counts["states"].get("succeeded", 0) > 0

    # A second run resumes: nothing new is submitted for requests that already ended.
    before = terminal_snapshot(tmp_path / "data")
    accepted = faulty_sim.stats()["submits"]["accepted"]
    again = run_generate(tmp_path / "catalog", tmp_path / "data", env, timeout=120)
    assert again.returncode in (0, 1), again.stderr[-2000:]
    assert faulty_sim.stats()["submits"]["accepted"] == accepted
    assert terminal_snapshot(tmp_path / "data") == before
    assert_report(check_invariants(tmp_path / "data", faulty_sim, env, expected_requests=n))


@pytest.mark.timeout(240)
def test_crash_drill_kill9_restart(tmp_path, faulty_sim):
    """SIGKILL generate once mid-submit and 5 more times at seeded random moments, restarting
    each time: ledger and lineage stay readable after every kill; in-flight submits become
    ``unknown`` and are never resubmitted; then the same invariants hold."""
    catalog, data = tmp_path / "catalog", tmp_path / "data"
    # A restart does not re-plan or re-submit what the ledger already holds, so the sweep must be
    # long enough that five random kills land on a running generate.
    n = make_catalog(catalog, subjects=5, prompts=2, seeds=4, rng_seed=2)
    env = faulty_sim.env(tmp_path / "dagster_home")
    log = tmp_path / "generate.log"

    inflight = kill_mid_submit(catalog, data, env, faulty_sim, log, slow_s=4.0)
    assert inflight, "the kill should catch requests in the submitting state"
    assert set(ledger_states(data)[r] for r in inflight) == {"submitting"}  # nobody has recovered them yet
    check_readable(data)
    home = tmp_path / "dagster_home"

    rng = random.Random(20240611)
    kills = tries = 0
    while kills < 5 and tries < 16:  # five kills that land on a running generate
        tries += 1
        kills += kill_at_random(catalog, data, env, rng, log, low=1.5, high=5.0)[0]
        check_readable(data)
    assert kills == 5

    runs = finish(catalog, data, env, timeout=200)
    assert runs[-1].returncode in (0, 1), runs[-1].stdout[-2000:] + runs[-1].stderr[-2000:]
    report = check_invariants(data, faulty_sim, env, expected_requests=n)
    assert_report(report)

    # submitting → unknown: listed, with exactly the one attempt that may have been paid for,
    # and never sent again (the simulator holds at most that one task).
    states = ledger_states(data)
    attempts = attempts_by_request(data)
    accepted = faulty_sim.stats()["submits"]["accepted_by_fingerprint"]
    from vidu_pipeline.ledger import Ledger

    ledger = Ledger(f"sqlite:///{data / 'ledger.sqlite'}")
    try:
        for rid in inflight:
            assert states[rid] == "unknown", (rid, states[rid])
            assert attempts[rid] == [(1, "unknown")]
            row = ledger.get(rid)
            assert "never recorded a task id" in row.last_error
            assert accepted.get(row.fingerprint, 0) <= 1
    finally:
        ledger.close()
    # Killed runs held Dagster pool slots; each restarted generate reaps them (else it would
    # have hung above), and none is left held once everything has ended.
    assert leaked_pool_slots(home, free=False) == []


@pytest.mark.timeout(480)
def test_race_drill_two_pollers_and_sigterm(tmp_path, faulty_sim):
    """Two pollers on one ledger (two ``generate``s planning and polling one fresh catalog at
    once; then ``generate`` beside the sensor evaluated in another process) while 40 % of tasks
    fail and polls are slow; then a SIGTERM at a random moment. Every invariant holds,
    including the paid-once ones: no task paid beyond need, no finished task left behind."""
    import signal

    catalog, data, home = tmp_path / "catalog", tmp_path / "data", tmp_path / "dagster_home"
    n = make_catalog(catalog, subjects=3, prompts=1, seeds=2, rng_seed=5)
    env = faulty_sim.env(home)
    races = [race_pollers(catalog, data, env, faulty_sim, tmp_path, with_sensor=False, timeout=150)]
    # Both planned one fresh catalog at once: neither dies on the partition race (exit 2).
    assert all(code in (0, 1) for code in races[0].exits), races[0]
    # generate + the sensor elsewhere, on requests the first race left failed or unfinished
    races.append(race_pollers(catalog, data, env, faulty_sim, tmp_path, with_sensor=True, timeout=150))
    landed, _ = kill_at_random(
        catalog, data, env, random.Random(3), tmp_path / "generate.log", low=2.0, high=6.0, sig=signal.SIGTERM
    )
    check_readable(data)
    runs = finish(catalog, data, env, timeout=200)
    assert runs[-1].returncode in (0, 1), runs[-1].stdout[-2000:] + runs[-1].stderr[-2000:]
    report = check_invariants(data, faulty_sim, env, expected_requests=n)
    print(f"races: {races}; SIGTERM landed: {landed}")
    assert_report(report)
    assert report.counts["paid_extra"] == 0 and report.counts["succeeded_not_downloaded"] == 0


# --- malformed service answers through the pipeline -------------------------------------------------


class MalformingProxy:
    """A loopback proxy in front of a real simulator that spoils chosen answers:

    * the first two submits reach the simulator (a task is created and paid for) but come back
      as 200 with an unusable body: ``{"task_id": 42}``, then plain text;
    * the first two polls of every task come back as 200 with a body that is not the contract's
      (HTML, then a JSON object without ``task``; then a result for another task id).
    """

    POLL_BODIES = [
        (b"<html><body>upstream hiccup</body></html>", "text/html"),
        (b'{"data": {"state": "done"}}', "application/json"),
        (b'{"task": {"task_id": "someone-else", "status": "TASK_STATUS_SUCCEED"}}', "application/json"),
    ]

    def __init__(self, upstream: str):
        self.upstream = upstream
        self.submits = 0
        self.polls: dict[str, int] = {}
        self.spoiled: list[str] = []
        self.lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _forward(self, body: bytes | None):
                headers = {k: v for k, v in self.headers.items() if k.lower() in ("authorization", "content-type")}
                resp = requests.request(
                    self.command, proxy.upstream + self.path, data=body, headers=headers, timeout=60
                )
                return resp.status_code, resp.content, resp.headers.get("Content-Type", "application/json")

            def _send(self, status, body, ctype):
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                status, content, ctype = self._forward(body)
                with proxy.lock:
                    proxy.submits += 1
                    n = proxy.submits
                if status == 200 and n == 1:
                    proxy.spoiled.append("submit: task_id is a number")
                    return self._send(200, b'{"task_id": 42}', "application/json")
                if status == 200 and n == 2:
                    proxy.spoiled.append("submit: not JSON")
                    return self._send(200, b"OK, queued", "text/plain")
                self._send(status, content, ctype)

            def do_GET(self):
                if self.path.startswith("/v3/async/task-result"):
                    task_id = self.path.split("task_id=", 1)[-1]
                    with proxy.lock:
                        n = proxy.polls.get(task_id, 0)
                        proxy.polls[task_id] = n + 1
                    if n < 2:
                        body, ctype = proxy.POLL_BODIES[(n + len(proxy.polls) - 1) % len(proxy.POLL_BODIES)]
                        proxy.spoiled.append(f"poll {n + 1} of {task_id[:8]}")
                        return self._send(200, body, ctype)
                self._send(*self._forward(None))

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.timeout(120)
def test_malformed_answers_keep_tasks_recoverable(tmp_path, monkeypatch, caplog):
    """Spoiled answers go through the Dagster assets and the sensor: a 200 without a usable
    task_id ends ``unknown`` (a paid task may exist) with a readable reason; spoiled polls are
    typed MalformedResponse, logged, rescheduled, and the tasks still end with their videos."""
    from dagster import instance_for_test
    from support import drive_sensor
    from test_pipeline_dagster import range_tags, run

    from vidu_pipeline.api import errors
    from vidu_pipeline.api.client import ViduClient
    from vidu_pipeline.defs.partitions import REQUESTS_PARTITIONS_NAME
    from vidu_pipeline.defs.resources import PipelineResource, ViduResource
    from vidu_pipeline.simulator import Simulator, SimulatorConfig

    monkeypatch.setenv("VIDU_SIMULATOR_RENDER_SCALE", "0.1")
    make_catalog(tmp_path / "catalog", subjects=2, prompts=2, seeds=1)
    config = SimulatorConfig(api_key="malformed-key", latency_s=0.3, render_scale=0.1, state_dir=tmp_path / "sim")
    with Simulator(config) as sim, MalformingProxy(sim.base_url) as proxy, instance_for_test() as instance:
        # The client alone: a spoiled poll is a typed, retryable, readable error.
        with ViduClient("malformed-key", proxy.base_url) as client:
            with pytest.raises(errors.MalformedResponse) as info:
                client.get_task_result("probe-task")
            assert info.value.retryable and info.value.status == 200
            assert "response is not JSON: '<html><body>upstream hiccup" in str(info.value)

        pipeline = PipelineResource(
            data_dir=str(tmp_path / "data"),
            catalog_dir=str(tmp_path / "catalog"),
            poll_time_budget_s=10,
            submit_workers=1,
        )
        resources = {"pipeline": pipeline, "vidu": ViduResource(api_key="malformed-key", base_url=proxy.base_url)}
        run(instance, resources, ["catalog", "reference_images", "rejections", "generation_requests"])
        keys = instance.get_dynamic_partitions(REQUESTS_PARTITIONS_NAME)
        assert len(keys) == 4
        assert run(instance, resources, ["video_tasks"], tags=range_tags(keys)).success
        ledger = pipeline.ledger()
        unknown = ledger.rows(states=["unknown"])
        assert len(unknown) == 2
        reasons = " | ".join(r.last_error for r in unknown)
        assert "submit answered 200 without a usable task_id" in reasons
        assert "task_id is not a non-empty string" in reasons and "response is not JSON" in reasons
        assert "a paid task may exist" in reasons

        with caplog.at_level(logging.WARNING, logger="vidu_pipeline.tasks"):
            drive_sensor(instance, resources, pipeline, timeout=90)
        logged = caplog.text
        assert "poll(s) failed and were rescheduled" in logged
        assert "response is not JSON" in logged or "no 'task' object" in logged or "answered for" in logged

        counts = ledger.counts_by_state()
        assert counts["succeeded"] == 2 and counts["unknown"] == 2, counts
        assert sum(1 for s in proxy.spoiled if s.startswith("poll")) >= 4
        for row in ledger.rows(states=["succeeded"]):
            assert row.video_sha256 and Path(row.video_path).exists()
        # The two spoiled submits created paid tasks the ledger calls unknown — never sent again.
        assert sim.stats()["submits"]["accepted"] == 4
        assert all(len(ledger.attempts_for(r.request_id)) == 1 for r in unknown)
        shutil.rmtree(tmp_path / "sim", ignore_errors=True)


# --- the paid-once invariants catch the case-1 bug (issue 10) ---------------------------------------


@pytest.mark.timeout(120)
def test_paid_once_invariants_fail_on_a_stale_poll_answer(tmp_path, monkeypatch):
    """Rebuild what the old code did: task 1 failed and was resubmitted (task 2); a slow
    poller's stale "failed" about task 1 was then applied to the request (written here as the
    old unconditioned UPDATE did), so task 3 was paid while task 2 ran. Task 3's video is
    collected; task 2 SUCCEEDED at the service and is never downloaded. The older invariants
    all hold on this data (3 tasks accepted, 3 billable attempts, one video per success); the
    paid-once ones must not."""
    import sqlite3
    import time

    from drills.run_drill import paid_once_checks
    from vidu_pipeline import tasks
    from vidu_pipeline.api.client import ViduClient
    from vidu_pipeline.ledger import Ledger, SpendCaps
    from vidu_pipeline.simulator import Simulator, SimulatorConfig
    from vidu_pipeline.simulator.faults import FaultConfig
    from vidu_pipeline.videos import collect_video

    monkeypatch.setenv("VIDU_SIMULATOR_RENDER_SCALE", "0.1")
    pipeline, [rid] = plan_catalog(tmp_path)
    path = pipeline.root / "ledger.sqlite"
    ledger = Ledger(f"sqlite:///{path}")
    key = "stale-answer-key"
    config = SimulatorConfig(
        api_key=key, latency_s=0.2, render_scale=0.1, state_dir=tmp_path / "sim", faults=FaultConfig(fail_tasks=1.0)
    )

    def submit(client):
        [out] = tasks.submit_requests(
            ledger,
            client,
            [rid],
            data_uri_for=pipeline.image_cache().data_uri,
            caps=SpendCaps(None, None, "bug"),
            owner="o:1:bug",
            retry_budget=3,
        )
        assert out.submitted, out
        return out.task_id

    def settle(client, *task_ids):
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            results = [client.get_task_result(t) for t in task_ids]
            if all(r.terminal for r in results):
                return
            time.sleep(0.1)
        raise AssertionError(f"tasks did not end: {results}")

    with Simulator(config) as sim, ViduClient(key, sim.base_url) as client:
        task1 = submit(client)
        settle(client, task1)
        assert tasks.poll_due(ledger, client, now=10**10).failed == [rid]
        sim.set_faults(FaultConfig())
        task2 = submit(client)
        con = sqlite3.connect(path)  # the slow poller's stale write, as the old code made it
        con.execute(
            "UPDATE requests SET state='failed', last_error='stale: task 1 failed', next_poll_at=NULL "
            "WHERE request_id=?",
            (rid,),
        )
        con.commit()
        con.close()
        task3 = submit(client)
        assert len({task1, task2, task3}) == 3
        settle(client, task2, task3)
        assert tasks.poll_due(ledger, client, now=10**10).succeeded == [rid]
        collect_video(ledger, client, rid, videos_dir=pipeline.videos_dir, render_scale=0.1)
        stats = sim.stats()
    rows = {r.request_id: r for r in ledger.rows()}
    attempts = {r: ledger.attempts_for(r) for r in rows}
    ledger.close()

    # What the older invariants look at is in order: one success with its video, 3 accepted
    # tasks for 3 billable attempts.
    assert rows[rid].state == "succeeded" and rows[rid].video_sha256 and rows[rid].task_id == task3
    assert stats["submits"]["accepted"] == 3 == sum(1 for a in attempts[rid] if a.outcome == "submitted")

    checks, counts = paid_once_checks(rows, attempts, stats["tasks"]["list"], retry_budget=3)
    by_name = {c.name: c for c in checks}
    assert not by_name["no task paid beyond need"].ok
    assert "3 tasks paid (FAILED, SUCCEED, SUCCEED), 1 beyond need" in by_name["no task paid beyond need"].detail
    assert not by_name["no succeeded task left undownloaded"].ok
    assert f"task {task2[:8]} SUCCEEDED at the service" in by_name["no succeeded task left undownloaded"].detail
    assert counts == {"paid_extra": 1, "succeeded_not_downloaded": 1}

    # The same service books with a correct ledger history (no stale write) pass.
    good = [t for t in stats["tasks"]["list"] if t["task_id"] != task2]
    good_attempts = {rid: [a for a in attempts[rid] if a.task_id != task2]}
    checks, counts = paid_once_checks(rows, good_attempts, good, retry_budget=3)
    assert all(c.ok for c in checks) and counts == {"paid_extra": 0, "succeeded_not_downloaded": 0}
