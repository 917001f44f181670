"""The code location as `dagster dev` loads it."""

import subprocess
import sys
from pathlib import Path

from dagster import AssetKey, DefaultSensorStatus

from vidu_pipeline.definitions import defs

ROOT = Path(__file__).resolve().parents[1]


QUALITY_GATES = (
    "no_frozen_clips",
    "no_blank_clips",
    "clips_like_references",
    "motion_follows_amplitude",
    "seeds_not_near_duplicates",
)


def test_definitions_hold_the_data_flow():
    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert keys == {
        "catalog",
        "reference_images",
        "rejections",
        "generation_requests",
        "video_tasks",
        "videos",
        "lineage",
        "dataset_export",
    }
    assert graph.get(AssetKey("videos")).parent_keys == {AssetKey("video_tasks")}
    assert graph.get(AssetKey("lineage")).parent_keys == {AssetKey("videos")}
    assert graph.get(AssetKey("dataset_export")).parent_keys == {AssetKey("lineage")}
    assert {c.name for c in graph.asset_check_keys} == {
        "images_accepted",
        "lineage_complete",
        "videos_match_requests",
        "no_unknown_tasks",
        "videos_verified",
        *QUALITY_GATES,
    }
    sensor = defs.resolve_sensor_def("vidu_task_sensor")
    assert sensor.default_status == DefaultSensorStatus.RUNNING
    schedule = defs.resolve_schedule_def("vidu_generation_schedule")
    assert schedule.default_status.value == "STOPPED"


def test_the_key_is_an_env_var_reference_not_a_value(monkeypatch):
    monkeypatch.setenv("VIDU_API_KEY", "sk-should-not-appear")
    from dagster import EnvVar

    from vidu_pipeline.defs.resources import vidu_resource_from_env

    resource = vidu_resource_from_env()
    assert isinstance(resource.api_key, EnvVar) and resource.api_key.env_var_name == "VIDU_API_KEY"
    assert "sk-should-not-appear" not in repr(resource)


