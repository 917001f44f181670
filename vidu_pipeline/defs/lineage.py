"""Stage 6: the Parquet lineage table (one row per request that reached an end) and the checks
a dataset user reads before trusting it."""

from pathlib import PurePosixPath

import pandas as pd
from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetExecutionContext,
    MaterializeResult,
    MetadataValue,
    TableColumn,
    TableSchema,
    asset,
    asset_check,
)

from .. import lineage as lineage_mod
from ..ledger import SUCCEEDED, UNKNOWN
from ..storage import StorageRoot
from .jobs import LINEAGE_AFTER_VIDEOS, WITH_ITS_ASSET
from .metadata import GROUP, md_table, relative_path
from .resources import PipelineResource
from .videos import sync_lineage, videos


def _lineage_table_schema() -> TableSchema:
    """The Parquet schema of lineage.py, as Dagster's column schema."""
    return TableSchema(
        columns=[
            TableColumn(name=f.name, type=str(f.type), description="" if f.nullable else "required")
            for f in lineage_mod.SCHEMA
        ]
    )


LINEAGE_TABLE_SCHEMA = _lineage_table_schema()


@asset(group_name=GROUP, deps=[videos], automation_condition=LINEAGE_AFTER_VIDEOS)
def lineage(context: AssetExecutionContext, pipeline: PipelineResource) -> MaterializeResult:
    """The Parquet lineage table: one row per request that reached an end (succeeded with its
    video, failed, or unknown) — enough to reproduce each video. Appends what is new, and
    compacts the small files."""
    appended = sync_lineage(pipeline, context.run_id)
    store = pipeline.lineage()
    store.compact()
    table = store.read()
    states = table["state"].value_counts().to_dict() if len(table) else {}
    return MaterializeResult(
        metadata={
            "path": MetadataValue.path(relative_path(pipeline, store.location)),
            "dagster/row_count": len(table),
            "dagster/column_schema": LINEAGE_TABLE_SCHEMA,
            "parquet_files": len(store.parts()),
            "appended": appended,
            "by_state": MetadataValue.json(states),
            "preview": md_table(
                table[["request_id", "state", "seed_effective", "video_sha256", "latency_s"]] if len(table) else table
            ),
        }
    )


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
    problems += _files_against_rows(pipeline.storage(), set(table["video_path"].dropna()) if len(table) else set())
    return AssetCheckResult(
        passed=not problems,
        metadata={
            "videos": len(with_video),
            "rows": len(table),
            "problems": MetadataValue.md("\n".join(f"- {p}" for p in problems[:100]) or "_none_"),
        },
    )


def _files_against_rows(storage: StorageRoot, recorded_paths: set[str]) -> list[str]:
    """Every video file under the storage root has a row, and every row's file is there (a
    row outside the root, e.g. a local reproduction, is looked up on the local disk)."""
    problems = []
    recorded = {storage.relative(p) or p for p in recorded_paths}
    for rel in storage.list("videos", ".mp4"):
        if rel not in recorded:
            problems.append(f"{PurePosixPath(rel).name}: file without a lineage row")
    for path in sorted(recorded_paths):
        if not storage.holds(path):
            problems.append(f"{path}: lineage row without its file")
    return problems


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
