"""The catalog: which subjects, reference images, prompts and seeds to generate, checked before
anything is paid for.

A catalog is a folder: ``images.csv|parquet`` (subject_id, image[, view]), ``prompts.csv|parquet``
(subject_id, prompt[, option columns]) and ``sweep.yaml`` (seeds, option defaults). Problems with
the whole catalog raise :class:`CatalogError`; problems with single rows, images or prompts become
:class:`Rejection` records and never stop the valid rows beside them. See docs/catalog.md.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pandas as pd

from .api.contract import MAX_PROMPT_CHARS
from .api.image_refs import redact_url
from .catalog_files import read_table
from .catalog_images import validate_images
from .catalog_model import (
    _SCHEME_RE,
    ACCEPTED_COLUMNS,
    IMAGE_COLUMNS,
    MAX_IMAGE_CELL_CHARS,
    MAX_SUBJECT_ID_CHARS,
    OPTION_COLUMNS,
    PROMPT_COLUMNS,
    REJECTION_COLUMNS,
    Catalog,
    CatalogError,
    Rejection,
    Sweep,
    ValidatedImages,
    _short,
    rejections_frame,
    spreadsheet_safe,
    write_rejections_csv,
)
from .sweep import MAX_SWEEP_BYTES, parse_option, read_sweep

__all__ = [
    "ACCEPTED_COLUMNS",
    "IMAGE_COLUMNS",
    "MAX_IMAGE_CELL_CHARS",
    "MAX_SUBJECT_ID_CHARS",
    "MAX_SWEEP_BYTES",
    "MAX_TABLE_BYTES",
    "OPTION_COLUMNS",
    "PROMPT_COLUMNS",
    "REJECTION_COLUMNS",
    "Catalog",
    "CatalogError",
    "Rejection",
    "Sweep",
    "ValidatedImages",
    "load_catalog",
    "rejections_frame",
    "spreadsheet_safe",
    "valid_prompts",
    "validate_images",
    "write_rejections_csv",
]

# Whole-file limit for images/prompts tables, so a wrong or hostile file fails with a clear
# message instead of filling the memory: 100 MB holds ~65,000 prompts of 1500 characters.
MAX_TABLE_BYTES = 100_000_000

# --- row checks ------------------------------------------------------------------------------


def _reject_rows(df: pd.DataFrame, bad: pd.Series, kind: str, rule: str, detail, out: list[Rejection]) -> None:
    """One rejection per row in ``bad``; ``detail(row) -> str`` follows the item prefix."""
    for row in df[bad].itertuples(index=False):
        subject = _short(row.subject_id, MAX_SUBJECT_ID_CHARS) or None
        out.append(Rejection(kind, subject, row.item, rule, f"{row.item}: {detail(row)}"))


def _cell_checks(df: pd.DataFrame, limits: dict[str, int]) -> list[tuple[str, pd.Series, Any]]:
    """(rule, bad rows, detail) for text no later stage can carry: a NUL character (no path, no
    SQL text column holds one) or a cell longer than its column's limit."""
    checks: list[tuple[str, pd.Series, Any]] = []
    for col, limit in limits.items():
        checks.append(
            (
                "control_character",
                df[col].str.contains("\x00", regex=False),
                lambda r, c=col: f"{c} contains a NUL character",
            )
        )
        checks.append(
            (
                "too_long",
                df[col].str.len() > limit,
                lambda r, c=col, n=limit: f"{c} is {len(getattr(r, c)):,} characters, at most {n:,}",
            )
        )
    return checks


def _shown(cell: str) -> str:
    """A cell as it may appear in a message: control characters escaped, at most 200 characters."""
    text = cell if cell.isprintable() else cell.encode("unicode_escape").decode("ascii")
    return _short(text, 200)


