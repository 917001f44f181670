"""Reading the catalog's files: only regular files of bounded size are opened (never a device or
a FIFO), and images/prompts tables come back as all-string columns.

Split out of :mod:`vidu_pipeline.catalog`, which re-exports it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from . import images as img
from .catalog_model import CatalogError, Rejection


def open_regular(path: Path, limit: int, why: str = ""):
    """Open a catalog file for reading, refusing (CatalogError) anything but a regular file of at
    most ``limit`` bytes: checked with stat before opening (a device is never opened), opened
    non-blocking and checked again with fstat (a FIFO swapped in between cannot hang a run)."""

    def check(st: os.stat_result) -> None:
        problem = img.not_regular_reason(st.st_mode)
        too_big = f"{st.st_size:,} bytes, at most {limit:,}" + (f" ({why})" if why else "")
        if problem or st.st_size > limit:
            raise CatalogError(f"{path.name}: {problem or too_big}")

    try:
        check(os.stat(path))
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise CatalogError(f"{path}: cannot be opened ({exc.strerror or exc})") from None
    f = open(fd, "rb")
    try:
        check(os.fstat(fd))
    except BaseException:
        f.close()
        raise
    return f


def read_table(
    root: Path,
    stem: str,
    required: tuple[str, ...],
    known: tuple[str, ...],
    rejections: list[Rejection],
    limit: int,
) -> tuple[pd.DataFrame, str]:
    """Read ``<stem>.csv`` or ``<stem>.parquet`` (at most ``limit`` bytes) as all-string columns,
    stripped, '' for empty."""
    found = [p for p in (root / f"{stem}.csv", root / f"{stem}.parquet") if os.path.lexists(p)]
    if not found:
        raise CatalogError(f"{root}: neither {stem}.csv nor {stem}.parquet exists")
    if len(found) > 1:
        raise CatalogError(f"{root}: both {stem}.csv and {stem}.parquet exist; keep one")
    path = found[0]
    with open_regular(path, limit) as f:
        try:
            if path.suffix == ".csv":
                df = pd.read_csv(f, dtype=str, keep_default_na=False, encoding="utf-8-sig")
            else:
                df = pd.read_parquet(f)
                df = df.astype(object).where(df.notna(), "").astype(str)
        except UnicodeDecodeError as exc:
            raise CatalogError(
                f"{path.name}: is not UTF-8 text (found byte 0x{exc.object[exc.start]:02x}); save it as UTF-8"
            ) from None
        except Exception as exc:
            raise CatalogError(f"{path.name}: cannot be parsed ({type(exc).__name__}: {exc})") from None
    df.columns = [str(c).strip().lower() for c in df.columns]
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise CatalogError(
            f"{path.name}: required column(s) {', '.join(missing)} missing (found: {', '.join(df.columns) or 'none'})"
        )
    if df.columns.duplicated().any():
        raise CatalogError(f"{path.name}: column(s) repeated: {', '.join(df.columns[df.columns.duplicated()])}")
    for col in df.columns:
        if col not in known:
            rejections.append(
                Rejection(
                    "catalog",
                    None,
                    f"{path.name} column {col!r}",
                    "unknown_column",
                    f"{path.name}: column {col!r} is not known and is ignored (known: {', '.join(known)})",
                )
            )
    df = df[[c for c in known if c in df.columns]].copy()
    for col in known:
        df[col] = df[col].str.strip() if col in df.columns else ""
    df.insert(0, "row", range(1, len(df) + 1))
    return df, path.name
