"""What several stages show in the UI the same way: tables, paths and sweep coordinates."""

import pandas as pd
from dagster import MetadataValue, TableColumn, TableSchema

from .resources import PipelineResource

GROUP = "vidu"


def md_table(df: pd.DataFrame, rows: int = 20) -> MetadataValue:
    """The first rows of a frame as a Markdown table (the UI renders it)."""
    return MetadataValue.md(df.head(rows).to_markdown(index=False) if len(df) else "_none_")


def table_metadata(frame: pd.DataFrame) -> dict:
    """Dagster's standard row count and column schema for a tabular asset (the UI shows both)."""
    return {
        "dagster/row_count": len(frame),
        "dagster/column_schema": TableSchema(columns=[TableColumn(str(c), str(t)) for c, t in frame.dtypes.items()]),
    }


def relative_path(pipeline: PipelineResource, path) -> str:
    """A path as the UI should show it: relative to the data dir (absolute if outside it)."""
    from pathlib import Path

    try:
        return str(Path(path).resolve().relative_to(pipeline.root))
    except ValueError:
        return str(path)


def sweep_metadata(row) -> dict:
    """What a user filters a sweep by in the UI."""
    return {"subject_id": row.subject_id, "seed": row.seed if row.seed is not None else -1}
