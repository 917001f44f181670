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
additionally lock one row of ``ledger_locks`` so spend caps hold across concurrent claimers).

Every update that follows a service answer is conditioned on the task it is about (or, for
submit outcomes, on the attempt): two pollers may read one task, and an answer about a task the
request has since replaced must not touch the new one. Such a stale answer is a no-op the
method reports (``False``), never an exception that aborts a batch.

All timestamps are UTC epoch seconds (floats).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    and_,
    create_engine,
    event,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

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

log = logging.getLogger(__name__)

DAY_S = 86_400.0
_PLAN_CHUNK = 5_000
_IN_CHUNK = 500  # ids per "IN (…)" query: far below every backend's parameter limit
_CLAIM_LOCK = "claim"

metadata = MetaData()

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


def _configure_sqlite(engine: Engine, *, read_only: bool = False) -> None:
    """Take transaction control from pysqlite, as SQLAlchemy's SQLite docs describe.

    Writes begin with ``BEGIN IMMEDIATE`` (the write lock is taken up front, waiting up to
    ``busy_timeout``), reads with a plain deferred ``BEGIN`` so WAL readers never block.
    ``busy_timeout`` comes first: switching a new file to WAL needs a lock another process
    creating the same ledger may hold. A read-only ledger sets nothing that writes.
    """

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record):
        dbapi_connection.isolation_level = None
        cur = dbapi_connection.cursor()
        cur.execute("PRAGMA busy_timeout=30000")
        if not read_only:
            cur.execute("PRAGMA journal_mode=WAL")
            # FULL: a committed intent must survive power loss, or we might pay twice.
            cur.execute("PRAGMA synchronous=FULL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection):
        immediate = conn.get_execution_options().get("ledger_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def _sqlite_read_only_creator(path: str) -> Callable[[], sqlite3.Connection]:
    """Connections that cannot write: ``mode=ro``, or ``immutable=1`` when even that fails
    (a WAL ledger in a read-only folder: its ``-shm`` side file cannot be created)."""
    uri = Path(path).resolve().as_uri()

    def connect() -> sqlite3.Connection:
        con = sqlite3.connect(f"{uri}?mode=ro", uri=True, check_same_thread=False)
        try:
            con.execute("SELECT count(*) FROM sqlite_master").fetchone()
            return con
        except sqlite3.OperationalError:
            con.close()
        return sqlite3.connect(f"{uri}?immutable=1", uri=True, check_same_thread=False)

    return connect


class Ledger:
    def __init__(
        self,
        url: str,
        *,
        clock: Callable[[], float] = time.time,
        echo: bool = False,
        read_only: bool = False,
    ):
        """Open (and create if needed) the ledger at ``url``; ``clock`` is injectable for tests.

        ``read_only``: open an existing ledger for reading only (``vidu-pipeline status`` on a
        read-only folder): no table creation, no write, no PRAGMA that writes.
        """
        self.url = url
        self.clock = clock
        self.read_only = read_only
        kw = {}
        if read_only and url.startswith("sqlite"):
            kw["creator"] = _sqlite_read_only_creator(url.split(":///", 1)[1])
        self.engine = create_engine(url, echo=echo, **kw)
        self._sqlite = self.engine.dialect.name == "sqlite"
        if self._sqlite:
            _configure_sqlite(self.engine, read_only=read_only)
        if not read_only:
            self._create()

    def _create(self) -> None:
        """Tables and the claim lock row; idempotent, also when several processes start at
        once on a fresh ledger (on SQLite the write lock serializes them; elsewhere a lost
        race shows as an error and the next look finds everything there)."""
        for tries_left in (2, 1, 0):
            try:
                with self._write() as conn:
                    metadata.create_all(conn)
                    if conn.execute(select(locks_table).where(locks_table.c.name == _CLAIM_LOCK)).first() is None:
                        conn.execute(insert(locks_table).values(name=_CLAIM_LOCK))
                return
            except (IntegrityError, ProgrammingError, OperationalError):
                if not tries_left:
                    raise
                time.sleep(0.1)

    def close(self) -> None:
        self.engine.dispose()

    # --- transactions -------------------------------------------------------------------------

    def _write(self):
        """A write transaction (``BEGIN IMMEDIATE`` on SQLite)."""
        if self.read_only:
            raise LedgerStateError(f"the ledger {self.url} was opened read-only")
        return self.engine.execution_options(ledger_write=True).begin()

    def _read(self):
        return self.engine.begin()

    def _locked(self, stmt):
        return stmt if self._sqlite else stmt.with_for_update()

    # --- planning -----------------------------------------------------------------------------

    def plan(self, rows: Iterable[PlannedRequest]) -> int:
        """Insert the requests not yet in the ledger; existing rows are never touched.

        Returns how many were new. Chunked executemany, one short write transaction per chunk.
        """
        new = 0
        chunk: dict[str, PlannedRequest] = {}
        for row in rows:
            chunk.setdefault(row.request_id, row)
            if len(chunk) >= _PLAN_CHUNK:
                new += self._plan_chunk(list(chunk.values()))
                chunk = {}
        if chunk:
            new += self._plan_chunk(list(chunk.values()))
        return new

    def _plan_chunk(self, rows: list[PlannedRequest]) -> int:
        """Insert the rows not yet present. SQLite's write lock serializes planners; elsewhere a
        planner that loses the race to insert the same ids reads again and inserts the rest."""
        for tries_left in (2, 1, 0):
            try:
                return self._insert_new(rows)
            except IntegrityError:
                if not tries_left:
                    raise
        raise AssertionError("unreachable")

    def _insert_new(self, rows: list[PlannedRequest]) -> int:
        now = self.clock()
        r = requests_table.c
        with self._write() as conn:
            existing: set[str] = set()
            for i in range(0, len(rows), _IN_CHUNK):
                ids = [p.request_id for p in rows[i : i + _IN_CHUNK]]
                existing.update(conn.scalars(select(r.request_id).where(r.request_id.in_(ids))))
            fresh = [
                {
                    "request_id": p.request_id,
                    "subject_id": p.subject_id,
                    "seed": p.seed,
                    "fingerprint": p.fingerprint,
                    "spec_json": p.spec_json,
                    "state": PLANNED,
                    "attempts": 0,
                    "polls": 0,
                    "video_attempts": 0,
                    "created_at": now,
                    "updated_at": now,
                }
                for p in rows
                if p.request_id not in existing
            ]
            if fresh:
                conn.execute(insert(requests_table), fresh)
        return len(fresh)

    # --- submitting ---------------------------------------------------------------------------

    def claim_for_submit(
        self,
        request_id: str,
        *,
        owner: str,
        retry_budget: int,
        caps: SpendCaps,
        allow_unknown: bool = False,
    ) -> Claim | Skip:
        """Commit the intent to submit, or say why not — state, budget and caps in ONE transaction.

        ``retry_budget`` is the number of attempts a request may use: every attempt counts
        except those provably never accepted and put back to ``planned`` (429, connection
        refused, a refused key). Caps count attempts that may have cost money: every attempt
        row except those the service provably created no task for.
        """
        r, a = requests_table.c, attempts_table.c
        with self._write() as conn:
            if not self._sqlite:
                conn.execute(select(locks_table).where(locks_table.c.name == _CLAIM_LOCK).with_for_update())
            row = conn.execute(self._locked(select(requests_table).where(r.request_id == request_id))).first()
            if row is None:
                return Skip(request_id, "not in the ledger")
            counted = conn.scalar(select(func.count()).where(a.request_id == request_id, _counted(a)))
            skip = _state_skip(row, counted, retry_budget, allow_unknown)
            if skip:
                return Skip(request_id, skip)
            now = self.clock()
            billable = _billable(a)
            if caps.per_run is not None:
                used = conn.scalar(select(func.count()).where(a.run_id == caps.run_id, billable))
                if used >= caps.per_run:
                    return Skip(request_id, f"cap reached: per-run {caps.per_run}")
            if caps.per_day is not None:
                used = conn.scalar(select(func.count()).where(a.started_at > now - DAY_S, billable))
                if used >= caps.per_day:
                    return Skip(request_id, f"cap reached: per-day {caps.per_day}")
            attempt = row.attempts + 1
            conn.execute(
                update(requests_table)
                .where(r.request_id == request_id)
                .values(
                    state=SUBMITTING,
                    attempts=attempt,
                    owner=owner,
                    submitting_at=now,
                    updated_at=now,
                    task_id=None,
                    submitted_at=None,
                    finished_at=None,
                    next_poll_at=None,
                    last_status=None,
                    eta_s=None,
                    progress=None,
                    polls=0,
                    effective_seed=None,
                )
            )
            conn.execute(
                insert(attempts_table).values(
                    request_id=request_id, attempt=attempt, run_id=caps.run_id, owner=owner, started_at=now
                )
            )
        return Claim(request_id, attempt, row.spec_json, row.seed, row.fingerprint)

    def record_submitted(self, request_id: str, attempt: int, task_id: str, *, first_poll_at: float) -> bool:
        """Store the task id the service returned. Always recorded on the attempt row (money was
        spent) unless that row already holds another task id; the request row follows only if
        it is still at this attempt without a task id (``submitting``, or ``unknown`` after a
        stale-intent recovery). Returns whether the request row follows it."""
        now = self.clock()
        r, a = requests_table.c, attempts_table.c
        with self._write() as conn:
            conn.execute(
                update(attempts_table)
                .where(a.request_id == request_id, a.attempt == attempt, or_(a.task_id.is_(None), a.task_id == task_id))
                .values(task_id=task_id, ended_at=now, outcome=OUTCOME_SUBMITTED, error=None)
            )
            res = conn.execute(
                update(requests_table)
                .where(
                    r.request_id == request_id,
                    r.attempts == attempt,
                    r.task_id.is_(None),
                    r.state.in_((SUBMITTING, UNKNOWN)),
                )
                .values(
                    state=SUBMITTED,
                    task_id=task_id,
                    submitted_at=now,
                    next_poll_at=first_poll_at,
                    last_error=None,
                    updated_at=now,
                )
            )
            return res.rowcount == 1

    def record_submit_rejected(self, request_id: str, attempt: int, error: str, *, retryable: bool = False) -> None:
        """The service provably created no task (400, 401, 404, 429, refused connection).

        ``retryable`` (429, refused connection, refused key): the attempt was never accepted;
        the request goes back to ``planned`` and the attempt counts against nothing.
        Otherwise (400, another 4xx) the request is ``failed`` with the service's words and the
        attempt counts against the retry budget (not against the spend caps).
        """
        if retryable:
            self._end_attempt(request_id, attempt, OUTCOME_REJECTED, error, PLANNED)
        else:
            self._end_attempt(request_id, attempt, OUTCOME_REFUSED, error, FAILED)

    def record_submit_unknown(self, request_id: str, attempt: int, error: str) -> None:
        """The body may have reached the service: a paid task may exist. Never resubmitted."""
        self._end_attempt(request_id, attempt, OUTCOME_UNKNOWN, error, UNKNOWN)

    def _end_attempt(self, request_id: str, attempt: int, outcome: str, error: str, state: str) -> None:
        now = self.clock()
        r, a = requests_table.c, attempts_table.c
        with self._write() as conn:
            conn.execute(
                update(attempts_table)
                .where(a.request_id == request_id, a.attempt == attempt)
                .values(ended_at=now, outcome=outcome, error=error)
            )
            res = conn.execute(
                update(requests_table)
                .where(r.request_id == request_id, r.attempts == attempt, r.state == SUBMITTING)
                .values(state=state, last_error=error, updated_at=now)
            )
            if res.rowcount != 1:
                raise LedgerStateError(self._describe(conn, request_id, f"end attempt {attempt} as {outcome}"))

    def recover_stale_submitting(
        self,
        older_than_s: float,
        now: float | None = None,
        *,
        owner_alive: Callable[[str | None], bool] | None = None,
    ) -> list[str]:
        """Intents without a task id whose submitter is gone become ``unknown`` (a paid task may
        exist): those older than ``older_than_s``, and, given ``owner_alive``, those whose owner
        it reports dead. Decided and updated in one transaction. Returns their ids."""
        now = self.clock() if now is None else now
        r, a = requests_table.c, attempts_table.c
        with self._write() as conn:
            pending = conn.execute(
                self._locked(select(r.request_id, r.attempts, r.owner, r.submitting_at).where(r.state == SUBMITTING))
            ).all()
            stale = []
            for rid, attempt, owner, since in pending:
                if now - since > older_than_s:
                    why = f"stale after {older_than_s:.0f} s"
                elif owner_alive is not None and not owner_alive(owner):
                    why = "its owner is gone"
                else:
                    continue
                stale.append(rid)
                reason = f"submit outcome unknown: intent by {owner} at {since:.0f} never recorded a task id ({why})"
                conn.execute(
                    update(attempts_table)
                    .where(a.request_id == rid, a.attempt == attempt, a.outcome.is_(None))
                    .values(ended_at=now, outcome=OUTCOME_UNKNOWN, error=reason)
                )
                conn.execute(
                    update(requests_table)
                    .where(r.request_id == rid, r.attempts == attempt, r.state == SUBMITTING)
                    .values(state=UNKNOWN, last_error=reason, updated_at=now)
                )
        return stale

    # --- polling ------------------------------------------------------------------------------

    def due_for_poll(self, now: float, limit: int) -> list[TaskRow]:
        r = requests_table.c
        stmt = (
            select(requests_table)
            .where(r.state == SUBMITTED, r.next_poll_at <= now)
            .order_by(r.next_poll_at, r.request_id)
            .limit(limit)
        )
        return self._select(stmt)

    def record_poll(
        self,
        request_id: str,
        *,
        task_id: str,
        status: str | None,
        eta_s: float | None,
        progress: float | None,
        next_poll_at: float | None,
    ) -> bool:
        """A non-terminal answer about ``task_id``: when to look again. False (nothing
        written) if the request has moved on from that task."""
        r = requests_table.c
        return self._answer(
            request_id,
            task_id,
            (SUBMITTED,),
            "record a poll",
            last_status=status,
            eta_s=eta_s,
            progress=progress,
            next_poll_at=next_poll_at,
            polls=r.polls + 1,
        )

    def record_succeeded(
        self, request_id: str, *, task_id: str, effective_seed: int | None, finished_at: float
    ) -> bool:
        """``task_id`` succeeded: from ``submitted``, or from ``unknown`` with that task id (a
        late poll found it done). False if the request has moved on from that task."""
        return self._answer(
            request_id,
            task_id,
            (SUBMITTED, UNKNOWN),
            "record success",
            state=SUCCEEDED,
            effective_seed=effective_seed,
            finished_at=finished_at,
            next_poll_at=None,
            last_error=None,
        )

    def record_failed(self, request_id: str, reason: str, *, task_id: str) -> bool:
        """``task_id`` ended FAILED: resubmittable while within the retry budget. False if the
        request has moved on from that task (an old task's failure must not end a new one)."""
        return self._answer(
            request_id,
            task_id,
            (SUBMITTED, UNKNOWN),
            "record failure",
            state=FAILED,
            last_error=reason,
            finished_at=self.clock(),
            next_poll_at=None,
        )

    def record_unknown(self, request_id: str, reason: str, *, task_id: str | None) -> bool:
        """E.g. the deadline passed with a non-terminal or unfamiliar status: report, never drop.

        ``task_id`` is the task the caller looked at; None for a ``submitting`` row (its
        submitter is gone), whose in-flight attempt is then closed as unknown too. Prefer
        :meth:`recover_stale_submitting` for those. False if the request has moved on.
        """
        r, a = requests_table.c, attempts_table.c
        with self._write() as conn:
            row = conn.execute(
                self._locked(select(r.state, r.attempts, r.task_id).where(r.request_id == request_id))
            ).first()
            if row is None:
                raise LedgerStateError(f"cannot record unknown: {request_id} is not in the ledger")
            if row.state not in (SUBMITTED, SUBMITTING) or row.task_id != task_id:
                self._stale(request_id, task_id, "record unknown", row)
                return False
            if row.state == SUBMITTING:
                conn.execute(
                    update(attempts_table)
                    .where(a.request_id == request_id, a.attempt == row.attempts, a.outcome.is_(None))
                    .values(ended_at=self.clock(), outcome=OUTCOME_UNKNOWN, error=reason)
                )
            conn.execute(
                update(requests_table)
                .where(r.request_id == request_id, r.attempts == row.attempts)
                .values(state=UNKNOWN, last_error=reason, next_poll_at=None, updated_at=self.clock())
            )
            return True

    def _answer(self, request_id: str, task_id: str | None, from_states: tuple[str, ...], what: str, **values) -> bool:
        """Apply a poll's answer only while the row holds ``task_id`` in one of ``from_states``
        (one conditional UPDATE, so no other writer can slip in between). A miss is a stale
        answer: logged at debug and reported as False."""
        r = requests_table.c
        if task_id is None:
            raise LedgerStateError(f"cannot {what}: no task id given for {request_id}")
        with self._write() as conn:
            res = conn.execute(
                update(requests_table)
                .where(r.request_id == request_id, r.task_id == task_id, r.state.in_(from_states))
                .values(updated_at=self.clock(), **values)
            )
            if res.rowcount == 1:
                return True
            row = conn.execute(select(r.state, r.attempts, r.task_id).where(r.request_id == request_id)).first()
        if row is None:
            raise LedgerStateError(f"cannot {what}: {request_id} is not in the ledger")
        self._stale(request_id, task_id, what, row)
        return False

    @staticmethod
    def _stale(request_id: str, task_id: str | None, what: str, row) -> None:
        log.debug(
            "stale answer ignored: cannot %s for %s about task %s: the row is %s (attempt %s, task %s)",
            what,
            request_id,
            task_id,
            row.state,
            row.attempts,
            row.task_id,
        )

    # --- videos and lineage -------------------------------------------------------------------

    def needing_video(self, limit: int | None = None, *, max_video_attempts: int | None = None) -> list[TaskRow]:
        r = requests_table.c
        stmt = select(requests_table).where(r.state == SUCCEEDED, r.video_sha256.is_(None))
        if max_video_attempts is not None:
            stmt = stmt.where(r.video_attempts < max_video_attempts)
        stmt = stmt.order_by(r.finished_at, r.request_id)
        if limit is not None:
            stmt = stmt.limit(limit)
        return self._select(stmt)

    def record_video(
        self, request_id: str, *, path: str, sha256: str, size_bytes: int, probe: dict, task_id: str | None = None
    ) -> None:
        """The verified video of a succeeded task. Given ``task_id`` (the task downloaded), the
        row must still hold it."""
        self._transition(
            request_id,
            (SUCCEEDED,),
            "record a video",
            task_id_is=task_id,
            video_path=str(path),
            video_sha256=sha256,
            video_bytes=size_bytes,
            probe_json=json.dumps(probe, sort_keys=True),
            last_error=None,
        )

    def record_video_error(self, request_id: str, error: str, *, task_id: str | None = None) -> None:
        r = requests_table.c
        self._transition(
            request_id,
            (SUCCEEDED,),
            "record a video error",
            task_id_is=task_id,
            video_attempts=r.video_attempts + 1,
            last_error=error,
        )

    def needing_lineage(self, limit: int | None = None) -> list[TaskRow]:
        """Rows whose current outcome is not yet in the lineage table: succeeded with a video,
        failed, or unknown, and ``lineage_state`` differing from ``state``."""
        r = requests_table.c
        stmt = (
            select(requests_table)
            .where(
                or_(
                    and_(r.state == SUCCEEDED, r.video_sha256.is_not(None)),
                    r.state.in_((FAILED, UNKNOWN)),
                ),
                or_(r.lineage_state.is_(None), r.lineage_state != r.state),
            )
            .order_by(r.updated_at, r.request_id)
        )
        if limit is not None:
            stmt = stmt.limit(limit)
        return self._select(stmt)

    def mark_lineage(self, request_ids: Sequence[str]) -> None:
        """Note that the lineage table now holds each row's current state."""
        r = requests_table.c
        with self._write() as conn:
            for i in range(0, len(request_ids), _IN_CHUNK):
                conn.execute(
                    update(requests_table)
                    .where(r.request_id.in_(request_ids[i : i + _IN_CHUNK]))
                    .values(lineage_state=r.state)
                )

    # --- reading ------------------------------------------------------------------------------

    def get(self, request_id: str) -> TaskRow | None:
        rows = self._select(select(requests_table).where(requests_table.c.request_id == request_id))
        return rows[0] if rows else None

    def get_many(self, request_ids: Sequence[str]) -> dict[str, TaskRow]:
        """The rows of these ids (absent ones left out), in chunked ``IN`` queries: one
        round trip per 500 ids instead of one per id."""
        r = requests_table.c
        found: dict[str, TaskRow] = {}
        for i in range(0, len(request_ids), _IN_CHUNK):
            stmt = select(requests_table).where(r.request_id.in_(request_ids[i : i + _IN_CHUNK]))
            found.update((row.request_id, row) for row in self._select(stmt))
        return found

    def rows(
        self,
        states: Iterable[str] | None = None,
        *,
        updated_before: float | None = None,
        limit: int | None = None,
        newest_first: bool = False,
    ) -> list[TaskRow]:
        """Rows oldest first (or most recently updated first). Filter in SQL: reading all 100k
        rows takes over a second."""
        r = requests_table.c
        order = (r.updated_at.desc(), r.request_id) if newest_first else (r.created_at, r.request_id)
        stmt = select(requests_table).order_by(*order)
        if states is not None:
            stmt = stmt.where(r.state.in_(list(states)))
        if updated_before is not None:
            stmt = stmt.where(r.updated_at < updated_before)
        if limit is not None:
            stmt = stmt.limit(limit)
        return self._select(stmt)

    def counts_by_state(self) -> dict[str, int]:
        r = requests_table.c
        with self._read() as conn:
            found = dict(conn.execute(select(r.state, func.count()).group_by(r.state)).all())
        return {s: found.get(s, 0) for s in STATES}

    def oldest_pending(self) -> TaskRow | None:
        """The longest-waiting request not yet finished (planned, submitting or submitted)."""
        r = requests_table.c
        rows = self._select(
            select(requests_table).where(r.state.in_(PENDING_STATES)).order_by(r.created_at, r.request_id).limit(1)
        )
        return rows[0] if rows else None

    def attempts_for(self, request_id: str) -> list[AttemptRow]:
        a = attempts_table.c
        with self._read() as conn:
            rows = conn.execute(select(attempts_table).where(a.request_id == request_id).order_by(a.attempt)).all()
        return [AttemptRow(**row._mapping) for row in rows]

    def submits_since(self, since: float, run_id: str | None = None) -> int:
        """Billable attempts started after ``since`` (optionally for one run): what caps count."""
        a = attempts_table.c
        stmt = select(func.count()).where(a.started_at > since, _billable(a))
        if run_id is not None:
            stmt = stmt.where(a.run_id == run_id)
        with self._read() as conn:
            return conn.scalar(stmt)

    # --- helpers ------------------------------------------------------------------------------

    def _select(self, stmt) -> list[TaskRow]:
        with self._read() as conn:
            return [TaskRow(**row._mapping) for row in conn.execute(stmt)]

    def _transition(self, request_id: str, from_states: tuple[str, ...], what: str, **kw) -> None:
        with self._write() as conn:
            self._update_from(conn, request_id, from_states, what, **kw)

    def _update_from(
        self,
        conn: Connection,
        request_id: str,
        from_states: tuple[str, ...],
        what: str,
        *,
        task_id_is: str | None = None,
        **values,
    ) -> None:
        """Update one row if it is in one of ``from_states`` (and holds ``task_id_is``, when
        given); LedgerStateError otherwise."""
        r = requests_table.c
        where = [r.request_id == request_id, r.state.in_(from_states)]
        if task_id_is is not None:
            where.append(r.task_id == task_id_is)
        res = conn.execute(update(requests_table).where(*where).values(updated_at=self.clock(), **values))
        if res.rowcount != 1:
            raise LedgerStateError(self._describe(conn, request_id, what))

    @staticmethod
    def _describe(conn: Connection, request_id: str, what: str) -> str:
        r = requests_table.c
        row = conn.execute(select(r.state, r.attempts, r.task_id).where(r.request_id == request_id)).first()
        if row is None:
            return f"cannot {what}: {request_id} is not in the ledger"
        return f"cannot {what}: {request_id} is {row.state} (attempt {row.attempts}, task {row.task_id})"


def _billable(a):
    """Attempts that may have cost money: all but those the service provably created no task for."""
    return or_(a.outcome.is_(None), a.outcome.not_in(NOT_BILLABLE))


def _counted(a):
    """Attempts that use up the retry budget: all but those provably never accepted."""
    return or_(a.outcome.is_(None), a.outcome != OUTCOME_REJECTED)


def _state_skip(row, counted: int, retry_budget: int, allow_unknown: bool) -> str | None:
    """Why a request in this state may not be submitted now, or None if it may. ``counted``:
    its attempts that use up the budget."""
    state = row.state
    if state == SUBMITTING:
        return f"submit in progress (attempt {row.attempts} by {row.owner})"
    if state == SUBMITTED:
        return f"already submitted (task {row.task_id})"
    if state == SUCCEEDED:
        return f"already succeeded (task {row.task_id})"
    if state == UNKNOWN and not allow_unknown:
        return "unknown outcome: not resubmitted"
    if counted >= retry_budget:
        return f"retry budget exhausted ({counted} of {retry_budget} attempts)"
    return None
