"""``generate --regenerate-failed-quality``: the catalog's clips that fail the quality gates get
a replacement request under a new seed, planned in the ledger and registered as partitions, and
then submitted like every other request of the run (under the same spend caps)."""

from __future__ import annotations

import sys

from ..defs.requests import register_partitions
from ..export import current_dataset, thresholds_for
from ..generation_requests import RequestSpec
from ..regeneration import Replacement, failing_clips, replacement_spec, replacements
from .driver import Driver


def replacements_due(driver: Driver, catalog_ids: list[str], rounds: int) -> tuple[list[Replacement], list[str]]:
    """The replacements to plan now, and every replacement already planned for the catalog's
    requests (an earlier run may have planned them and been stopped before they finished)."""
    pipeline = driver.pipeline
    ledger = pipeline.ledger()
    originals = [RequestSpec.from_json(row.spec_json) for row in ledger.get_many(catalog_ids).values()]
    chains = [replacement_spec(spec, r).request_id for spec in originals for r in range(1, rounds + 1)]
    planned = list(ledger.get_many(chains))
    failing = failing_clips(current_dataset(pipeline.lineage()), thresholds_for(pipeline.catalog_path))
    return replacements(originals, failing, planned, rounds), planned


def plan_replacements(driver: Driver, catalog_ids: list[str], rounds: int) -> list[str]:
    """Plan the replacements due and return the ids of all of them (new and earlier ones)."""
    due, planned = replacements_due(driver, catalog_ids, rounds)
    for r in due:
        print(
            f"regenerating {r.original} ({'; '.join(r.reasons)}) as {r.spec.request_id} "
            f"(seed {r.spec.seed}, round {r.round} of {rounds})",
            file=sys.stderr,
        )
    driver.pipeline.ledger().plan(r.spec.planned() for r in due)
    ids = [*planned, *(r.spec.request_id for r in due)]
    register_partitions(driver.instance, ids)
    print(
        f"quality: {len(due)} failing clip(s) regenerated now, {len(planned)} earlier replacement(s)", file=sys.stderr
    )
    return ids
