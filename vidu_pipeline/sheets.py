"""The contact sheet of the whole dataset: one tile per current video, labelled with its request
id and its quality flags, paged so a sweep of thousands stays a set of viewable PNGs."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

from .mp4 import contact_sheet
from .quality import Thresholds, quality_flags

TILES_PER_PAGE = 100  # 10 × 10 tiles of up to 320 px: a few MB per page
SHEET_NAME = "contact_sheet"


def tile_label(row, thresholds: Thresholds) -> str:
    """``<request_id>`` plus its flags: quality ones (frozen, blank, …) and a request mismatch."""
    probe = json.loads(row.probe_json) if row.probe_json else {}
    flags = quality_flags(probe.get("quality") or {}, thresholds)
    if probe.get("problems"):
        flags.append("mismatch")
    return f"{row.request_id} [{', '.join(flags)}]" if flags else row.request_id


def page_path(root: Path, page: int) -> Path:
    """contact_sheet.png, contact_sheet-2.png, …"""
    return root / (f"{SHEET_NAME}.png" if page == 1 else f"{SHEET_NAME}-{page}.png")


def write_pages(root: Path, items: Sequence[tuple[str, Path]], per_page: int | None = None) -> list[Path]:
    """Write the sheets of ``items`` (label, frame or video) under ``root``, ``per_page`` tiles
    each (default ``TILES_PER_PAGE``); stale pages from a larger earlier dataset are removed.
    Returns the pages, first first."""
    per_page = per_page or TILES_PER_PAGE
    pages = []
    for number, start in enumerate(range(0, len(items), per_page), start=1):
        chunk = items[start : start + per_page]
        columns = max(1, math.ceil(math.sqrt(len(chunk))))
        image = contact_sheet(chunk, columns=columns, cell_width=max(64, min(320, 4096 // columns)))
        path = page_path(root, number)
        image.save(path, format="PNG", compress_level=1)  # ~2x faster to write, a third larger
        pages.append(path)
    _remove_stale(root, len(pages))
    return pages


def _remove_stale(root: Path, kept: int) -> None:
    for path in root.glob(f"{SHEET_NAME}-*.png"):
        suffix = path.stem.rsplit("-", 1)[-1]
        if suffix.isdigit() and int(suffix) > kept:
            path.unlink()


def current_rows(rows: Iterable, videos_dir: Path) -> list:
    """Ledger rows whose video is stored in ``videos_dir`` (not a reproduction) and still on
    disk, by request id."""
    return sorted(
        (
            r
            for r in rows
            if r.video_sha256
            and r.video_path
            and Path(r.video_path).parent == videos_dir
            and Path(r.video_path).exists()
        ),
        key=lambda r: r.request_id,
    )
