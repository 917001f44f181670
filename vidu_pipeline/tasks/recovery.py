"""What a crash or a full disk left behind, put right at the next start.

Claims carry their owner (host and pid) so a dead owner's ``submitting`` row can be told from
a live one and listed ``unknown``; a paid task id the ledger could not take is kept in an
fsync'ed journal and given back to its row.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

from ..ledger import Ledger

log = logging.getLogger(__name__)


def owner_id(run_id: str | None = None) -> str:
    """Who holds a claim: host and pid, so a dead owner can be told from a live one."""
    return f"{socket.gethostname()}:{os.getpid()}:{run_id or '-'}"


def owner_alive(owner: str | None) -> bool:
    try:
        host, pid, _ = (owner or "").split(":", 2)
        pid_n = int(pid)
    except ValueError:
        return False
    if host != socket.gethostname():
        return True  # another machine's claim: only the age rule may retire it
    try:
        os.kill(pid_n, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_abandoned(ledger: Ledger, *, max_submit_s: float = 900.0, journal: Path | None = None) -> list[str]:
    """First the task ids a failed ledger write left in ``journal`` reach their rows; then
    ``submitting`` rows whose owner died (or that are older than any submit can take)
    become ``unknown``: the POST may have been paid for. Returns the ids made unknown."""
    if journal is not None:
        replay_journal(ledger, journal)
    dead = ledger.recover_stale_submitting(max_submit_s, owner_alive=owner_alive)
    if dead:
        log.warning("%d interrupted submission(s) marked unknown: %s", len(dead), ", ".join(dead[:10]))
    return dead


# --- the recovery journal: paid task ids the ledger could not take -----------------------------


def journal_task_id(journal: Path, request_id: str, attempt: int, task_id: str) -> None:
    """Append one line and fsync it: the only durable copy of a paid task id when the
    ledger write failed (disk full). Raises OSError when this fails too."""
    journal = Path(journal)
    journal.parent.mkdir(parents=True, exist_ok=True)
    line = (
        json.dumps(
            {"request_id": request_id, "attempt": attempt, "task_id": task_id, "time": time.time()}, sort_keys=True
        )
        + "\n"
    )
    fd = os.open(journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def replay_journal(ledger: Ledger, journal: Path) -> list[str]:
    """Give every journaled task id to its attempt: a ``submitting``/``unknown`` row still at
    that attempt without a task id becomes ``submitted`` (polled, downloaded), instead of
    being left unknown. Idempotent: rows that already hold a task id are not touched.
    Returns the request ids that became ``submitted``."""
    try:
        lines = Path(journal).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    restored = []
    for line in lines:
        try:
            entry = json.loads(line)
            request_id, attempt, task_id = entry["request_id"], int(entry["attempt"]), str(entry["task_id"])
        except (ValueError, KeyError, TypeError):
            continue  # a torn last line
        if ledger.record_submitted(request_id, attempt, task_id, first_poll_at=time.time()):
            restored.append(request_id)
    if restored:
        log.warning("%d task id(s) restored from %s: %s", len(restored), journal, ", ".join(restored[:10]))
    return restored
