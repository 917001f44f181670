"""The Dagster code location: ``dagster dev -w workspace.yaml`` loads ``defs`` from here."""

import os

from dagster import Definitions, in_process_executor

from .defs.assets import ALL_ASSETS
from .defs.checks import ALL_CHECKS
from .defs.dataset import DATASET_ASSETS, DATASET_CHECKS
from .defs.jobs import ALL_JOBS, vidu_automation_sensor
from .defs.resources import PipelineResource, vidu_resource_from_env
from .defs.schedules import generation_schedule
from .defs.sensors import vidu_task_sensor
from .defs.storage_io import storage_io_managers


def build_definitions(pipeline: PipelineResource | None = None, resources: dict | None = None) -> Definitions:
    """The code location; ``resources`` replaces the default ones (tests, the CLI)."""
    return Definitions(
        assets=[*ALL_ASSETS, *DATASET_ASSETS],
        asset_checks=[*ALL_CHECKS, *DATASET_CHECKS],
        jobs=ALL_JOBS,
        # Steps are light and mostly sequential: one process per run, not one per step
        # (a process start costs seconds on a small machine).
        executor=in_process_executor,
        sensors=[vidu_task_sensor, vidu_automation_sensor],
        schedules=[generation_schedule],
        resources=resources or default_resources(pipeline),
    )


def default_resources(pipeline: PipelineResource | None = None) -> dict:
    """The pipeline's settings, the API, and (on an object-store root) an IO manager there."""
    pipeline = pipeline or PipelineResource(data_dir=os.environ.get("VIDU_DATA_DIR", "data"))
    return {"pipeline": pipeline, "vidu": vidu_resource_from_env(), **storage_io_managers(pipeline)}


defs = build_definitions()
