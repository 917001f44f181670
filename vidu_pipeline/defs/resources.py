"""Dagster resources: where the data lives, what may be spent, and how to reach the API."""

import functools
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dagster import ConfigurableResource, EnvVar
from pydantic import Field, field_validator

from ..api import contract, runtime
from ..api.client import ViduClient
from ..api.contract import DEFAULT_BASE_URL
from ..images import ImageCache
from ..ledger import Ledger, SpendCaps
from ..ledger.url import ENV_LEDGER_URL
from ..lineage import LineageTable, open_lineage
from ..storage import StorageRoot, storage_location
from ..tasks import PollingPolicy

# Runs that share this tag share one per-run spend cap (the CLI tags every run of a generate).
SESSION_TAG = "vidu/session"


@functools.lru_cache(maxsize=8)
def _ledger(url: str) -> Ledger:
    """One engine per ledger URL per process (runs in one process share it)."""
    return Ledger(url)


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    return int(value) if value else None


class PipelineResource(ConfigurableResource):
    """Paths, budgets and caps. Every field can be set in run config or the environment."""

    data_dir: str = Field(default="data", description="Folder for the cache, ledger, videos and lineage.")
    storage_root: str = Field(
        default="",
        description="Where the dataset goes (videos, thumbnails, lineage, export): a folder or an fsspec URL "
        "such as s3://bucket/prefix; default $VIDU_STORAGE_ROOT, else <data_dir>.",
    )
    catalog_dir: str = Field(default="", description="Catalog folder; default <data_dir>/catalog.")
    ledger_url: str = Field(
        default="",
        repr=False,
        description="The ledger's SQLAlchemy URL (e.g. postgresql+psycopg://…); empty: VIDU_LEDGER_URL, "
        "else SQLite in <data_dir>. Prefer the environment variable: a password here shows in the UI.",
    )
    strict_images: bool = Field(default=False, description="Reject images that would need fixing.")
    allow_outside_paths: bool = Field(default=False, description="Let catalog paths leave the catalog folder.")
    retry_budget: int = Field(default=3, ge=1, description="Submit attempts per request, first included.")
    max_tasks_per_run: int | None = Field(default=None, ge=0, description="Cap on submits per Dagster run.")
    max_tasks_per_day: int | None = Field(default=None, ge=0, description="Cap on submits in any 24 h.")
    resubmit_unknown: bool = Field(default=False, description="Resubmit requests whose outcome is unknown.")
    seeds: list[int] = Field(default=[], description="Override the sweep's seeds (empty: use sweep.yaml).")
    auto_submit: bool = Field(default=True, description="The sensor submits planned requests (e.g. from the schedule).")
    submit_workers: int = Field(default=4, ge=1)
    poll_workers: int = Field(default=16, ge=1)
    video_workers: int = Field(
        default_factory=lambda: min(4, os.cpu_count() or 1),
        ge=1,
        description="Videos downloaded and verified at once per run (default: one per core, at most 4).",
    )
    poll_time_budget_s: float = Field(default=40.0, gt=0, description="Per sensor tick; Dagster's limit is 60 s.")
    task_deadline_s: float = Field(default=3600.0, gt=0, description="After this, a task is reported unknown.")
    video_attempts: int = Field(default=3, ge=1, description="Download/verify attempts per video.")
    task_id_journal_path: str = Field(
        default="",
        description="Recovery journal for paid task ids the ledger could not take (disk full); "
        "default <data_dir>/state/submitted-task-ids.jsonl. Best on another disk than the ledger.",
    )

    @field_validator("seeds")
    @classmethod
    def _seeds_in_policy(cls, seeds: list[int]) -> list[int]:
        """The same seed rules as sweep.yaml and --seeds: a run-config override may not bypass them."""
        if len(seeds) > contract.MAX_SWEEP_SEEDS:
            raise ValueError(f"seeds: {len(seeds)} seeds, at most {contract.MAX_SWEEP_SEEDS}")
        problems = [p for p in map(contract.seed_problem, seeds) if p]
        if problems:
            raise ValueError(f"seeds: {problems[0]}")
        return seeds

    @property
    def root(self) -> Path:
        return Path(self.data_dir).resolve()

    @property
    def catalog_path(self) -> Path:
        return Path(self.catalog_dir).resolve() if self.catalog_dir else self.root / "catalog"

    @property
    def storage_location(self) -> str:
        """The storage root as set (field, then VIDU_STORAGE_ROOT), else the data folder."""
        return storage_location(self.storage_root, self.root)

    def storage(self) -> StorageRoot:
        """The dataset's storage root (one per call: cheap; fsspec caches the file system)."""
        return StorageRoot(self.storage_location)

    @property
    def videos_dir(self) -> Any:
        """A local folder (Path), or the videos folder's URL (str) on an object store.

        Any, not ``Path | str``, while callers written for a local Path (sheets.current_rows)
        are not widened; new code should use :meth:`storage`."""
        storage = self.storage()
        return Path(storage.location) / "videos" if storage.is_local else storage.url("videos")

    @property
    def reports_dir(self) -> Path:
        return self.root / "reports"

    @property
    def simulator_state_dir(self) -> Path:
        return self.root / "state" / "simulator"

    @property
    def task_id_journal(self) -> Path:
        """Where a paid task id goes when the ledger cannot take it (disk full); replayed on start."""
        if self.task_id_journal_path:
            return Path(self.task_id_journal_path).resolve()
        return self.root / "state" / "submitted-task-ids.jsonl"

    @property
    def ledger_location(self) -> str:
        """The field, else VIDU_LEDGER_URL (read when used, so ``dagster dev`` and its runs
        honour it), else SQLite in the data folder."""
        from_env = os.environ.get(ENV_LEDGER_URL, "").strip()
        return self.ledger_url or from_env or f"sqlite:///{self.root / 'ledger.sqlite'}"

    def ledger(self) -> Ledger:
        self.root.mkdir(parents=True, exist_ok=True)
        return _ledger(self.ledger_location)

    def read_only_ledger(self) -> Ledger:
        """For looking only (``status``): works on a read-only data folder, creates nothing."""
        return Ledger(self.ledger_location, read_only=True)

    def image_cache(self) -> ImageCache:
        return ImageCache(self.root / "cache" / "images")

    def lineage(self) -> LineageTable:
        return open_lineage(self.storage(), self.root / "state")

    def caps(self, run_id: str) -> SpendCaps:
        per_run = self.max_tasks_per_run if self.max_tasks_per_run is not None else _env_int("VIDU_MAX_TASKS_PER_RUN")
        per_day = self.max_tasks_per_day if self.max_tasks_per_day is not None else _env_int("VIDU_MAX_TASKS_PER_DAY")
        return SpendCaps(per_run=per_run, per_day=per_day, run_id=run_id)

    def polling(self) -> PollingPolicy:
        return PollingPolicy(deadline_s=self.task_deadline_s)


