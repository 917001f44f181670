"""Opening the ledger's database and its transactions: SQLite (WAL, ``BEGIN IMMEDIATE`` for
writes, a read-only mode) or Postgres (row locks; the schema created under an advisory lock),
plus the guarded single-row update every transition uses. :class:`LedgerBase` is what the
ledger's concern mixins build on.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import Table, create_engine, event, inspect, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

from .schema import _CLAIM_LOCK, LedgerStateError, TaskRow, locks_table, metadata, requests_table
from .url import check_ledger_url, shown

# The key of the Postgres advisory lock held while the schema is created ("vidu" in ASCII):
# two processes starting on a fresh database take turns instead of one failing (DuplicateTable).
SCHEMA_LOCK_KEY = 0x76696475


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


class LedgerBase:
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
        check_ledger_url(url)
        self.url = shown(url)  # what messages may say: the password masked (SQLite's is the same)
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
        once on a fresh ledger: SQLite's write lock serializes them, on Postgres a
        transaction-scoped advisory lock does (DDL is transactional there, so the second
        creator sees the first one's tables once it gets the lock)."""
        for tries_left in (2, 1, 0):
            try:
                with self._write() as conn:
                    if not self._sqlite:
                        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": SCHEMA_LOCK_KEY})
                    metadata.create_all(conn)
                    for index in requests_table.indexes:  # a ledger made before an index existed
                        index.create(conn, checkfirst=True)
                    conn.execute(self._insert(locks_table).values(name=_CLAIM_LOCK).on_conflict_do_nothing())
                return
            except (IntegrityError, ProgrammingError, OperationalError):
                if not tries_left:
                    raise
                time.sleep(0.1)

    def close(self) -> None:
        self.engine.dispose()

    def exists(self) -> bool:
        """Whether the ledger's tables are there (``status`` on a database nothing wrote yet)."""
        return inspect(self.engine).has_table(requests_table.name)

    def _insert(self, table: Table):
        """The dialect's INSERT, which has ``on_conflict_do_nothing`` on SQLite and Postgres."""
        return (sqlite.insert if self._sqlite else postgresql.insert)(table)

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
