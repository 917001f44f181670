"""Stage 3: the plan — subjects × prompts × seeds recorded in the ledger and registered as
request partitions — plus what the partitioned stages after it share (the batch config and
the API pool)."""

import time

import pandas as pd
from dagster import AssetExecutionContext, Config, DataVersion, MetadataValue, Output, asset
from sqlalchemy.exc import IntegrityError, OperationalError

from .. import catalog as catalog_mod
from ..generation_requests import expand, plan_digest
from .jobs import PLAN_DIGEST
from .metadata import GROUP, md_table, table_metadata
from .partitions import PARTITION_SOFT_LIMIT, REQUESTS_PARTITIONS_NAME
from .resources import PipelineResource

PLAN_DATA_VERSION = DataVersion("requests-are-content-addressed-v1")
API_POOL = "vidu_api"


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
    specs = expand(prompts, reference_images.accepted, pipeline.seeds or catalog.sweep.seeds)
    refused = catalog_mod.rejections_frame([*catalog.rejections, *reference_images.rejections, *prompt_rejections])
    ledger = pipeline.ledger()
    new_in_ledger = ledger.plan(s.planned() for s in specs)
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
            **table_metadata(frame),
            "requests": len(specs),
            "new_partitions": len(new_keys),
            "new_in_ledger": new_in_ledger,
            "ledger_states": MetadataValue.json(ledger.counts_by_state()),
            "preview": md_table(frame),
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
