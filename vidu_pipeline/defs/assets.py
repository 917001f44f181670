"""The data flow as assets: catalog → reference images → requests → tasks → videos → lineage.

Each asset is a thin shell over a domain module. ``video_tasks`` and ``videos`` are
partitioned by request id and use a single-run backfill policy: one run handles a whole batch
of partitions (a run costs seconds of process start; a download costs far less), and each
partition still gets its own materialization with its own metadata.
"""

import dataclasses
import os
import time

import pandas as pd
from dagster import (
    AssetExecutionContext,
    AssetKey,
    AssetMaterialization,
    BackfillPolicy,
    Config,
    DataVersion,
    Failure,
    MaterializeResult,
    MetadataValue,
    Output,
    TableColumn,
    TableSchema,
    asset,
)
from dagster._core.definitions.data_version import (
    CODE_VERSION_TAG,
    DATA_VERSION_IS_USER_PROVIDED_TAG,
    DATA_VERSION_TAG,
    INPUT_DATA_VERSION_TAG_PREFIX,
    INPUT_EVENT_POINTER_TAG_PREFIX,
)
from sqlalchemy.exc import IntegrityError, OperationalError

from .. import catalog as catalog_mod
from .. import collect, plan, tasks
from .. import lineage as lineage_mod
from ..ledger import PlannedRequest
from .jobs import LINEAGE_AFTER_VIDEOS, PLAN_DIGEST, plan_digest
from .partitions import PARTITION_SOFT_LIMIT, REQUESTS_PARTITIONS_NAME, requests_partitions
from .resources import SESSION_TAG, PipelineResource, ViduResource

GROUP = "vidu"
PLAN_DATA_VERSION = DataVersion("requests-are-content-addressed-v1")
API_POOL = "vidu_api"


def _md_table(df: pd.DataFrame, rows: int = 20) -> MetadataValue:
    return MetadataValue.md(df.head(rows).to_markdown(index=False) if len(df) else "_none_")


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
            "preview": _md_table(preview),
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
            **_table_metadata(frame),
            "rejections": len(frame),
            "by_rule": MetadataValue.json(frame["rule"].value_counts().to_dict() if len(frame) else {}),
            "path": MetadataValue.path(str(path)),
            "table": _md_table(frame, 50),
        }
    )
    return frame


def register_partitions(instance, keys: list[str], *, tries: int = 5) -> tuple[list[str], int]:
    """Add the request partitions that are missing; returns (keys added here, total keys).

    Dagster's own add is check-then-insert, so two processes planning one fresh catalog at
    once (two ``generate``s, or one beside ``dagster dev``) collide on its unique index: the
    loser re-reads what is there and adds only what is still missing.
    """
    for attempt in range(tries):
        existing = set(instance.get_dynamic_partitions(REQUESTS_PARTITIONS_NAME))
        missing = [k for k in dict.fromkeys(keys) if k not in existing]
        if not missing:
            return [], len(existing)
        try:
            instance.add_dynamic_partitions(REQUESTS_PARTITIONS_NAME, missing)
            return missing, len(existing) + len(missing)
        except (IntegrityError, OperationalError):  # the same keys inserted, or being inserted, elsewhere
            if attempt == tries - 1:
                raise
            time.sleep(0.2 * (attempt + 1))  # let the other planner's insert commit
    raise AssertionError("unreachable")


