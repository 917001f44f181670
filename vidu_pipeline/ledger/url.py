"""The ledger's SQLAlchemy URL: checked up front with one clear line, and shown without its
password. SQLite (the default, a file in the data folder) and PostgreSQL are supported.
"""

from __future__ import annotations

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError

from ..api.errors import ConfigurationError

ENV_LEDGER_URL = "VIDU_LEDGER_URL"
POSTGRES_EXAMPLE = "postgresql+psycopg://USER:PASSWORD@HOST:5432/DATABASE"
POSTGRES_INSTALL = "pip install 'vidu-pipeline[postgres]'"
SUPPORTED = ("sqlite", "postgresql")


def shown(url: str | URL) -> str:
    """The URL as it may be printed or logged: the password replaced by ``***``."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "(not a URL)"


def check_ledger_url(url: str) -> URL:
    """The parsed URL, or :class:`ConfigurationError` saying in one line what is wrong: not a
    URL, a scheme the ledger does not support, or a driver that is not installed."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ConfigurationError(
            f"the ledger URL ({ENV_LEDGER_URL} / --ledger-url) is not a SQLAlchemy URL; "
            f"expected sqlite:///PATH or {POSTGRES_EXAMPLE}"
        ) from None
    where = f"the ledger URL {shown(parsed)}"
    backend = parsed.get_backend_name()
    if backend == "postgres":
        raise ConfigurationError(f"{where}: SQLAlchemy does not know postgres://; use {POSTGRES_EXAMPLE}")
    if backend not in SUPPORTED:
        raise ConfigurationError(
            f"{where}: unknown scheme {parsed.drivername!r}; the ledger runs on sqlite:///PATH or {POSTGRES_EXAMPLE}"
        )
    try:
        parsed.get_dialect().import_dbapi()
    except NoSuchModuleError:
        raise ConfigurationError(f"{where}: unknown driver {parsed.drivername!r}; use {POSTGRES_EXAMPLE}") from None
    except ImportError as exc:
        raise ConfigurationError(
            f"{where}: its driver is not installed ({exc.name or exc}); {POSTGRES_INSTALL}"
        ) from None
    if backend == "postgresql" and not parsed.database:
        raise ConfigurationError(f"{where}: no database named; use {POSTGRES_EXAMPLE}")
    return parsed
