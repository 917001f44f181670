"""The durable task ledger: the only protection against paying twice for one video.

The API has no idempotency key, so every submit is preceded by a committed *intent*
(``claim_for_submit``: state ``submitting``, one ``attempts`` row) and followed by the task id
(``record_submitted``). A submit whose outcome is unknown ends in state ``unknown`` and is never
resubmitted automatically.

States::

    planned -> submitting -> submitted -> succeeded
       ^            |              |----> failed  (resubmittable while attempts < budget)
       |            |              '----> unknown (deadline passed without a terminal status)
       '- rejected -+-> failed (rejected for good) / unknown (outcome unknown, crash)

Each attempt ends ``submitted`` or ``unknown`` (both may have cost money: spend caps and the
retry budget count them), ``refused`` (the service refused the request for good: counts against
the retry budget only) or ``rejected`` (provably never accepted — 429, a connection that never
opened, a refused key — counts against nothing).

SQLAlchemy Core, so the same code runs on SQLite (the default: WAL, ``busy_timeout``, and
``BEGIN IMMEDIATE`` for every write transaction so concurrent processes serialize instead of
failing on a lock upgrade) and on Postgres (row locks with ``SELECT … FOR UPDATE``; claims
additionally lock one row of ``ledger_locks`` so spend caps hold across concurrent claimers;
the schema is created under an advisory lock; planning is ``INSERT … ON CONFLICT DO NOTHING``).
The URL is checked up front (:mod:`.url`) and shown with its password masked.

A succeeded task's video is downloaded by one worker: ``claim_video`` records the collector
(``video_claims``) before the download; the claim ends with the video or its error, and one of
a dead collector or older than a lease may be taken over.

Every update that follows a service answer is conditioned on the task it is about (or, for
submit outcomes, on the attempt): two pollers may read one task, and an answer about a task the
request has since replaced must not touch the new one. Such a stale answer is a no-op the
method reports (``False``), never an exception that aborts a batch.

All timestamps are UTC epoch seconds (floats).

The package: ``schema`` (states, tables, row records), ``engine`` (connections, transactions,
the guarded update), and one mixin per concern (``planning``, ``submitting``, ``polling``,
``videos``, ``reading``), composed here into :class:`Ledger`.
"""

from __future__ import annotations

from .planning import PlanningMixin
from .polling import PollingMixin
from .reading import ReadingMixin
from .schema import (
    DAY_S,
    FAILED,
    NOT_BILLABLE,
    OUTCOME_REFUSED,
    OUTCOME_REJECTED,
    OUTCOME_SUBMITTED,
    OUTCOME_UNKNOWN,
    PENDING_STATES,
    PLANNED,
    STATES,
    SUBMITTED,
    SUBMITTING,
    SUCCEEDED,
    UNKNOWN,
    VIDEO_CLAIM_LEASE_S,
    AttemptRow,
    Claim,
    LedgerStateError,
    PlannedRequest,
    Skip,
    SpendCaps,
    TaskRow,
    attempts_table,
    locks_table,
    metadata,
    requests_table,
    video_claims_table,
)
from .submitting import SubmittingMixin
from .videos import VideosMixin

__all__ = [
    "DAY_S",
    "FAILED",
    "NOT_BILLABLE",
    "OUTCOME_REFUSED",
    "OUTCOME_REJECTED",
    "OUTCOME_SUBMITTED",
    "OUTCOME_UNKNOWN",
    "PENDING_STATES",
    "PLANNED",
    "STATES",
    "SUBMITTED",
    "SUBMITTING",
    "SUCCEEDED",
    "UNKNOWN",
    "VIDEO_CLAIM_LEASE_S",
    "AttemptRow",
    "Claim",
    "Ledger",
    "LedgerStateError",
    "PlannedRequest",
    "Skip",
    "SpendCaps",
    "TaskRow",
    "attempts_table",
    "locks_table",
    "metadata",
    "requests_table",
    "video_claims_table",
]


class Ledger(PlanningMixin, SubmittingMixin, PollingMixin, VideosMixin, ReadingMixin):
    """The task ledger; see the module docstring. Each concern lives in its own mixin."""
