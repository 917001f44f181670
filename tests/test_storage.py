"""The storage root: a local folder or an fsspec URL, addressed by relative paths, written atomically."""

import datetime as dt
import hashlib
import os
import sys
import uuid

import fsspec.registry  # noqa: F401  (loaded before it is patched)
import pytest

from vidu_pipeline.api.errors import ConfigurationError
from vidu_pipeline.lineage import ObjectLineageStore, open_lineage
from vidu_pipeline.storage import StorageRoot


@pytest.fixture(params=["local", "memory"])
def root(request, tmp_path) -> StorageRoot:
    if request.param == "local":
        return StorageRoot(tmp_path / "store")
    return StorageRoot(f"memory://test-{uuid.uuid4().hex}/dataset")


def test_write_read_list_delete_by_relative_path(root, tmp_path):
    local = tmp_path / "finished.mp4"
    local.write_bytes(b"video bytes")
    url = root.put_file(local, "videos/a.mp4")
    root.write_bytes("videos/b.mp4", b"other")
    root.write_bytes("thumbnails/a.png", b"png")
    assert local.exists()  # copied, not consumed
    assert root.read_bytes("videos/a.mp4") == b"video bytes"
    assert root.list("videos") == ["videos/a.mp4", "videos/b.mp4"]
    assert root.list("videos", ".png") == []
    assert root.list("absent") == []
    assert root.relative(url) == "videos/a.mp4"
    assert root.exists("videos/a.mp4") and not root.exists("videos/c.mp4")
    assert root.holds(url) and not root.holds(root.url("videos/c.mp4"))
    assert root.holds(local) and not root.holds(tmp_path / "absent.mp4")  # outside the root: the local disk
    root.delete("videos/a.mp4")
    root.delete("videos/a.mp4")  # already gone: not an error
    assert root.list("videos") == ["videos/b.mp4"]


def test_put_file_move_consumes_the_local_file(root, tmp_path):
    local = tmp_path / "staging.download"
    local.write_bytes(b"x" * 1000)
    root.put_file(local, "videos/a.mp4", move=True)
    assert not local.exists()
    assert root.read_bytes("videos/a.mp4") == b"x" * 1000


def test_names_are_relative_to_the_root(root):
    assert root.relative(root.url("videos/a.mp4")) == "videos/a.mp4"
    assert root.relative("/elsewhere/videos/a.mp4") is None
    assert root.relative("memory://another-bucket/videos/a.mp4") is None
    for bad in ("", "/abs/a.mp4", "../a.mp4", "videos/../../a.mp4"):
        with pytest.raises(ValueError, match="relative path"):
            root.url(bad)


def test_local_root_accepts_a_file_url_and_writes_atomically(tmp_path):
    root = StorageRoot(f"file://{tmp_path}/store")
    assert root.is_local and root.location == str(tmp_path / "store")
    root.write_bytes("videos/a.mp4", b"1")
    root.write_bytes("videos/a.mp4", b"2")  # replaced whole
    assert (tmp_path / "store" / "videos" / "a.mp4").read_bytes() == b"2"
    assert os.listdir(tmp_path / "store" / "videos") == ["a.mp4"]  # no temp file left
    assert root.relative(str(tmp_path / "store" / "videos" / "a.mp4")) == "videos/a.mp4"
    assert root.relative("s3://bucket/videos/a.mp4") is None


def test_unknown_protocol_is_one_clear_line():
    with pytest.raises(ConfigurationError) as caught:
        StorageRoot("nosuchproto://bucket/x")
    assert "unknown protocol 'nosuchproto'" in str(caught.value) and "\n" not in str(caught.value)


def test_missing_s3fs_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "s3fs", None)  # import s3fs now fails
    monkeypatch.delitem(sys.modules["fsspec.registry"]._registry, "s3", raising=False)
    with pytest.raises(ConfigurationError) as caught:
        StorageRoot("s3://bucket/prefix")
    assert "pip install 'vidu-pipeline[s3]'" in str(caught.value) and "\n" not in str(caught.value)


