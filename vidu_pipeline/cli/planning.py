"""The plan step of ``generate``: the catalog validated and expanded by the domain functions
alone, a plan run made only when that plan changed, and ``--dry-run``."""

from __future__ import annotations

import dataclasses
import sys

import pandas as pd
from dagster import AssetKey

from .. import catalog as catalog_mod
from ..defs.jobs import PLAN_DIGEST, plan_job
from ..defs.partitions import REQUESTS_PARTITIONS_NAME
from ..defs.resources import PipelineResource
from ..generation_requests import expand, plan_digest
from ..ledger import PLANNED
from .driver import Driver, first_failure
from .exit_codes import EXIT_OK
from .settings import CatalogProblem


@dataclasses.dataclass(frozen=True)
class PlanPreview:
    """What the plan job would produce, computed by the domain functions alone (no run)."""

    catalog: catalog_mod.Catalog
    specs: list
    rejected: pd.DataFrame
    digest: str


def preview_plan(pipeline: PipelineResource) -> PlanPreview:
    """Load and validate the catalog and expand the sweep, exactly as the plan job's assets do."""
    try:
        cat = catalog_mod.load_catalog(pipeline.catalog_path, allow_outside_paths=pipeline.allow_outside_paths)
    except catalog_mod.CatalogError as exc:
        raise CatalogProblem(f"catalog: {exc}") from None
    try:
        validated = catalog_mod.validate_images(cat, pipeline.image_cache(), strict=pipeline.strict_images)
    except catalog_mod.CatalogError as exc:
        raise CatalogProblem(f"reference_images: {exc}") from None
    prompts, prompt_rejections = catalog_mod.valid_prompts(cat, validated)
    rejected = catalog_mod.rejections_frame([*cat.rejections, *validated.rejections, *prompt_rejections])
    specs = expand(prompts, validated.accepted, pipeline.seeds or cat.sweep.seeds)
    return PlanPreview(cat, specs, rejected, plan_digest(specs, rejected))


def plan_is_current(driver: Driver, preview: PlanPreview) -> bool:
    """The last plan recorded this very plan, and every request is in the ledger and has its
    partition: a plan run would change nothing, so none is made (the assets stay as they are)."""
    records = driver.instance.fetch_materializations(AssetKey("generation_requests"), limit=1).records
    last = records[0].asset_materialization if records else None
    entry = last.metadata.get(PLAN_DIGEST) if last else None
    if getattr(entry, "value", None) != preview.digest:
        return False
    ids = [s.request_id for s in preview.specs]
    partitions = set(driver.instance.get_dynamic_partitions(REQUESTS_PARTITIONS_NAME))
    return len(driver.pipeline.ledger().get_many(ids)) == len(set(ids)) and partitions.issuperset(ids)


def plan_requests(driver: Driver) -> tuple[list[str], pd.DataFrame]:
    """The request ids to generate and the rejected inputs, running the plan job only when
    the catalog (or the seeds) changed since the last plan."""
    pipeline = driver.pipeline
    preview = preview_plan(pipeline)
    ids = [s.request_id for s in preview.specs]
    if not ids:
        cat, rejected = preview.catalog, preview.rejected
        raise CatalogProblem(
            f"catalog {pipeline.catalog_path} yields no request to generate: {len(cat.images)} valid image row(s) "
            f"in images.csv, {len(cat.prompts)} valid prompt row(s) in prompts.csv, {len(rejected)} input(s) "
            f"rejected (see {pipeline.reports_dir / 'rejections.csv'}); every request needs a subject with a "
            "valid image and a prompt"
        )
    if plan_is_current(driver, preview):
        note = "unchanged since the last plan"
    else:
        result = driver.run(plan_job.name)
        if not result.success:
            raise CatalogProblem(first_failure(result))
        ids, note = list(result.output_for_node("generation_requests")["request_id"]), "planned"
    print(
        f"catalog: {len(ids)} request(s) {note}; {len(preview.rejected)} input(s) rejected "
        f"(see {pipeline.reports_dir / 'rejections.csv'})",
        file=sys.stderr,
    )
    return ids, preview.rejected


def dry_run(driver: Driver, args) -> int:
    """Validate and plan without a run, a ledger write or a submit: no asset changes."""
    preview = preview_plan(driver.pipeline)
    specs, rejected = preview.specs, preview.rejected
    seeds = driver.pipeline.seeds or preview.catalog.sweep.seeds
    known = driver.pipeline.ledger().get_many([s.request_id for s in specs])
    new = [s for s in specs if s.request_id not in known or known[s.request_id].state == PLANNED]
    subjects = len({s.subject_id for s in specs})
    print(
        f"dry run: {len(specs)} request(s) from {subjects} "
        f"subject(s) × prompts × {len(seeds)} seed(s); {len(new)} would be submitted, "
        f"{len(specs) - len(new)} already have a task; {len(rejected)} input(s) rejected"
    )
    if args.price_per_task is not None:
        print(f"estimated cost: {len(new)} × {args.price_per_task:g} = {len(new) * args.price_per_task:.2f}")
    cap = driver.pipeline.caps("-").per_run
    if cap is not None and cap < len(new):
        print(f"the per-run cap ({cap}) would hold back {len(new) - cap} request(s)")
    if args.regenerate_failed_quality:
        from .regenerate import replacements_due

        due, _ = replacements_due(driver, [s.request_id for s in specs], args.regeneration_rounds)
        price = f" (cost {len(due) * args.price_per_task:.2f})" if args.price_per_task is not None else ""
        print(f"quality: {len(due)} failing clip(s) would be regenerated under a new seed{price}")
        for r in due:
            print(f"  {r.original}: {'; '.join(r.reasons)} -> {r.spec.request_id} (seed {r.spec.seed})")
    print("nothing was submitted")
    return EXIT_OK
