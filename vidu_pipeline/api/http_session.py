"""HTTP plumbing shared by the client's calls: the retry policies (what is safe to repeat), the
sessions they are mounted on, and helpers that read answers and name failures without quoting
URLs (a signed URL carries its signature).

Split out of :mod:`vidu_pipeline.api.client`, which re-exports the public names.
"""

from __future__ import annotations

import dataclasses
import http.client
import logging
import re

import requests
import urllib3.exceptions
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError
from urllib3.util.retry import Retry

from .deadline import DeadlineAdapter, DeadlineRetry

RETRYABLE_STATUSES = frozenset({429, 500, 502, 503, 504})
# What a failed transfer can raise from below requests' wrappers (urllib3 re-raises some of its
# own errors; a body read through ``resp.raw`` is not wrapped at all).
_TRANSFER_ERRORS = (OSError, urllib3.exceptions.HTTPError, http.client.HTTPException)


class _SubmitRetry(DeadlineRetry):
    """The submit's policy: a status is retried only when it is 429.

    urllib3 also retries any 413/429/503 that carries ``Retry-After`` whatever the
    ``status_forcelist`` says; for a submit, a 503 may come after the task was created, so
    resending it could pay twice.
    """

    def is_retry(self, method: str, status_code: int, has_retry_after: bool = False) -> bool:
        return status_code == 429 and super().is_retry(method, status_code, has_retry_after)


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """How hard to try. ``retries`` counts re-tries after the first attempt."""

    retries: int = 4
    backoff_factor: float = 0.5
    backoff_max: float = 30.0
    jitter: float = 0.25
    retry_after_max: float = 60.0

    def for_gets(self) -> Retry:
        return DeadlineRetry(
            total=self.retries,
            connect=self.retries,
            read=self.retries,
            status=self.retries,
            other=self.retries,
            allowed_methods=frozenset({"GET"}),
            status_forcelist=RETRYABLE_STATUSES,
            **self._backoff(),
            redirect=5,
        )

    def _backoff(self) -> dict:
        """How both policies wait between tries; the last answer is returned, not raised."""
        return {
            "backoff_factor": self.backoff_factor,
            "backoff_max": self.backoff_max,
            "backoff_jitter": self.jitter,
            "respect_retry_after_header": True,
            "retry_after_max": int(self.retry_after_max),
            "raise_on_status": False,
        }

    def for_submit(self) -> Retry:
        # read=0 / other=0: once the body may have been sent, never again. Status retries
        # apply to 429 only (the service refused the task; nothing was created) — also when a
        # 5xx carries Retry-After (see _SubmitRetry).
        return _SubmitRetry(
            total=self.retries,
            connect=self.retries,
            read=0,
            other=0,
            status=self.retries,
            redirect=0,
            allowed_methods=frozenset({"POST"}),
            status_forcelist=frozenset({429}),
            **self._backoff(),
        )


def deadline_session(retry: Retry, pool_size: int = 10) -> requests.Session:
    """A session whose every call obeys a total deadline (``api/deadline.py``) and ``retry``."""
    session = requests.Session()
    session.max_redirects = 5
    adapter = DeadlineAdapter(max_retries=retry, pool_connections=pool_size, pool_maxsize=pool_size)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.headers["User-Agent"] = "vidu-pipeline"
    return session


def _never_sent(exc: BaseException) -> bool:
    """True when the request provably never left: the connection could not be opened."""
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return True
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, (NewConnectionError, ConnectTimeoutError)):
            return True
        reason = getattr(cause, "reason", None)
        nested = cause.args[0] if cause.args and isinstance(cause.args[0], BaseException) else None
        cause = reason if isinstance(reason, BaseException) else nested or cause.__cause__ or cause.__context__
    return False


def _exc_name(exc: BaseException) -> str:
    """The exception class and the innermost reason, without URLs (they may carry secrets)."""
    inner = getattr(exc, "args", ()) and exc.args[0]
    reason = getattr(inner, "reason", None) if inner is not None else None
    name = type(exc).__name__
    return f"{name}: {type(reason).__name__}" if isinstance(reason, BaseException) else name


def _retry_after(resp: requests.Response) -> float | None:
    value = resp.headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


class RedactQueryStrings(logging.Filter):
    """Drops query strings from urllib3's log lines: its DEBUG lines quote each request's URL,
    and a signed video URL carries its signature there."""

    _QUERY_RE = re.compile(r"\?[^\s\"'<>]*")

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = self._QUERY_RE.sub("?…", record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(self._QUERY_RE.sub("?…", a) if isinstance(a, str) else a for a in record.args)
        return True


def _redact_urllib3_logs() -> None:
    for name in ("urllib3.connectionpool", "urllib3.util.retry", "urllib3.poolmanager"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactQueryStrings) for f in logger.filters):
            logger.addFilter(RedactQueryStrings())


_redact_urllib3_logs()


def _int_header(resp: requests.Response, name: str) -> int | None:
    try:
        return int(resp.headers[name])
    except (KeyError, ValueError):
        return None
