"""The live progress view (issue 12): every sensor tick that changed something records, on
``video_tasks``, the per-state counts and a table of the tasks in flight; the tick's skip
reason is one readable line. Driven through sensor evaluation with tasks in flight on the
simulator over HTTP."""

import shutil
import time
from pathlib import Path

import pytest
from dagster import AssetKey, AssetObservation, Definitions, build_sensor_context, instance_for_test

from vidu_pipeline.defs.assets import ALL_ASSETS
from vidu_pipeline.defs.checks import ALL_CHECKS
from vidu_pipeline.defs.jobs import ALL_JOBS
from vidu_pipeline.defs.partitions import REQUESTS_PARTITIONS_NAME
from vidu_pipeline.defs.resources import PipelineResource, ViduResource
from vidu_pipeline.defs.sensors import vidu_task_sensor
from vidu_pipeline.simulator import Simulator, SimulatorConfig
from vidu_pipeline.simulator.faults import FaultConfig

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "catalog"
KEY = "progress-test-key"

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def in_flight(tmp_path, monkeypatch):
    """Ten tasks submitted to a slow simulator that renders one at a time: they stay in flight."""
    monkeypatch.setenv("VIDU_SIMULATOR_RENDER_SCALE", "0.1")
    shutil.copytree(SAMPLE, tmp_path / "catalog")
    config = SimulatorConfig(api_key=KEY, latency_s=120, concurrency=1, render_scale=0.1, state_dir=tmp_path / "sim")
    pipeline = PipelineResource(
        data_dir=str(tmp_path / "data"), catalog_dir=str(tmp_path / "catalog"), poll_time_budget_s=5
    )
    with Simulator(config) as sim, instance_for_test() as instance:
        resources = {"pipeline": pipeline, "vidu": ViduResource(api_key=KEY, base_url=sim.base_url)}
        defs = Definitions(assets=ALL_ASSETS, asset_checks=ALL_CHECKS, jobs=ALL_JOBS, resources=resources)
        assert defs.resolve_job_def("vidu_plan_job").execute_in_process(instance=instance).success
        keys = instance.get_dynamic_partitions(REQUESTS_PARTITIONS_NAME)
        tags = {"dagster/asset_partition_range_start": keys[0], "dagster/asset_partition_range_end": keys[-1]}
        assert defs.resolve_job_def("vidu_submit_job").execute_in_process(instance=instance, tags=tags).success
        yield sim, instance, resources, keys


def tick(instance, resources):
    return vidu_task_sensor(build_sensor_context(instance=instance, resources=resources))


def tick_until_polled(instance, resources, timeout_s: float = 60):
    """Tick until the service has been asked about the tasks (the first poll waits ~2 s)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = tick(instance, resources)
        if not result.skip_reason.skip_message.startswith("nothing to run: polled 0"):
            return result
        time.sleep(0.5)
    raise AssertionError("the sensor never polled")


def test_a_tick_shows_states_and_tasks_in_flight(in_flight):
    sim, instance, resources, keys = in_flight
    result = tick_until_polled(instance, resources)

    [event] = result.asset_events
    assert isinstance(event, AssetObservation) and event.asset_key == AssetKey("video_tasks")
    assert "**submitted** 10" in event.metadata["states"].value
    table = event.metadata["in_flight"]
    rows = [record.data for record in table.records]
    assert sorted(r["request_id"] for r in rows) == sorted(keys)
    assert {c.name for c in table.schema.columns} == {"request_id", "state", "eta_s", "progress_pct", "age_s"}
    assert {r["state"] for r in rows} <= {"submitted", "created", "queued", "processing"}, rows
    assert {"queued", "processing"} & {r["state"] for r in rows}, "the service's words, made readable"
    assert all(r["age_s"] >= 0 and (r["progress_pct"] == -1 or 0 <= r["progress_pct"] <= 100) for r in rows)

    reason = result.skip_reason.skip_message
    assert reason.startswith("nothing to run: polled ") and "requests: 10 submitted" in reason
    assert "\n" not in reason and "{" not in reason, reason  # a readable line, not JSON


def test_a_tick_that_changes_nothing_records_nothing(in_flight):
    sim, instance, resources, keys = in_flight
    [event] = tick_until_polled(instance, resources).asset_events
    instance.report_runless_asset_event(event)  # what the daemon does with a sensor's asset events

    sim.set_faults(FaultConfig(poll_server_error=1.0))  # no poll answers: nothing can change
    result = tick(instance, resources)
    assert result.asset_events == []
    assert result.skip_reason.skip_message.startswith("nothing to run:")

    assert len(instance.fetch_observations(AssetKey("video_tasks"), limit=10).records) == 1
