"""A fresh PostgreSQL database per test, on the server ``VIDU_TEST_POSTGRES_URL`` names
(``.ci/postgres.sh start`` prints it). Without that variable the tests skip with the reason;
in CI (``CI`` set to 1/true) they fail instead, so a CI that lost its server cannot go green.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator

import pytest

ENV_URL = "VIDU_TEST_POSTGRES_URL"


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def server_url() -> str:
    """The server's URL, or skip (laptop) / fail (CI) saying what is missing."""
    url = os.environ.get(ENV_URL, "").strip()
    problem = None if url else f'{ENV_URL} is not set (start a server: eval "$(.ci/postgres.sh start)")'
    if not problem:
        try:
            import psycopg  # noqa: F401
        except ImportError:
            problem = "psycopg is not installed (pip install -e '.[test,postgres]')"
    if problem:
        if in_ci():
            pytest.fail(f"PostgreSQL tests must run in CI: {problem}", pytrace=False)
        pytest.skip(f"no PostgreSQL server: {problem}")
    return url


@contextlib.contextmanager
def fresh_database() -> Iterator[str]:
    """A new, empty database on the test server (dropped afterwards); yields its URL."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    server = make_url(server_url())
    name = f"vidu_{uuid.uuid4().hex[:12]}"
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        yield server.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
