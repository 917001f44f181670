"""The Dagster machinery end to end: real temporary instance, the simulator over HTTP,
materialize → sensor ticks → the runs the sensor asks for → videos, lineage, ledger."""

import shutil
from pathlib import Path

import pytest
import requests
from dagster import (
    AssetKey,
    instance_for_test,
    materialize,
)
from support import drive_sensor

from vidu_pipeline.defs.assets import ALL_ASSETS
from vidu_pipeline.defs.checks import ALL_CHECKS
from vidu_pipeline.defs.partitions import REQUESTS_PARTITIONS_NAME
from vidu_pipeline.defs.resources import PipelineResource, ViduResource
from vidu_pipeline.mp4 import probe_video
from vidu_pipeline.simulator import Simulator, SimulatorConfig

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "catalog"
SCALE = 0.1


@pytest.fixture
def sim(tmp_path):
    config = SimulatorConfig(
        api_key="test-key", latency_s=0.5, concurrency=5, render_scale=SCALE, state_dir=tmp_path / "sim"
    )
    with Simulator(config) as s:
        yield s


@pytest.fixture
def setup(tmp_path, sim, monkeypatch):
    monkeypatch.setenv("VIDU_SIMULATOR_RENDER_SCALE", str(SCALE))
    catalog = tmp_path / "catalog"
    shutil.copytree(SAMPLE, catalog)
    pipeline = PipelineResource(data_dir=str(tmp_path / "data"), catalog_dir=str(catalog), poll_time_budget_s=10)
    vidu = ViduResource(api_key="test-key", base_url=sim.base_url)
    with instance_for_test() as instance:
        yield instance, {"pipeline": pipeline, "vidu": vidu}, pipeline


def stats(sim):
    return requests.get(sim.base_url + "/_simulator/stats", headers={"Authorization": "Bearer test-key"}).json()


def run(instance, resources, selection, **kw):
    return materialize(
        [*ALL_ASSETS, *ALL_CHECKS],
        selection=[AssetKey(s) for s in selection],
        instance=instance,
        resources=resources,
        **kw,
    )


def range_tags(keys):
    return {"dagster/asset_partition_range_start": keys[0], "dagster/asset_partition_range_end": keys[-1]}


def test_catalog_to_lineage_through_dagster(setup, sim):
    instance, resources, pipeline = setup
    planned = run(instance, resources, ["catalog", "reference_images", "rejections", "generation_requests"])
    keys = instance.get_dynamic_partitions(REQUESTS_PARTITIONS_NAME)
    assert len(keys) == 10  # 5 prompts × 2 seeds
    assert planned.output_for_node("rejections").empty
    assert all(set(k) <= set("abcdefghijklmnopqrstuvwxyz0123456789-_") for k in keys)

    # planning again adds nothing
    run(instance, resources, ["catalog", "reference_images", "generation_requests"])
    assert len(instance.get_dynamic_partitions(REQUESTS_PARTITIONS_NAME)) == 10

    run(instance, resources, ["video_tasks"], tags=range_tags(keys))
    assert stats(sim)["submits"]["accepted"] == 10
    materialized = instance.get_materialized_partitions(AssetKey("video_tasks"))
    assert materialized == set(keys)

    batches = drive_sensor(instance, resources, pipeline)
    assert len([b for b in batches if b.startswith("videos:")]) < 10, "videos should be collected in batches"

    ledger = pipeline.ledger()
    assert ledger.counts_by_state()["succeeded"] == 10
    assert instance.get_materialized_partitions(AssetKey("videos")) == set(keys)
    for row in ledger.rows():
        probe = probe_video(Path(row.video_path))
        assert probe.sha256 == row.video_sha256
        spec_bgm = '"bgm":true' in row.spec_json
        assert probe.has_audio == spec_bgm
        assert probe.frames > 0

    result = run(instance, resources, ["lineage"])
    assert result.success
    table = pipeline.lineage().read()
    assert sorted(table["request_id"]) == sorted(keys)
    assert set(table["state"]) == {"succeeded"}
    assert table["reference_sha256s"].map(len).min() >= 2
    assert (table["seed_effective"] == table["seed_requested"]).all()
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks == {"lineage_complete": True, "videos_match_requests": True, "no_unknown_tasks": True}

    # Re-materializing every partition pays for nothing new, and changes no partition (so no
    # video goes out of date).
    before = task_materializations(instance)
    again = run(instance, resources, ["video_tasks"], tags=range_tags(keys))
    assert again.success
    assert stats(sim)["submits"]["accepted"] == 10
    assert task_materializations(instance) == before
    assert all(len(ledger.attempts_for(k)) == 1 for k in keys)


def task_materializations(instance) -> int:
    return len(instance.fetch_materializations(AssetKey("video_tasks"), limit=10_000).records)


def test_a_stop_leaves_the_rest_of_a_videos_batch_for_the_next_run(setup, sim):
    """After Ctrl-C / SIGTERM (tasks.STOP) the videos step downloads nothing more: its run
    ends at once and the next run collects every video (nothing is lost, nothing paid again)."""
    import time

    from vidu_pipeline import tasks
    from vidu_pipeline.api.client import ViduClient

    instance, resources, pipeline = setup
    run(instance, resources, ["catalog", "reference_images", "rejections", "generation_requests"])
    keys = instance.get_dynamic_partitions(REQUESTS_PARTITIONS_NAME)
    run(instance, resources, ["video_tasks"], tags=range_tags(keys))
    ledger = pipeline.ledger()
    with ViduClient("test-key", sim.base_url) as client:
        deadline = time.monotonic() + 120
        while ledger.counts_by_state()["succeeded"] < len(keys) and time.monotonic() < deadline:
            tasks.poll_due(ledger, client, now=10**10)
            time.sleep(0.3)
    assert ledger.counts_by_state()["succeeded"] == len(keys)

    tasks.STOP.set()
    try:
        stopped = run(instance, resources, ["videos"], tags=range_tags(keys))
    finally:
        tasks.STOP.clear()
    assert stopped.success
    assert stats(sim)["downloads"]["ok"] == 0 and not any(r.video_sha256 for r in ledger.rows())

    run(instance, resources, ["videos"], tags=range_tags(keys))
    assert stats(sim)["downloads"]["ok"] == len(keys) and all(r.video_sha256 for r in ledger.rows())
    assert stats(sim)["submits"]["accepted"] == len(keys)