class ViduResource(ConfigurableResource):
    """The API endpoint. No key: the embedded simulator (started on demand, nothing paid)."""

    api_key: str | None = Field(default=None, repr=False, description="From the VIDU_API_KEY environment variable.")
    base_url: str = Field(default=DEFAULT_BASE_URL, description="From VIDU_API_BASE_URL.")

    def endpoint(self, simulator_state_dir: Path) -> runtime.Endpoint:
        env = dict(os.environ)
        env.pop(runtime.ENV_KEY, None)
        api_key = _value(self.api_key)
        if api_key:
            env[runtime.ENV_KEY] = api_key
            env[runtime.ENV_BASE_URL] = _value(self.base_url) or DEFAULT_BASE_URL
        return runtime.resolve_endpoint(simulator_state_dir, env)

    @contextmanager
    def get_client(self, simulator_state_dir: Path) -> Iterator[tuple[ViduClient, runtime.Endpoint]]:
        """One client (two pooled HTTP sessions) for a whole run or sensor tick, closed when
        the ``with`` block ends, also on an error: an asset or a tick holds it for its body."""
        client, endpoint = self.client(simulator_state_dir)
        with client:
            yield client, endpoint

    def client(self, simulator_state_dir: Path) -> tuple[ViduClient, runtime.Endpoint]:
        """A client the caller closes (prefer :meth:`get_client`)."""
        endpoint = self.endpoint(simulator_state_dir)
        return ViduClient(endpoint.api_key, endpoint.base_url), endpoint


def _value(field):
    """A field's value, also when the resource is used outside a run (EnvVar unresolved)."""
    return field.get_value() if isinstance(field, EnvVar) else field


def vidu_resource_from_env() -> ViduResource:
    """The key stays an EnvVar reference, so the UI shows its name, never its value."""
    if os.environ.get(runtime.ENV_KEY, "").strip():
        base = EnvVar(runtime.ENV_BASE_URL) if os.environ.get(runtime.ENV_BASE_URL) else DEFAULT_BASE_URL
        return ViduResource(api_key=EnvVar(runtime.ENV_KEY), base_url=base)
    return ViduResource()
