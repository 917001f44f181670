"""The exported dataset as trainers load it: `datasets` (the lineage Parquet folder and the
videofolder), `webdataset` (every sample's mp4 + json), and byte-identical re-exports."""

import hashlib
import json
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
from dagster import AssetKey, instance_for_test
from dataset_harness import gates, sweep
from PIL import Image

from vidu_pipeline import export, sheets
from vidu_pipeline.cli.progress import write_contact_sheet

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A clean 8-clip sweep through Dagster; its export written by the dataset_export asset."""
    tmp = tmp_path_factory.mktemp("sweep")
    mp = pytest.MonkeyPatch()
    mp.setenv("VIDU_SIMULATOR_RENDER_SCALE", "0.1")
    with instance_for_test() as instance:
        pipeline, result, _ = sweep(tmp, instance)
        records = instance.fetch_materializations(AssetKey("videos"), limit=100).records
        videos_metadata = {
            r.partition_key: {k: v.value for k, v in r.asset_materialization.metadata.items()} for r in records
        }
    mp.undo()
    return pipeline, result, videos_metadata


@pytest.fixture
def hf(tmp_path, monkeypatch):
    """`datasets`, offline, with its cache in the test's folder."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    datasets = pytest.importorskip("datasets")
    return datasets, str(tmp_path / "hf-cache")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_clean_sweep_passes_every_gate(made):
    _, result, _ = made
    found = gates(result)
    assert len(found) == 5 and all(g.passed for g in found.values()), {n: g.failing for n, g in found.items()}


def test_videos_partitions_carry_the_quality_figures(made):
    pipeline, _, videos_metadata = made
    table = pipeline.lineage().read().set_index("request_id")
    assert set(videos_metadata) == set(table.index)
    for request_id, metadata in videos_metadata.items():
        figures = metadata["quality"]
        assert figures["motion"] == metadata["quality/motion"] == table.loc[request_id, "motion"] > 0
        assert list(figures["phash"]) == list(table.loc[request_id, "phash"])
        assert figures["reference_similarity"] == table.loc[request_id, "reference_similarity"] > 0.5


def test_lineage_folder_loads_with_datasets_parquet(made, hf):
    datasets, cache = hf
    pipeline, _, _ = made
    lineage = pipeline.root / "lineage"
    assert all(p.suffix == ".parquet" for p in lineage.iterdir())  # no lock or temp file among the parts
    table = datasets.load_dataset("parquet", data_dir=str(lineage), split="train", cache_dir=cache)
    assert len(table) == 8
    for row in table:
        assert not Path(row["video_path"]).is_absolute()
        assert (pipeline.root / row["video_path"]).is_file()
        assert row["motion"] > 0 and len(row["phash"]) > 1 and row["reference_similarity"] > 0.5
        assert row["frozen"] is False and row["blank"] is False


def test_videofolder_loads_with_its_metadata(made, hf):
    datasets, cache = hf
    pipeline, _, _ = made
    folder = pipeline.root / "export" / "videofolder"
    lines = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    assert [line["file_name"] for line in lines] == sorted(f"{line['request_id']}.mp4" for line in lines)
    loaded = datasets.load_dataset("videofolder", data_dir=str(folder), split="train", cache_dir=cache)
    # Decoding video needs torchcodec (not installed here): read the column as paths.
    loaded = loaded.cast_column("video", datasets.Video(decode=False))
    assert len(loaded) == 8
    wanted = {"prompt", "subject_id", "movement_amplitude", "seed_requested", "seed_effective", "task_id"}
    wanted |= {"reference_sha256s", "width", "frames", "motion", "still_share", "phash", "quality_flags"}
    assert wanted <= set(loaded.column_names)
    ledger = {r.request_id: r for r in pipeline.ledger().rows()}
    for row in loaded:
        assert Path(row["video"]["path"]).name == f"{row['request_id']}.mp4"
        assert sha256(Path(row["video"]["path"]).read_bytes()) == ledger[row["request_id"]].video_sha256
        assert row["task_id"] == ledger[row["request_id"]].task_id and row["quality_flags"] == []


def test_webdataset_shards_hold_every_sample(made, tmp_path):
    wds = pytest.importorskip("webdataset")
    pipeline, _, _ = made
    out = tmp_path / "out"
    cli = [sys.executable, "-m", "vidu_pipeline.cli", "export", "--data-dir", str(pipeline.root)]
    done = subprocess.run([*cli, "--out", str(out), "--shard-size", "3"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "exported 8 clip(s)" in done.stdout
    shards = sorted(str(p) for p in (out / "webdataset").glob("shard-*.tar"))
    assert len(shards) == 3  # 3 + 3 + 2
    samples = list(wds.WebDataset(shards, shardshuffle=False))
    assert sorted(s["__key__"] for s in samples) == sorted(r.request_id for r in pipeline.ledger().rows())
    for sample in samples:
        meta = json.loads(sample["json"])
        assert meta["request_id"] == sample["__key__"] and sha256(sample["mp4"]) == meta["video_sha256"]


def test_reexport_is_byte_identical_and_incremental(made, tmp_path):
    pipeline, _, _ = made
    store, catalog = pipeline.lineage(), pipeline.catalog_path
    first = export.export(store, tmp_path / "a", shard_size=3, catalog_dir=catalog)
    second = export.export(store, tmp_path / "b", shard_size=3, catalog_dir=catalog)
    assert files(tmp_path / "a") == files(tmp_path / "b")
    assert first.shards_written == 3 and first.videos_written == 8
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "a").rglob("*") if p.is_file()}
    again = export.export(store, tmp_path / "a", shard_size=3, catalog_dir=catalog)
    assert (again.shards_written, again.videos_written) == (0, 0)
    assert {p: p.stat().st_mtime_ns for p in before} == before  # nothing rewritten
    assert second.samples == again.samples == 8
    # The Dagster asset wrote the same shards (default shard size) in the data dir.
    assert (pipeline.root / "export" / "webdataset" / "shard-000000.tar").is_file()


