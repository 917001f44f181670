"""The dataset on an S3-compatible server (moto's standalone server, started by .ci/run): a real
``generate`` in a subprocess puts every video, thumbnail and lineage part in the bucket, with
paths relative to the storage root. Without ``VIDU_TEST_S3_ENDPOINT`` these tests skip, except in
CI (``CI`` = 1/true), where a missing server is a failure."""

import hashlib
import os
import shutil
from pathlib import Path

import pyarrow.dataset as ds
import pytest
from dagster import DagsterInstance, materialize
from s3_bucket import fresh_bucket, s3_settings
from support import run_cli

from vidu_pipeline import export
from vidu_pipeline.api import runtime
from vidu_pipeline.defs.checks import ALL_CHECKS
from vidu_pipeline.defs.lineage import lineage
from vidu_pipeline.defs.resources import PipelineResource
from vidu_pipeline.defs.videos import _video_problem
from vidu_pipeline.lineage import SCHEMA, ObjectLineageStore
from vidu_pipeline.storage import StorageRoot

pytestmark = pytest.mark.s3

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "catalog"


@pytest.fixture
def bucket_url(monkeypatch) -> str:
    return fresh_bucket(monkeypatch)


@pytest.mark.slow
def test_generate_puts_the_dataset_in_the_bucket(tmp_path, bucket_url, figure):
    shutil.copytree(SAMPLE, tmp_path / "catalog")
    env = {k: v for k, v in os.environ.items() if not k.startswith("VIDU_")}
    env.update(
        DAGSTER_HOME=str(tmp_path / "dagster_home"),
        VIDU_SIMULATOR_RENDER_SCALE="0.1",
        VIDU_SIMULATOR_IDLE_EXIT="60",  # the embedded simulator, stopped below, never outlives the run long
        VIDU_STORAGE_ROOT=bucket_url,
        TMPDIR=str(tmp_path / "tmp"),
        **s3_settings(),
    )
    (tmp_path / "tmp").mkdir()
    data = tmp_path / "data"
    args = ["generate", "--catalog", str(tmp_path / "catalog"), "--data-dir", str(data), "--no-contact-sheet"]
    try:
        done = run_cli(*args, cwd=tmp_path, env=env, timeout=600)
    finally:
        runtime.stop_local_simulator(data / "state" / "simulator")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "requests: 10  succeeded: 10" in done.stdout

    storage = StorageRoot(bucket_url)
    videos = storage.list("videos", ".mp4")
    thumbnails = storage.list("thumbnails", ".png")
    parts = storage.list("lineage", ".parquet")
    figure(f"bucket {bucket_url}: {len(videos)} videos, {len(thumbnails)} thumbnails, {len(parts)} lineage parts")
    assert len(videos) == 10 and len(thumbnails) == 10 and parts
    assert not list((data / "videos").glob("*.mp4")) if (data / "videos").exists() else True
    assert not (data / "lineage").exists()  # nothing of the dataset on the local disk
    assert not list((tmp_path / "tmp").glob("vidu-pipeline-scratch-*"))  # the local scratch copies are gone

    # The lineage read straight from the bucket with pyarrow: relative paths that resolve
    # under the root to the very bytes recorded; no file without a row.
    paths = [storage.fs_path(p) for p in parts]
    table = ds.dataset(paths, schema=SCHEMA, format="parquet", filesystem=storage.fs).to_table().to_pylist()
    latest = {r["request_id"]: r for r in sorted(table, key=lambda r: r["recorded_at"])}
    assert len(latest) == 10 and {r["state"] for r in latest.values()} == {"succeeded"}
    for row in latest.values():
        assert row["video_path"] == f"videos/{row['request_id']}.mp4"
        assert hashlib.sha256(storage.read_bytes(row["video_path"])).hexdigest() == row["video_sha256"]
    assert sorted(videos) == sorted(r["video_path"] for r in latest.values())

    # The lineage asset and its checks on the same root (compaction without a lock, on S3).
    pipeline = PipelineResource(data_dir=str(data), catalog_dir=str(tmp_path / "catalog"), storage_root=bucket_url)
    result = materialize(
        [lineage, *ALL_CHECKS],
        selection=[lineage.key],
        resources={"pipeline": pipeline},
        instance=DagsterInstance.ephemeral(),
    )
    assert result.success
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks.get("lineage_complete") is True, checks
    assert len(storage.list("lineage", ".parquet")) == 1  # compacted
    assert len(pipeline.lineage().read()) == 10
    # videos_verified's rule finds each recorded video under the root (not on the local disk).
    rows = pipeline.ledger().rows()
    assert len(rows) == 10 and [(r.request_id, _video_problem(r, pipeline)) for r in rows] == [
        (r.request_id, None) for r in rows
    ]

    # The export of the bucket's dataset: every clip, byte for byte.
    summary = export.export(pipeline.lineage(), tmp_path / "export")
    assert (summary.samples, summary.missing) == (10, ())
    for path in sorted((tmp_path / "export" / "videofolder").glob("*.mp4")):
        assert path.read_bytes() == storage.read_bytes(f"videos/{path.name}")

    # The command line takes the root as a flag too (here without VIDU_STORAGE_ROOT).
    env.pop("VIDU_STORAGE_ROOT")
    out = tmp_path / "export-cli"
    exported = run_cli(
        "export", "--data-dir", str(data), "--out", str(out), "--storage-root", bucket_url,
        cwd=tmp_path, env=env, timeout=300,
    )  # fmt: skip
    assert exported.returncode == 0, exported.stderr[-2000:]
    assert len(list((out / "videofolder").glob("*.mp4"))) == 10


