"""What the Dagster UI shows for each video and table: inline thumbnails, the request, the
timings, paths relative to the data dir, row counts and column schemas, and the videos check.
Real temporary instance, the simulator over HTTP, the sensor's own runs."""

import base64
import io
import json
import shutil
from pathlib import Path

import pytest
from dagster import AssetKey, AssetSelection, instance_for_test, materialize
from PIL import Image
from support import drive_sensor

from vidu_pipeline.defs.assets import ALL_ASSETS
from vidu_pipeline.defs.checks import ALL_CHECKS
from vidu_pipeline.defs.partitions import REQUESTS_PARTITIONS_NAME
from vidu_pipeline.defs.resources import PipelineResource, ViduResource
from vidu_pipeline.defs.videos import videos_verified
from vidu_pipeline.generation_requests import RequestSpec
from vidu_pipeline.lineage import SCHEMA
from vidu_pipeline.simulator import Simulator, SimulatorConfig

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "catalog"
SCALE = 0.1


@pytest.fixture
def generated(tmp_path, monkeypatch):
    """A small sweep (the sample's 5 prompts × 1 seed) generated through Dagster: plan, submit, the sensor's runs."""
    monkeypatch.setenv("VIDU_SIMULATOR_RENDER_SCALE", str(SCALE))
    catalog = tmp_path / "catalog"
    shutil.copytree(SAMPLE, catalog)
    pipeline = PipelineResource(
        data_dir=str(tmp_path / "data"), catalog_dir=str(catalog), seeds=[7], poll_time_budget_s=10
    )
    config = SimulatorConfig(
        api_key="test-key", latency_s=0.5, concurrency=5, render_scale=SCALE, state_dir=tmp_path / "sim"
    )
    with Simulator(config) as sim, instance_for_test() as instance:
        resources = {"pipeline": pipeline, "vidu": ViduResource(api_key="test-key", base_url=sim.base_url)}
        run(instance, resources, ["catalog", "reference_images", "rejections", "generation_requests"])
        keys = instance.get_dynamic_partitions(REQUESTS_PARTITIONS_NAME)
        run(
            instance,
            resources,
            ["video_tasks"],
            tags={"dagster/asset_partition_range_start": keys[0], "dagster/asset_partition_range_end": keys[-1]},
        )
        yield instance, resources, pipeline, keys, drive_sensor(instance, resources, pipeline)


def run(instance, resources, selection, **kw):
    return materialize(
        [*ALL_ASSETS, *ALL_CHECKS],
        selection=selection if isinstance(selection, AssetSelection) else [AssetKey(s) for s in selection],
        instance=instance,
        resources=resources,
        **kw,
    )


def latest_metadata(instance, asset: str, partition: str | None = None) -> dict:
    event = (
        instance.get_latest_materialization_event(AssetKey(asset))
        if partition is None
        else instance.fetch_materializations(AssetKey(asset), limit=1000).records
    )
    if partition is None:
        return event.asset_materialization.metadata
    matching = [r for r in event if r.asset_materialization.partition == partition]
    return matching[-1].asset_materialization.metadata


def inline_images(markdown: str) -> list[Image.Image]:
    """Every ``![…](data:image/jpeg;base64,…)`` of a Markdown value, decoded."""
    images = []
    for part in markdown.split("(data:image/jpeg;base64,")[1:]:
        data = base64.b64decode(part.split(")", 1)[0], validate=True)
        image = Image.open(io.BytesIO(data), formats=["JPEG"])
        image.load()
        images.append((image, len(data)))
    return images


