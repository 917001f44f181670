"""How the command stops: SIGINT/SIGTERM handlers, a full disk recognised anywhere in an
exception chain, and Dagster's library chatter kept off the terminal."""

from __future__ import annotations

import errno
import logging
import os
import signal
import sys

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM: stop taking new work, let the step in flight record its task ids."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_stopping: list[int] = []


def install_stop_handlers() -> None:
    """SIGTERM (Docker, Kubernetes, systemd, ``timeout``) stops like Ctrl-C; a second signal
    forces the exit. SIGINT gets the handler even when inherited as ignored (``cmd &`` in a
    script): Dagster copies SIGINT's disposition onto SIGTERM, so an ignored SIGINT would make
    SIGTERM ignored too — and every child (Dagster's ``tail -F``) would ignore it as well."""

    def handler(signum, _frame):
        if _stopping:
            print(
                f"\n{signal.Signals(signum).name} again: exiting now; the next run marks a submit cut short as unknown",
                file=sys.stderr,
                flush=True,
            )
            os._exit(128 + signum)
        _stopping.append(signum)
        raise Interrupted(signum)

    for signum in STOP_SIGNALS:
        signal.signal(signum, handler)


def disk_full(exc: BaseException) -> bool:
    """A full disk (or quota) anywhere: our StorageError, an OSError, or SQLite's "full"."""
    from ..storage import StorageError

    for e in _chain(exc):
        if isinstance(e, StorageError):
            return True
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if type(e).__name__ == "OperationalError" and "disk is full" in str(e):
            return True
    return False


def disk_message(exc: BaseException) -> str:
    from ..storage import StorageError

    for e in _chain(exc):
        if isinstance(e, StorageError):
            return str(e)
        if isinstance(e, OSError):
            return f"the disk is full: {e.strerror}" + (f" ({e.filename})" if e.filename else "")
        if type(e).__name__ == "OperationalError":
            return f"the disk is full: the ledger could not be written ({getattr(e, 'orig', e)})"
    return f"the disk is full ({exc})"


def _chain(exc: BaseException | None):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def quiet_dagster() -> None:
    """Dagster's beta notices and per-event INFO lines are for library authors and the UI;
    on the command line the progress line and the summary say what matters."""
    import warnings

    import dagster

    for category in (dagster.BetaWarning, dagster.PreviewWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    logging.getLogger("dagster").setLevel(logging.WARNING)
