"""The catalog: which subjects, reference images, prompts and seeds to generate, checked before
anything is paid for.

A catalog is a folder: ``images.csv|parquet`` (subject_id, image[, view]), ``prompts.csv|parquet``
(subject_id, prompt[, option columns]) and ``sweep.yaml`` (seeds, option defaults). Problems with
the whole catalog raise :class:`CatalogError`; problems with single rows, images or prompts become
:class:`Rejection` records and never stop the valid rows beside them. See docs/catalog.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import tempfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pandas as pd
import yaml

from . import images as img
from .contract import (
    ASPECT_RATIOS,
    DEFAULTS,
    DURATIONS,
    MAX_IMAGES,
    MAX_PROMPT_CHARS,
    MAX_SWEEP_SEEDS,
    MOVEMENT_AMPLITUDES,
    RESOLUTIONS,
    redact_url,
    seed_problem,
)
from .errors import StorageError
from .quality import Thresholds

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
# Whole-file limits, so a wrong or hostile file fails with a clear message instead of filling the
# memory: 100 MB holds ~65,000 prompts of 1500 characters; 10,000 seeds fit in ~150 KB of YAML.
MAX_TABLE_BYTES = 100_000_000
MAX_SWEEP_BYTES = 1_000_000
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


# --- options ---------------------------------------------------------------------------------

_BOOLS = {"true": True, "false": False, "yes": True, "no": False, "1": True, "0": False}


def _parse_option(name: str, raw: Any) -> tuple[Any, str | None]:
    """One option value (a cell or a YAML scalar) → (typed value, None) or (None, problem)."""
    text = str(raw).strip()
    if name == "bgm":
        flag = _BOOLS.get(text.lower())
        return (flag, None) if flag is not None else (None, f"{text!r} is not true or false")
    if name == "duration":
        try:
            number = float(text)
        except ValueError:
            number = None
        if number in DURATIONS:
            return int(number), None
        return None, f"{text!r} is not accepted, only {', '.join(map(str, DURATIONS))}"
    allowed = {"aspect_ratio": ASPECT_RATIOS, "movement_amplitude": MOVEMENT_AMPLITUDES, "resolution": RESOLUTIONS}[
        name
    ]
    value = text if name == "aspect_ratio" else text.lower()
    if value in allowed:
        return value, None
    return None, f"{text!r} is not one of {', '.join(allowed)}"


# --- reading the files -----------------------------------------------------------------------


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader without YAML 1.1's base-60 numbers, so an unquoted ``16:9`` stays a string."""


_YamlLoader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:int", re.compile(r"^[-+]?(?:0|[1-9][0-9_]*)$"), list("-+0123456789")
)
_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)?\.[0-9_]+(?:[eE][-+]?[0-9]+)?$"),
    list("-+.0123456789"),
)


def _open_regular(path: Path, limit: int, why: str = ""):
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


def _read_table(
    root: Path, stem: str, required: tuple[str, ...], known: tuple[str, ...], rejections: list[Rejection]
) -> tuple[pd.DataFrame, str]:
    """Read ``<stem>.csv`` or ``<stem>.parquet`` as all-string columns, stripped, '' for empty."""
    found = [p for p in (root / f"{stem}.csv", root / f"{stem}.parquet") if os.path.lexists(p)]
    if not found:
        raise CatalogError(f"{root}: neither {stem}.csv nor {stem}.parquet exists")
    if len(found) > 1:
        raise CatalogError(f"{root}: both {stem}.csv and {stem}.parquet exist; keep one")
    path = found[0]
    with _open_regular(path, MAX_TABLE_BYTES) as f:
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