def test_each_video_partition_shows_its_clip_request_and_timings(generated):
    instance, _, pipeline, keys, _ = generated
    ledger = pipeline.ledger()
    assert len(keys) == 5
    for key in keys:
        row = ledger.get(key)
        spec = RequestSpec.from_json(row.spec_json)
        meta = latest_metadata(instance, "videos", key)

        [(thumb, size)] = inline_images(meta["thumbnail"].value)
        probe = meta["probe"].value
        assert thumb.width == min(320, probe["width"]) and 0 < size < 30_000

        assert meta["path"].value == f"videos/{key}.mp4"  # relative to the data dir
        assert (pipeline.root / meta["path"].value).is_file()
        assert meta["prompt"].value == spec.prompt
        assert meta["options"].value == spec.options
        assert meta["subject_id"].value == spec.subject_id
        assert meta["seed"].value == spec.seed == 7
        assert meta["seed_effective"].value == row.effective_seed
        assert meta["task_id"].value == row.task_id
        assert meta["submitted_at"].value == pytest.approx(row.submitted_at)
        assert meta["finished_at"].value == pytest.approx(row.finished_at)
        assert meta["latency_s"].value == pytest.approx(row.finished_at - row.submitted_at, abs=0.01)
        assert probe["frames"] > 0 and meta["problems"].value == "none"

        references = inline_images(meta["references"].value)
        assert len(references) == len(spec.image_sha256s) >= 1
        assert all(image.width <= 96 and size < 10_000 for image, size in references)
        assert str(pipeline.root) not in json.dumps({k: str(v.value) for k, v in meta.items()})
    # each reference image is shrunk once, not once per video
    assert len(list((pipeline.root / "thumbnails" / "references").glob("*-96.jpg"))) == len(
        {sha for key in keys for sha in RequestSpec.from_json(ledger.get(key).spec_json).image_sha256s}
    )


def test_videos_check_lists_what_is_missing_and_passes_when_all_are_verified(generated):
    instance, resources, pipeline, keys, _ = generated
    [passed] = run(instance, resources, AssetSelection.checks(videos_verified)).get_asset_check_evaluations()
    assert passed.passed and passed.metadata["verified"].value == len(keys)

    gone = pipeline.root / "videos" / f"{keys[0]}.mp4"
    gone.unlink()
    [failed] = run(instance, resources, AssetSelection.checks(videos_verified)).get_asset_check_evaluations()
    assert not failed.passed and failed.severity.value == "ERROR"
    assert failed.metadata["verified"].value == len(keys) - 1
    assert f"{keys[0]}: video file missing" in failed.metadata["missing"].value

    instance.add_dynamic_partitions(REQUESTS_PARTITIONS_NAME, ["late-s1-0000"])
    [pending] = run(instance, resources, AssetSelection.checks(videos_verified)).get_asset_check_evaluations()
    assert "late-s1-0000: not in the ledger" in pending.metadata["missing"].value


def test_lineage_shows_row_count_schema_and_relative_path(generated):
    instance, resources, _, keys, _ = generated
    result = run(instance, resources, ["lineage"])
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks == {"lineage_complete": True, "videos_match_requests": True, "no_unknown_tasks": True}
    meta = latest_metadata(instance, "lineage")
    assert meta["dagster/row_count"].value == len(keys)
    assert [c.name for c in meta["dagster/column_schema"].value.columns] == SCHEMA.names
    assert meta["path"].value == "lineage"
    assert meta["parquet_files"].value == 1, "the lineage asset compacts the parts"


def test_tabular_plan_assets_show_row_count_and_schema(generated):
    """The UI's table view of generation_requests and rejections: Dagster's standard keys."""
    instance, _, _, keys, _ = generated
    requests = latest_metadata(instance, "generation_requests")
    assert requests["dagster/row_count"].value == len(keys)
    columns = {c.name for c in requests["dagster/column_schema"].schema.columns}
    assert {"request_id", "subject_id", "seed", "aspect_ratio", "prompt"} <= columns
    rejections = latest_metadata(instance, "rejections")
    assert rejections["dagster/row_count"].value == rejections["rejections"].value
    assert {"rule"} <= {c.name for c in rejections["dagster/column_schema"].schema.columns}
