"""Stage 5: each finished task's MP4 downloaded, verified and stored, shown in the UI with its
thumbnail and request, and the check that every requested partition has a verified video.

Partitioned like ``video_tasks`` (single-run backfill: one run per batch; a download costs
far less than a run's process start).
"""

import contextlib
import dataclasses
import functools
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetCheckSeverity,
    AssetExecutionContext,
    AssetMaterialization,
    BackfillPolicy,
    Failure,
    MetadataValue,
    asset,
    asset_check,
)

from .. import tasks
from ..generation_requests import RequestSpec
from ..ledger import FAILED, SUCCEEDED, UNKNOWN
from ..videos import CollectedVideo, collect_video, lineage_row, thumbnail_png
from .jobs import AFTER_VIDEOS_BATCH
from .metadata import GROUP, relative_path, sweep_metadata
from .partitions import REQUESTS_PARTITIONS_NAME, requests_partitions
from .requests import API_POOL, BatchConfig
from .resources import PipelineResource, ViduResource
from .tasks import video_tasks

T = TypeVar("T")
THUMBNAIL_WIDTH = 320  # px; a JPEG of ~5–15 kB inline in the event log
REFERENCE_THUMBNAIL_WIDTH = 96


@asset(
    group_name=GROUP,
    partitions_def=requests_partitions,
    backfill_policy=BackfillPolicy.single_run(),
    deps=[video_tasks],
    output_required=False,
    pool=API_POOL,
)
def videos(context: AssetExecutionContext, config: BatchConfig, pipeline: PipelineResource, vidu: ViduResource):
    """Download each finished task's MP4, verify it decodes end to end, probe it, check it
    against its request, and store it at <data_dir>/videos/<request_id>.mp4. Partitions whose
    task has not succeeded are skipped (logged), not failed."""
    ledger = pipeline.ledger()
    broken: list[str] = []
    collected: list[str] = []
    collector = tasks.owner_id(context.run_id)  # who downloads: one worker per video
    with (
        vidu.get_client(pipeline.simulator_state_dir) as (client, endpoint),
        contextlib.closing(pipeline.image_cache()) as images,  # one per run: it opens its index
        ThreadPoolExecutor(pipeline.video_workers, thread_name_prefix="vidu-videos") as pool,
    ):

        def collect(key: str) -> CollectedVideo:
            return collect_video(
                ledger,
                client,
                key,
                videos_dir=pipeline.videos_dir,
                render_scale=endpoint.render_scale,
                run_id=context.run_id,
                reference_bytes=images.get_bytes,
            )

        claimed = _claimed(context, config.select(context.partition_keys), ledger, collector)
        for key, video in in_order(pool, collect, claimed, ahead=2 * pipeline.video_workers):
            if isinstance(video, Exception):  # one bad video must not cost the batch its other videos
                ledger.release_video_claim(key, collector=collector)
                broken.append(f"{key}: {type(video).__name__}: {video}")
                context.log.error(f"{key}: {video}")
                continue
            collected.append(key)
            stored = ledger.get(key)
            assert stored is not None and stored.video_sha256, f"{key}: collected but not in the ledger"
            yield AssetMaterialization(
                asset_key=context.asset_key,
                partition=key,
                metadata={**_video_metadata(pipeline, stored, video), **_quality_metadata(video)},
                tags={"dagster/data_version": stored.video_sha256},
            )
    if collected:
        sync_lineage(pipeline, context.run_id)
    if broken:
        raise Failure(
            description=f"{len(broken)} video(s) could not be collected; they will be retried",
            metadata={"errors": MetadataValue.md("\n".join(f"- {b}" for b in broken))},
        )


def _claimed(context: AssetExecutionContext, keys, ledger, collector: str) -> Iterator[str]:
    """The partitions this run downloads, each claimed only when the pool has room for it;
    none after Ctrl-C / SIGTERM (the videos in flight still finish and are recorded)."""
    for key in keys:
        if tasks.STOP.is_set():  # the rest are collected by the next run
            context.log.warning(f"stopping: {key} and the partitions after it are left for the next run")
            return
        skip = _why_not_here(ledger, key, collector)
        if skip:
            context.log.info(f"{key}: {skip}")
            continue
        yield key