def test_workspace_validates_like_dagster_dev(tmp_path):
    result = subprocess.run(
        [str(Path(sys.executable).with_name("dagster")), "definitions", "validate", "-w", "workspace.yaml"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": str(Path(sys.executable).parent), "DAGSTER_HOME": str(tmp_path), "HOME": str(tmp_path)},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "passed validation" in result.stdout + result.stderr


def test_every_stage_has_a_named_job_with_its_checks():
    nodes = {
        name: set(defs.resolve_job_def(name).graph.node_dict)
        for name in ("vidu_plan_job", "vidu_submit_job", "vidu_collect_job", "vidu_lineage_job")
    }
    assert nodes["vidu_submit_job"] == {"video_tasks"}
    assert nodes["vidu_collect_job"] == {"videos"}  # its check would always be skipped there
    assert nodes["vidu_lineage_job"] == {
        "lineage",
        "lineage_lineage_complete",
        "lineage_videos_match_requests",
        "lineage_no_unknown_tasks",
        "videos_videos_verified",
        "dataset_export",
        "dataset_quality_gates",  # one step for every gate: one read of the table
    }
    gates = defs.resolve_job_def("vidu_lineage_job").asset_layer.asset_graph.asset_check_keys
    assert {key.name for key in gates} >= set(QUALITY_GATES)
    assert "generation_requests" in nodes["vidu_plan_job"]
    for name in nodes:
        assert defs.resolve_job_def(name).tags["vidu/stage"]
    automation = defs.resolve_sensor_def("vidu_automation_sensor")
    assert automation.default_status == DefaultSensorStatus.RUNNING


def test_the_task_sensor_launches_the_stage_jobs():
    """Its runs show under Jobs and on the timeline by name, not as ad-hoc asset runs."""
    sensor = defs.resolve_sensor_def("vidu_task_sensor")
    assert {job.name for job in sensor.jobs} == {"vidu_submit_job", "vidu_collect_job", "vidu_lineage_job"}


def _lineage_requested(instance, condition_defs, cursor):
    from dagster import evaluate_automation_conditions

    result = evaluate_automation_conditions(defs=condition_defs, instance=instance, cursor=cursor)
    return result.get_num_requested(AssetKey("lineage")), result.cursor


def _condition_defs(condition):
    """The videos → lineage edge as it is in the code location, with ``condition`` on lineage."""
    from dagster import asset

    from vidu_pipeline.defs.partitions import requests_partitions

    @asset(name="videos", partitions_def=requests_partitions)
    def videos_stub(): ...

    @asset(name="lineage", deps=["videos"], automation_condition=condition)
    def lineage_stub(): ...

    return [videos_stub, lineage_stub]


def _materialize(instance, key, partition=None):
    from dagster import AssetMaterialization

    instance.report_runless_asset_event(AssetMaterialization(asset_key=key, partition=partition))


def test_lineage_refreshes_after_each_videos_batch_while_other_partitions_are_missing():
    from dagster import AutomationCondition, instance_for_test

    from vidu_pipeline.defs.jobs import LINEAGE_AFTER_VIDEOS
    from vidu_pipeline.defs.partitions import REQUESTS_PARTITIONS_NAME

    assert defs.resolve_assets_def("lineage").automation_conditions_by_key[AssetKey("lineage")] == LINEAGE_AFTER_VIDEOS
    for condition, fires_with_missing in ((LINEAGE_AFTER_VIDEOS, True), (AutomationCondition.eager(), False)):
        with instance_for_test() as instance:
            instance.add_dynamic_partitions(REQUESTS_PARTITIONS_NAME, ["a-s1-1", "b-s1-2", "c-s1-3"])
            condition_defs = _condition_defs(condition)
            _materialize(instance, "lineage")
            requested, cursor = _lineage_requested(instance, condition_defs, None)
            assert requested == 0, "nothing new upstream: no run"
            _materialize(instance, "videos", "a-s1-1")  # one batch of three
            requested, cursor = _lineage_requested(instance, condition_defs, cursor)
            assert requested == (1 if fires_with_missing else 0)
            if fires_with_missing:
                requested, cursor = _lineage_requested(instance, condition_defs, cursor)
                assert requested == 0, "requested once per batch, not every tick"
                _materialize(instance, "lineage")
                _materialize(instance, "videos", "b-s1-2")
                requested, cursor = _lineage_requested(instance, condition_defs, cursor)
                assert requested == 1, "and again after the next batch"
                # The last batch lands between the request and the next tick: not forgotten.
                _materialize(instance, "videos", "c-s1-3")
                requested, cursor = _lineage_requested(instance, condition_defs, cursor)
                assert requested == 1, "a batch that landed after the request is picked up"


def test_the_automation_sensor_refreshes_lineage_and_the_videos_check_after_a_batch():
    from dagster import AssetCheckKey, evaluate_automation_conditions, instance_for_test

    from vidu_pipeline.defs.partitions import REQUESTS_PARTITIONS_NAME

    videos_check = AssetCheckKey(AssetKey("videos"), "videos_verified")
    lineage_checks = {
        AssetCheckKey(AssetKey("lineage"), name)
        for name in ("lineage_complete", "videos_match_requests", "no_unknown_tasks")
    }
    export_checks = {AssetCheckKey(AssetKey("dataset_export"), name) for name in QUALITY_GATES}
    with instance_for_test() as instance:
        instance.add_dynamic_partitions(REQUESTS_PARTITIONS_NAME, ["a-s1-1", "b-s1-2"])
        _materialize(instance, "lineage")
        cursor = evaluate_automation_conditions(defs=defs, instance=instance).cursor
        _materialize(instance, "videos", "a-s1-1")
        result = evaluate_automation_conditions(defs=defs, instance=instance, cursor=cursor)
        requested = {r.key for r in result.results if r.true_subset.size}
        assert requested == {
            AssetKey("lineage"),
            AssetKey("dataset_export"),
            videos_check,
            *lineage_checks,
            *export_checks,
        }
        result = evaluate_automation_conditions(defs=defs, instance=instance, cursor=result.cursor)
        assert result.total_requested == 0


def test_scheduled_plan_runs_say_which_catalog_and_seeds(tmp_path):
    from dagster import build_schedule_context

    from vidu_pipeline.defs.resources import PipelineResource
    from vidu_pipeline.defs.schedules import generation_schedule

    pipeline = PipelineResource(data_dir=str(tmp_path), seeds=[3, 4])
    [request] = generation_schedule.evaluate_tick(build_schedule_context(resources={"pipeline": pipeline})).run_requests
    assert request.tags["vidu/catalog"] == str(tmp_path.resolve() / "catalog")
    assert request.tags["vidu/seeds"] == "3,4"
    assert generation_schedule.job_name == "vidu_plan_job"


def test_a_seed_override_in_run_config_follows_the_seed_policy():
    """Run config (the UI's launchpad) may not slip a seed past the rules sweep.yaml follows."""
    import pytest

    from vidu_pipeline.api import contract
    from vidu_pipeline.defs.resources import PipelineResource

    assert PipelineResource(seeds=[0, contract.SEED_MAX]).seeds == [0, contract.SEED_MAX]
    with pytest.raises(Exception, match="outside 0..2147483647"):
        PipelineResource(seeds=[1, 2**63])
    with pytest.raises(Exception, match="at most 10000"):
        PipelineResource(seeds=list(range(contract.MAX_SWEEP_SEEDS + 1)))
