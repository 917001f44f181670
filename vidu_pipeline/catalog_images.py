"""Checking the catalog's images on their bytes (in a small thread pool, with the verdict cache)
and choosing at most ``max_images_per_subject`` per subject.

Split out of :mod:`vidu_pipeline.catalog`, which re-exports it.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import pandas as pd

from . import images as img
from .catalog_model import _SCHEME_RE, ACCEPTED_COLUMNS, Catalog, Rejection, ValidatedImages

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
    results, hits = _examine_sources(sources, cache, strict, http_session, workers)
    rejections: list[Rejection] = []
    accepted = _accepted_rows(rows, results, rejections)
    items = dict(zip(rows["row"], rows["item"]))
    accepted = _choose_per_subject(accepted, catalog.sweep.max_images_per_subject, items, rejections)
    frame = pd.DataFrame(accepted, columns=list(ACCEPTED_COLUMNS))
    rejections += _subjects_without_images(catalog, rejections, set(frame["subject_id"]))
    return ValidatedImages(accepted=frame, rejections=rejections, cache_hits=hits, cache_misses=len(sources) - hits)


def _examine_sources(
    sources: pd.DataFrame, cache: img.ImageCache, strict: bool, http_session, workers: int
) -> tuple[dict[str, tuple[str | None, img.ImageVerdict]], int]:
    """Source → (sha256, verdict) for every distinct source, and how many came from the cache."""
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
        session = img.url_session()
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
    return results, hits


def _accepted_rows(rows: pd.DataFrame, results, rejections: list[Rejection]) -> list[tuple]:
    """The rows whose image passed (in ACCEPTED_COLUMNS order); each problem of the others is
    appended to ``rejections``."""
    accepted = []
    for r in rows.itertuples(index=False):
        sha, verdict = results[r.location]
        for rule, reason in verdict.problems:
            rejections.append(Rejection("image", r.subject_id, r.item, rule, f"{r.item}: {reason}"))
        if not verdict.ok:
            continue
        notes = list(verdict.notes)
        claimed = _claimed_format(r.image)
        if claimed and claimed != verdict.format:
            notes.insert(0, f"extension says {claimed} but the content is {verdict.format}")
        accepted.append(
            (r.subject_id, r.image, r.view, sha, verdict.sent_sha256, verdict.mime_subtype, verdict.width,
             verdict.height, verdict.sent_bytes, "; ".join(notes), r.row)
        )  # fmt: skip
    return accepted


def _subjects_without_images(catalog: Catalog, rejections: list[Rejection], kept: set[str]) -> list[Rejection]:
    """One rejection per subject left with no valid image, summing up why."""
    subjects = set(catalog.images["subject_id"]) | {
        r.subject_id for r in catalog.rejections if r.kind == "image" and r.subject_id
    }
    out = []
    for subject in sorted(subjects - kept):
        reasons = [r for r in catalog.rejections + rejections if r.kind == "image" and r.subject_id == subject]
        summary = "; ".join(f"{r.item.split(':')[0]}: {r.rule}" for r in reasons) or "no image rows"
        out.append(
            Rejection(
                "subject",
                subject,
                f"subject {subject}",
                "no_valid_images",
                f"subject {subject!r} has no valid reference image ({summary})",
            )
        )
    return out


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
