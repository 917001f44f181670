"""The Parquet lineage table: what was asked, what was sent, what came back, for every video.

An append-only log under one folder: each ``append`` writes ONE new immutable file with a
unique name (``part-<utc>-<uuid4>.parquet``), first to a dot-prefixed temp file in the same
folder, fsynced, then ``os.replace``d — so a reader never sees a half-written file, even if the
writer is killed. Several rows for one request (e.g. ``unknown`` then ``succeeded``) are
resolved at read time: the latest ``recorded_at`` wins. ``compact`` merges the parts under a
lock; the schema (:data:`SCHEMA`, documented in ``docs/lineage.md``) evolves only by adding
nullable columns, and every read applies it explicitly.

The folder holds nothing but Parquet parts, so it is readable as is by
``pandas.read_parquet(root)``, DuckDB (``read_parquet('root/*.parquet')``) and Hugging Face
``datasets.load_dataset("parquet", data_dir=root)``: temp files and the compaction lock live in
``<data_dir>/state/`` (the folder beside ``lineage``). ``video_path`` is stored relative to the
data dir (the lineage folder's parent), so the data dir can move; :meth:`LineageStore.read`
gives it back absolute, and rows written before (absolute paths, no quality columns) read as
they were, with nulls for the missing columns.

On an object store (:class:`ObjectLineageStore`, a storage root such as ``s3://bucket/prefix``)
there is no ``flock`` and no rename: a part is written to a local temp file and PUT whole (an
object appears complete or not at all), and compaction needs no lock — it writes one merged
part, then deletes only the parts it read. Two compactions at once leave duplicate rows for a
while, which every read resolves (latest ``recorded_at`` wins, as for any request). The ledger,
not the file system, coordinates the workers.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import os
import tempfile
import time
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from .storage import StorageRoot

TS = pa.timestamp("us", tz="UTC")

SCHEMA = pa.schema(
    [
        pa.field("request_id", pa.string(), nullable=False),
        pa.field("subject_id", pa.string()),
        pa.field("prompt", pa.string()),
        pa.field("aspect_ratio", pa.string()),
        pa.field("movement_amplitude", pa.string()),
        pa.field("bgm", pa.bool_()),
        pa.field("duration", pa.int32()),
        pa.field("resolution", pa.string()),
        pa.field("seed_requested", pa.int64()),
        pa.field("seed_effective", pa.int64()),
        pa.field("reference_sha256s", pa.list_(pa.string())),
        pa.field("reference_original_sha256s", pa.list_(pa.string())),
        pa.field("task_id", pa.string()),
        pa.field("attempts", pa.int32()),
        pa.field("state", pa.string()),
        pa.field("reason", pa.string()),
        pa.field("submitted_at", TS),
        pa.field("finished_at", TS),
        pa.field("latency_s", pa.float64()),
        pa.field("video_path", pa.string()),
        pa.field("video_sha256", pa.string()),
        pa.field("video_bytes", pa.int64()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("fps", pa.float64()),
        pa.field("frames", pa.int32()),
        pa.field("duration_s", pa.float64()),
        pa.field("has_audio", pa.bool_()),
        pa.field("dagster_run_id", pa.string()),
        pa.field("pipeline_version", pa.string()),
        pa.field("recorded_at", TS, nullable=False),
        # quality figures (quality.VideoQuality), added at the end as the schema evolves; null for rows written before they existed
        pa.field("motion", pa.float64()),
        pa.field("still_share", pa.float64()),
        pa.field("frozen", pa.bool_()),
        pa.field("blank_share", pa.float64()),
        pa.field("blank", pa.bool_()),
        pa.field("phash", pa.list_(pa.string())),
        pa.field("reference_similarity", pa.float64()),
    ]
)
STATES = ("succeeded", "failed", "unknown")
_TIMESTAMPS = ("submitted_at", "finished_at", "recorded_at")
LOCK_NAME = "lineage-compact.lock"  # in the state folder, not among the parts
TMP_DIR_NAME = "lineage-tmp"
TMP_SUFFIX = ".tmp"
STALE_TMP_S = 3600.0


class LineageBusy(RuntimeError):
    """Another process holds the compaction lock."""


def to_utc(value: Any) -> dt.datetime | None:
    """Epoch seconds, ISO strings, naive (taken as UTC) or aware datetimes → aware UTC."""
    if value is None or (isinstance(value, float) and value != value):
        return None
    if isinstance(value, pd.Timestamp):
        value = value.floor("us").to_pydatetime()  # Parquet keeps microseconds
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return dt.datetime.fromtimestamp(value, dt.UTC)
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value)
    if isinstance(value, dt.datetime):
        return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)
    raise TypeError(f"not a timestamp: {value!r}")


def normalize_row(row: Mapping[str, Any], now: dt.datetime) -> dict[str, Any]:
    """Check one row against the schema; fill ``recorded_at`` and ``latency_s`` when absent."""
    unknown = set(row) - set(SCHEMA.names)
    if unknown:
        raise ValueError(f"columns not in the lineage schema: {', '.join(sorted(unknown))}")
    if not row.get("request_id"):
        raise ValueError("request_id is required")
    if row.get("state") is not None and row["state"] not in STATES:
        raise ValueError(f"state {row['state']!r} is not one of {', '.join(STATES)}")
    out = {name: row.get(name) for name in SCHEMA.names}
    for name in _TIMESTAMPS:
        out[name] = to_utc(out[name])
    out["recorded_at"] = out["recorded_at"] or now
    if out["latency_s"] is None and out["submitted_at"] and out["finished_at"]:
        out["latency_s"] = (out["finished_at"] - out["submitted_at"]).total_seconds()
    return out


class LineageTable:
    """What every lineage store reads the same way: the full history and the current table."""

    location: str  # where the parts are, for messages and the UI

    def parts(self) -> list:
        raise NotImplementedError

    def append(self, rows: Iterable[Mapping[str, Any]]) -> Any:
        raise NotImplementedError

    def compact(self) -> Any:
        raise NotImplementedError

    def relative_video_path(self, path: str | None) -> str | None:
        raise NotImplementedError

    def absolute_video_path(self, path: str | None) -> str | None:
        raise NotImplementedError

    def _read_parts(self) -> pa.Table:
        raise NotImplementedError

    def read_all(self) -> pd.DataFrame:
        """Every row ever appended (the full history), in file order; ``video_path`` absolute."""
        df = self._read_parts().to_pandas()
        df["video_path"] = df["video_path"].map(self.absolute_video_path)
        return df

    def read(self) -> pd.DataFrame:
        """The current table: one row per request_id, the latest ``recorded_at`` winning."""
        df = self.read_all()
        df = df.sort_values("recorded_at", kind="stable")
        return df.drop_duplicates("request_id", keep="last").sort_values("request_id").reset_index(drop=True)


def _normalized_table(rows: Iterable[Mapping[str, Any]], store: LineageTable, now: dt.datetime) -> pa.Table:
    normalized = [normalize_row(r, now) for r in rows]
    for row in normalized:
        row["video_path"] = store.relative_video_path(row["video_path"])
    table = pa.Table.from_pylist(normalized, schema=SCHEMA)
    if table.num_rows == 0:
        raise ValueError("nothing to append")
    return table


def _part_name(now: dt.datetime) -> str:
    return f"part-{now:%Y%m%dT%H%M%S%fZ}-{uuid.uuid4().hex}.parquet"


def open_lineage(storage: StorageRoot, state_dir: str | os.PathLike | None = None) -> LineageTable:
    """The lineage table under ``<storage root>/lineage``: local parts (flock, os.replace) on a
    folder, PUT-only parts on an object store."""
    if storage.is_local:
        return LineageStore(Path(storage.location) / "lineage", state_dir)
    return ObjectLineageStore(storage)


class LineageStore(LineageTable):
    def __init__(self, root: str | os.PathLike, state_dir: str | os.PathLike | None = None):
        self.root = Path(root)
        self.location = str(self.root)
        self.data_root = self.root.resolve().parent  # what video_path is relative to
        self.state_dir = Path(state_dir) if state_dir is not None else self.data_root / "state"
        self.lock_path = self.state_dir / LOCK_NAME
        self.tmp_dir = self.state_dir / TMP_DIR_NAME
        self.root.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)

    def relative_video_path(self, path: str | None) -> str | None:
        """``path`` relative to the data dir when it lies inside it (else unchanged)."""
        if not path or not os.path.isabs(path):
            return path
        try:
            return Path(path).resolve().relative_to(self.data_root).as_posix()
        except ValueError:
            return path

    def absolute_video_path(self, path: str | None) -> str | None:
        """A stored ``video_path`` as an absolute path (old rows already hold one)."""
        if not isinstance(path, str) or not path or os.path.isabs(path):
            return path
        return str(self.data_root / path)

    # --- writing ------------------------------------------------------------------------------

    def append(self, rows: Iterable[Mapping[str, Any]]) -> Path:
        """Write ``rows`` as one new immutable part file; returns its path."""
        now = dt.datetime.now(dt.UTC)
        return self._write_atomic(_normalized_table(rows, self, now), now)

    def _write_atomic(self, table: pa.Table, now: dt.datetime) -> Path:
        name = _part_name(now)
        final = self.root / name
        tmp = self.tmp_dir / f".{name}{TMP_SUFFIX}"  # same file system: os.replace stays atomic
        try:
            with open(tmp, "wb") as f:
                pq.write_table(table, f, compression="zstd")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(self.root)
        return final

    def compact(self) -> Path | None:
        """Merge every part present now into one file; parts appended meanwhile stay untouched.

        Single writer (a non-blocking ``flock``, released by the OS if the process dies; raises
        :class:`LineageBusy` when held). Also removes temp files older than an hour, left by
        killed writers. Returns the merged file, or None when there was nothing to merge.
        """
        with open(self.lock_path, "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise LineageBusy(f"{self.root} is being compacted by another process") from None
            self._remove_stale_tmp()
            parts = self.parts()
            if len(parts) < 2:
                return None
            merged = self._write_atomic(_read(parts), dt.datetime.now(dt.UTC))
            for p in parts:
                p.unlink()
            _fsync_dir(self.root)
            return merged

    def _remove_stale_tmp(self) -> None:
        cutoff = time.time() - STALE_TMP_S
        for p in [*self.tmp_dir.glob(f".*{TMP_SUFFIX}"), *self.root.glob(f".*{TMP_SUFFIX}")]:
            try:
                if p.stat().st_mtime < cutoff:
                    p.unlink()
            except FileNotFoundError:
                pass

    # --- reading ------------------------------------------------------------------------------

    def parts(self) -> list[Path]:
        """The visible part files, oldest name first (temp and lock files excluded)."""
        return sorted(self.root.glob("part-*.parquet"))

    def _read_parts(self) -> pa.Table:
        return _read(self.parts())


class ObjectLineageStore(LineageTable):
    """The lineage parts under ``<root>/lineage`` on an object store: PUT-only, no lock."""

    READ_TRIES = 5  # a compaction may delete a listed part before it is read: list again

    def __init__(self, storage: StorageRoot, folder: str = "lineage"):
        self.storage = storage
        self.folder = folder
        self.location = storage.url(folder)

    def relative_video_path(self, path: str | None) -> str | None:
        """``path`` relative to the storage root when it lies under it (else unchanged)."""
        if not path:
            return path
        return self.storage.relative(path) or path

    def absolute_video_path(self, path: str | None) -> str | None:
        """A stored relative ``video_path`` as its URL under the root."""
        if not isinstance(path, str) or not path or os.path.isabs(path) or "://" in path:
            return path
        return self.storage.url(path)

    def append(self, rows: Iterable[Mapping[str, Any]]) -> str:
        """Write ``rows`` as one new part: a finished local file, then one PUT; returns its URL."""
        now = dt.datetime.now(dt.UTC)
        return self._put(_normalized_table(rows, self, now), now)

    def _put(self, table: pa.Table, now: dt.datetime) -> str:
        name = _part_name(now)
        with tempfile.TemporaryDirectory(prefix="vidu-lineage-") as tmp:
            local = Path(tmp) / name
            pq.write_table(table, local, compression="zstd")
            return self.storage.put_file(local, f"{self.folder}/{name}", move=True)

    def compact(self) -> str | None:
        """Merge the parts listed now into one new part, then delete exactly the parts it read.

        No lock: a part appended meanwhile is not touched, a part another compaction removed
        meanwhile is skipped (its merged part holds the rows), and two compactions reading the
        same part only leave duplicate rows, which reads resolve. Returns the merged part's URL,
        or None when there was nothing to merge."""
        read = self.parts()
        if len(read) < 2:
            return None
        try:
            table = self._read_listed(read)
        except FileNotFoundError:  # some were merged meanwhile by another compaction: take the rest
            table, read = self._read_each(read)
            if len(read) < 2:
                return None
        merged = self._put(table, dt.datetime.now(dt.UTC))
        for part in read:
            self.storage.delete(part)
        return merged

    def parts(self) -> list[str]:
        """The part files (relative to the storage root), oldest name first."""
        return [p for p in self.storage.list(self.folder, ".parquet") if Path(p).name.startswith("part-")]

    def _read_listed(self, parts: list[str]) -> pa.Table:
        if not parts:
            return SCHEMA.empty_table()
        paths = [self.storage.fs_path(p) for p in parts]
        return ds.dataset(paths, schema=SCHEMA, format="parquet", filesystem=self.storage.fs).to_table()

    def _read_each(self, parts: list[str]) -> tuple[pa.Table, list[str]]:
        """The parts still there, one by one, and which they were."""
        tables, read = [], []
        for part in parts:
            try:
                tables.append(self._read_listed([part]))
            except FileNotFoundError:  # its rows are in another compaction's merged part
                continue
            read.append(part)
        return (pa.concat_tables(tables) if tables else SCHEMA.empty_table()), read

    def _read_parts(self) -> pa.Table:
        for _ in range(self.READ_TRIES - 1):
            try:
                return self._read_listed(self.parts())
            except FileNotFoundError:  # compacted away between the listing and the read
                continue
        return self._read_listed(self.parts())


def _read(parts: list[Path]) -> pa.Table:
    """Read parts with the explicit schema: older files lacking newer columns read as null."""
    if not parts:
        return SCHEMA.empty_table()
    return ds.dataset([str(p) for p in parts], schema=SCHEMA, format="parquet").to_table()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
