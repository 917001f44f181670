"""The current dataset in the layouts trainers load: a Hugging Face ``videofolder``, WebDataset
tar shards and a dataset card.

The dataset is the lineage table's latest state: one row per request whose task succeeded with
a verified video. ``export`` writes, under the output folder::

    README.md                      dataset card (counts, distributions, quality, licences)
    videofolder/metadata.jsonl     one JSON object per clip, ``file_name`` relative
    videofolder/<request_id>.mp4   the clips (hard links to the data dir's files when possible)
    webdataset/shard-000000.tar    ``<request_id>.mp4`` + ``<request_id>.json`` per sample

Everything is deterministic: rows sorted by request id, JSON with sorted keys, tar members in
a fixed order with mtime 0, uid/gid 0 and no user names — the same dataset gives the same bytes.
Re-export is incremental: a file whose content would not change is not rewritten.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import shutil
import sys
import tarfile
import uuid
from pathlib import Path, PurePosixPath
from typing import Any

import fsspec
import numpy as np
import pandas as pd

from . import card
from .lineage import LineageStore as LineageStore  # re-exported: callers build one for export()
from .lineage import LineageTable, open_lineage
from .quality import Thresholds
from .storage import StorageRoot, is_url, storage_location

DEFAULT_SHARD_SIZE = 100  # samples per tar shard
# Lineage columns that describe the clip; recorded_at/dagster_run_id describe the bookkeeping
# and would make the same dataset export differently after a lineage re-sync.
METADATA_COLUMNS = (
    "request_id",
    "subject_id",
    "prompt",
    "aspect_ratio",
    "movement_amplitude",
    "bgm",
    "duration",
    "resolution",
    "seed_requested",
    "seed_effective",
    "reference_sha256s",
    "reference_original_sha256s",
    "task_id",
    "submitted_at",
    "finished_at",
    "video_sha256",
    "video_bytes",
    "width",
    "height",
    "fps",
    "frames",
    "duration_s",
    "has_audio",
    "reason",
    "pipeline_version",
    "motion",
    "still_share",
    "frozen",
    "blank_share",
    "blank",
    "phash",
    "reference_similarity",
)


class ExportProblem(ValueError):
    """The export cannot start (no lineage table, a catalog with bad thresholds): one line says why."""


@dataclasses.dataclass(frozen=True)
class ExportSummary:
    out_dir: Path
    samples: int
    shards: tuple[Path, ...]
    videos_written: int  # videos copied or linked this time (0 on an unchanged re-export)
    shards_written: int
    missing: tuple[str, ...]  # request ids whose video file is gone from the data dir


def current_dataset(store: LineageTable) -> pd.DataFrame:
    """One row per request with a verified video (latest state), sorted by request id.

    Only videos of ``<data_dir>/videos``: a reproduction (``reproduce``, stored under
    ``reproductions/``) checks a clip, it is not another sample of the dataset.
    """
    table = store.read()
    if not len(table):
        return table
    in_videos = table["video_path"].map(
        lambda p: isinstance(p, str) and _in_videos_folder(store.relative_video_path(p))
    )
    ok = (table["state"] == "succeeded") & table["video_sha256"].notna() & in_videos
    return table[ok].sort_values("request_id").reset_index(drop=True)


def _in_videos_folder(relative: str | None) -> bool:
    """``videos/<file>`` relative to the storage root (not a reproduction, not outside)."""
    return (
        isinstance(relative, str)
        and not os.path.isabs(relative)
        and PurePosixPath(relative).parent.as_posix() == "videos"
    )


def plain(value: Any) -> Any:
    """A pandas/numpy cell as a JSON value: NaN/NaT → None, arrays → lists, times → ISO 8601."""
    if isinstance(value, (list, tuple, np.ndarray)):
        return [plain(v) for v in value]
    if value is None or value is pd.NaT:
        return None
    if isinstance(value, pd.Timestamp):
        return value.isoformat()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def sample_record(row: pd.Series, thresholds: Thresholds) -> dict[str, Any]:
    """The metadata of one clip: what was asked, what came back, its quality and flags."""
    from .quality import quality_flags

    record = {name: plain(row.get(name)) for name in METADATA_COLUMNS}
    record["quality_flags"] = quality_flags(record, thresholds)
    return record


def export(
    store: LineageTable,
    out_dir: str | os.PathLike,
    *,
    shard_size: int = DEFAULT_SHARD_SIZE,
    thresholds: Thresholds | None = None,
    catalog_dir: Path | None = None,
) -> ExportSummary:
    """Write (or bring up to date) the export of the current dataset under ``out_dir``."""
    if shard_size < 1:
        raise ValueError(f"shard size must be at least 1, got {shard_size}")
    limits = thresholds or Thresholds()
    out = Path(out_dir)
    table = current_dataset(store)
    present = table["video_path"].map(_exists).astype(bool) if len(table) else pd.Series(dtype=bool)
    missing = tuple(table.loc[~present, "request_id"]) if len(table) else ()
    table = table[present].reset_index(drop=True) if len(table) else table
    records = [sample_record(row, limits) for _, row in table.iterrows()]
    sources = [str(p) for p in table["video_path"]] if len(table) else []
    videos_written = _write_videofolder(out / "videofolder", records, sources)
    # A video on an object store is read once, into the videofolder; the shards take that copy.
    local = [out / "videofolder" / f"{r['request_id']}.mp4" if is_url(s) else Path(s) for r, s in zip(records, sources)]
    shards, shards_written = _write_shards(out / "webdataset", records, local, shard_size)
    _write_if_changed(out / "README.md", card.dataset_card(records, limits, catalog_dir, shard_size).encode())
    return ExportSummary(out, len(records), tuple(shards), videos_written, shards_written, missing)


# --- videofolder ------------------------------------------------------------------------------


def _write_videofolder(folder: Path, records: list[dict], sources: list[str]) -> int:
    """The clips plus ``metadata.jsonl``; stale clips (no longer in the dataset) are removed."""
    folder.mkdir(parents=True, exist_ok=True)
    written = 0
    wanted = set()
    lines = []
    for record, source in zip(records, sources, strict=True):
        name = f"{record['request_id']}.mp4"
        wanted.add(name)
        if _place_video(source, folder / name, record["video_sha256"]):
            written += 1
        lines.append(json.dumps({"file_name": name, **record}, sort_keys=True, ensure_ascii=False))
    for stale in folder.glob("*.mp4"):
        if stale.name not in wanted:
            stale.unlink(missing_ok=True)  # another exporter may have removed it already
    _write_if_changed(folder / "metadata.jsonl", "".join(line + "\n" for line in lines).encode())
    return written


def _exists(path: str) -> bool:
    """A video file is there: on the local disk, or at its URL (an object-store root)."""
    if not is_url(path):
        return os.path.exists(path)
    fs, inner = fsspec.core.url_to_fs(path)
    return bool(fs.exists(inner))


def _place_video(source: str, dest: Path, sha256: str) -> bool:
    """Hard-link (or copy, or download) ``source`` to ``dest`` unless ``dest`` already holds
    those bytes."""
    if dest.exists() and (_same_file(source, dest) or _sha256(dest) == sha256):
        return False
    tmp = _temp_beside(dest)
    try:
        if is_url(source):
            fs, inner = fsspec.core.url_to_fs(source)
            fs.get_file(inner, str(tmp))
        else:
            try:
                os.link(source, tmp)
            except OSError:  # another file system, or links not allowed
                shutil.copyfile(source, tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, dest)
    # rename(2) does nothing when both names are links to one file (another exporter linked
    # the same source there first): the temp name is then still there.
    tmp.unlink(missing_ok=True)
    return True


def _same_file(a: str | Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --- WebDataset ---------------------------------------------------------------------------------


def _write_shards(folder: Path, records: list[dict], sources: list[Path], shard_size: int) -> tuple[list[Path], int]:
    """``shard-NNNNNN.tar`` of ``shard_size`` samples each; a shard is rewritten only when its
    content changes (its sidecar ``.sha256`` names the content), surplus shards are removed."""
    folder.mkdir(parents=True, exist_ok=True)
    shards, written = [], 0
    for number, start in enumerate(range(0, len(records), shard_size)):
        chunk = list(zip(records[start : start + shard_size], sources[start : start + shard_size], strict=True))
        path = folder / f"shard-{number:06d}.tar"
        if _write_shard(path, chunk):
            written += 1
        shards.append(path)
    for stale in folder.glob("shard-*.tar"):
        if stale not in shards:
            stale.unlink(missing_ok=True)
    return shards, written


def _write_shard(path: Path, samples: list[tuple[dict, Path]]) -> bool:
    """Write one shard unless an identical one is there; True when written."""
    content_id = hashlib.sha256(
        json.dumps([[r, r["video_sha256"]] for r, _ in samples], sort_keys=True).encode()
    ).hexdigest()
    marker = path.with_name(f".{path.name}.content")
    if path.exists() and marker.exists() and marker.read_text() == content_id:
        return False
    tmp = _temp_beside(path)
    with open(tmp, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for record, source in samples:
            key = record["request_id"]
            with open(source, "rb") as video:
                _add_member(tar, f"{key}.mp4", video, os.fstat(video.fileno()).st_size)
            meta = json.dumps(record, sort_keys=True, ensure_ascii=False).encode()
            _add_member(tar, f"{key}.json", io.BytesIO(meta), len(meta))
    os.replace(tmp, path)
    marker.write_text(content_id)
    return True


def _add_member(tar: tarfile.TarFile, name: str, data, size: int) -> None:
    """A tar member whose header depends only on its name and size."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, data)


