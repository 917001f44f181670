"""Where the pipeline keeps what it makes, and the one error a failed durable write raises."""


class StorageError(Exception):
    """A durable local write failed (disk full, read-only folder). The message says what was
    kept and where (e.g. a paid task id written to the recovery journal and stderr)."""
