"""The code location as `dagster dev` loads it."""

import subprocess
import sys
from pathlib import Path

from dagster import AssetKey, DefaultSensorStatus

from vidu_pipeline.definitions import defs

ROOT = Path(__file__).resolve().parents[1]


def test_definitions_hold_the_data_flow():
    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert keys == {"catalog", "reference_images", "rejections", "generation_requests",
                    "video_tasks", "videos", "lineage"}
    assert graph.get(AssetKey("videos")).parent_keys == {AssetKey("video_tasks")}
    assert graph.get(AssetKey("lineage")).parent_keys == {AssetKey("videos")}
    assert {c.name for c in graph.asset_check_keys} == {
        "images_accepted", "lineage_complete", "videos_match_requests", "no_unknown_tasks"}
    sensor = defs.resolve_sensor_def("vidu_task_sensor")
    assert sensor.default_status == DefaultSensorStatus.RUNNING
    schedule = defs.resolve_schedule_def("vidu_generation_schedule")
    assert schedule.default_status.value == "STOPPED"


def test_the_key_is_an_env_var_reference_not_a_value(monkeypatch):
    monkeypatch.setenv("VIDU_API_KEY", "sk-should-not-appear")
    from vidu_pipeline.defs.resources import vidu_resource_from_env

    from dagster import EnvVar

    resource = vidu_resource_from_env()
    assert isinstance(resource.api_key, EnvVar) and resource.api_key.env_var_name == "VIDU_API_KEY"
    assert "sk-should-not-appear" not in repr(resource)


def test_workspace_validates_like_dagster_dev(tmp_path):
    result = subprocess.run(
        [str(Path(sys.executable).with_name("dagster")), "definitions", "validate", "-w", "workspace.yaml"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={"PATH": str(Path(sys.executable).parent), "DAGSTER_HOME": str(tmp_path), "HOME": str(tmp_path)},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "passed validation" in result.stdout + result.stderr