def _write_if_changed(path: Path, data: bytes) -> bool:
    """Atomically replace ``path`` with ``data`` unless it already holds exactly that."""
    if path.exists() and path.read_bytes() == data:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_beside(path)
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return True


def _temp_beside(path: Path) -> Path:
    """A temp name next to ``path``, unique to this writer: two exporters of one data folder
    (two ``generate``s, or one beside the daemon) must not unlink or replace each other's file."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


# --- command line ---------------------------------------------------------------------------


def command(
    data_dir: str, out: str | None, shard_size: int, catalog: str | None, storage_root: str | None = None
) -> int:
    """``vidu-pipeline export``: export the data dir's current dataset, print what was written.
    ``storage_root``: where the dataset is (default ``VIDU_STORAGE_ROOT``, else the data dir)."""
    root = Path(data_dir).resolve()
    storage = StorageRoot(storage_location(storage_root, root))
    lineage_url = storage.url("lineage")
    if storage.is_local and not Path(lineage_url).is_dir():  # checked before the store makes the folder
        raise ExportProblem(f"{lineage_url}: no lineage table; run `vidu-pipeline generate` first")
    store = open_lineage(storage, root / "state")
    if not storage.is_local and not store.parts():
        raise ExportProblem(f"{lineage_url}: no lineage table; run `vidu-pipeline generate` first")
    catalog_dir = Path(catalog).resolve() if catalog else root / "catalog"
    summary = export(
        store,
        Path(out) if out else root / "export",
        shard_size=shard_size,
        thresholds=thresholds_for(catalog_dir),
        catalog_dir=catalog_dir if catalog_dir.is_dir() else None,
    )
    for request_id in summary.missing:
        print(f"warning: {request_id}: video file missing from {root}; not exported", file=sys.stderr)
    print(
        f"exported {summary.samples} clip(s) to {summary.out_dir}: {len(summary.shards)} shard(s) "
        f"({summary.shards_written} written), {summary.videos_written} video(s) written"
    )
    return 0


def thresholds_for(catalog_dir: Path) -> Thresholds:
    """sweep.yaml's quality thresholds; the defaults when there is no catalog."""
    from .catalog_model import CatalogError
    from .sweep import read_sweep

    if not catalog_dir.is_dir():
        return Thresholds()
    try:  # sweep.yaml alone: the tables and images have nothing to say about thresholds
        return read_sweep(catalog_dir / "sweep.yaml", []).quality
    except CatalogError as exc:
        raise ExportProblem(f"{catalog_dir}: {exc}") from None
