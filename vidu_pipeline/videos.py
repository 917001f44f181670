"""Finished task → verified video on disk → ledger → lineage row.

A video is only recorded once it decodes end to end; a file that decodes but does not match
its request (size, duration, audio) is kept and recorded with its problems, so the asset check
fails loudly instead of the dataset silently holding a wrong clip.
"""

from __future__ import annotations

import atexit
import dataclasses
import io
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image

from .api import errors
from .api.client import ViduClient
from .generation_requests import PIPELINE_VERSION, RequestSpec
from .ledger import Ledger, TaskRow
from .mp4 import FrameAt, VideoInvalid, VideoProbe, check_against_request, probe_video
from .quality import FrameSampler, Thresholds, VideoQuality, measure
from .storage import StorageError, StorageRoot, is_url

log = logging.getLogger(__name__)
THUMBNAIL_AT_S = 1.0  # the moment a video's thumbnail (and contact-sheet cell) shows


@dataclasses.dataclass(frozen=True)
class CollectedVideo:
    request_id: str
    path: Path | str  # where it is stored: a local file, or its URL on an object store
    probe: VideoProbe
    problems: tuple[str, ...]
    quality: VideoQuality | None = None  # None when the frames could not be measured
    frame: Image.Image | None = None  # the frame at THUMBNAIL_AT_S, from the verification decode


def video_path(videos_dir: Path, request_id: str) -> Path:
    return Path(videos_dir) / f"{request_id}.mp4"


def scratch_file(request_id: str) -> Path:
    """Where a video bound for an object store is downloaded and verified, on local disk (removed
    once uploaded; the folder goes at exit)."""
    folder = Path(tempfile.gettempdir()) / f"vidu-pipeline-scratch-{os.getpid()}"
    if not folder.exists():
        folder.mkdir(parents=True, exist_ok=True)
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder / f"{request_id}.{threading.get_ident()}.mp4"


def store_remote(local: Path, videos_dir: str, request_id: str, frame: Image.Image | None) -> str:
    """PUT the verified video (one finished file: the object appears whole or not at all) and
    the thumbnail of ``frame`` (``thumbnails/`` beside ``videos/``); returns the video's URL."""
    videos = StorageRoot(videos_dir)
    try:
        url = videos.put_file(local, f"{request_id}.mp4")
    except Exception as exc:  # the store's errors (s3fs/botocore) are not all OSErrors
        raise StorageError(
            f"could not store the video of {request_id} in {videos_dir}: {exc}; "
            "the task stays succeeded and is downloaded again on the next run"
        ) from None
    if frame is None:
        return url
    try:
        StorageRoot(videos_dir.rsplit("/", 1)[0]).write_bytes(f"thumbnails/{request_id}.png", thumbnail_png(frame))
    except OSError as exc:  # the video is stored; a thumbnail is a convenience
        log.warning("%s: no thumbnail stored: %s", request_id, exc)
    return url


def thumbnail_png(frame) -> bytes:
    """A video's thumbnail: ``frame`` (the one at 1 s), longest side 320 px, as PNG — the file
    the contact sheet reuses, stored beside the videos."""
    small = frame.copy()
    small.thumbnail((320, 320))
    out = io.BytesIO()
    small.save(out, format="PNG")
    return out.getvalue()


def collect_video(
    ledger: Ledger,
    client: ViduClient,
    request_id: str,
    *,
    videos_dir: Path | str,
    render_scale: float = 1.0,
    run_id: str | None = None,
    reference_bytes: Callable[[str], bytes] | None = None,
    thresholds: Thresholds | None = None,
) -> CollectedVideo:
    """Download, verify and probe one succeeded task's video; record it in the ledger.

    The quality figures are measured on the frames of the verification decode (no second
    decode), against the request's reference images as ``reference_bytes(sha256)`` gives them
    (e.g. ``ImageCache.get_bytes``); they are stored with the probe under ``"quality"``.

    Raises :class:`VideoInvalid` or a :class:`~vidu_pipeline.api.errors.ViduError` when no good
    file could be had (recorded as a video error; the next attempt downloads again).
    """
    row = ledger.get(request_id)
    if row is None or row.state != "succeeded" or not row.task_id:
        raise ValueError(f"{request_id}: no succeeded task to collect (state {row.state if row else 'absent'})")
    spec = RequestSpec.from_json(row.spec_json)
    remote = is_url(videos_dir) and not str(videos_dir).startswith("file://")
    final = (
        scratch_file(request_id) if remote else video_path(Path(str(videos_dir).removeprefix("file://")), request_id)
    )
    staging = final.with_name(f".{final.name}.{os.getpid()}.download")
    download, probe, sampler, still = _download_and_decode(ledger, client, row, staging, videos_dir)
    problems = tuple(
        check_against_request(
            probe,
            aspect_ratio=spec.options["aspect_ratio"],
            bgm=spec.options["bgm"],
            render_scale=render_scale,
            duration_s=spec.options["duration"],
        )
    )
    quality = _measure(request_id, sampler, _references(spec, reference_bytes), thresholds)
    frame = still.image()
    staging.replace(final)
    if remote:
        try:
            stored = store_remote(final, str(videos_dir), request_id, frame)
        finally:
            final.unlink(missing_ok=True)
    else:
        stored = str(final)
    ledger.record_video(
        request_id,
        task_id=row.task_id,
        path=stored,
        sha256=download.sha256,
        size_bytes=download.size_bytes,
        probe={
            **dataclasses.asdict(probe),
            "problems": list(problems),
            "dagster_run_id": run_id,
            "quality": quality.to_dict() if quality else None,
        },
    )
    if problems:
        log.error("%s: video does not match its request: %s", request_id, "; ".join(problems))
    return CollectedVideo(request_id, stored if remote else final, probe, problems, quality, frame)


