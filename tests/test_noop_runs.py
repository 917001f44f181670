"""A second ``generate`` with nothing new, and a ``--dry-run``, leave every asset as it was
(issue 12): no new materialization, no new run, and nothing the UI would call "Unsynced".
The CLI runs in a subprocess against a simulator process, as a user runs it; what the UI
would show is read from the same Dagster instance."""

import shutil
import subprocess
from pathlib import Path

import pytest
from dagster import DagsterInstance
from dagster._core.definitions.data_version import StaleStatus
from dagster._core.instance.ref import InstanceRef
from dagster._utils.test.data_versions import get_stale_status_resolver
from support import run_cli

from vidu_pipeline.definitions import build_definitions
from vidu_pipeline.testing import SimulatorProcess

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "catalog"
NAMED_JOBS = {"vidu_plan_job", "vidu_submit_job", "vidu_collect_job", "vidu_lineage_job"}

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture
def work(tmp_path):
    shutil.copytree(SAMPLE, tmp_path / "catalog")
    with SimulatorProcess(tmp_path / "sim", latency=0.3) as sim:
        yield tmp_path, sim


def generate(work: Path, sim: SimulatorProcess, *extra: str) -> subprocess.CompletedProcess:
    args = ["generate", "--catalog", str(work / "catalog"), "--data-dir", str(work / "data"), "--no-contact-sheet"]
    result = run_cli(*args, *extra, cwd=work, env=sim.env(work / "dagster_home"), timeout=400)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def instance_at(work: Path) -> DagsterInstance:
    return DagsterInstance.from_ref(InstanceRef.from_dir(str(work / "dagster_home")))


def snapshot(instance: DagsterInstance) -> tuple[dict[str, int], int]:
    """Materializations per asset, and the number of runs."""
    keys = build_definitions().resolve_asset_graph().get_all_asset_keys()
    counts = {k.to_user_string(): len(instance.fetch_materializations(k, limit=10_000).records) for k in keys}
    return counts, len(instance.get_runs())


def stale(instance: DagsterInstance) -> list[str]:
    """Every asset (partition) the UI would mark "Unsynced"."""
    defs = build_definitions()
    graph = defs.resolve_asset_graph()
    resolver = get_stale_status_resolver(instance, defs.assets)  # as the webserver resolves it
    found = []
    for key in graph.materializable_asset_keys:
        node = graph.get(key)
        partitions = (
            node.partitions_def.get_partition_keys(dynamic_partitions_store=instance) if node.partitions_def else [None]
        )
        found += [
            f"{key.to_user_string()}[{p}]" for p in partitions if resolver.get_status(key, p) == StaleStatus.STALE
        ]
    return found


def test_a_second_generate_and_a_dry_run_change_no_asset(work):
    tmp, sim = work
    first = generate(tmp, sim)
    assert "summary" in first.stdout
    with instance_at(tmp) as instance:
        after_first, runs_after_first = snapshot(instance)
        assert after_first["videos"] == 10 and after_first["video_tasks"] == 10, after_first
        assert after_first["generation_requests"] == 1 and after_first["lineage"] >= 1, after_first
        jobs = {run.job_name for run in instance.get_runs()}
        assert jobs <= NAMED_JOBS and {"vidu_plan_job", "vidu_submit_job", "vidu_collect_job"} <= jobs, jobs
        plan_run = next(r for r in instance.get_runs() if r.job_name == "vidu_plan_job")
        assert plan_run.tags["vidu/stage"] == "plan" and plan_run.tags["vidu/catalog"] == str(tmp / "catalog")
        assert stale(instance) == []

    second = generate(tmp, sim)
    assert "unchanged since the last plan" in second.stderr
    assert sim.stats()["submits"]["accepted"] == 10
    with instance_at(tmp) as instance:
        assert snapshot(instance) == (after_first, runs_after_first), "a no-op generate changed an asset"
        assert stale(instance) == []

    generate(tmp, sim, "--dry-run")
    with instance_at(tmp) as instance:
        assert snapshot(instance) == (after_first, runs_after_first), "a dry run changed an asset"
        assert stale(instance) == []


def test_a_changed_catalog_is_planned_again(work):
    """The plan run is skipped only when nothing changed: one more seed plans again."""
    tmp, sim = work
    generate(tmp, sim, "--seeds", "7")
    with instance_at(tmp) as instance:
        before, _ = snapshot(instance)
    result = generate(tmp, sim, "--seeds", "7,8")
    assert "planned" in result.stderr and "unchanged" not in result.stderr
    with instance_at(tmp) as instance:
        after, _ = snapshot(instance)
        runs = instance.get_runs()
        assert after["generation_requests"] == before["generation_requests"] + 1
        assert after["video_tasks"] == before["video_tasks"] + 5  # only the new seed's requests
        assert any(r.tags.get("vidu/seeds") == "7,8" for r in runs if r.job_name == "vidu_plan_job")
        assert stale(instance) == []