def test_lineage_on_an_object_store_is_put_only_and_relative():
    storage = StorageRoot(f"memory://test-{uuid.uuid4().hex}/dataset")
    store = open_lineage(storage)
    assert isinstance(store, ObjectLineageStore)
    store.append([{"request_id": "a", "state": "unknown"}])
    store.append([{"request_id": "a", "state": "succeeded", "video_path": storage.url("videos/a.mp4")}])
    store.append([{"request_id": "b", "state": "failed", "video_path": "/elsewhere/b.mp4"}])
    assert len(store.parts()) == 3 and all(p.startswith("lineage/part-") for p in store.parts())
    merged = store.compact()
    assert store.parts() == [storage.relative(merged)]
    raw = storage.fs.cat_file(storage.fs_path(store.parts()[0]))
    assert b"videos/a.mp4" in raw and storage.location.encode() not in raw  # relative, not the URL
    table = store.read().set_index("request_id")
    assert table.loc["a", "state"] == "succeeded" and table.loc["a", "video_path"] == storage.url("videos/a.mp4")
    assert table.loc["b", "video_path"] == "/elsewhere/b.mp4"  # outside the root: kept as given


def test_object_store_compaction_touches_only_the_parts_it_read():
    storage = StorageRoot(f"memory://test-{uuid.uuid4().hex}/dataset")
    store = ObjectLineageStore(storage)
    for i in range(3):
        store.append([{"request_id": f"r{i}"}])
    read_first = store.parts()
    late = store.append([{"request_id": "late"}])  # lands after the listing a compaction made
    merged = store._put(store._read_listed(read_first), dt.datetime.now(dt.UTC))  # a compaction's two steps
    for part in read_first:
        storage.delete(part)
    assert sorted(store.parts()) == sorted([storage.relative(merged), storage.relative(late)])
    assert sorted(store.read()["request_id"]) == ["late", "r0", "r1", "r2"]


def test_export_reads_the_videos_of_an_object_store_root(tmp_path):
    """The dataset on an object store exports to a local folder: the clips are downloaded once
    into the videofolder, the shards hold the same bytes, a missing object is reported."""
    import tarfile

    from vidu_pipeline import export

    storage = StorageRoot(f"memory://test-{uuid.uuid4().hex}/dataset")
    storage.write_bytes("videos/kept.mp4", b"not really a video")
    digest = hashlib.sha256(b"not really a video").hexdigest()
    rows = [
        {"request_id": "kept", "video_path": storage.url("videos/kept.mp4")},
        {"request_id": "gone", "video_path": storage.url("videos/gone.mp4")},
        {"request_id": "kept-r1", "video_path": storage.url("reproductions/kept-r1.mp4")},
    ]
    store = open_lineage(storage)
    store.append([{"state": "succeeded", "video_sha256": digest, **r} for r in rows])
    summary = export.export(store, tmp_path / "out", shard_size=2)
    assert (summary.samples, summary.missing, summary.videos_written) == (1, ("gone",), 1)
    assert (tmp_path / "out" / "videofolder" / "kept.mp4").read_bytes() == b"not really a video"
    with tarfile.open(summary.shards[0]) as tar:
        assert tar.extractfile("kept.mp4").read() == b"not really a video"  # type: ignore[union-attr]
    again = export.export(store, tmp_path / "out", shard_size=2)
    assert (again.videos_written, again.shards_written) == (0, 0)  # unchanged: nothing fetched again


def test_values_between_assets_are_kept_on_an_object_store_root(tmp_path):
    """Another worker (here: another Dagster instance) loads what one run stored on the root."""
    from dagster import AssetKey, DagsterInstance, asset, materialize

    from vidu_pipeline.defs.resources import PipelineResource
    from vidu_pipeline.defs.storage_io import IO_FOLDER, storage_io_managers

    @asset
    def upstream() -> dict:
        return {"subjects": ["cat", "dog"]}

    @asset
    def downstream(upstream: dict) -> int:
        return len(upstream["subjects"])

    url = f"memory://test-{uuid.uuid4().hex}/dataset"
    pipeline = PipelineResource(data_dir=str(tmp_path / "data"), storage_root=url)
    resources = storage_io_managers(pipeline)
    first = materialize([upstream], resources=resources, instance=DagsterInstance.ephemeral())
    assert first.success and StorageRoot(url).list(IO_FOLDER) == [f"{IO_FOLDER}/upstream"]
    second = materialize(
        [upstream, downstream], selection=[downstream.key], resources=resources, instance=DagsterInstance.ephemeral()
    )
    assert second.success and second.output_for_node("downstream") == 2
    assert StorageRoot(url).exists(f"{IO_FOLDER}/{AssetKey('downstream').path[0]}")
    assert storage_io_managers(PipelineResource(data_dir=str(tmp_path / "data"))) == {}  # local: Dagster's default


