"""Stage 1–2: the catalog folder parsed, its images validated, and everything refused before
any money is spent (with the check that says whether anything can be generated at all)."""

from typing import Any

import pandas as pd
from dagster import AssetCheckResult, AssetCheckSeverity, AssetExecutionContext, MetadataValue, asset, asset_check

from .. import catalog as catalog_mod
from .metadata import GROUP, md_table, table_metadata
from .resources import PipelineResource


@asset(group_name=GROUP)
def catalog(context: AssetExecutionContext, pipeline: PipelineResource) -> catalog_mod.Catalog:
    """The parsed catalog folder: images.csv, prompts.csv and sweep.yaml."""
    cat = catalog_mod.load_catalog(pipeline.catalog_path, allow_outside_paths=pipeline.allow_outside_paths)
    context.add_output_metadata(
        {
            "catalog_dir": MetadataValue.path(str(cat.root)),
            "subjects": int(cat.images["subject_id"].nunique()) if len(cat.images) else 0,
            "image_rows": len(cat.images),
            "prompt_rows": len(cat.prompts),
            "seeds": MetadataValue.text(", ".join(map(str, cat.sweep.seeds))),
            "row_rejections": len(cat.rejections),
        }
    )
    return cat


@asset(group_name=GROUP)
def reference_images(
    context: AssetExecutionContext, catalog: catalog_mod.Catalog, pipeline: PipelineResource
) -> catalog_mod.ValidatedImages:
    """Every catalog image checked against the API's limits on its bytes and encoded into the
    content-addressed cache; only hashes and sizes travel on."""
    validated = catalog_mod.validate_images(catalog, pipeline.image_cache(), strict=pipeline.strict_images)
    accepted = validated.accepted
    preview = accepted.drop(columns=[c for c in ("notes",) if c in accepted.columns]).copy()
    for col in ("original_sha256", "sent_sha256"):
        if col in preview:
            preview[col] = preview[col].str[:12]
    context.add_output_metadata(
        {
            "accepted_images": len(accepted),
            "rejected_images": sum(1 for r in validated.rejections if r.kind == "image"),
            "subjects_with_images": int(accepted["subject_id"].nunique()) if len(accepted) else 0,
            "cache_hits": validated.cache_hits,
            "cache_misses": validated.cache_misses,
            "preview": md_table(preview),
            **{
                f"thumbnail_{i}": MetadataValue.path(str(path))
                for i, path in enumerate(_reference_thumbnails(pipeline, accepted.head(4)))
            },
        }
    )
    return validated


def _reference_thumbnails(pipeline: PipelineResource, accepted: pd.DataFrame) -> list:
    """Small PNGs of a few accepted images, as files: metadata carries paths, never image bytes."""
    import io

    from PIL import Image

    cache = pipeline.image_cache()
    out_dir = pipeline.root / "thumbnails" / "references"
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for sha in accepted["sent_sha256"]:
        path = out_dir / f"{sha[:16]}.png"
        if not path.exists():
            with Image.open(io.BytesIO(cache.get_bytes(sha))) as im:
                im.thumbnail((160, 160))
                im.convert("RGB").save(path)
        paths.append(path)
    return paths


@asset(group_name=GROUP)
def rejections(
    context: AssetExecutionContext,
    catalog: catalog_mod.Catalog,
    reference_images: catalog_mod.ValidatedImages,
    pipeline: PipelineResource,
) -> pd.DataFrame:
    """Everything refused before any money was spent, with the rule and a specific reason.
    Also written to <data_dir>/reports/rejections.csv."""
    _, prompt_rejections = catalog_mod.valid_prompts(catalog, reference_images)
    frame = catalog_mod.rejections_frame([*catalog.rejections, *reference_images.rejections, *prompt_rejections])
    # The CSV is for spreadsheets: formula-like cells are escaped there; this output keeps the text.
    path = catalog_mod.write_rejections_csv(frame, pipeline.reports_dir / "rejections.csv")
    context.add_output_metadata(
        {
            **table_metadata(frame),
            "rejections": len(frame),
            "by_rule": MetadataValue.json(frame["rule"].value_counts().to_dict() if len(frame) else {}),
            "path": MetadataValue.path(str(path)),
            "table": md_table(frame, 50),
        }
    )
    return frame


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