def _download_and_decode(ledger: Ledger, client: ViduClient, row, staging: Path, videos_dir: Path | str):
    """The task's video downloaded to ``staging`` and decoded end to end (the quality sampler
    and the thumbnail's frame riding on that decode). A bad video is recorded as a video error and raised; a local write
    failure is a StorageError (the task stays succeeded and is downloaded again next run)."""
    try:
        download = client.download(row.task_id, staging)
        sampler, still = FrameSampler(), FrameAt(THUMBNAIL_AT_S)

        def on_frame(frame) -> None:
            sampler.offer(frame)
            still.offer(frame)

        probe = probe_video(staging, on_frame=on_frame)
    except (VideoInvalid, errors.ViduError) as exc:
        staging.unlink(missing_ok=True)
        ledger.record_video_error(row.request_id, f"{type(exc).__name__}: {exc}", task_id=row.task_id)
        raise
    except OSError as exc:  # our side: disk full, folder not writable — not the video's fault
        staging.unlink(missing_ok=True)
        raise StorageError(
            f"could not store the video of {row.request_id} in {videos_dir}: {exc.strerror or exc}; "
            "the task stays succeeded and is downloaded again on the next run"
        ) from None
    return download, probe, sampler, still


def _references(spec: RequestSpec, reference_bytes: Callable[[str], bytes] | None) -> list[bytes]:
    """The request's reference images; [] (no similarity figure) when any one is missing."""
    if reference_bytes is None:
        return []
    try:
        return [reference_bytes(sha) for sha in spec.image_sha256s]
    except (KeyError, OSError) as exc:
        log.warning("%s: reference images unavailable, no similarity figure: %s", spec.request_id, exc)
        return []


def _measure(
    request_id: str, sampler: FrameSampler, references: list[bytes], thresholds: Thresholds | None
) -> VideoQuality | None:
    """The quality figures; None (logged) rather than losing a verified video to a bad reference."""
    try:
        return measure(sampler, references, thresholds)
    except ValueError as exc:
        log.warning("%s: quality not measured: %s", request_id, exc)
        return None


# The lineage columns taken from the probe's "quality" (quality.VideoQuality.to_dict()).
QUALITY_COLUMNS = ("motion", "still_share", "frozen", "blank_share", "blank", "phash", "reference_similarity")


def lineage_row(row: TaskRow, run_id: str | None = None) -> dict[str, Any]:
    """The lineage record of one terminal ledger row: enough to reproduce the video."""
    spec = RequestSpec.from_json(row.spec_json)
    probe = json.loads(row.probe_json) if row.probe_json else {}
    problems = probe.get("problems") or []
    quality = probe.get("quality") or {}
    reason = row.last_error if row.state != "succeeded" else "; ".join(problems) or None
    submitted = _ts(row.submitted_at)
    finished = _ts(row.finished_at)
    return {
        "request_id": row.request_id,
        "subject_id": spec.subject_id,
        "prompt": spec.prompt,
        "aspect_ratio": spec.options["aspect_ratio"],
        "movement_amplitude": spec.options["movement_amplitude"],
        "bgm": bool(spec.options["bgm"]),
        "duration": int(spec.options["duration"]),
        "resolution": spec.options["resolution"],
        "seed_requested": spec.seed,
        "seed_effective": row.effective_seed,
        "reference_sha256s": list(spec.image_sha256s),
        "reference_original_sha256s": list(spec.original_sha256s),
        "task_id": row.task_id,
        "attempts": row.attempts,
        "state": row.state,
        "reason": reason,
        "submitted_at": submitted,
        "finished_at": finished,
        "latency_s": (row.finished_at - row.submitted_at) if row.finished_at and row.submitted_at else None,
        "video_path": row.video_path,
        "video_sha256": row.video_sha256,
        "video_bytes": row.video_bytes,
        "width": probe.get("width"),
        "height": probe.get("height"),
        "fps": probe.get("fps"),
        "frames": probe.get("frames"),
        "duration_s": probe.get("duration_s"),
        "has_audio": probe.get("has_audio"),
        **{name: quality.get(name) for name in QUALITY_COLUMNS},
        "dagster_run_id": probe.get("dagster_run_id") or run_id,
        "pipeline_version": PIPELINE_VERSION,
        "recorded_at": pd.Timestamp(time.time(), unit="s", tz="UTC"),
    }


def _ts(epoch: float | None):
    return pd.Timestamp(epoch, unit="s", tz="UTC") if epoch else None
