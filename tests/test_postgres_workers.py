"""Several workers share one PostgreSQL ledger (issue 13, items 2 and 4): each runs
``vidu-pipeline generate`` on the same catalog in its own working folder, data folder, Dagster
home and temp dir, against one simulator over loopback. Every video is paid for once and
downloaded once: 0 duplicate submits, 0 duplicate downloads, N ledger rows for N videos.

Workers start together, or join one that is already downloading (its videos still needing a
download look abandoned to a newcomer: before the claim in the ledger, both downloaded them —
the issue saw 48 downloads for 40 videos).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from postgres_db import fresh_database
from s3_bucket import fresh_bucket, s3_settings
from sqlalchemy.engine import make_url

from vidu_pipeline.ledger import PLANNED, SUBMITTING, SUCCEEDED, Ledger
from vidu_pipeline.testing import SimulatorProcess

pytestmark = [pytest.mark.postgres, pytest.mark.slow]  # a server, a simulator, CLI subprocesses

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "catalog"


def dagster_yaml(storage_url: str) -> str:
    """A Dagster instance on PostgreSQL storage (dagster-postgres), shared by the workers.
    dagster-postgres needs its own driver, psycopg2 (with psycopg 3 its NOTIFY fails)."""
    url = make_url(storage_url).set(drivername="postgresql+psycopg2").render_as_string(hide_password=False)
    return f"""\
storage:
  postgres:
    postgres_url: "{url}"
concurrency:
  pools:
    default_limit: 2
telemetry:
  enabled: false
"""


def start_worker(
    work: Path, sim: SimulatorProcess, ledger_url: str, storage_url: str = "", bucket_url: str = ""
) -> subprocess.Popen:
    """One worker: its own folders; the ledger URL from the environment, as a deployment sets it.
    Given ``storage_url``, its Dagster instance keeps runs and events in that database; given
    ``bucket_url``, the dataset goes there (VIDU_STORAGE_ROOT) instead of its data folder."""
    shutil.copytree(SAMPLE, work / "catalog")
    (work / "tmp").mkdir()
    if storage_url:
        (work / "dagster_home").mkdir()
        (work / "dagster_home" / "dagster.yaml").write_text(dagster_yaml(storage_url))
    env = sim.env(work / "dagster_home")
    env.update({"VIDU_LEDGER_URL": ledger_url, "TMPDIR": str(work / "tmp")})
    if bucket_url:
        env.update({"VIDU_STORAGE_ROOT": bucket_url, **s3_settings()})
    args = ["generate", "--catalog", str(work / "catalog"), "--data-dir", str(work / "data"), "--no-contact-sheet"]
    return subprocess.Popen(
        [sys.executable, "-m", "vidu_pipeline.cli", *args],
        cwd=work,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(url: str, proc: subprocess.Popen, what: str, ready, deadline_s: float = 600.0) -> None:
    """Until ``ready(ledger)`` holds, while the first worker runs."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline and proc.poll() is None:
        ledger = Ledger(url)
        try:
            if ledger.exists() and ready(ledger):
                return
        finally:
            ledger.close()
        time.sleep(0.1)
    raise AssertionError(f"the first worker never got to {what}")


def all_submitted(ledger: Ledger) -> bool:
    counts = ledger.counts_by_state()
    return sum(counts.values()) == 10 and counts[PLANNED] + counts[SUBMITTING] == 0


def downloading(ledger: Ledger) -> bool:
    succeeded = ledger.rows(states=[SUCCEEDED])
    return len(succeeded) >= 3 and not all(r.video_sha256 for r in succeeded)


def join_while_downloading(url: str, first: subprocess.Popen, sim: SimulatorProcess) -> None:
    """Once the first worker has submitted everything, every call (polls, downloads) takes 2 s
    (the simulator's "slow" fault), so it is still downloading when the others start."""
    wait_for(url, first, "submitting everything", all_submitted)
    sim.set_faults(slow=1.0, slow_s=2.0)
    wait_for(url, first, "downloading", downloading)


@pytest.mark.timeout(1500)
@pytest.mark.parametrize("start", ["together", "joining"])
@pytest.mark.parametrize("workers", [2, 4])
def test_workers_sharing_a_postgres_ledger_pay_and_download_each_video_once(workers, start, tmp_path, figure):
    with fresh_database() as url:
        run_workers(tmp_path, workers, start, url, figure=figure)


@pytest.mark.s3
@pytest.mark.timeout(1500)
@pytest.mark.parametrize("workers", [2, 4])
def test_workers_sharing_the_database_and_the_bucket(workers, tmp_path, monkeypatch, figure):
    """The deployment of issue 13: workers with their own folders and temp dirs share only the
    ledger and Dagster's runs and events on PostgreSQL (dagster-postgres; one fresh instance
    database all start on at once, its first-start migration raced) and the dataset in one
    bucket. The dataset is whole: one lineage row per video, lineage_complete passing, no
    object in the bucket without a row, nothing of it on a worker's disk."""
    bucket_url = fresh_bucket(monkeypatch)
    with fresh_database() as url, fresh_database() as storage_url:
        run_workers(tmp_path, workers, "together", url, storage_url, bucket_url, figure=figure)
        check_shared_dataset(tmp_path, workers, url, bucket_url, figure)


