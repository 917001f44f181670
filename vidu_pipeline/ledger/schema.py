"""The ledger's schema: request states and attempt outcomes, the SQL tables, and the row
records the ledger hands out. Split out of :mod:`vidu_pipeline.ledger`, which re-exports it.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from sqlalchemy import BigInteger, Column, Float, Index, Integer, MetaData, String, Table, Text, or_, text

PLANNED = "planned"
SUBMITTING = "submitting"
SUBMITTED = "submitted"
SUCCEEDED = "succeeded"
FAILED = "failed"
UNKNOWN = "unknown"
STATES = (PLANNED, SUBMITTING, SUBMITTED, SUCCEEDED, FAILED, UNKNOWN)
PENDING_STATES = (PLANNED, SUBMITTING, SUBMITTED)

# Outcomes of one submit attempt (``attempts.outcome``); NULL while the POST is in flight.
OUTCOME_SUBMITTED = "submitted"
OUTCOME_REJECTED = "rejected"  # provably not created, may be tried again: costs nothing, not counted
OUTCOME_REFUSED = "refused"  # the service refused it for good: costs nothing, counts against the budget
OUTCOME_UNKNOWN = "unknown"
NOT_BILLABLE = (OUTCOME_REJECTED, OUTCOME_REFUSED)

DAY_S = 86_400.0
_PLAN_CHUNK = 5_000
_IN_CHUNK = 500  # ids per "IN (…)" query: far below every backend's parameter limit
_CLAIM_LOCK = "claim"

metadata = MetaData()
_LINEAGE_DUE = "lineage_state IS NULL OR lineage_state != state"

requests_table = Table(
    "requests",
    metadata,
    Column("request_id", String(200), primary_key=True),
    Column("subject_id", String(200), nullable=False),
    Column("seed", BigInteger),
    Column("fingerprint", String(64), nullable=False),
    Column("spec_json", Text, nullable=False),
    Column("state", String(16), nullable=False),
    Column("task_id", String(200)),
    Column("attempts", Integer, nullable=False, default=0),
    Column("last_error", Text),
    Column("effective_seed", BigInteger),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("submitting_at", Float),
    Column("submitted_at", Float),
    Column("finished_at", Float),
    Column("next_poll_at", Float),
    Column("last_status", String(64)),
    Column("eta_s", Float),
    Column("progress", Float),
    Column("polls", Integer, nullable=False, default=0),
    Column("owner", String(300)),
    Column("video_path", Text),
    Column("video_sha256", String(64)),
    Column("video_bytes", BigInteger),
    Column("probe_json", Text),
    Column("video_attempts", Integer, nullable=False, default=0),
    Column("lineage_state", String(16)),
    Index("ix_requests_state_next_poll", "state", "next_poll_at"),
    Index("ix_requests_fingerprint", "fingerprint"),
    # The sensor's per-tick reads, kept proportional to the work due, not to the dataset:
    # needing_video, needing_lineage (a partial index of the rows whose outcome the lineage
    # lacks) and retryable_failed.
    Index("ix_requests_state_video", "state", "video_sha256"),
    Index(
        "ix_requests_lineage_due",
        "state",
        sqlite_where=text(_LINEAGE_DUE),
        postgresql_where=text(_LINEAGE_DUE),
    ),
    Index("ix_requests_state_attempts", "state", "attempts"),
)

attempts_table = Table(
    "attempts",
    metadata,
    Column("request_id", String(200), primary_key=True),
    Column("attempt", Integer, primary_key=True),
    Column("run_id", String(200), nullable=False),
    Column("owner", String(300), nullable=False),
    Column("task_id", String(200)),
    Column("started_at", Float, nullable=False),
    Column("ended_at", Float),
    Column("outcome", String(16)),
    Column("error", Text),
    Index("ix_attempts_started_at", "started_at"),
    Index("ix_attempts_run_id", "run_id"),
)

# One row per named lock; claims lock the "claim" row so caps are checked serially on Postgres.
locks_table = Table("ledger_locks", metadata, Column("name", String(64), primary_key=True))

# Who is downloading a succeeded task's video: one collector per video across workers. A table
# of its own (not columns of ``requests``), so ledgers written before it need no migration.
video_claims_table = Table(
    "video_claims",
    metadata,
    Column("request_id", String(200), primary_key=True),
    Column("task_id", String(200), nullable=False),
    Column("collector", String(300), nullable=False),
    Column("claimed_at", Float, nullable=False),
)
VIDEO_CLAIM_LEASE_S = 900.0  # a claim this old is abandoned: another worker may take it over


@dataclasses.dataclass(frozen=True)
class PlannedRequest:
    """One request to plan. ``spec_json`` is stored verbatim: images by sha256, never data URIs."""

    request_id: str
    subject_id: str
    seed: int | None
    fingerprint: str
    spec_json: str


@dataclasses.dataclass(frozen=True)
class SpendCaps:
    """Submits allowed for one run, and in any rolling 24 h window across all runs (None: no cap)."""

    per_run: int | None
    per_day: int | None
    run_id: str


@dataclasses.dataclass(frozen=True)
class Claim:
    """Permission to POST exactly once: the intent is committed before this is returned."""

    request_id: str
    attempt: int
    spec_json: str
    seed: int | None
    fingerprint: str


@dataclasses.dataclass(frozen=True)
class Skip:
    request_id: str
    reason: str


@dataclasses.dataclass(frozen=True)
class TaskRow:
    request_id: str
    subject_id: str
    seed: int | None
    fingerprint: str
    spec_json: str
    state: str
    task_id: str | None
    attempts: int
    last_error: str | None
    effective_seed: int | None
    created_at: float
    updated_at: float
    submitting_at: float | None
    submitted_at: float | None
    finished_at: float | None
    next_poll_at: float | None
    last_status: str | None
    eta_s: float | None
    progress: float | None
    polls: int
    owner: str | None
    video_path: str | None
    video_sha256: str | None
    video_bytes: int | None
    probe_json: str | None
    video_attempts: int
    lineage_state: str | None

    @property
    def probe(self) -> dict[str, Any] | None:
        return json.loads(self.probe_json) if self.probe_json else None


@dataclasses.dataclass(frozen=True)
class AttemptRow:
    request_id: str
    attempt: int
    run_id: str
    owner: str
    task_id: str | None
    started_at: float
    ended_at: float | None
    outcome: str | None
    error: str | None


class LedgerStateError(RuntimeError):
    """A transition was asked of a row that is not in a state allowing it (a caller bug)."""


def _billable(a):
    """Attempts that may have cost money: all but those the service provably created no task for."""
    return or_(a.outcome.is_(None), a.outcome.not_in(NOT_BILLABLE))


def _counted(a):
    """Attempts that use up the retry budget: all but those provably never accepted."""
    return or_(a.outcome.is_(None), a.outcome != OUTCOME_REJECTED)