def _locate(
    image: str, root_real: str, allow_outside: bool, folders: dict[str, str]
) -> tuple[str, bool, str | None, str]:
    """One image cell → (location, is_url, rule, reason); rule is None when the row is fine."""
    m = _SCHEME_RE.match(image)
    if m:
        scheme = m.group(1).lower()
        if scheme not in ("http", "https"):
            return image, True, "url_scheme", f"{scheme}: is not accepted, only http(s) URLs or paths"
        if not urlsplit(image).hostname:
            return image, True, "url_scheme", "the URL has no host"
        return image, True, None, ""
    path = image if os.path.isabs(image) else os.path.join(root_real, image)
    real = _realpath(path, folders)
    if not allow_outside and not (real + os.sep).startswith(root_real + os.sep):
        link = "" if os.path.normpath(path) == real else " through a symlink"
        return (
            real,
            False,
            "path_escape",
            (f"resolves{link} to {real}, outside the catalog folder {root_real} (allow_outside_paths is off)"),
        )
    if not os.path.lexists(path) or not os.path.exists(real):
        return real, False, "missing_file", f"no such file ({real})"
    return real, False, None, ""


def _realpath(path: str, folders: dict[str, str]) -> str:
    """``os.path.realpath``, resolving each folder once per catalog read (``folders`` keeps
    them): a catalog's images share a few folders, and resolving every component of every path
    was most of a re-run's time."""
    folder, name = os.path.split(path)
    if name in ("", ".", "..") or ".." in folder.split(os.sep) or os.path.islink(path):
        return os.path.realpath(path)
    if folder not in folders:
        folders[folder] = os.path.realpath(folder)
    return os.path.join(folders[folder], name)


def _check_image_rows(
    df: pd.DataFrame, name: str, root_real: str, allow_outside: bool, out: list[Rejection]
) -> pd.DataFrame:
    shown = df["image"].map(lambda cell: _shown(redact_url(cell)))
    df["item"] = name + " row " + df["row"].astype(str) + ": " + shown
    keep = pd.Series(True, index=df.index)
    checks = [("missing_value", df[col] == "", lambda r, c=col: f"{c} is empty") for col in ("subject_id", "image")]
    checks += _cell_checks(df, {"subject_id": MAX_SUBJECT_ID_CHARS, "image": MAX_IMAGE_CELL_CHARS})
    for rule, bad, detail in checks:
        _reject_rows(df, bad & keep, "image", rule, detail, out)
        keep &= ~bad
    folders: dict[str, str] = {}
    cells = {c: _locate(c, root_real, allow_outside, folders) for c in df.loc[keep, "image"].unique()}
    unchecked: tuple[str, bool, str | None, str] = ("", False, None, "")
    located = [cells[i] if k else unchecked for i, k in zip(df["image"], keep)]
    df["location"] = [x[0] for x in located]
    df["is_url"] = [x[1] for x in located]
    for i, item, subject, (_, _, cell_rule, reason) in zip(df.index, df["item"], df["subject_id"], located):
        if cell_rule:
            out.append(Rejection("image", subject or None, item, cell_rule, f"{item}: {reason}"))
            keep[i] = False
    valid = df[keep]
    dup = valid.duplicated(["subject_id", "location"]).reindex(df.index, fill_value=False)
    first = valid.groupby(["subject_id", "location"])["row"].transform("first")
    _reject_rows(
        df.assign(first_row=first),
        dup,
        "image",
        "duplicate_row",
        lambda r: f"same subject and image as row {r.first_row}",
        out,
    )
    return df[keep & ~dup].reset_index(drop=True)


