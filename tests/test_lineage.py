"""The lineage table: latest-wins reads, atomic appends, safe compaction, a stable schema."""

from __future__ import annotations

import datetime as dt
import fcntl
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vidu_pipeline import lineage
from vidu_pipeline.lineage import SCHEMA, LineageBusy, LineageStore

T0 = 1_700_000_000.0
REPO = Path(lineage.__file__).resolve().parents[1]


def row(i: int, state: str = "succeeded", recorded_at: float | None = None, **kw) -> dict:
    base = {
        "request_id": f"req-{i:05d}",
        "subject_id": f"subj-{i % 3}",
        "prompt": "a cat on a skateboard",
        "aspect_ratio": "9:16",
        "movement_amplitude": "auto",
        "bgm": False,
        "duration": 5,
        "resolution": "1080p",
        "seed_requested": i,
        "seed_effective": i,
        "reference_sha256s": ["a" * 64, "b" * 64],
        "reference_original_sha256s": ["c" * 64, "d" * 64],
        "task_id": f"task-{i}",
        "attempts": 1,
        "state": state,
        "submitted_at": T0,
        "finished_at": T0 + 42.5,
        "video_path": f"videos/req-{i:05d}.mp4",
        "video_sha256": "e" * 64,
        "video_bytes": 123_456,
        "width": 1080,
        "height": 1920,
        "fps": 24.0,
        "frames": 120,
        "duration_s": 5.0,
        "has_audio": False,
        "dagster_run_id": "run-1",
        "pipeline_version": "0.1.0",
    }
    if recorded_at is not None:
        base["recorded_at"] = recorded_at
    return {**base, **kw}


@pytest.fixture
def store(tmp_path):
    return LineageStore(tmp_path / "lineage")


def test_append_and_read_round_trip(store):
    path = store.append([row(1), row(2, state="failed", reason="moderation", video_path=None)])
    assert path.parent == store.root and path.name.startswith("part-") and path.suffix == ".parquet"
    df = store.read()
    assert list(df.columns) == SCHEMA.names
    assert list(df.request_id) == ["req-00001", "req-00002"]
    r1 = df.iloc[0]
    assert list(r1.reference_sha256s) == ["a" * 64, "b" * 64]
    assert r1.submitted_at == pd.Timestamp(T0, unit="s", tz="UTC")
    assert r1.latency_s == 42.5  # derived from the timestamps
    assert df.iloc[1].reason == "moderation" and pd.isna(df.iloc[1].video_path)
    assert str(df.recorded_at.dtype).startswith("datetime64[us, UTC]")


def test_latest_row_per_request_wins(store):
    store.append([row(1, state="unknown", recorded_at=T0 + 10), row(2, recorded_at=T0 + 10)])
    store.append([row(1, state="succeeded", recorded_at=T0 + 20)])
    store.append([row(2, state="failed", recorded_at=T0 + 5)])  # older record written later
    df = store.read().set_index("request_id")
    assert df.loc["req-00001", "state"] == "succeeded"
    assert df.loc["req-00002", "state"] == "succeeded"
    assert len(store.read_all()) == 4


def test_each_append_is_a_new_file(store):
    paths = {store.append([row(i)]) for i in range(5)}
    assert len(paths) == 5 and set(store.parts()) == paths


def test_rejects_rows_outside_the_schema(store):
    with pytest.raises(ValueError, match="not in the lineage schema: colour"):
        store.append([row(1, colour="red")])
    with pytest.raises(ValueError, match="state"):
        store.append([row(1, state="submitted")])
    with pytest.raises(ValueError, match="request_id"):
        store.append([row(1, request_id="")])
    with pytest.raises(ValueError, match="nothing"):
        store.append([])
    assert store.parts() == []


def test_timestamps_accept_epoch_iso_and_datetimes():
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    expected = dt.datetime.fromtimestamp(T0, dt.UTC)
    for value in (T0, expected.isoformat(), expected, expected.replace(tzinfo=None), pd.Timestamp(expected)):
        assert lineage.normalize_row({"request_id": "r", "submitted_at": value}, now)["submitted_at"] == expected
    assert lineage.normalize_row({"request_id": "r"}, now)["recorded_at"] == now