@asset(group_name=GROUP)
def generation_requests(
    context: AssetExecutionContext,
    catalog: catalog_mod.Catalog,
    reference_images: catalog_mod.ValidatedImages,
    pipeline: PipelineResource,
) -> Output[pd.DataFrame]:
    """subjects × prompts × seeds, planned in the ledger and registered as partitions.
    Existing requests are left alone: re-planning the same catalog adds nothing.

    A request id is the hash of the request's content and a plan only ever adds requests, so
    what a planned partition was made from never changes: the data version is constant, and
    a new plan leaves every existing task and video in sync (new partitions show as missing)."""
    prompts, prompt_rejections = catalog_mod.valid_prompts(catalog, reference_images)
    specs = plan.expand(prompts, reference_images.accepted, pipeline.seeds or catalog.sweep.seeds)
    refused = catalog_mod.rejections_frame([*catalog.rejections, *reference_images.rejections, *prompt_rejections])
    ledger = pipeline.ledger()
    new_in_ledger = ledger.plan(
        PlannedRequest(
            request_id=s.request_id,
            subject_id=s.subject_id,
            seed=s.seed,
            fingerprint=s.fingerprint(),
            spec_json=s.to_json(),
        )
        for s in specs
    )
    new_keys, total = register_partitions(context.instance, [s.request_id for s in specs])
    if total > PARTITION_SOFT_LIMIT:
        context.log.warning(
            f"{total:,} request partitions: past Dagster's advised {PARTITION_SOFT_LIMIT:,} per asset "
            "the UI slows down; split the catalog into several code locations or data dirs."
        )
    frame = pd.DataFrame(
        [
            {
                "request_id": s.request_id,
                "subject_id": s.subject_id,
                "seed": s.seed,
                "aspect_ratio": s.options["aspect_ratio"],
                "prompt": s.prompt[:80],
            }
            for s in specs
        ],
        columns=["request_id", "subject_id", "seed", "aspect_ratio", "prompt"],
    )
    context.add_output_metadata(
        {
            **_table_metadata(frame),
            "requests": len(specs),
            "new_partitions": len(new_keys),
            "new_in_ledger": new_in_ledger,
            "ledger_states": MetadataValue.json(ledger.counts_by_state()),
            "preview": _md_table(frame),
            PLAN_DIGEST: plan_digest(specs, refused),
        }
    )
    return Output(frame, data_version=PLAN_DATA_VERSION)


class BatchConfig(Config):
    """Limit a range run to some of its partitions: the sensor and the CLI pass exactly the
    requests of a batch, so a range never sweeps up its neighbours."""

    request_ids: list[str] = []

    def select(self, keys) -> list[str]:
        if not self.request_ids:
            return list(keys)
        wanted = set(self.request_ids)
        return [k for k in keys if k in wanted]


@asset(
    group_name=GROUP,
    partitions_def=requests_partitions,
    backfill_policy=BackfillPolicy.single_run(),
    deps=[generation_requests],
    output_required=False,
    pool=API_POOL,
)
def video_tasks(context: AssetExecutionContext, config: BatchConfig, pipeline: PipelineResource, vidu: ViduResource):
    """Submit each partition's request unless it already has a live task: paid for once,
    whatever is re-run. Only the partitions submitted by this run are materialized (with
    their task id): a re-run that submits nothing changes no partition, so no video goes
    out of date."""
    keys = config.select(context.partition_keys)
    ledger = pipeline.ledger()
    client, endpoint = vidu.client(pipeline.simulator_state_dir)
    context.log.info(f"submitting up to {len(keys)} request(s) to the {endpoint.describe()}")
    tasks.recover_abandoned(ledger, journal=pipeline.task_id_journal)
    outcomes = tasks.submit_requests(
        ledger,
        client,
        keys,
        data_uri_for=pipeline.image_cache().data_uri,
        caps=pipeline.caps(context.run.tags.get(SESSION_TAG) or context.run_id),
        owner=tasks.owner_id(context.run_id),
        retry_budget=pipeline.retry_budget,
        allow_unknown=pipeline.resubmit_unknown,
        policy=pipeline.polling(),
        workers=pipeline.submit_workers,
        journal=pipeline.task_id_journal,
    )
    provenance = _plan_provenance(context)
    submitted = 0
    for outcome in outcomes:
        if not outcome.submitted:
            context.log.info(f"{outcome.request_id}: {outcome.message}")
            continue
        submitted += 1
        row = ledger.get(outcome.request_id)
        yield AssetMaterialization(
            asset_key=context.asset_key,
            partition=outcome.request_id,
            metadata={
                **_sweep_metadata(row),
                "task_id": outcome.task_id or "",
                "attempt": row.attempts if row else 0,
                "note": outcome.message,
            },
            tags={**provenance, DATA_VERSION_TAG: outcome.task_id or "", DATA_VERSION_IS_USER_PROVIDED_TAG: "true"},
        )
    held = [o for o in outcomes if not o.submitted and not o.task_id]
    context.log.info(
        f"{submitted} submitted, {sum(1 for o in outcomes if o.task_id and not o.submitted)} already had a task, "
        f"{len(held)} not submitted"
    )


