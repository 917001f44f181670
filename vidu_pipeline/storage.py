"""Where the pipeline keeps what it makes, and the one error a failed durable write raises.

:class:`StorageRoot` is the dataset's storage root: a local folder or an fsspec URL
(``s3://bucket/prefix``, ``memory://…``, ``file://…``). Files under it are named by paths
RELATIVE to the root (``videos/<id>.mp4``), so a root can move and every worker that shares
it names a file the same way. A write is atomic either way: locally a temp file beside the
target then ``os.replace``; on an object store one PUT of a finished local file (an object
appears whole or not at all). S3 reads the standard AWS settings (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``) through s3fs.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path, PurePosixPath

import fsspec
from fsspec.implementations.local import LocalFileSystem

from .api.errors import ConfigurationError

ENV_STORAGE_ROOT = "VIDU_STORAGE_ROOT"
S3_HINT = "pip install 'vidu-pipeline[s3]'"


class StorageError(Exception):
    """A durable local write failed (disk full, read-only folder). The message says what was
    kept and where (e.g. a paid task id written to the recovery journal and stderr)."""


def storage_location(setting: str | None, data_dir: str | os.PathLike[str]) -> str:
    """Where the dataset goes: the setting (a flag or a resource field), else VIDU_STORAGE_ROOT,
    else the data folder."""
    return setting or os.environ.get(ENV_STORAGE_ROOT, "").strip() or str(data_dir)


def is_url(location: str | os.PathLike[str]) -> bool:
    """True for ``proto://…`` (an fsspec URL), False for a plain local path."""
    return "://" in str(location)


class StorageRoot:
    """A folder on some file system, addressed by paths relative to it."""

    def __init__(self, location: str | os.PathLike[str]):
        text = str(location)
        if is_url(text) and not text.startswith("file://"):
            self.fs = _filesystem(text)
            self.is_local = False
            self._base = self.fs._strip_protocol(text).rstrip("/")
            self.location = text.rstrip("/")
        else:
            self.fs = LocalFileSystem()
            self.is_local = True
            local = Path(text.removeprefix("file://")).resolve()
            self._base = local.as_posix()
            self.location = str(local)

    def __repr__(self) -> str:
        return f"StorageRoot({self.location!r})"

    # --- names ------------------------------------------------------------------------------

    def url(self, relative: str) -> str:
        """The full name of ``relative``: an absolute local path, or ``proto://bucket/…``."""
        rel = _check_relative(relative)
        return str(Path(self.location) / rel) if self.is_local else f"{self.location}/{rel}"

    def _path(self, relative: str) -> str:
        return f"{self._base}/{_check_relative(relative)}"

    def relative(self, location: str | os.PathLike[str]) -> str | None:
        """``location`` (a path or URL) relative to the root; None when it lies outside."""
        text = str(location)
        if self.is_local:
            if is_url(text) and not text.startswith("file://"):
                return None
            try:
                return Path(text.removeprefix("file://")).resolve().relative_to(self._base).as_posix()
            except ValueError:
                return None
        if not is_url(text) or text.split("://", 1)[0] != self.location.split("://", 1)[0]:
            return None
        inner, prefix = self.fs._strip_protocol(text), self._base + "/"
        return inner[len(prefix) :] if inner.startswith(prefix) and len(inner) > len(prefix) else None

    # --- writing ------------------------------------------------------------------------------

    def put_file(self, local: str | os.PathLike[str], relative: str, *, move: bool = False) -> str:
        """Store the finished local file at ``relative`` atomically; returns its :meth:`url`.
        ``move``: the local file is consumed (renamed when it can be, else removed after the put)."""
        if self.is_local:
            final = Path(self._path(relative))
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = final.with_name(f".{final.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
            try:
                if move:
                    shutil.move(os.fspath(local), tmp)
                else:
                    shutil.copyfile(local, tmp)
                os.replace(tmp, final)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            return str(final)
        self.fs.put_file(os.fspath(local), self._path(relative))
        if move:
            Path(local).unlink(missing_ok=True)
        return self.url(relative)

    def write_bytes(self, relative: str, data: bytes) -> str:
        """Write ``data`` at ``relative`` atomically (temp + rename locally, one PUT remotely)."""
        if self.is_local:
            final = Path(self._path(relative))
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = final.with_name(f".{final.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
            try:
                tmp.write_bytes(data)
                os.replace(tmp, final)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            return str(final)
        self.fs.pipe_file(self._path(relative), data)
        return self.url(relative)

    def delete(self, relative: str) -> None:
        """Remove one file; a file already gone is not an error (another worker may have)."""
        try:
            self.fs.rm_file(self._path(relative))
        except FileNotFoundError:
            pass

    # --- reading ------------------------------------------------------------------------------

    def read_bytes(self, relative: str) -> bytes:
        return self.fs.cat_file(self._path(relative))

    def get_file(self, relative: str, local: str | os.PathLike[str]) -> None:
        """Copy one stored file to a local path."""
        self.fs.get_file(self._path(relative), os.fspath(local))

    def exists(self, relative: str) -> bool:
        return bool(self.fs.exists(self._path(relative)))

    def holds(self, location: str | os.PathLike[str]) -> bool:
        """The file named by ``location`` (as a ledger or lineage row names it) is there: under
        the root through the root's file system, elsewhere (a local reproduction) on local disk."""
        inside = self.relative(location)
        if inside is not None:
            return self.exists(inside)
        return not is_url(location) and os.path.exists(location)

    def list(self, folder: str, suffix: str = "") -> list[str]:
        """Relative paths of the files directly in ``folder`` whose name ends with ``suffix``,
        sorted; hidden (dot) files — temp files — excluded; [] when the folder is absent."""
        try:
            entries = self.fs.ls(self._path(folder), detail=True, refresh=True)
        except FileNotFoundError:
            return []
        names = [PurePosixPath(e["name"]).name for e in entries if e.get("type") == "file"]
        rel = _check_relative(folder)
        return sorted(f"{rel}/{n}" for n in names if n.endswith(suffix) and not n.startswith("."))

    def fs_path(self, relative: str) -> str:
        """The file system's own name for ``relative`` (what ``self.fs`` and pyarrow take)."""
        return self._path(relative)


def _check_relative(relative: str) -> str:
    """A clean relative POSIX path: no leading slash, no ``..``, not empty."""
    rel = PurePosixPath(str(relative).replace("\\", "/"))
    if not str(relative) or rel.is_absolute() or ".." in rel.parts or str(rel) == ".":
        raise ValueError(f"not a relative path inside the storage root: {relative!r}")
    return rel.as_posix()


def _filesystem(url: str):
    """The fsspec file system for ``url``; a one-line :class:`ConfigurationError` when the
    protocol is unknown or its package (s3fs for ``s3://``) is not installed."""
    protocol = url.split("://", 1)[0]
    try:
        # S3: no listing cache, so a file another worker stored is seen at once.
        options = {"use_listings_cache": False} if protocol in ("s3", "s3a") else {}
        fs, _ = fsspec.core.url_to_fs(url, **options)
    except ImportError as exc:
        hint = S3_HINT if protocol in ("s3", "s3a") else str(exc).splitlines()[0]
        raise ConfigurationError(
            f"storage root {url}: {protocol}:// needs a package that is not installed ({hint})"
        ) from None
    except ValueError as exc:
        raise ConfigurationError(f"storage root {url}: unknown protocol {protocol!r} ({exc})") from None
    return fs
