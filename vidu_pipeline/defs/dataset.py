"""The exported dataset and its quality gates.

``dataset_export`` writes the current dataset (see :mod:`vidu_pipeline.export`) under
``<data_dir>/export`` after each lineage update. The gates are asset checks on it, with the
thresholds of sweep.yaml's ``quality:`` section (``quality.Thresholds`` by default); a failing
gate lists every failing clip by request id with its figures. Clips collected before quality
figures existed have none and are not judged.
"""

from collections.abc import Callable

import pandas as pd
from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetCheckSpec,
    AssetExecutionContext,
    AutomationCondition,
    MaterializeResult,
    MetadataValue,
    asset,
    multi_asset_check,
)

from .. import export as export_mod
from .. import quality
from ..regeneration import near_duplicate_pairs
from .jobs import WITH_ITS_ASSET
from .lineage import lineage
from .metadata import GROUP
from .resources import PipelineResource

MIN_CLIPS_PER_AMPLITUDE = 1  # clips each of `small` and `large` a subject needs for the amplitude gate
FIGURES = ["request_id", "subject_id", "movement_amplitude", "seed_requested", "motion", "still_share"]
FIGURES += ["blank_share", "reference_similarity"]


def thresholds_for(pipeline: PipelineResource) -> quality.Thresholds:
    """sweep.yaml's thresholds (``quality:``); the defaults when there is no catalog folder."""
    return export_mod.thresholds_for(pipeline.catalog_path)


@asset(group_name=GROUP, deps=[lineage], automation_condition=AutomationCondition.eager())
def dataset_export(context: AssetExecutionContext, pipeline: PipelineResource) -> MaterializeResult:
    """The current dataset as a videofolder, WebDataset shards and a dataset card under
    <data_dir>/export (incremental: unchanged files are not rewritten)."""
    summary = export_mod.export(
        pipeline.lineage(),
        pipeline.root / "export",
        thresholds=thresholds_for(pipeline),
        catalog_dir=pipeline.catalog_path,
    )
    for request_id in summary.missing:
        context.log.warning(f"{request_id}: its video file is missing from the data dir; not exported")
    return MaterializeResult(
        metadata={
            "path": MetadataValue.path(str(summary.out_dir)),
            "dagster/row_count": summary.samples,
            "shards": len(summary.shards),
            "videos_written": summary.videos_written,
            "shards_written": summary.shards_written,
            "missing_videos": len(summary.missing),
        }
    )


def _measured(pipeline: PipelineResource) -> pd.DataFrame:
    """The current dataset's clips that carry quality figures."""
    table = export_mod.current_dataset(pipeline.lineage())
    return table[table["motion"].notna()].reset_index(drop=True) if len(table) else table


def _result(failing: pd.DataFrame, checked: int, notes: list[str] | None = None) -> AssetCheckResult:
    """Pass/fail with every failing clip by request id and its figures."""
    ids = sorted(failing["request_id"]) if len(failing) else []
    table = failing[[c for c in FIGURES if c in failing.columns]].sort_values("request_id") if len(failing) else None
    return AssetCheckResult(
        passed=not ids,
        metadata={
            "clips_checked": checked,
            "failing_request_ids": MetadataValue.json(ids),
            "failing": MetadataValue.md(table.to_markdown(index=False) if table is not None else "_none_"),
            "notes": MetadataValue.md("\n".join(f"- {n}" for n in notes or []) or "_none_"),
        },
    )


def _per_clip_gate(flag: str) -> Callable[[pd.DataFrame, quality.Thresholds], AssetCheckResult]:
    def gate(table: pd.DataFrame, limits: quality.Thresholds) -> AssetCheckResult:
        if not len(table):
            return _result(table, 0)
        failing = table.apply(lambda row: flag in quality.quality_flags(row, limits), axis=1).astype(bool)
        return _result(table[failing], len(table))

    return gate


def motion_follows_amplitude(table: pd.DataFrame, limits: quality.Thresholds) -> AssetCheckResult:
    failing, notes = [], []
    for subject, group in table.groupby("subject_id") if len(table) else []:
        sides = {a: group.loc[group["movement_amplitude"] == a, "motion"].tolist() for a in ("small", "large")}
        if min(len(sides["small"]), len(sides["large"])) < MIN_CLIPS_PER_AMPLITUDE:
            continue
        problem = quality.amplitude_problem(sides, limits)
        if problem:
            notes.append(f"{subject}: {problem}")
            failing.append(group[group["movement_amplitude"].isin(["small", "large"])])
    return _result(pd.concat(failing) if failing else table.iloc[0:0], len(table), notes)


def seeds_not_near_duplicates(table: pd.DataFrame, limits: quality.Thresholds) -> AssetCheckResult:
    ids: set[str] = set()
    notes: list[str] = []
    for a, b, distance in near_duplicate_pairs(table, limits):
        ids.update((a, b))
        notes.append(f"{a} and {b}: {distance:.1f} bits apart (at least {limits.duplicate_bits})")
    failing = table[table["request_id"].isin(ids)] if len(table) else table
    return _result(failing, len(table), notes)


# name: (gate, description). One step judges them all on one read of the table.
GATES: dict[str, tuple[Callable[[pd.DataFrame, quality.Thresholds], AssetCheckResult], str]] = {
    "no_frozen_clips": (_per_clip_gate("frozen"), "No clip holds one picture still (sweep.yaml quality)."),
    "no_blank_clips": (_per_clip_gate("blank"), "No clip is black or one flat colour."),
    "clips_like_references": (
        _per_clip_gate("unlike references"),
        "Every clip's frames are similar enough to its reference images.",
    ),
    "motion_follows_amplitude": (
        motion_follows_amplitude,
        "Per subject, `large` clips move clearly more than `small` ones (sweep.yaml quality.amplitude_ratio).",
    ),
    "seeds_not_near_duplicates": (
        seeds_not_near_duplicates,
        "Clips of one prompt under different seeds are not near-duplicates (sweep.yaml quality.duplicate_bits).",
    ),
}


@multi_asset_check(
    specs=[
        AssetCheckSpec(name, asset=dataset_export, description=description, automation_condition=WITH_ITS_ASSET)
        for name, (_, description) in GATES.items()
    ],
    can_subset=True,
)
def dataset_quality_gates(context: AssetCheckExecutionContext, pipeline: PipelineResource):
    """The quality gates over the exported dataset's clips (those that carry quality figures)."""
    table, limits = _measured(pipeline), thresholds_for(pipeline)
    for key in context.selected_asset_check_keys:
        gate, _ = GATES[key.name]
        result = gate(table, limits)
        yield AssetCheckResult(
            asset_key=key.asset_key, check_name=key.name, passed=result.passed, metadata=result.metadata
        )


DATASET_ASSETS = [dataset_export]
DATASET_CHECKS = [dataset_quality_gates]
