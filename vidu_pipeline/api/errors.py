"""Typed errors of the Vidu client: each says what happened and whether retrying is safe.

Messages never carry the API key, a data URI or a signed video URL's query string.
"""

from __future__ import annotations


class ViduError(Exception):
    """Base class. ``retryable`` tells a caller whether the same call may simply be repeated."""

    retryable = False

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        reason: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.reason = reason

    def __str__(self) -> str:
        parts = []
        if self.status is not None:
            parts.append(f"HTTP {self.status}")
        if self.reason:
            parts.append(self.reason)
        head = " ".join(parts)
        return f"{head}: {self.message}" if head else self.message


class InvalidRequest(ViduError):
    """400, or caught before sending: the request breaks the contract. Never retry as is."""

    def __init__(self, problems: list[str], *, status: int | None = None, reason: str | None = None):
        self.problems = list(problems)
        super().__init__("; ".join(self.problems) or "invalid request", status=status, reason=reason)


class AuthError(ViduError):
    """401/403: missing or wrong key, or no balance left. Never retry."""


class TaskNotFound(ViduError):
    """404: the service does not know this task id."""


class RateLimited(ViduError):
    """429. ``retry_after`` is the server's Retry-After in seconds, when it sent one."""

    retryable = True

    def __init__(self, message: str, *, retry_after: float | None = None, **kw) -> None:
        super().__init__(message, **kw)
        self.retry_after = retry_after


class TransientError(ViduError):
    """5xx, timeouts, dropped connections or a passed deadline on a call that is safe to
    repeat: a poll, or a submit that provably never left (the connection was never opened)."""

    retryable = True


class SubmitOutcomeUnknown(ViduError):
    """The submit body may have been sent and no answer proves whether a task was created: a
    5xx, a 1xx, a 2xx other than 200 (202, 201, 204…), a 3xx, a 200 cut off or without a
    usable task_id, a dropped connection, or the submit deadline passing. A paid task may exist.

    The client never resends in this case; the caller records it and decides.
    """


class MalformedResponse(ViduError):
    """The service answered 200 with a body that is not the documented shape."""

    retryable = True


class TaskFailed(ViduError):
    """The task ended in TASK_STATUS_FAILED; ``reason`` is the service's."""


class DownloadError(ViduError):
    """A video download did not produce the complete file (short, too big, bad redirect)."""

    retryable = True


class VideoURLExpired(DownloadError):
    """The signed video URL has expired (403/404/410 on the download); poll again for a fresh one."""


class SubmitRejected(ViduError):
    """A 4xx other than 400/401/403/429 on submit: the service refused the request and
    created no task. Not retried as is (the request ends failed with the service's words)."""


class ConfigurationError(ViduError):
    """The settings cannot work at all (e.g. a key with a character no HTTP header can
    carry). Said before anything is sent; nothing is recorded as attempted."""
