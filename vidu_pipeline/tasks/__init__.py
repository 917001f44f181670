"""Requests → paid tasks, exactly once; then following each task to its end.

Submission order of durable writes is the whole trick: the ledger commits the intent
(``submitting``) before the POST and the task id right after it. A crash in between leaves a
``submitting`` row whose owner is gone, which :func:`recover_abandoned` turns into
``unknown`` — listed for the user, never resubmitted behind their back. A task id the ledger
cannot take (disk full) goes to an fsync'ed recovery journal and the log, and the next start
gives it back to its row (:func:`replay_journal`).

Polling follows the service's ``eta``: each task is polled when the ledger says it is due,
many at once from a bounded thread pool, inside a time budget so a Dagster sensor tick with
thousands of pending tasks ends in time and carries the rest over. Every answer is recorded
against the task that was polled, so a slow poller's answer about an old task never touches the
request's new one.

The package: submitting.py sends, polling.py follows, recovery.py deals with what a crash or a
full disk left behind, halting.py holds the stop flag. Callers use the names below as
``tasks.<name>``.
"""

from .halting import STOP
from .polling import PollingPolicy, PollReport, first_poll_delay, poll_due
from .recovery import journal_task_id, owner_alive, owner_id, recover_abandoned, replay_journal
from .submitting import SubmitOutcome, submit_requests

__all__ = [
    "STOP",
    "PollReport",
    "PollingPolicy",
    "SubmitOutcome",
    "first_poll_delay",
    "journal_task_id",
    "owner_alive",
    "owner_id",
    "poll_due",
    "recover_abandoned",
    "replay_journal",
    "submit_requests",
]
