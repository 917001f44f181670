"""Why submitting and polling stop early: Ctrl-C, or a ledger that cannot be written.

Both loops share the stop flag, and both word a failed ledger write the same way.
"""

from __future__ import annotations

import threading

# Set on Ctrl-C: submits and polls not yet started are skipped; those in flight finish and
# are recorded, so the ledger stays exact.
STOP = threading.Event()


def db_reason(exc: BaseException) -> str:
    """The database's own words (e.g. 'database or disk is full'), without SQL or parameters."""
    orig = getattr(exc, "orig", None)
    return str(orig or exc).splitlines()[0][:200] if str(orig or exc) else type(exc).__name__
