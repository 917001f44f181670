"""The verdict cache: the bytes to send, by sha256, and what was decided about each content.

It is what makes a re-run cheap — an unchanged file is not re-read, known content is not
decoded again — and the only place encoded payloads live; everything else carries hashes.
"""

from __future__ import annotations

import base64
import hashlib
import os
import sqlite3
import tempfile
import threading
from collections.abc import Iterable
from pathlib import Path

from .image_sniff import MIME_SUBTYPES, sniff_format
from .image_verdict import VALIDATION_VERSION, ImageVerdict


def file_key(st: os.stat_result) -> tuple[int, int, int, int]:
    """What identifies an unchanged local file: size, mtime, ctime (not settable by users), inode."""
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


class ImageCache:
    """Content-addressed store of the bytes to send (by sha256), plus two indexes in SQLite.

    * ``verdicts``: (original sha256, VALIDATION_VERSION, strict) → :class:`ImageVerdict`, so the
      same content is never decoded twice;
    * ``files``: local path → (size, mtime_ns, ctime_ns, inode, sha256), so an unchanged file is
      not even re-read or re-hashed, while any write to it changes the key.

    Blobs are written to a temp file and renamed, SQLite runs in WAL mode: several processes may
    share one cache. One connection, guarded by a lock, serves the worker threads.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        (self.root / "blobs").mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.root / "index.sqlite", timeout=60, check_same_thread=False)
        with self._lock, self._db:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, size INT, mtime_ns INT,"
                " ctime_ns INT, inode INT, sha256 TEXT)"
            )
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS verdicts (sha256 TEXT, version TEXT, strict INT,"
                " verdict TEXT, PRIMARY KEY (sha256, version, strict))"
            )

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # blobs
    def blob_path(self, sha256: str) -> Path:
        return self.root / "blobs" / sha256[:2] / sha256

    def has_bytes(self, sha256: str) -> bool:
        return self.blob_path(sha256).is_file()

    def put_bytes(self, data: bytes, sha256: str | None = None) -> str:
        sha256 = sha256 or hashlib.sha256(data).hexdigest()
        path = self.blob_path(sha256)
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        return sha256

    def get_bytes(self, sha256: str) -> bytes:
        """The stored bytes, checked against their hash; KeyError if absent or damaged."""
        try:
            data = self.blob_path(sha256).read_bytes()
        except FileNotFoundError:
            raise KeyError(f"image {sha256[:12]}… is not in the cache at {self.root}") from None
        if hashlib.sha256(data).hexdigest() != sha256:
            raise KeyError(f"cached image {sha256[:12]}… is damaged (hash mismatch)")
        return data

    def data_uri(self, sent_sha256: str) -> str:
        """``data:image/<type>;base64,…`` of the stored bytes; the type is sniffed, not stored."""
        data = self.get_bytes(sent_sha256)
        fmt = sniff_format(data[:64])
        if fmt not in MIME_SUBTYPES:
            raise KeyError(f"cached image {sent_sha256[:12]}… is {fmt}, not a sendable image")
        return f"data:image/{MIME_SUBTYPES[fmt]};base64,{base64.b64encode(data).decode('ascii')}"

    # indexes
    def known_files(self, keys: dict[str, tuple[int, int, int, int]]) -> dict[str, str]:
        """path → sha256 for the paths whose stored (size, mtime, ctime, inode) still match."""
        sql = "SELECT path, size, mtime_ns, ctime_ns, inode, sha256 FROM files WHERE path IN ({marks})"
        with self._lock:
            rows = self._select_in(sql, [], list(keys))
        return {path: sha for path, *key, sha in rows if tuple(key) == keys[path]}

    def remember_files(self, rows: Iterable[tuple[str, tuple[int, int, int, int], str]]) -> None:
        with self._lock, self._db:
            self._db.executemany(
                "INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?)",
                [(path, *key, sha) for path, key, sha in rows],
            )

    def verdicts(self, shas: Iterable[str], strict: bool) -> dict[str, ImageVerdict]:
        """Cached verdicts for these contents; an accepted one counts only if its blob is there."""
        sql = "SELECT sha256, verdict FROM verdicts WHERE version = ? AND strict = ? AND sha256 IN ({marks})"
        with self._lock:
            rows = self._select_in(sql, [VALIDATION_VERSION, int(strict)], list(dict.fromkeys(shas)))
        found = {sha: ImageVerdict.from_json(text) for sha, text in rows}
        return {s: v for s, v in found.items() if not v.ok or self.has_bytes(v.sent_sha256)}

    def remember_verdicts(self, verdicts: dict[str, ImageVerdict], strict: bool) -> None:
        with self._lock, self._db:
            self._db.executemany(
                "INSERT OR REPLACE INTO verdicts VALUES (?, ?, ?, ?)",
                [(sha, VALIDATION_VERSION, int(strict), v.to_json()) for sha, v in verdicts.items()],
            )

    def _select_in(self, sql: str, params: list, keys: list[str]) -> list:
        """``sql`` with ``{marks}`` for its IN list, run over ``keys`` 500 at a time (SQLite
        caps the parameters of one statement); the caller holds the lock."""
        rows: list = []
        for i in range(0, len(keys), 500):
            chunk = keys[i : i + 500]
            rows += self._db.execute(sql.format(marks=",".join("?" * len(chunk))), [*params, *chunk]).fetchall()
        return rows
