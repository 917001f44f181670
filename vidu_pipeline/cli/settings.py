"""The command line's settings turned into the pipeline's resource, and the settings that
cannot work refused up front (before anything is recorded)."""

from __future__ import annotations

import os
from pathlib import Path

from sqlalchemy import create_engine
from sqlalchemy.exc import OperationalError

from ..api.errors import ConfigurationError
from ..defs.resources import PipelineResource
from ..ledger.url import check_ledger_url, shown


class CatalogProblem(Exception):
    """The catalog or configuration cannot be used at all (message names file and field)."""


def check_endpoint_settings() -> None:
    """A key no HTTP header can carry, or a base URL that is not http(s), is a configuration
    error said up front (:class:`errors.ConfigurationError`), before anything is recorded."""
    from ..api import runtime
    from ..api.client import check_api_key

    key = os.environ.get(runtime.ENV_KEY, "").strip()
    if key:
        check_api_key(key)
        url = os.environ.get(runtime.ENV_BASE_URL, "").strip()
        if url and not url.startswith(("http://", "https://")):
            raise CatalogProblem(f"{runtime.ENV_BASE_URL} must start with http:// or https://, got {url[:80]!r}")


def pipeline_from_args(args) -> PipelineResource:
    """The resource for a command; its storage root and ledger URL checked (the ledger reached)
    before anything runs."""
    pipeline = PipelineResource(
        data_dir=str(Path(args.data_dir).resolve()),
        ledger_url=getattr(args, "ledger_url", "") or "",
        storage_root=getattr(args, "storage_root", None) or "",  # else VIDU_STORAGE_ROOT, else data_dir
        catalog_dir=str(Path(args.catalog).resolve()) if getattr(args, "catalog", None) else "",
        strict_images=getattr(args, "strict_images", False),
        allow_outside_paths=getattr(args, "allow_outside_paths", False),
        retry_budget=getattr(args, "retry_budget", 3),
        max_tasks_per_run=getattr(args, "max_tasks", None),
        max_tasks_per_day=getattr(args, "max_tasks_per_day", None),
        resubmit_unknown=getattr(args, "resubmit_unknown", False),
        seeds=getattr(args, "seeds", None) or [],
    )
    pipeline.storage()  # an unknown protocol or a missing s3fs: one line, before anything is recorded
    check_ledger_reachable(pipeline.ledger_location)
    return pipeline


def check_ledger_reachable(url: str) -> None:
    """A ledger URL that cannot work, or a database server that cannot be reached, is one
    line (:class:`ConfigurationError`, the password masked) instead of a trace mid-run."""
    check_ledger_url(url)
    if url.startswith("sqlite"):
        return  # a file: the data folder's own checks say what is wrong with it
    engine = create_engine(url)
    try:
        with engine.connect():
            pass
    except OperationalError as exc:
        reason = str(exc.orig or exc).strip().splitlines()[0]
        raise ConfigurationError(f"cannot reach the ledger at {shown(url)}: {reason}") from None
    finally:
        engine.dispose()