def test_lineage_compaction_on_s3_loses_no_row(bucket_url):
    """Two compactions and appends racing on one bucket: every row is still read, once."""
    store = ObjectLineageStore(StorageRoot(bucket_url))
    for i in range(4):
        store.append([{"request_id": f"r{i}", "state": "succeeded", "video_path": f"{bucket_url}/videos/r{i}.mp4"}])
    other = ObjectLineageStore(StorageRoot(bucket_url))
    listed = other.parts()
    store.compact()  # deletes the parts the other compaction listed too
    store.append([{"request_id": "r4", "state": "failed"}])
    other.compact()  # lists again: the merged part and the new one
    table = store.read()
    assert sorted(table["request_id"]) == ["r0", "r1", "r2", "r3", "r4"]
    assert set(table["video_path"].dropna()) == {f"{bucket_url}/videos/r{i}.mp4" for i in range(4)}
    assert len(listed) == 4 and len(store.parts()) == 1


def test_values_between_assets_go_to_the_bucket(tmp_path, bucket_url):
    """The IO manager on an s3:// root: one run's output is read back by another instance."""
    from dagster import asset

    from vidu_pipeline.defs.storage_io import IO_FOLDER, storage_io_managers

    @asset
    def upstream() -> list[str]:
        return ["cat", "dog", "owl"]

    @asset
    def downstream(upstream: list[str]) -> int:
        return len(upstream)

    resources = storage_io_managers(PipelineResource(data_dir=str(tmp_path / "data"), storage_root=bucket_url))
    assert materialize([upstream], resources=resources, instance=DagsterInstance.ephemeral()).success
    assert StorageRoot(bucket_url).list(IO_FOLDER) == [f"{IO_FOLDER}/upstream"]
    again = materialize(
        [upstream, downstream], selection=[downstream.key], resources=resources, instance=DagsterInstance.ephemeral()
    )
    assert again.success and again.output_for_node("downstream") == 3


def test_appends_and_compactions_at_once_lose_no_row(bucket_url, figure):
    """Workers append while two others compact and one reads, with no lock: every row is read."""
    import concurrent.futures as cf
    import threading

    writing, merges, reads = threading.Event(), [], []

    def writer(w: int) -> list[str]:
        """Appends until compactions and a read have run meanwhile (at most 100 rows)."""
        store, written = ObjectLineageStore(StorageRoot(bucket_url)), []
        for i in range(100):
            store.append([{"request_id": f"w{w}-{i}", "state": "succeeded"}])
            written.append(f"w{w}-{i}")
            if len(merges) >= 2 and reads:
                break
        return written

    def compactor() -> None:
        store = ObjectLineageStore(StorageRoot(bucket_url))
        while writing.is_set():
            if store.compact() is not None:
                merges.append(writing.is_set())

    def reader() -> None:
        store = ObjectLineageStore(StorageRoot(bucket_url))
        while writing.is_set():
            store.read()  # parts may vanish under it
            reads.append(writing.is_set())

    writing.set()
    with cf.ThreadPoolExecutor(max_workers=7) as pool:
        others = [pool.submit(compactor), pool.submit(compactor), pool.submit(reader)]
        written = [row for done in [pool.submit(writer, w) for w in range(4)] for row in done.result()]
        writing.clear()
        for other in others:
            other.result()
    table = ObjectLineageStore(StorageRoot(bucket_url)).read()
    figure(
        f"4 writers, 2 compactors, 1 reader at once: {len(written)} rows appended, "
        f"{merges.count(True)} compactions and {reads.count(True)} reads while appending, {len(table)} rows read"
    )
    assert merges.count(True) >= 1 and reads.count(True) >= 1  # they really overlapped
    assert sorted(table["request_id"]) == sorted(written)