def test_readable_by_pandas_and_by_glob(store):
    for i in range(3):
        store.append([row(i)])
    store.compact()  # its lock file lives in the state folder, not among the parts
    store.append([row(3)])
    (store.root / ".part-x.parquet.tmp").write_bytes(b"PAR1 half a file")
    df = pd.read_parquet(store.root)
    assert len(df) == 4 and list(df.columns) == SCHEMA.names
    # DuckDB's read_parquet('root/*.parquet') sees exactly the part files.
    assert sorted(store.root.glob("*.parquet")) == store.parts()
    assert store.lock_path.exists() and store.lock_path.parent == store.root.parent / "state"
    assert sorted(p.name for p in store.root.iterdir()) == sorted(
        [".part-x.parquet.tmp", *(p.name for p in store.parts())]
    )


def test_empty_store_reads_as_empty_frame_with_schema(store):
    assert list(store.read().columns) == SCHEMA.names
    assert store.read().empty and store.compact() is None


@pytest.mark.parametrize("where", ["tmp_dir", "root"])  # root: left there by an older version
def test_stray_temp_file_is_ignored_and_cleaned_once_stale(store, where):
    store.append([row(1)])
    stray = getattr(store, where) / ".part-20260101T000000000000Z-dead.parquet.tmp"
    stray.write_bytes(b"PAR1\x00\x00 not a footer")
    assert list(store.read().request_id) == ["req-00001"]
    store.append([row(2)])
    store.compact()
    assert stray.exists()  # young: may belong to a live writer
    os.utime(stray, (T0, T0))
    store.append([row(3)])
    store.compact()
    assert not stray.exists()
    assert len(store.read()) == 3


