"""The values passed between assets (the catalog, the validated images) kept on the storage root
when it is an object store, so a run on another machine reads what this one wrote.

Dagster's own ``FilesystemIOManager`` is a ``UPathIOManager``: given an fsspec URL it pickles
each output to ``<root>/dagster-io/<asset key>`` through universal_pathlib (s3fs for ``s3://``,
with the standard AWS settings). On a local root nothing changes: Dagster's default IO manager
keeps them in ``$DAGSTER_HOME/storage`` as before.
"""

from typing import Any

from dagster import FilesystemIOManager

from .resources import PipelineResource

IO_FOLDER = "dagster-io"


def storage_io_managers(pipeline: PipelineResource) -> dict[str, Any]:
    """``{"io_manager": …}`` on an object-store root; ``{}`` on a local one."""
    storage = pipeline.storage()
    if storage.is_local:
        return {}
    return {"io_manager": FilesystemIOManager(base_dir=storage.url(IO_FOLDER))}