def _plan_provenance(context: AssetExecutionContext) -> dict[str, str]:
    """The provenance tags Dagster records for an output, for ``video_tasks``' runtime
    materializations: with them the UI compares the plan's data version (constant, see
    ``generation_requests``) instead of timestamps, so a later plan leaves the tasks in sync."""
    records = context.instance.fetch_materializations(AssetKey("generation_requests"), limit=1).records
    plan = records[0].asset_materialization if records else None
    version = (plan.tags or {}).get(DATA_VERSION_TAG) if plan else None
    if not version:
        return {}
    return {
        CODE_VERSION_TAG: context.run_id,
        f"{INPUT_DATA_VERSION_TAG_PREFIX}/generation_requests": version,
        f"{INPUT_EVENT_POINTER_TAG_PREFIX}/generation_requests": str(records[0].storage_id),
    }


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
    client, endpoint = vidu.client(pipeline.simulator_state_dir)
    broken: list[str] = []
    collected: list[str] = []
    for key in config.select(context.partition_keys):
        row = ledger.get(key)
        if row is None or row.state != "succeeded":
            context.log.info(f"{key}: task is {row.state if row else 'not planned'}; nothing to download yet")
            continue
        if row.video_sha256:
            context.log.info(f"{key}: video already stored at {row.video_path}")
            continue
        try:
            video = collect.collect_video(
                ledger,
                client,
                key,
                videos_dir=pipeline.videos_dir,
                render_scale=endpoint.render_scale,
                run_id=context.run_id,
                reference_bytes=pipeline.image_cache().get_bytes,
            )
        except Exception as exc:  # one bad video must not cost the batch its other videos
            broken.append(f"{key}: {type(exc).__name__}: {exc}")
            context.log.error(f"{key}: {exc}")
            continue
        collected.append(key)
        stored = ledger.get(key)
        assert stored is not None and stored.video_sha256, f"{key}: collected but not in the ledger"
        yield AssetMaterialization(
            asset_key=context.asset_key,
            partition=key,
            metadata={
                **_video_metadata(pipeline, stored, video),
                "quality": MetadataValue.json(video.quality.to_dict() if video.quality else {}),
                **{
                    f"quality/{name}": value
                    for name, value in (video.quality.to_dict() if video.quality else {}).items()
                    if isinstance(value, (int, float)) and not isinstance(value, bool)
                },
            },
            tags={"dagster/data_version": stored.video_sha256},
        )
    if collected:
        sync_lineage(pipeline, context.run_id)
    if broken:
        raise Failure(
            description=f"{len(broken)} video(s) could not be collected; they will be retried",
            metadata={"errors": MetadataValue.md("\n".join(f"- {b}" for b in broken))},
        )


def _sweep_metadata(row) -> dict:
    """What a user filters a sweep by in the UI."""
    return {"subject_id": row.subject_id, "seed": row.seed if row.seed is not None else -1}