def test_writer_killed_mid_append_leaves_table_readable(store):
    store.append([row(1)])
    # The child dies (SIGKILL) right after writing its temp file, before fsync and rename.
    script = textwrap.dedent(
        f"""
        import os, signal
        from vidu_pipeline import lineage
        os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)
        lineage.LineageStore({str(store.root)!r}).append([{{"request_id": "doomed"}}] * 1000)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=str(REPO))
    assert proc.returncode == -9
    leftovers = list(store.tmp_dir.glob(".*.tmp"))
    assert len(leftovers) == 1
    assert [p.suffix for p in store.root.iterdir()] == [".parquet"]  # the lineage folder holds parts only
    assert list(store.read().request_id) == ["req-00001"]
    assert len(pd.read_parquet(store.root)) == 1


def test_compaction_keeps_every_row(store):
    for batch in range(5):
        store.append([row(batch * 10 + i, recorded_at=T0 + batch) for i in range(10)])
    store.append([row(0, state="failed", recorded_at=T0 + 99)])
    before_all, before = store.read_all(), store.read()
    merged = store.compact()
    assert store.parts() == [merged]
    assert len(store.read_all()) == len(before_all) == 51
    pd.testing.assert_frame_equal(store.read(), before)
    assert store.read().set_index("request_id").loc["req-00000", "state"] == "failed"


def test_append_during_compaction_is_not_lost(store, monkeypatch):
    for i in range(3):
        store.append([row(i)])
    real_read = lineage._read

    def read_then_append(parts):
        store.append([row(99)])  # lands after compaction listed its inputs
        return real_read(parts)

    monkeypatch.setattr(lineage, "_read", read_then_append)
    store.compact()
    assert len(store.parts()) == 2
    assert sorted(store.read().request_id) == ["req-00000", "req-00001", "req-00002", "req-00099"]


def test_concurrent_appends_and_compactions(store):
    def writer():
        for i in range(40):
            store.append([row(1000 + i)])

    t = threading.Thread(target=writer)
    t.start()
    while t.is_alive():
        store.compact()
    t.join()
    store.compact()
    assert len(store.parts()) == 1
    assert len(store.read_all()) == 40


def test_only_one_compactor(store):
    store.append([row(1)])
    store.append([row(2)])
    with open(store.lock_path, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(LineageBusy):
            store.compact()
    assert store.compact() is not None


def test_many_batches(store):
    for b in range(10):
        store.append([row(b * 100 + i) for i in range(100)])
    assert len(store.read()) == 1000
    store.compact()
    assert len(store.read()) == 1000


def test_schema_is_stable_and_evolves_by_nullable_columns(store):
    path = store.append([row(1)])
    assert pq.read_schema(path).remove_metadata() == SCHEMA.remove_metadata()
    # A part written by an older version that lacked two columns still reads, as nulls.
    old_schema = pa.schema([f for f in SCHEMA if f.name not in ("has_audio", "pipeline_version")])
    pq.write_table(
        pa.Table.from_pylist([lineage.normalize_row(row(2), dt.datetime.now(dt.UTC))], schema=old_schema),
        store.root / "part-00000000T000000000000Z-old.parquet",
    )
    df = store.read().set_index("request_id")
    assert pd.isna(df.loc["req-00002", "has_audio"]) and df.loc["req-00001", "has_audio"] == False  # noqa: E712
    for field in SCHEMA:
        assert field.nullable or field.name in ("request_id", "recorded_at")


def test_video_path_is_stored_relative_to_the_data_dir(tmp_path):
    store = LineageStore(tmp_path / "data" / "lineage")
    data = tmp_path / "data"
    store.append([row(1, video_path=str(data / "videos" / "a.mp4")), row(2, video_path="/elsewhere/b.mp4")])
    raw = pq.read_table(store.parts()[0]).to_pydict()["video_path"]
    assert raw == ["videos/a.mp4", "/elsewhere/b.mp4"]  # outside the data dir: kept as given
    assert list(store.read().video_path) == [str(data / "videos" / "a.mp4"), "/elsewhere/b.mp4"]
    # Moved data dir: the rows follow it.
    moved = tmp_path / "moved"
    os.rename(data, moved)
    assert LineageStore(moved / "lineage").read().video_path[0] == str(moved / "videos" / "a.mp4")


def test_quality_columns_round_trip(store):
    figures = {"motion": 0.03, "still_share": 0.0, "frozen": False, "blank_share": 0.0, "blank": False}
    store.append([row(1, phash=["00ff00ff00ff00ff", "ffffffffffffffff"], reference_similarity=0.9, **figures)])
    got = store.read().iloc[0]
    assert list(got.phash) == ["00ff00ff00ff00ff", "ffffffffffffffff"]
    assert (got.motion, got.reference_similarity, bool(got.frozen)) == (0.03, 0.9, False)


def test_rows_written_before_quality_columns_still_read(store):
    """A part written with the old schema (absolute path, no quality columns) reads with nulls."""
    old_schema = pa.schema([f for f in SCHEMA if f.name not in collect_quality_columns()])
    old = {**row(1, video_path="/old/data/videos/req-00001.mp4"), "recorded_at": dt.datetime.fromtimestamp(T0, dt.UTC)}
    for name in ("submitted_at", "finished_at"):
        old[name] = dt.datetime.fromtimestamp(old[name], dt.UTC)
    old["latency_s"], old["reason"] = 42.5, None
    pq.write_table(
        pa.Table.from_pylist([old], schema=old_schema), store.root / "part-20200101T000000000000Z-old.parquet"
    )
    store.append([row(2, motion=0.02, phash=["0" * 16])])
    table = store.read()
    assert list(table.request_id) == ["req-00001", "req-00002"]
    assert table.video_path[0] == "/old/data/videos/req-00001.mp4"
    assert pd.isna(table.motion[0]) and table.phash[0] is None and table.motion[1] == 0.02
    from vidu_pipeline import export, quality

    assert quality.quality_flags(export.sample_record(table.iloc[0], quality.Thresholds())) == []


def test_lineage_folder_loads_with_datasets(store, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    datasets = pytest.importorskip("datasets")
    for i in range(3):
        store.append([row(i)])
    store.compact()
    store.append([row(3)])
    loaded = datasets.load_dataset("parquet", data_dir=str(store.root), split="train", cache_dir=str(tmp_path / "hf"))
    assert sorted(loaded["request_id"]) == ["req-00000", "req-00001", "req-00002", "req-00003"]


def collect_quality_columns() -> tuple[str, ...]:
    from vidu_pipeline.videos import QUALITY_COLUMNS

    return QUALITY_COLUMNS