def test_object_store_compaction_skips_a_part_merged_away_meanwhile(monkeypatch):
    """A part listed, then removed by another compaction before it was read: the rest merge."""
    storage = StorageRoot(f"memory://test-{uuid.uuid4().hex}/dataset")
    store = ObjectLineageStore(storage)
    for i in range(3):
        store.append([{"request_id": f"r{i}"}])
    listed = store.parts()
    gone = "lineage/part-00000000T000000000000Z-merged-away.parquet"
    monkeypatch.setattr(store, "parts", lambda: [gone, *listed])
    merged = store.compact()
    monkeypatch.undo()
    assert merged is not None and store.parts() == [storage.relative(merged)]
    assert sorted(store.read()["request_id"]) == ["r0", "r1", "r2"]


def test_collect_video_puts_the_verified_file_under_an_object_store_root(tmp_path, monkeypatch):
    """The store step on a URL root: verified locally, then one PUT of the video and its
    thumbnail; the ledger names the object; a failed PUT records nothing (downloaded again)."""
    import time

    from support import plan_catalog

    from vidu_pipeline import tasks
    from vidu_pipeline.api.client import ViduClient
    from vidu_pipeline.ledger import SpendCaps
    from vidu_pipeline.simulator import Simulator, SimulatorConfig
    from vidu_pipeline.storage import StorageError
    from vidu_pipeline.videos import collect_video, scratch_file

    monkeypatch.setenv("VIDU_SIMULATOR_RENDER_SCALE", "0.1")
    pipeline, [rid] = plan_catalog(tmp_path)
    ledger, root = pipeline.ledger(), StorageRoot(f"memory://test-{uuid.uuid4().hex}/dataset")
    config = SimulatorConfig(api_key="storage-test-key", latency_s=0.1, render_scale=0.1, state_dir=tmp_path / "sim")
    with Simulator(config) as sim, ViduClient("storage-test-key", sim.base_url) as client:
        [out] = tasks.submit_requests(
            ledger, client, [rid], data_uri_for=pipeline.image_cache().data_uri,
            caps=SpendCaps(None, None, "t"), owner="o:1:t", retry_budget=3,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while not client.get_task_result(out.task_id).terminal and time.monotonic() < deadline:
            time.sleep(0.1)
        assert tasks.poll_due(ledger, client, now=10**10).succeeded == [rid]

        def refused(*args, **kwargs):
            raise PermissionError(13, "Access Denied")

        with monkeypatch.context() as patched:
            patched.setattr(StorageRoot, "put_file", refused)
            with pytest.raises(StorageError, match="downloaded again"):
                collect_video(ledger, client, rid, videos_dir=root.url("videos"), render_scale=0.1)
        row = ledger.get(rid)
        assert row is not None and row.video_sha256 is None and root.list("videos") == []

        video = collect_video(ledger, client, rid, videos_dir=root.url("videos"), render_scale=0.1)
    row = ledger.get(rid)
    assert row is not None and row.video_path == root.url(f"videos/{rid}.mp4")
    assert root.list("videos") == [f"videos/{rid}.mp4"] and root.list("thumbnails") == [f"thumbnails/{rid}.png"]
    assert hashlib.sha256(root.read_bytes(f"videos/{rid}.mp4")).hexdigest() == row.video_sha256
    assert video.path == row.video_path and video.frame is not None  # the UI thumbnail needs no local copy
    assert not list(scratch_file(rid).parent.glob(f"{rid}.*"))  # the verified scratch copy is gone
    assert not (pipeline.root / "videos").exists() or not list((pipeline.root / "videos").iterdir())