def in_order(
    pool: Executor, work: Callable[[str], T], keys: Iterable[str], ahead: int
) -> Iterator[tuple[str, T | Exception]]:
    """``work(key)`` for each key on ``pool``, at most ``ahead`` at once (keys are drawn only as
    room frees up), yielding ``(key, result or the exception it raised)`` in key order."""
    window: deque[tuple[str, Future]] = deque()

    def oldest() -> tuple[str, T | Exception]:
        key, future = window.popleft()
        try:
            return key, future.result()
        except Exception as exc:
            return key, exc

    for key in keys:
        window.append((key, pool.submit(work, key)))
        if len(window) >= ahead:
            yield oldest()
    while window:
        yield oldest()


def _why_not_here(ledger, key: str, collector: str) -> str | None:
    """Why this run does not download ``key`` (not finished, already stored, another worker
    holds its claim), or None once the download is claimed for this run."""
    row = ledger.get(key)
    if row is None or row.state != "succeeded":
        return f"task is {row.state if row else 'not planned'}; nothing to download yet"
    if row.video_sha256:
        return f"video already stored at {row.video_path}"
    held = ledger.claim_video(key, task_id=row.task_id or "", collector=collector, collector_alive=tasks.owner_alive)
    return f"not downloaded here: {held}" if held else None


def _quality_metadata(video: CollectedVideo) -> dict:
    """The clip's quality figures: all of them as JSON, and each number on its own (plottable)."""
    figures = video.quality.to_dict() if video.quality else {}
    numbers = {
        f"quality/{name}": value
        for name, value in figures.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool)
    }
    return {"quality": MetadataValue.json(figures), **numbers}


def _thumbnail_uri(pipeline: PipelineResource, video: CollectedVideo) -> str:
    """The video's frame at 1 s as <data_dir>/thumbnails/<key>.png (the contact sheet reuses
    it), returned as a small inline JPEG for the UI."""
    from ..mp4 import jpeg_data_uri

    if video.frame is None:
        return ""
    out = pipeline.root / "thumbnails" / f"{video.request_id}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(thumbnail_png(video.frame))
    return jpeg_data_uri(video.frame, width=THUMBNAIL_WIDTH)


def sync_lineage(pipeline: PipelineResource, run_id: str | None) -> int:
    """Append one lineage row per ledger row whose current outcome the table lacks."""
    ledger = pipeline.ledger()
    rows = ledger.needing_lineage()
    if not rows:
        return 0
    pipeline.lineage().append([lineage_row(r, run_id) for r in rows])
    ledger.mark_lineage(rows)
    return len(rows)


def _video_metadata(pipeline: PipelineResource, row, video: CollectedVideo) -> dict:
    """One videos partition as the UI shows it: the clip's frame inline, what was asked
    (prompt, options, seed, subject, reference images), what came back and when."""
    spec = RequestSpec.from_json(row.spec_json)
    thumbnail_uri = _thumbnail_uri(pipeline, video)
    metadata = {
        "thumbnail": MetadataValue.md(f"![{row.request_id}]({thumbnail_uri})"),
        "path": MetadataValue.path(relative_path(pipeline, video.path)),
        "prompt": MetadataValue.text(spec.prompt),
        "options": MetadataValue.json(spec.options),
        **sweep_metadata(row),  # subject_id, seed (as requested)
        "seed_effective": row.effective_seed if row.effective_seed is not None else -1,
        "references": MetadataValue.md(_reference_markdown(pipeline, spec)),
        "task_id": row.task_id or "",
        "sha256": row.video_sha256,
        "bytes": row.video_bytes,
        "probe": MetadataValue.json(dataclasses.asdict(video.probe)),
        "problems": MetadataValue.text("; ".join(video.problems) or "none"),
    }
    if row.submitted_at:
        metadata["submitted_at"] = MetadataValue.timestamp(row.submitted_at)
    if row.finished_at:
        metadata["finished_at"] = MetadataValue.timestamp(row.finished_at)
    if row.submitted_at and row.finished_at:
        metadata["latency_s"] = MetadataValue.float(round(row.finished_at - row.submitted_at, 2))
    return metadata