def _thumbnail(pipeline: PipelineResource, path, key: str):
    """The frame at 1 s as <data_dir>/thumbnails/<key>.png (the contact sheet reuses it) and
    as a small inline JPEG for the UI."""
    from ..video import frame_image, jpeg_data_uri

    frame = frame_image(path, at_s=1.0)
    out = pipeline.root / "thumbnails" / f"{key}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    png = frame.copy()
    png.thumbnail((320, 320))
    png.save(out, format="PNG")
    return out, jpeg_data_uri(frame, width=THUMBNAIL_WIDTH)


def sync_lineage(pipeline: PipelineResource, run_id: str | None) -> int:
    """Append one lineage row per ledger row whose current outcome the table lacks."""
    ledger = pipeline.ledger()
    rows = ledger.needing_lineage()
    if not rows:
        return 0
    pipeline.lineage().append([collect.lineage_row(r, run_id) for r in rows])
    ledger.mark_lineage([r.request_id for r in rows])
    return len(rows)


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
            "path": MetadataValue.path(_relative(pipeline, store.root)),
            "dagster/row_count": len(table),
            "dagster/column_schema": LINEAGE_TABLE_SCHEMA,
            "parquet_files": len(list(store.root.glob("*.parquet"))),
            "appended": appended,
            "by_state": MetadataValue.json(states),
            "preview": _md_table(
                table[["request_id", "state", "seed_effective", "video_sha256", "latency_s"]] if len(table) else table
            ),
        }
    )


ALL_ASSETS = [catalog, reference_images, rejections, generation_requests, video_tasks, videos, lineage]


# --- what the UI shows for each video ---------------------------------------------------------

THUMBNAIL_WIDTH = 320  # px; a JPEG of ~5–15 kB inline in the event log
REFERENCE_THUMBNAIL_WIDTH = 96


def _relative(pipeline: PipelineResource, path) -> str:
    """A path as the UI should show it: relative to the data dir (absolute if outside it)."""
    from pathlib import Path

    try:
        return str(Path(path).resolve().relative_to(pipeline.root))
    except ValueError:
        return str(path)


def _video_metadata(pipeline: PipelineResource, row, video: collect.CollectedVideo) -> dict:
    """One videos partition as the UI shows it: the clip's frame inline, what was asked
    (prompt, options, seed, subject, reference images), what came back and when."""
    spec = plan.RequestSpec.from_json(row.spec_json)
    _, thumbnail_uri = _thumbnail(pipeline, video.path, row.request_id)
    metadata = {
        "thumbnail": MetadataValue.md(f"![{row.request_id}]({thumbnail_uri})"),
        "path": MetadataValue.path(_relative(pipeline, video.path)),
        "prompt": MetadataValue.text(spec.prompt),
        "options": MetadataValue.json(spec.options),
        **_sweep_metadata(row),  # subject_id, seed (as requested)
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

    from ..video import jpeg_data_uri

    path = pipeline.root / "thumbnails" / "references" / f"{sha[:16]}-{REFERENCE_THUMBNAIL_WIDTH}.jpg"
    if not path.exists():
        with Image.open(io.BytesIO(pipeline.image_cache().get_bytes(sha))) as im:
            uri = jpeg_data_uri(im, width=REFERENCE_THUMBNAIL_WIDTH, quality=70)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(base64.b64decode(uri.split(",", 1)[1]))
        tmp.replace(path)  # readers never see half a file
        return uri
    return "data:image/jpeg;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _lineage_table_schema() -> TableSchema:
    """The Parquet schema of lineage.py, as Dagster's column schema."""
    return TableSchema(
        columns=[
            TableColumn(name=f.name, type=str(f.type), description="" if f.nullable else "required")
            for f in lineage_mod.SCHEMA
        ]
    )


LINEAGE_TABLE_SCHEMA = _lineage_table_schema()


def _table_metadata(frame: pd.DataFrame) -> dict:
    """Dagster's standard row count and column schema for a tabular asset (the UI shows both)."""
    return {
        "dagster/row_count": len(frame),
        "dagster/column_schema": TableSchema(columns=[TableColumn(str(c), str(t)) for c, t in frame.dtypes.items()]),
    }
