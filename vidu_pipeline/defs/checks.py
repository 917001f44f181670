"""Asset checks: what a dataset user must know before trusting the output."""

import os
from typing import Any

import pandas as pd
from dagster import AssetCheckExecutionContext, AssetCheckResult, AssetCheckSeverity, MetadataValue, asset_check

from .. import catalog as catalog_mod
from ..ledger import FAILED, SUCCEEDED, UNKNOWN
from .assets import lineage, reference_images, videos
from .jobs import AFTER_VIDEOS_BATCH, WITH_ITS_ASSET
from .partitions import REQUESTS_PARTITIONS_NAME
from .resources import PipelineResource


@asset_check(
    asset=reference_images, description="Warns when images are rejected; fails when no subject has a valid image."
)
def images_accepted(reference_images: catalog_mod.ValidatedImages) -> AssetCheckResult:
    rejected = [r for r in reference_images.rejections if r.kind in ("image", "subject")]
    accepted = len(reference_images.accepted)
    metadata: dict[str, Any] = {
        "accepted": accepted,
        "rejected": len(rejected),
        "reasons": MetadataValue.md("\n".join(f"- {r.item}: {r.rule} — {r.detail}" for r in rejected[:50]) or "_none_"),
    }
    if accepted == 0:
        return AssetCheckResult(
            passed=False,
            severity=AssetCheckSeverity.ERROR,
            metadata=metadata,
            description="no valid reference image: nothing can be generated",
        )
    return AssetCheckResult(passed=not rejected, severity=AssetCheckSeverity.WARN, metadata=metadata)


@asset_check(
    asset=lineage,
    automation_condition=WITH_ITS_ASSET,
    description="Every stored video has exactly one lineage row and one file, and every file a row.",
)
def lineage_complete(pipeline: PipelineResource) -> AssetCheckResult:
    table = pipeline.lineage().read()
    with_video = [r for r in pipeline.ledger().rows(states=[SUCCEEDED]) if r.video_sha256]
    problems: list[str] = []
    by_id = table.set_index("request_id") if len(table) else pd.DataFrame()
    for row in with_video:
        if row.request_id not in by_id.index:
            problems.append(f"{row.request_id}: no lineage row")
            continue
        rec = by_id.loc[row.request_id]
        if rec["video_sha256"] != row.video_sha256:
            problems.append(f"{row.request_id}: lineage sha256 differs from the ledger")
    if len(table):
        dupes = table["video_path"].dropna().duplicated()
        problems += [f"{p}: in more than one lineage row" for p in table["video_path"].dropna()[dupes]]
    recorded_paths = set(table["video_path"].dropna()) if len(table) else set()
    for path in sorted(pipeline.videos_dir.glob("*.mp4")) if pipeline.videos_dir.exists() else []:
        if str(path) not in recorded_paths:
            problems.append(f"{path.name}: file without a lineage row")
    for path in recorded_paths:
        if not pd.isna(path) and not os.path.exists(path):
            problems.append(f"{path}: lineage row without its file")
    return AssetCheckResult(
        passed=not problems,
        metadata={
            "videos": len(with_video),
            "rows": len(table),
            "problems": MetadataValue.md("\n".join(f"- {p}" for p in problems[:100]) or "_none_"),
        },
    )


@asset_check(
    asset=lineage,
    automation_condition=WITH_ITS_ASSET,
    description="Stored videos match their requests (size, 5 s, audio iff bgm) and none failed verification for good.",
)
def videos_match_requests(pipeline: PipelineResource) -> AssetCheckResult:
    problems: list[str] = []
    for row in pipeline.ledger().rows(states=[SUCCEEDED]):
        probe = row.probe or {}
        if probe.get("problems"):
            problems.append(f"{row.request_id}: {'; '.join(probe['problems'])}")
        elif not row.video_sha256 and row.video_attempts >= pipeline.video_attempts:
            problems.append(
                f"{row.request_id}: no verified video after {row.video_attempts} attempts ({row.last_error})"
            )
    return AssetCheckResult(
        passed=not problems,
        metadata={"problems": MetadataValue.md("\n".join(f"- {p}" for p in problems[:100]) or "_none_")},
    )


@asset_check(
    asset=lineage,
    automation_condition=WITH_ITS_ASSET,
    description="Lists requests whose outcome is unknown (a paid task may exist); they are never resubmitted automatically.",
)
def no_unknown_tasks(pipeline: PipelineResource) -> AssetCheckResult:
    unknown = pipeline.ledger().rows(states=[UNKNOWN])
    return AssetCheckResult(
        passed=not unknown,
        severity=AssetCheckSeverity.WARN,
        metadata={
            "unknown": len(unknown),
            "requests": MetadataValue.md(
                "\n".join(f"- {r.request_id} (task {r.task_id or '?'}): {r.last_error}" for r in unknown[:100])
                or "_none_"
            ),
        },
    )


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
    if not row.video_path or not os.path.exists(row.video_path):
        return f"video file missing: {row.video_path}"
    return None


ALL_CHECKS = [images_accepted, lineage_complete, videos_match_requests, no_unknown_tasks, videos_verified]
