"""Issue 10, case 1: two pollers on one ledger, and a late answer about an old task.

Task 1 fails. A slow poller reads FAILED for it; a fast poller records the failure and
resubmits (task 2). The slow poller's answer then arrives: it must not touch the request, which
now holds task 2 — before the fix it marked the request failed while task 2 ran, and the next
resubmit paid for a task 3.

Real parts: the simulator over HTTP on loopback, two ``Ledger`` instances (two engines, as two
processes would have) on one SQLite file, the catalog planned through Dagster.
"""

from __future__ import annotations

import threading
import time

import pytest
from dagster import AssetKey, instance_for_test, materialize

from drills.run_drill import make_catalog
from vidu_pipeline import tasks
from vidu_pipeline.api.client import ViduClient
from vidu_pipeline.defs.assets import ALL_ASSETS
from vidu_pipeline.defs.resources import PipelineResource, ViduResource
from vidu_pipeline.ledger import Ledger, SpendCaps
from vidu_pipeline.simulator import Simulator, SimulatorConfig
from vidu_pipeline.simulator.faults import FaultConfig

KEY = "race-key"
CAPS = SpendCaps(per_run=None, per_day=None, run_id="race")
FAR = 10**10  # "now" for poll_due: every submitted task is due


class SlowPoller(ViduClient):
    """Reads the answer, then waits to be let go before the caller records it."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.read = threading.Event()
        self.go = threading.Event()
        self.seen: list[str] = []

    def get_task_result(self, task_id):
        result = super().get_task_result(task_id)
        self.seen.append(f"{task_id}:{result.status}")
        self.read.set()
        assert self.go.wait(60), "the test never let the slow poller go"
        return result


@pytest.fixture
def planned(tmp_path, monkeypatch):
    """One request planned through Dagster; the simulator fails every task until told not to."""
    monkeypatch.setenv("VIDU_SIMULATOR_RENDER_SCALE", "0.1")
    make_catalog(tmp_path / "catalog", subjects=1, prompts=1, seeds=1)
    config = SimulatorConfig(
        api_key=KEY, latency_s=0.2, render_scale=0.1, state_dir=tmp_path / "sim", faults=FaultConfig(fail_tasks=1.0)
    )
    pipeline = PipelineResource(data_dir=str(tmp_path / "data"), catalog_dir=str(tmp_path / "catalog"))
    with Simulator(config) as sim, instance_for_test() as instance:
        resources = {"pipeline": pipeline, "vidu": ViduResource(api_key=KEY, base_url=sim.base_url)}
        result = materialize(
            ALL_ASSETS,
            selection=[AssetKey(k) for k in ("catalog", "reference_images", "generation_requests")],
            instance=instance,
            resources=resources,
        )
        [request_id] = list(result.output_for_node("generation_requests")["request_id"])
        yield sim, pipeline, request_id


def submit(ledger, client, pipeline, request_id):
    return tasks.submit_requests(
        ledger,
        client,
        [request_id],
        data_uri_for=pipeline.image_cache().data_uri,
        caps=CAPS,
        owner=tasks.owner_id("race"),
        retry_budget=3,
    )


def wait_for_status(client, task_id, status, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.get_task_result(task_id).status == status:
            return
        time.sleep(0.1)
    raise AssertionError(f"task {task_id} never reached {status}")


@pytest.mark.timeout(120)
def test_slow_pollers_answer_about_task_1_leaves_task_2_alone(planned):
    sim, pipeline, rid = planned
    url = f"sqlite:///{pipeline.root / 'ledger.sqlite'}"
    fast_ledger, slow_ledger = Ledger(url), Ledger(url)
    with ViduClient(KEY, sim.base_url) as fast, SlowPoller(KEY, sim.base_url) as slow:
        [first] = submit(fast_ledger, fast, pipeline, rid)
        task1 = first.task_id
        wait_for_status(fast, task1, "TASK_STATUS_FAILED")

        # The slow poller reads FAILED for task 1 and stalls before writing it down.
        slow_report: dict = {}
        slow_thread = threading.Thread(
            target=lambda: slow_report.update(r=tasks.poll_due(slow_ledger, slow, now=FAR, workers=1))
        )
        slow_thread.start()
        assert slow.read.wait(30)

        # Meanwhile the fast poller records the failure and resubmits: task 2.
        assert tasks.poll_due(fast_ledger, fast, now=FAR).failed == [rid]
        sim.set_faults(FaultConfig())
        [second] = submit(fast_ledger, fast, pipeline, rid)
        task2 = second.task_id
        assert second.submitted and task2 != task1

        slow.go.set()
        slow_thread.join(30)
        report = slow_report["r"]
        assert slow.seen == [f"{task1}:TASK_STATUS_FAILED"]
        assert report.failed == [] and report.stale == [rid], report

        row = fast_ledger.get(rid)
        assert (row.state, row.task_id, row.attempts) == ("submitted", task2, 2)

        # Another submit pass (a sensor's resubmit run) finds task 2 live: nothing more is paid.
        [again] = submit(fast_ledger, fast, pipeline, rid)
        assert not again.submitted and again.message == f"already submitted (task {task2})"
        assert sim.stats()["submits"]["accepted_by_fingerprint"] == {row.fingerprint: 2}

        # Task 2 is followed to its end and its success is recorded.
        wait_for_status(fast, task2, "TASK_STATUS_SUCCEED")
        assert tasks.poll_due(slow_ledger, fast, now=FAR).succeeded == [rid]
        row = fast_ledger.get(rid)
        assert (row.state, row.task_id) == ("succeeded", task2)
    fast_ledger.close()
    slow_ledger.close()