def check_shared_dataset(tmp_path: Path, workers: int, ledger_url: str, bucket_url: str, figure) -> None:
    from dagster import DagsterInstance, materialize

    from vidu_pipeline.defs.checks import ALL_CHECKS
    from vidu_pipeline.defs.lineage import lineage
    from vidu_pipeline.defs.resources import PipelineResource
    from vidu_pipeline.storage import StorageRoot

    pipeline = PipelineResource(
        data_dir=str(tmp_path / "worker0" / "data"),
        catalog_dir=str(SAMPLE),
        ledger_url=ledger_url,
        storage_root=bucket_url,
    )
    result = materialize(
        [lineage, *ALL_CHECKS],
        selection=[lineage.key],
        resources={"pipeline": pipeline},
        instance=DagsterInstance.ephemeral(),
    )
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    table = pipeline.lineage().read()
    storage = StorageRoot(bucket_url)
    objects = [storage.url(name) for name in storage.list("videos", ".mp4")]
    figure(
        f"{workers} workers, one bucket: {len(objects)} videos in the bucket, {len(table)} lineage rows, "
        f"lineage_complete {'passed' if checks.get('lineage_complete') else 'FAILED'}"
    )
    assert result.success and checks.get("lineage_complete") is True, checks
    assert len(table) == 10 and set(table["state"]) == {"succeeded"}
    assert sorted(objects) == sorted(table["video_path"])  # no object without a row, no row without an object
    for n in range(workers):  # the dataset is in the bucket (a local export is a copy, by design)
        data = tmp_path / f"worker{n}" / "data"
        assert not list((data / "videos").glob("*.mp4")) if (data / "videos").exists() else True
        assert not (data / "lineage").exists()


def run_workers(
    tmp_path: Path, workers: int, start: str, url: str, storage_url: str = "", bucket_url: str = "", *, figure
) -> None:
    """``workers`` generates on the sample catalog sharing the ledger at ``url``; the figures
    printed, and every video paid for once and downloaded once."""
    with SimulatorProcess(tmp_path / "sim", latency=0.5) as sim:
        folders = [tmp_path / f"worker{n}" for n in range(workers)]
        for folder in folders:
            folder.mkdir()
        procs = [start_worker(folders[0], sim, url, storage_url, bucket_url)]
        if start == "joining":
            join_while_downloading(url, procs[0], sim)
        procs += [start_worker(folder, sim, url, storage_url, bucket_url) for folder in folders[1:]]
        outcomes = [proc.communicate(timeout=1200) for proc in procs]
        for folder, proc, (out, err) in zip(folders, procs, outcomes):
            assert proc.returncode == 0, f"{folder.name} exited {proc.returncode}:\n{out[-2000:]}\n{err[-4000:]}"
        stats = sim.stats()
    ledger = Ledger(url)
    try:
        rows = ledger.rows()
    finally:
        ledger.close()
    if bucket_url:  # one shared folder: the simulator's download count says who fetched twice
        files = Counter(Path(r.video_path).stem for r in rows if r.video_path)
        per_worker: object = "all in one bucket"
    else:
        files = Counter(p.stem for folder in folders for p in (folder / "data" / "videos").glob("*.mp4"))
        per_worker = [len(list((folder / "data" / "videos").glob("*.mp4"))) for folder in folders]
    submits = stats["submits"]["accepted"]
    duplicate_submits = sum(n - 1 for n in stats["submits"]["accepted_by_fingerprint"].values())
    downloads = stats["downloads"]["ok"]
    succeeded = [r for r in rows if r.state == SUCCEEDED and r.video_sha256]
    figure(
        f"\n{workers} workers ({start}, Dagster storage: {'postgres' if storage_url else 'sqlite per worker'}, "
        f"dataset: {'one bucket' if bucket_url else 'each worker its folder'}): "
        f"{len(rows)} requests, {submits} submits ({duplicate_submits} duplicate), "
        f"{downloads} downloads ({downloads - len(files)} duplicate; videos per worker {per_worker}), "
        f"{len(succeeded)} ledger rows succeeded with a video"
    )
    assert len(rows) == 10  # the sample catalog: 5 prompts x 2 seeds
    assert duplicate_submits == 0 and submits == len(rows)
    assert len(succeeded) == len(rows)
    # Each task's video downloaded by exactly one worker: one file per request across all
    # workers' folders, and no more downloads served than videos.
    assert set(files) == {r.request_id for r in rows} and max(files.values()) == 1
    assert downloads == len(rows)
    if storage_url:
        assert run_owners(folders[0] / "dagster_home") == workers  # one instance held every worker's runs


def run_owners(dagster_home: Path) -> int:
    """How many processes made the runs this instance's storage holds."""
    from dagster import DagsterInstance
    from dagster._core.instance.ref import InstanceRef

    from vidu_pipeline.cli.instance import OWNER_TAG

    with DagsterInstance.from_ref(InstanceRef.from_dir(str(dagster_home))) as instance:
        return len({run.tags.get(OWNER_TAG) for run in instance.get_runs()})
