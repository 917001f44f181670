"""Who owns the API client: one per run or sensor tick, closed at its end; and the embedded
simulator checked once per process, not once per client.

Counted the way they happen: every HTTP session the client module makes (and whether it was
closed), every ``/_simulator/stats`` request, every lock of the simulator's state folder;
against the embedded simulator the pipeline starts by itself (no key set).
"""

from __future__ import annotations

import json
import os
import signal

import pytest
import requests
from dagster import AssetKey, RunRequest, build_sensor_context, instance_for_test, materialize
from support import drive_sensor, plan_catalog

from vidu_pipeline.api import client as client_module
from vidu_pipeline.api import runtime
from vidu_pipeline.cli.driver import Driver
from vidu_pipeline.defs.assets import ALL_ASSETS
from vidu_pipeline.defs.partitions import REQUESTS_PARTITIONS_NAME
from vidu_pipeline.defs.resources import ViduResource
from vidu_pipeline.defs.sensors import vidu_task_sensor

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


class Counts:
    """HTTP sessions made by ViduClient (and which were closed), stats requests, state locks."""

    def __init__(self, monkeypatch):
        self.sessions: list[requests.Session] = []
        self.closed: set[int] = set()
        self.stats_calls = 0
        self.locks = 0
        make_session, get, flock = client_module.deadline_session, requests.get, runtime.fcntl.flock

        def counted_session(*args, **kwargs):
            session = make_session(*args, **kwargs)
            self.sessions.append(session)
            close = session.close

            def counted_close():
                self.closed.add(id(session))
                close()

            session.close = counted_close  # type: ignore[method-assign]
            return session

        def counted_get(url, *args, **kwargs):
            if str(url).endswith("/_simulator/stats"):
                self.stats_calls += 1
            return get(url, *args, **kwargs)

        def counted_flock(fd, op):
            self.locks += str(getattr(fd, "name", "")).endswith("simulator.lock")
            return flock(fd, op)

        monkeypatch.setattr(client_module, "deadline_session", counted_session)
        monkeypatch.setattr(requests, "get", counted_get)
        monkeypatch.setattr(runtime.fcntl, "flock", counted_flock)

    @property
    def open_sessions(self) -> int:
        return sum(1 for s in self.sessions if id(s) not in self.closed)


@pytest.fixture
def embedded(monkeypatch):
    """No key: the pipeline starts its own simulator (fast, small frames); stopped after."""
    monkeypatch.delenv("VIDU_API_KEY", raising=False)
    monkeypatch.delenv("VIDU_API_BASE_URL", raising=False)
    monkeypatch.setenv("VIDU_SIMULATOR_LATENCY", "0.3")
    monkeypatch.setenv("VIDU_SIMULATOR_RENDER_SCALE", "0.1")
    monkeypatch.setenv("VIDU_SIMULATOR_IDLE_EXIT", "120")
    started: list = []
    yield started
    for state_dir in started:
        runtime.stop_local_simulator(state_dir)


def test_a_batch_run_and_sensor_ticks_each_close_one_client_and_check_the_simulator_once(
    tmp_path, monkeypatch, embedded
):
    pipeline, ids = plan_catalog(tmp_path, prompts=3)
    embedded.append(pipeline.simulator_state_dir)
    counts = Counts(monkeypatch)
    resources = {"pipeline": pipeline, "vidu": ViduResource()}
    tags = {"dagster/asset_partition_range_start": ids[0], "dagster/asset_partition_range_end": ids[-1]}
    with instance_for_test() as instance:
        instance.add_dynamic_partitions(REQUESTS_PARTITIONS_NAME, ids)
        submitted = materialize(
            ALL_ASSETS, selection=[AssetKey("video_tasks")], instance=instance, resources=resources, tags=tags
        )
        assert submitted.success
        assert len(instance.get_materialized_partitions(AssetKey("video_tasks"))) == 3
        # The run of three partitions: one client (two sessions), closed when its step ended.
        assert (len(counts.sessions), counts.open_sessions) == (2, 0)

        for tick in range(1, 5):
            with build_sensor_context(instance=instance, resources=resources) as context:
                vidu_task_sensor(context)
            assert (len(counts.sessions), counts.open_sessions) == (2 + 2 * tick, 0), f"tick {tick}"

        # The runs the sensor asks for (the collect run's client too) until every video is in.
        before = len(counts.sessions)
        drive_sensor(instance, resources, pipeline)
        assert len(counts.sessions) > before and counts.open_sessions == 0
    assert pipeline.ledger().counts_by_state()["succeeded"] == 3
    # The simulator was checked (under the state folder's lock) once in this process; before,
    # once per client: every run and every tick.
    assert counts.stats_calls == 1 and counts.locks == 1, (counts.stats_calls, counts.locks)