def test_dataset_card_counts_quality_and_licences(made):
    pipeline, _, _ = made
    card = (pipeline.root / "export" / "README.md").read_text()
    assert "- clips: 8\n- subjects: 2" in card
    assert "| small | 4 |" in card and "| large | 4 |" in card  # movement_amplitude distribution
    assert "- clips with a quality flag: 0" in card
    assert "| images/cat/face.png |" in card and "CC0" in card
    assert "images/rocket" not in card  # only the dataset's subjects' images


def test_export_without_lineage_is_a_clear_error(tmp_path):
    cli = [sys.executable, "-m", "vidu_pipeline.cli", "export", "--data-dir", str(tmp_path / "empty")]
    done = subprocess.run(cli, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert (
        done.stderr.strip()
        == f"error: {tmp_path / 'empty' / 'lineage'}: no lineage table; run `vidu-pipeline generate` first"
    )


def test_contact_sheet_pages_every_current_video(made, monkeypatch):
    pipeline, _, _ = made
    stale = pipeline.root / "contact_sheet-9.png"
    stale.write_bytes(b"from a bigger dataset")
    monkeypatch.setattr(sheets, "TILES_PER_PAGE", 3)
    first = write_contact_sheet(pipeline)  # the dataset's videos, not the rows of one run
    pages = sorted(pipeline.root.glob("contact_sheet*.png"))
    assert first == pipeline.root / "contact_sheet.png"
    assert [p.name for p in pages] == ["contact_sheet-2.png", "contact_sheet-3.png", "contact_sheet.png"]
    with Image.open(first) as page1, Image.open(pipeline.root / "contact_sheet-3.png") as page3:
        assert page1.size == (2 * 320, 2 * (320 + 24))  # 3 tiles: 2 columns, 2 rows
        assert page3.size == (2 * 320, 1 * (320 + 24))  # the last 2 of 8
    assert not stale.exists()


def test_tile_label_names_the_request_and_its_flags():
    probe = {"quality": {"still_share": 1.0, "blank_share": 0.0, "reference_similarity": 0.2}, "problems": ["size"]}
    row = types.SimpleNamespace(request_id="cat-s1-abc", probe_json=json.dumps(probe))
    assert sheets.tile_label(row, export.Thresholds()) == "cat-s1-abc [frozen, unlike references, mismatch]"
    clean = types.SimpleNamespace(request_id="cat-s2-def", probe_json=json.dumps({"quality": {"still_share": 0.0}}))
    assert sheets.tile_label(clean, export.Thresholds()) == "cat-s2-def"


def test_export_skips_a_missing_video_and_leaves_reproductions_out(tmp_path):
    store = export.LineageStore(tmp_path / "data" / "lineage")
    videos = tmp_path / "data" / "videos"
    videos.mkdir()
    (videos / "kept.mp4").write_bytes(b"not really a video")
    rows = [
        {"request_id": "kept", "video_path": str(videos / "kept.mp4")},
        {"request_id": "gone", "video_path": str(videos / "gone.mp4")},
        {"request_id": "kept-r1", "video_path": str(tmp_path / "data" / "reproductions" / "kept-r1.mp4")},
        {"request_id": "failed", "state": "failed"},
    ]
    store.append([{"state": "succeeded", "video_sha256": sha256(b"not really a video"), **r} for r in rows])
    summary = export.export(store, tmp_path / "out", shard_size=2)
    assert (summary.samples, summary.missing) == (1, ("gone",))
    assert sorted(files(tmp_path / "out" / "videofolder")) == ["kept.mp4", "metadata.jsonl"]


def test_two_exporters_of_one_folder_do_not_trip_over_each_other(made, tmp_path):
    """Two generates (or one beside the daemon) export the same data folder at once: each
    writer's temp files are its own, and the result is the same export."""
    import concurrent.futures as cf

    pipeline, _, _ = made
    store, catalog = pipeline.lineage(), pipeline.catalog_path
    out = tmp_path / "shared"

    def export_fresh(i: int):
        # Start from nothing each round so both writers really write the same files together.
        return export.export(store, out, shard_size=3, catalog_dir=catalog)

    for _ in range(3):
        shutil.rmtree(out, ignore_errors=True)
        with cf.ThreadPoolExecutor(max_workers=2) as pool:
            results = list(pool.map(export_fresh, range(2)))
        assert all(r.samples == 8 for r in results)
    export.export(store, tmp_path / "alone", shard_size=3, catalog_dir=catalog)
    assert files(out) == files(tmp_path / "alone")
    assert not list(out.rglob("*.tmp"))