def _short(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def _integer(name: str, field: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise CatalogError(f"{name}: {field} must be an integer, got {_short(repr(value))}")
    return value


def _sweep_seeds(name: str, doc: dict) -> list[int]:
    """The seeds sweep.yaml asks for, every one within contract.SEED_MIN..SEED_MAX.

    The count is checked before any seed is looked at or any range built, so a 200,000-seed
    sweep is refused at once; any bad seed makes the whole sweep a CatalogError (the seeds
    decide what is paid for: a silently shortened sweep is worse than a clear stop).
    """
    if "seeds" in doc and ({"seed_start", "seed_count"} & set(doc)):
        raise CatalogError(f"{name}: give either `seeds` or `seed_start` + `seed_count`, not both")
    if "seeds" in doc:
        listed = doc["seeds"]
        if not isinstance(listed, list) or not listed:
            raise CatalogError(f"{name}: seeds must be a non-empty list of integers")
        if len(listed) > MAX_SWEEP_SEEDS:
            raise CatalogError(f"{name}: seeds: {len(listed)} seeds, at most {MAX_SWEEP_SEEDS}")
        for i, seed in enumerate(listed):
            problem = seed_problem(_integer(name, f"seeds[{i}]", seed))
            if problem:
                raise CatalogError(f"{name}: seeds[{i}]: {_short(problem)}")
        return listed
    if "seed_start" not in doc or "seed_count" not in doc:
        raise CatalogError(f"{name}: needs `seeds: [...]` or both `seed_start` and `seed_count`")
    start, count = _integer(name, "seed_start", doc["seed_start"]), _integer(name, "seed_count", doc["seed_count"])
    if not 1 <= count <= MAX_SWEEP_SEEDS:
        raise CatalogError(f"{name}: seed_count: {count} seeds, it must be between 1 and {MAX_SWEEP_SEEDS}")
    for field, seed in (("seed_start", start), ("seed_start + seed_count - 1", start + count - 1)):
        problem = seed_problem(seed)
        if problem:
            raise CatalogError(f"{name}: {field}: {problem}")
    return list(range(start, start + count))


def _read_sweep(path: Path, rejections: list[Rejection]) -> Sweep:
    if not os.path.lexists(path):
        raise CatalogError(f"{path}: missing; it needs `seeds: [...]` or `seed_start` + `seed_count`")
    with _open_regular(path, MAX_SWEEP_BYTES, f"a sweep has at most {MAX_SWEEP_SEEDS} seeds") as f:
        data = f.read()
    try:
        doc = yaml.load(data.decode("utf-8-sig"), Loader=_YamlLoader)
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise CatalogError(f"{path.name}: not valid YAML ({exc})") from None
    if not isinstance(doc, dict):
        raise CatalogError(f"{path.name}: must be a mapping with `seeds` or `seed_start` + `seed_count`")
    unknown = set(doc) - {"seeds", "seed_start", "seed_count", "defaults", "max_images_per_subject", "quality"}
    if unknown:
        raise CatalogError(f"{path.name}: unknown field(s) {_short(', '.join(sorted(map(str, unknown))))}")
    seeds = _sweep_seeds(path.name, doc)
    counts = Counter(seeds)
    for seed in sorted(s for s, n in counts.items() if n > 1):
        rejections.append(
            Rejection(
                "sweep",
                None,
                f"{path.name} seeds",
                "duplicate_seed",
                f"{path.name}: seed {seed} is listed {counts[seed]} times; used once",
            )
        )

    defaults = dict(DEFAULTS)
    given = doc.get("defaults") or {}
    if not isinstance(given, dict):
        raise CatalogError(f"{path.name}: defaults must be a mapping of option: value")
    for name, raw in given.items():
        if name not in OPTION_COLUMNS:
            raise CatalogError(
                f"{path.name}: defaults.{_short(str(name))} is not an option ({', '.join(OPTION_COLUMNS)})"
            )
        value, problem = _parse_option(name, raw)
        if problem:
            raise CatalogError(f"{path.name}: defaults.{name}: {_short(problem)}")
        defaults[name] = value
    max_images = _integer(path.name, "max_images_per_subject", doc.get("max_images_per_subject", MAX_IMAGES))
    if not 1 <= max_images <= MAX_IMAGES:
        raise CatalogError(f"{path.name}: max_images_per_subject must be between 1 and {MAX_IMAGES}")
    quality = _quality_thresholds(path.name, doc.get("quality"))
    return Sweep(seeds=tuple(counts), defaults=defaults, max_images_per_subject=max_images, quality=quality)


def _quality_thresholds(name: str, given: Any) -> Thresholds:
    """sweep.yaml's ``quality:`` section over :class:`quality.Thresholds`'s defaults."""
    if given is None:
        return Thresholds()
    if not isinstance(given, dict):
        raise CatalogError(f"{name}: quality must be a mapping of threshold: number")
    known = {f.name for f in dataclasses.fields(Thresholds)}
    values = {}
    for key, value in given.items():
        if key not in known:
            raise CatalogError(f"{name}: quality.{_short(str(key))} is not a threshold ({', '.join(sorted(known))})")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1e6:
            raise CatalogError(f"{name}: quality.{key} must be a non-negative number, got {_short(repr(value))}")
        values[key] = float(value)
    return Thresholds(**values)


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


def _locate(image: str, root_real: str, allow_outside: bool) -> tuple[str, bool, str | None, str]:
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
    real = os.path.realpath(path)
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
    cells = {c: _locate(c, root_real, allow_outside) for c in df.loc[keep, "image"].unique()}
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
        parsed = {v: _parse_option(col, v) for v in df[col].unique() if v != ""}
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
    images, images_name = _read_table(root, "images", ("subject_id", "image"), IMAGE_COLUMNS, rejections)
    prompts, prompts_name = _read_table(root, "prompts", ("subject_id", "prompt"), PROMPT_COLUMNS, rejections)
    sweep = _read_sweep(root / "sweep.yaml", rejections)
    subjects = set(images.loc[images["subject_id"] != "", "subject_id"])
    images = _check_image_rows(images, images_name, os.path.realpath(root), allow_outside_paths, rejections)
    prompts = _check_prompt_rows(prompts, prompts_name, subjects, sweep, rejections)
    return Catalog(root=root, images=images, prompts=prompts, sweep=sweep, rejections=rejections)


# --- images ----------------------------------------------------------------------------------


def _examine(source: str, is_url: bool, cache: img.ImageCache, strict: bool, session):
    """Worker: bytes of one source → (sha256 or None, verdict, from_cache).

    The verdict cache is consulted after hashing, so content already validated under another
    path or URL is not decoded again.
    """
    try:
        data = img.fetch_url(source, session) if is_url else img.read_local(source)
    except img.SourceError as exc:
        return None, img.refuse(exc.rule, exc.reason), False
    sha = hashlib.sha256(data).hexdigest()
    cached = cache.verdicts([sha], strict).get(sha)
    if cached is not None:
        return sha, cached, True
    verdict, sent = img.check_image_bytes(data, strict=strict, sha256=sha)
    if sent is not None:
        cache.put_bytes(sent, verdict.sent_sha256)
    return sha, verdict, False


def validate_images(
    catalog: Catalog, cache: img.ImageCache, *, strict: bool = False, http_session=None, workers: int = 2
) -> ValidatedImages:
    """Check every image of the catalog on its bytes and choose at most 7 per subject.

    Unchanged local files are recognised by (path, size, mtime, ctime, inode) and known contents
    by sha256, so a re-run decodes nothing it has seen. The rest is read, hashed and decoded in a
    small thread pool (Pillow releases the GIL while decoding). Each distinct source is examined
    once however many rows point at it.
    """
    rows = catalog.images
    sources = rows.drop_duplicates("location")[["location", "is_url"]]
    local = [s for s, u in zip(sources["location"], sources["is_url"]) if not u]
    urls = [s for s, u in zip(sources["location"], sources["is_url"]) if u]

    stats: dict[str, tuple[int, int, int, int]] = {}
    for path in local:
        try:
            stats[path] = img.file_key(os.stat(path))
        except OSError:
            pass  # read_local in the worker names the problem
    known = cache.known_files(stats)
    cached = cache.verdicts(known.values(), strict)
    results: dict[str, tuple[str | None, img.ImageVerdict]] = {
        p: (sha, cached[sha]) for p, sha in known.items() if sha in cached
    }
    hits = len(results)
    todo = [(p, False) for p in local if p not in results] + [(u, True) for u in urls]
    session = http_session
    if urls and session is None:
        import requests

        session = requests.Session()
    new_verdicts: dict[str, img.ImageVerdict] = {}
    new_files = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = [pool.submit(_examine, s, u, cache, strict, session) for s, u in todo]
        for (source, is_url), future in zip(todo, futures):
            sha, verdict, from_cache = future.result()
            results[source] = (sha, verdict)
            hits += from_cache
            if sha and not from_cache:
                new_verdicts[sha] = verdict
            if sha and not is_url and source in stats:
                new_files.append((source, stats[source], sha))
    cache.remember_verdicts(new_verdicts, strict)
    cache.remember_files(new_files)
    if session is not None and http_session is None:
        session.close()

    rejections: list[Rejection] = []
    accepted = []
    for r in rows.itertuples(index=False):
        sha, verdict = results[r.location]
        for rule, reason in verdict.problems:
            rejections.append(Rejection("image", r.subject_id, r.item, rule, f"{r.item}: {reason}"))
        if verdict.ok:
            notes = list(verdict.notes)
            claimed = _claimed_format(r.image)
            if claimed and claimed != verdict.format:
                notes.insert(0, f"extension says {claimed} but the content is {verdict.format}")
            accepted.append(
                (
                    r.subject_id,
                    r.image,
                    r.view,
                    sha,
                    verdict.sent_sha256,
                    verdict.mime_subtype,
                    verdict.width,
                    verdict.height,
                    verdict.sent_bytes,
                    "; ".join(notes),
                    r.row,
                )
            )
    items = dict(zip(rows["row"], rows["item"]))
    accepted = _choose_per_subject(accepted, catalog.sweep.max_images_per_subject, items, rejections)
    frame = pd.DataFrame(accepted, columns=list(ACCEPTED_COLUMNS))
    subjects = set(rows["subject_id"]) | {
        r.subject_id for r in catalog.rejections if r.kind == "image" and r.subject_id
    }
    for subject in sorted(subjects - set(frame["subject_id"])):
        reasons = [r for r in catalog.rejections + rejections if r.kind == "image" and r.subject_id == subject]
        summary = "; ".join(f"{r.item.split(':')[0]}: {r.rule}" for r in reasons) or "no image rows"
        rejections.append(
            Rejection(
                "subject",
                subject,
                f"subject {subject}",
                "no_valid_images",
                f"subject {subject!r} has no valid reference image ({summary})",
            )
        )
    return ValidatedImages(accepted=frame, rejections=rejections, cache_hits=hits, cache_misses=len(sources) - hits)


_EXTENSIONS = {
    ".png": "PNG",
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".jpe": "JPEG",
    ".webp": "WEBP",
    ".gif": "GIF",
    ".bmp": "BMP",
    ".tif": "TIFF",
    ".tiff": "TIFF",
    ".heic": "HEIC",
    ".svg": "SVG",
}


def _claimed_format(image: str) -> str | None:
    path = urlsplit(image).path if _SCHEME_RE.match(image) else image
    return _EXTENSIONS.get(os.path.splitext(path)[1].lower())


def _choose_per_subject(
    accepted: list[tuple], limit: int, items: dict[int, str], rejections: list[Rejection]
) -> list[tuple]:
    """Drop repeated content within a subject, then keep ``limit`` images per subject.

    The choice depends on content, not row order: by ``view`` (named views first, in
    alphabetical order), then by the original sha256. Reordering the table changes nothing.
    Rows are ACCEPTED_COLUMNS tuples; plain Python, as pandas' per-call overhead dominates here.
    """
    by_subject: dict[str, list[tuple]] = {}
    for a in accepted:
        by_subject.setdefault(a[0], []).append(a)
    kept = []
    for subject, group in by_subject.items():
        group.sort(key=lambda a: (a[2] == "", a[2], a[3], a[10]))
        first_row: dict[str, int] = {}
        chosen: list[tuple] = []
        for a in group:
            item = items[a[10]]
            if a[3] in first_row:
                rejections.append(
                    Rejection(
                        "image",
                        subject,
                        item,
                        "duplicate_image",
                        f"{item}: same content as row {first_row[a[3]]} of subject {subject!r}",
                    )
                )
            elif len(chosen) >= limit:
                rejections.append(
                    Rejection(
                        "image",
                        subject,
                        item,
                        "too_many_images",
                        f"{item}: subject {subject!r} has more than {limit} valid "
                        f"images; kept the first {limit} by view, then content hash",
                    )
                )
            else:
                first_row[a[3]] = a[10]
                chosen.append(a)
        kept += chosen
    return sorted(kept, key=lambda a: a[10])


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