def test_a_client_is_closed_when_the_step_fails(tmp_path, monkeypatch, embedded):
    """A submit step that raises still closes its client (the ``with`` ends it)."""
    pipeline, ids = plan_catalog(tmp_path, prompts=1)
    embedded.append(pipeline.simulator_state_dir)
    counts = Counts(monkeypatch)

    def broken_submit(*args, **kwargs):
        raise RuntimeError("the submit broke")

    monkeypatch.setattr("vidu_pipeline.tasks.submit_requests", broken_submit)
    with instance_for_test() as instance:
        instance.add_dynamic_partitions(REQUESTS_PARTITIONS_NAME, ids)
        result = materialize(
            ALL_ASSETS,
            selection=[AssetKey("video_tasks")],
            instance=instance,
            resources={"pipeline": pipeline, "vidu": ViduResource()},
            partition_key=ids[0],
            raise_on_error=False,
        )
    assert not result.success
    assert (len(counts.sessions), counts.open_sessions) == (2, 0)


def test_a_known_simulator_is_reused_until_it_is_gone_or_may_have_idled(tmp_path, monkeypatch, embedded, caplog):
    state = tmp_path / "state" / "simulator"
    embedded.append(state)
    counts = Counts(monkeypatch)
    first = runtime.resolve_endpoint(state)
    assert [runtime.resolve_endpoint(state) for _ in range(5)] == [first] * 5
    assert (counts.stats_calls, counts.locks) == (1, 1)

    # Half the idle exit later it may be about to stop: asked again (the ask keeps it up).
    clock = runtime._clock
    monkeypatch.setattr(runtime, "_clock", lambda: clock() + 61)
    assert runtime.resolve_endpoint(state) == first
    assert (counts.stats_calls, counts.locks) == (2, 2)
    monkeypatch.setattr(runtime, "_clock", clock)

    # Stopped (its announcement removed): a new one is started and announced.
    pid = json.loads((state / "simulator.json").read_text())["pid"]
    assert runtime.stop_local_simulator(state)
    wait_gone(pid)  # it holds its state folder until it has stopped
    second = runtime.resolve_endpoint(state)
    assert second.base_url != first.base_url
    assert requests.get(second.base_url + "/_simulator/stats", headers=auth(second)).status_code == 200

    # Killed outright (the announcement stays, its process is gone): also replaced.
    pid = json.loads((state / "simulator.json").read_text())["pid"]
    os.kill(pid, signal.SIGKILL)
    wait_gone(pid)
    third = runtime.resolve_endpoint(state)
    assert third.base_url not in (first.base_url, second.base_url)
    assert requests.get(third.base_url + "/_simulator/stats", headers=auth(third)).status_code == 200
    assert first.api_key not in caplog.text and third.api_key not in caplog.text


def test_the_driver_runs_each_run_key_once_and_records_repeats(tmp_path):
    """The one loop the CLI, the tests and the drills share: a run asked for again is not run
    again (the daemon's dedupe) and is reported, so a test can fail on it."""
    pipeline, _ = plan_catalog(tmp_path, prompts=1)
    request = RunRequest(run_key="lineage:once", job_name="vidu_lineage_job")
    with instance_for_test() as instance:
        driver = Driver(instance, pipeline, ViduResource(api_key="unused-key", base_url="http://127.0.0.1:9"))
        try:
            assert driver.run_request(request)
            assert not driver.run_request(request)
            driver.drain()
        finally:
            driver.close(interrupted=False)
        assert driver.jobs_by_run_key == {"lineage:once": "vidu_lineage_job"}
        assert driver.repeated_run_keys == ["lineage:once"]
        assert driver.failed_runs == []
        assert len(instance.get_run_records()) == 1


def auth(endpoint) -> dict[str, str]:
    return {"Authorization": f"Bearer {endpoint.api_key}"}


def wait_gone(pid: int) -> None:
    """Until the killed process is reaped by its parent (init) or at least no longer runs."""
    import time

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        with open(f"/proc/{pid}/stat") as f:
            if f.read().split(")")[-1].split()[0] == "Z":  # a zombie: dead, not yet reaped
                return
        time.sleep(0.05)
    raise AssertionError(f"process {pid} still runs")
