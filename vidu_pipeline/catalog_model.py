"""The catalog's data: the records every catalog stage passes on (rows, rejections, the sweep),
the column names and cell limits they share, and the rejections report people read.

Split out of :mod:`vidu_pipeline.catalog` so the readers (tables, sweep.yaml, images) can share
these types without importing each other; ``catalog`` re-exports every public name.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

from .api.contract import MAX_IMAGES
from .quality import Thresholds
from .storage import StorageError

OPTION_COLUMNS = ("aspect_ratio", "movement_amplitude", "bgm", "duration", "resolution")
IMAGE_COLUMNS = ("subject_id", "image", "view")
PROMPT_COLUMNS = ("subject_id", "prompt", *OPTION_COLUMNS)
REJECTION_COLUMNS = ("kind", "subject_id", "item", "rule", "detail")
ACCEPTED_COLUMNS = (
    "subject_id",
    "image",
    "view",
    "original_sha256",
    "sent_sha256",
    "mime_subtype",
    "width",
    "height",
    "sent_bytes",
    "notes",
    "row",
)
MAX_SUBJECT_ID_CHARS = 200  # the ledger's subject_id column is String(200)
MAX_IMAGE_CELL_CHARS = 4096  # PATH_MAX on Linux; far beyond any sane URL
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")


class CatalogError(Exception):
    """The catalog as a whole cannot be used; the message names the file and field."""


@dataclasses.dataclass(frozen=True)
class Rejection:
    kind: str  # "image" | "prompt" | "subject" | "sweep" | "catalog"
    subject_id: str | None
    item: str  # e.g. "images.csv row 4: photos/x.png"
    rule: str  # short stable id, e.g. "min_size"
    detail: str  # a sentence naming the file/row/field and the limit


@dataclasses.dataclass(frozen=True)
class Sweep:
    seeds: tuple[int, ...]
    defaults: dict  # option defaults, sweep.yaml's merged over contract.DEFAULTS
    max_images_per_subject: int = MAX_IMAGES
    quality: Thresholds = dataclasses.field(default_factory=Thresholds)  # the dataset's quality gates


@dataclasses.dataclass
class Catalog:
    """Parsed rows that passed the row-level checks, and the rejections of the others.

    ``images``: row, item, subject_id, image, view, location (real path or URL), is_url.
    ``prompts``: row, item, subject_id, prompt and every option column filled and typed.
    Row numbers count data rows from 1 (the header is not a row).
    """

    root: Path
    images: pd.DataFrame
    prompts: pd.DataFrame
    sweep: Sweep
    rejections: list[Rejection]


@dataclasses.dataclass
class ValidatedImages:
    accepted: pd.DataFrame  # ACCEPTED_COLUMNS; hashes and sizes only, never payloads
    rejections: list[Rejection]
    cache_hits: int
    cache_misses: int


def rejections_frame(rejections: list[Rejection]) -> pd.DataFrame:
    return pd.DataFrame([dataclasses.astuple(r) for r in rejections], columns=list(REJECTION_COLUMNS))


# A cell starting with one of these is a formula to a spreadsheet (OWASP "CSV injection").
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(value: Any) -> Any:
    """A text cell a spreadsheet would execute gets a leading single quote; the rest as is."""
    if isinstance(value, str) and value.startswith(_FORMULA_STARTS):
        return "'" + value
    return value


def write_rejections_csv(frame: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write the rejections report for people (who open it in a spreadsheet): formula-like cells
    escaped, written to a temp file and renamed, so a reader never sees half a file.
    Raises StorageError if it cannot be written."""
    path = Path(path)
    safe = frame.astype(object).map(spreadsheet_safe)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            safe.to_csv(f, index=False)
        os.replace(tmp, path)
    except OSError as exc:
        if tmp:
            Path(tmp).unlink(missing_ok=True)
        raise StorageError(
            f"cannot write {path} ({exc.strerror or exc}); the {len(frame)} "
            f"rejection(s) are kept only in the run's output"
        ) from None
    return path


def _short(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[:limit] + "…"