def _reference_markdown(pipeline: PipelineResource, spec) -> str:
    """The reference images sent, as small inline JPEGs."""
    cells = []
    for sha in spec.image_sha256s:
        try:
            cells.append(f"![{sha[:12]}]({_reference_thumbnail_uri(pipeline, sha)})")
        except (KeyError, OSError) as exc:
            cells.append(f"`{sha[:12]}…` ({exc})")
    return " ".join(cells) or "_none_"


def _reference_thumbnail_uri(pipeline: PipelineResource, sha: str) -> str:
    """A reference image's small JPEG as a data URI, made once per image and kept under
    <data_dir>/thumbnails/references/ (a subject's images recur in every one of its videos)."""
    import base64
    import io

    from PIL import Image

    from ..mp4 import jpeg_data_uri

    path = pipeline.root / "thumbnails" / "references" / f"{sha[:16]}-{REFERENCE_THUMBNAIL_WIDTH}.jpg"
    if not path.exists():
        with Image.open(io.BytesIO(pipeline.image_cache().get_bytes(sha))) as im:
            uri = jpeg_data_uri(im, width=REFERENCE_THUMBNAIL_WIDTH, quality=70)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(base64.b64decode(uri.split(",", 1)[1]))
        tmp.replace(path)  # readers never see half a file
        return uri
    return _kept_jpeg_uri(str(path))


@functools.lru_cache(maxsize=256)
def _kept_jpeg_uri(path: str) -> str:
    """A kept reference thumbnail as a data URI, read once: its name holds the image's hash."""
    import base64

    return "data:image/jpeg;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


@asset_check(
    asset=videos,
    automation_condition=AFTER_VIDEOS_BATCH,
    description="Every requested partition has a verified video: its request succeeded and its MP4 "
    "decoded end to end and matches the request. Warns while some are still in flight; fails (error) "
    "when one failed, is unknown, or does not match.",
)
def videos_verified(context: AssetCheckExecutionContext, pipeline: PipelineResource) -> AssetCheckResult:
    requested = set(context.instance.get_dynamic_partitions(REQUESTS_PARTITIONS_NAME))
    ledger_rows = {r.request_id: r for r in pipeline.ledger().rows()}
    verified, pending, bad = [], [], []
    for key in sorted(requested):
        problem = _video_problem(ledger_rows.get(key), pipeline)
        if problem is None:
            verified.append(key)
        elif problem.startswith("pending"):
            pending.append(f"{key}: {problem}")
        else:
            bad.append(f"{key}: {problem}")
    missing = bad + pending
    return AssetCheckResult(
        passed=not missing,
        severity=AssetCheckSeverity.ERROR if bad else AssetCheckSeverity.WARN,
        description=f"{len(verified)} of {len(requested)} requested videos verified",
        metadata={
            "requested": len(requested),
            "verified": len(verified),
            "pending": len(pending),
            "failed_or_mismatched": len(bad),
            "missing": MetadataValue.md("\n".join(f"- {m}" for m in missing[:100]) or "_none_"),
        },
    )


def _video_problem(row, pipeline: PipelineResource) -> str | None:
    """Why a request has no verified video (None when it has one); "pending …" while it may
    still get one."""
    if row is None:
        return "not in the ledger"
    if row.state in (FAILED, UNKNOWN):
        return f"{row.state}: {row.last_error or 'no reason recorded'}"
    if row.state != SUCCEEDED:
        return f"pending ({row.state})"
    if not row.video_sha256:
        if row.video_attempts >= pipeline.video_attempts:
            return f"no verified video after {row.video_attempts} attempts ({row.last_error})"
        return "pending (succeeded, video not downloaded yet)"
    problems = (row.probe or {}).get("problems")
    if problems:
        return "mismatched: " + "; ".join(problems)
    if not row.video_path or not pipeline.storage().holds(row.video_path):
        return f"video file missing: {row.video_path}"
    return None