def _check_prompt_rows(
    df: pd.DataFrame, name: str, subjects: set[str], sweep: Sweep, out: list[Rejection]
) -> pd.DataFrame:
    df["item"] = name + " row " + df["row"].astype(str)
    keep = pd.Series(True, index=df.index)
    checks = [
        ("missing_value", df["subject_id"] == "", lambda r: "subject_id is empty"),
        *_cell_checks(df, {"subject_id": MAX_SUBJECT_ID_CHARS}),
        (
            "unknown_subject",
            (df["subject_id"] != "") & ~df["subject_id"].isin(subjects),
            lambda r: f"subject {_short(r.subject_id)!r} has no row in the images table",
        ),
        ("prompt_empty", df["prompt"] == "", lambda r: "prompt is empty"),
        (
            "prompt_too_long",
            df["prompt"].str.len() > MAX_PROMPT_CHARS,
            lambda r: f"prompt is {len(r.prompt)} characters, at most {MAX_PROMPT_CHARS}",
        ),
        (
            "control_character",
            df["prompt"].str.contains("\x00", regex=False),
            lambda r: "prompt contains a NUL character",
        ),
    ]
    for rule, bad, detail in checks:
        _reject_rows(df, bad, "prompt", rule, detail, out)
        keep &= ~bad
    for col in OPTION_COLUMNS:
        # Parse each distinct cell once: a 10,000-row table has a handful of distinct values.
        parsed = {v: parse_option(col, v) for v in df[col].unique() if v != ""}
        empty = df[col] == ""
        problem = df[col].map(lambda v, parsed=parsed: parsed[v][1] if v else None)
        bad = problem.notna()
        _reject_rows(
            df.assign(problem=problem), bad, "prompt", "bad_option", lambda r, c=col: f"{c}: {_short(r.problem)}", out
        )
        keep &= ~bad
        values = df[col].map(lambda v, parsed=parsed: parsed[v][0] if v and not parsed[v][1] else None)
        df[col] = values.where(~empty, sweep.defaults[col])
    key = ["subject_id", "prompt", *OPTION_COLUMNS]
    dup = keep & df[keep].duplicated(key).reindex(df.index, fill_value=False)
    _reject_rows(
        df, dup, "prompt", "duplicate_row", lambda r: "same subject, prompt and options as an earlier row", out
    )
    good = df[keep & ~dup].reset_index(drop=True)
    good["bgm"] = good["bgm"].astype(bool)
    good["duration"] = good["duration"].astype(int)
    return good[["row", "item", "subject_id", "prompt", *OPTION_COLUMNS]]


def load_catalog(catalog_dir: str | os.PathLike, *, allow_outside_paths: bool = False) -> Catalog:
    """Parse the catalog folder and apply every row-level rule; no image is opened here."""
    root = Path(catalog_dir)
    if not root.is_dir():
        raise CatalogError(f"{root}: catalog folder does not exist")
    rejections: list[Rejection] = []
    images, images_name = read_table(
        root, "images", ("subject_id", "image"), IMAGE_COLUMNS, rejections, MAX_TABLE_BYTES
    )
    prompts, prompts_name = read_table(
        root, "prompts", ("subject_id", "prompt"), PROMPT_COLUMNS, rejections, MAX_TABLE_BYTES
    )
    sweep = read_sweep(root / "sweep.yaml", rejections)
    subjects = set(images.loc[images["subject_id"] != "", "subject_id"])
    images = _check_image_rows(images, images_name, os.path.realpath(root), allow_outside_paths, rejections)
    prompts = _check_prompt_rows(prompts, prompts_name, subjects, sweep, rejections)
    return Catalog(root=root, images=images, prompts=prompts, sweep=sweep, rejections=rejections)


# --- prompts ---------------------------------------------------------------------------------


def valid_prompts(catalog: Catalog, validated: ValidatedImages) -> tuple[pd.DataFrame, list[Rejection]]:
    """Prompt rows whose subject kept at least one image, options filled and typed; plus the
    rejections of the prompt rows whose subject has none (other prompt problems are already in
    ``catalog.rejections``)."""
    prompts = catalog.prompts
    ok = prompts["subject_id"].isin(set(validated.accepted["subject_id"]))
    rejections = [
        Rejection(
            "prompt",
            r.subject_id,
            r.item,
            "no_valid_images",
            f"{r.item}: subject {r.subject_id!r} has no valid reference image",
        )
        for r in prompts[~ok].itertuples(index=False)
    ]
    return prompts[ok].reset_index(drop=True), rejections
