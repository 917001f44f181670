"""HTTP client for the Vidu Q1 Reference-to-Video API (or the local simulator: same contract).

Retries are urllib3 ``Retry`` policies mounted on ``requests`` sessions, one policy per kind
of call, because the kinds differ in what is safe to repeat:

* polls and downloads are idempotent GETs: connection errors, read errors, 429 and 5xx are
  retried with capped exponential backoff and jitter, honouring ``Retry-After``;
* a submit creates a paid task, so it is retried only when it provably never reached the
  service: the connection could not be opened, or the service answered 429. A dropped
  connection, a passed deadline, or any answer that does not prove whether a task was created
  (5xx, 202, a 3xx, a broken 200…) raise :class:`~vidu_pipeline.api.errors.SubmitOutcomeUnknown`
  and are never resent (not even when a 5xx carries ``Retry-After``), and a submit never
  follows a redirect.

Every call has a total deadline (connect, headers and body together; see
:mod:`~vidu_pipeline.api.deadline`), so a server that drips bytes cannot hold it forever. No
exception of requests, urllib3 or http.client leaves a public method: each failure is a typed
:mod:`~vidu_pipeline.api.errors` error, sorted by :mod:`~vidu_pipeline.api.answers`.

The API key goes only to the API's own endpoints (never to video download hosts) and never
into a message, log line or ``repr``; and every text the service sends back (error words, a
task's status and failure reason) is scrubbed of it here, so nothing downstream sees it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Mapping
from typing import Any

import requests

from . import answers, contract, errors
from .contract import GenerationRequest
from .deadline import Call, deadline
from .download import DEFAULT_MAX_VIDEO_BYTES, Download, DownloadMixin
from .http_session import (
    _TRANSFER_ERRORS,
    RETRYABLE_STATUSES,
    RedactQueryStrings,
    RetryPolicy,
    _exc_name,
    _int_header,
    _never_sent,
    _retry_after,
    deadline_session,
)
from .task_result import TaskResult, TaskStatus

__all__ = [
    "DEFAULT_MAX_VIDEO_BYTES",
    "MAX_JSON_BYTES",
    "RETRYABLE_STATUSES",
    "Download",
    "RedactQueryStrings",
    "RetryPolicy",
    "ViduClient",
    "check_api_key",
    "poll_delay",
]

log = logging.getLogger(__name__)
_DEFAULT_RETRY = RetryPolicy()  # frozen: one shared default, as a default argument is

MAX_JSON_BYTES = 8 * 1024 * 1024  # a task-result body is tiny; anything this big is broken


class _BodyCut(Exception):
    """The body of an answer did not arrive whole (cut off, or the deadline passed)."""


class ViduClient(DownloadMixin):
    """Submit, poll and download against one base URL with one API key.

    ``*_deadline_s`` bound each HTTP call as a whole (connect, headers, body, retries and their
    waits), while ``read_timeout`` only bounds the silence between two bytes.
    """

    def __init__(
        self,
        api_key: str,
        base_url: str = contract.DEFAULT_BASE_URL,
        *,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        submit_deadline_s: float = 120.0,
        poll_deadline_s: float = 60.0,
        download_deadline_s: float = 900.0,
        retry: RetryPolicy = _DEFAULT_RETRY,
        pool_size: int = 16,
        max_video_bytes: int = DEFAULT_MAX_VIDEO_BYTES,
    ) -> None:
        if not api_key:
            raise errors.AuthError("no API key given (set VIDU_API_KEY)")
        check_api_key(api_key)
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"API base URL must start with http:// or https://, got {base_url[:80]!r}")
        for name, value in (
            ("submit", submit_deadline_s),
            ("poll", poll_deadline_s),
            ("download", download_deadline_s),
        ):
            if not value > 0:
                raise ValueError(f"{name}_deadline_s must be positive, got {value!r}")
        self._api_key = api_key
        self._scrub = answers.Scrubber(api_key)
        self.base_url = base_url.rstrip("/")
        self.timeout = (connect_timeout, read_timeout)
        self.submit_deadline_s = submit_deadline_s
        self.poll_deadline_s = poll_deadline_s
        self.download_deadline_s = download_deadline_s
        self.retry = retry
        self.max_video_bytes = max_video_bytes
        self._gets = deadline_session(retry.for_gets(), pool_size)
        self._posts = deadline_session(retry.for_submit(), pool_size)

    def __repr__(self) -> str:
        return f"ViduClient(base_url={self.base_url!r}, api_key=***)"

    def close(self) -> None:
        self._gets.close()
        self._posts.close()

    def __enter__(self) -> ViduClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- submit --------------------------------------------------------------------------

    def validate(self, request: GenerationRequest | Mapping[str, Any]) -> dict[str, Any]:
        """The body to send, or :class:`InvalidRequest` listing every broken rule."""
        from ..images import inspect_image_bytes

        body = request.to_payload() if isinstance(request, GenerationRequest) else dict(request)
        if "seed" in body and body["seed"] is None:  # "let the service pick": not sent as null
            del body["seed"]
        problems = contract.validate_payload(body, inspect=inspect_image_bytes)
        if problems:
            raise errors.InvalidRequest(problems)
        return body

    def submit(self, request: GenerationRequest | Mapping[str, Any]) -> str:
        """Queue one paid task and return its ``task_id``. Validates first: no money is
        spent on a request the service would reject. Which answer raises what:
        :func:`~vidu_pipeline.api.answers.submit_error_kind`."""
        body = self.validate(request)
        url = self.base_url + contract.SUBMIT_PATH
        with deadline(self.submit_deadline_s) as call:
            try:
                # No redirects: requests would resend the body on a 307/308 (a second paid
                # task, perhaps to another host).
                resp = self._posts.post(
                    url,
                    json=body,
                    headers=self._auth(),
                    timeout=self.timeout,
                    stream=True,
                    allow_redirects=False,
                )
            except _TRANSFER_ERRORS as exc:
                raise self._submit_lost(exc, call) from None
            with resp:
                task_id = self._submit_answer(resp, call)
        log.debug("submitted task %s", task_id)
        return task_id

    def _submit_lost(self, exc: BaseException, call: Call) -> errors.ViduError:
        """The error for a submit that got no answer: not sent, or maybe paid."""
        if _never_sent(exc):
            return errors.TransientError(f"submit not sent: could not connect to {self.base_url} ({_exc_name(exc)})")
        what = (
            f"no complete answer within the {call.seconds:g} s submit deadline"
            if call.expired
            else f"no answer came back ({_exc_name(exc)})"
        )
        return errors.SubmitOutcomeUnknown(
            f"submit sent to {self.base_url} but {what}; a paid task may exist — not resending"
        )

    def _submit_answer(self, resp: requests.Response, call: Call) -> str:
        status = resp.status_code
        kind = answers.submit_error_kind(status)
        if kind is errors.SubmitOutcomeUnknown:
            raise errors.SubmitOutcomeUnknown(
                f"submit answered {status} after the body was sent; a paid task may exist — "
                f"not resending ({self._error_text(resp)})",
                status=status,
            )
        if kind is errors.SubmitRejected:
            raise errors.SubmitRejected(f"submit refused, no task created: {self._error_text(resp)}", status=status)
        if kind is not None:
            raise self._error(resp, kind)
        try:
            task_id = answers.task_id_in(self._json(resp, call))
        except (_BodyCut, errors.MalformedResponse) as exc:
            raise self._no_task_id(getattr(exc, "message", str(exc))) from None
        if task_id is None or self._scrub.has_key(task_id):
            raise self._no_task_id(
                f"task_id is not a non-empty string of at most {answers.MAX_TASK_ID_CHARS} visible ASCII characters"
            )
        return task_id

    @staticmethod
    def _no_task_id(detail: str) -> errors.SubmitOutcomeUnknown:
        return errors.SubmitOutcomeUnknown(
            f"submit answered 200 without a usable task_id ({detail}); a paid task may exist — not resending",
            status=200,
        )

    # --- poll ----------------------------------------------------------------------------

    def get_task_result(self, task_id: str) -> TaskResult:
        """One poll (with retries for transient errors). Unknown statuses are returned as is;
        the status and reason are scrubbed of our key."""
        url = self.base_url + contract.TASK_RESULT_PATH
        with deadline(self.poll_deadline_s) as call:
            try:
                resp = self._gets.get(
                    url, params={"task_id": task_id}, headers=self._auth(), timeout=self.timeout, stream=True
                )
            except _TRANSFER_ERRORS as exc:
                what = f"no answer within the {call.seconds:g} s poll deadline" if call.expired else _exc_name(exc)
                raise errors.TransientError(f"polling task {task_id} failed: {what}") from None
            with resp:
                kind = answers.poll_error_kind(resp.status_code)
                if kind is not None:
                    raise self._error(resp, kind, task_id=task_id)
                try:
                    body = self._json(resp, call)
                except _BodyCut as exc:
                    raise errors.TransientError(f"polling task {task_id}: {exc}", status=200) from None
        try:
            result = TaskResult.from_json(body)
        except ValueError as exc:
            raise errors.MalformedResponse(f"task {task_id}: {self._scrub(str(exc))[:300]}", status=200) from None
        if result.task_id != task_id:
            raise errors.MalformedResponse(
                f"asked for task {task_id}, the service answered for {self._scrub(result.task_id)[:100]}",
                status=200,
            )
        return dataclasses.replace(result, status=self._scrub(result.status), reason=self._scrub(result.reason))

    def wait(
        self,
        task_id: str,
        *,
        timeout_s: float = 1800.0,
        min_interval_s: float = 0.5,
        max_interval_s: float = 30.0,
    ) -> TaskResult:
        """Poll until the task is terminal, sleeping as long as its ``eta`` suggests.

        Raises :class:`TaskFailed` for a failed task and :class:`TimeoutError` at the deadline
        (the task is not forgotten: the caller still has its id).
        """
        deadline_at = time.monotonic() + timeout_s
        while True:
            try:
                result = self.get_task_result(task_id)
            except errors.RateLimited as exc:
                last, delay = "no answer", exc.retry_after or max_interval_s
            except (errors.TransientError, errors.MalformedResponse):
                last, delay = "no answer", max_interval_s / 2  # keep trying until the deadline
            else:
                if result.succeeded:
                    return result
                if result.failed:  # reason already scrubbed by get_task_result
                    raise errors.TaskFailed(
                        f"task {task_id} failed: {result.reason or 'no reason given'}", reason=result.reason
                    )
                last, delay = result.status, poll_delay(result, min_interval_s, max_interval_s)
            remaining = deadline_at - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"task {task_id} not finished after {timeout_s:.0f} s (last status {last})")
            time.sleep(min(delay, remaining))

    # --- helpers -------------------------------------------------------------------------

    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._api_key}"}

    def _json(self, resp: requests.Response, call: Call) -> Any:
        """The JSON body; :class:`_BodyCut` when it did not arrive whole, MalformedResponse
        when it arrived but is not JSON (or is too big to be an answer)."""
        announced = _int_header(resp, "Content-Length")
        if announced is not None and announced > MAX_JSON_BYTES:
            raise errors.MalformedResponse(
                f"response body announced as {announced:,} bytes, over {MAX_JSON_BYTES:,}; refusing to read",
                status=resp.status_code,
            )
        try:
            raw = resp.raw.read(MAX_JSON_BYTES + 1, decode_content=True)
        except _TRANSFER_ERRORS as exc:
            raise _BodyCut(f"the body was cut off: {self._cut_reason(exc, call)}") from None
        if len(raw) > MAX_JSON_BYTES:
            raise errors.MalformedResponse(
                f"response body over {MAX_JSON_BYTES:,} bytes; refusing to parse", status=resp.status_code
            )
        try:
            return json.loads(raw)
        except ValueError:
            if call.expired:  # a close-delimited body ends "normally" when its socket is cut
                raise _BodyCut(f"the body was cut off: {self._cut_reason(None, call)}") from None
            raise errors.MalformedResponse(
                f"response is not JSON: {self._scrub(raw[:2000].decode('utf-8', 'replace'))[:120]!r}",
                status=resp.status_code,
            ) from None

    def _error_words(self, resp: requests.Response) -> tuple[str | None, str]:
        """(reason, message) of an error answer, scrubbed; best effort (the deadline still
        holds: a dripping error body ends when the call does)."""
        try:
            raw = resp.raw.read(64 * 1024, decode_content=True) if resp.raw else b""
        except _TRANSFER_ERRORS:
            raw = b""
        reason, message = answers.error_fields(raw)
        reason = self._scrub(reason)[:100] if reason else None
        return reason, self._scrub(message or resp.reason or "no details")[:500]

    def _error_text(self, resp: requests.Response) -> str:
        reason, message = self._error_words(resp)
        return " ".join(p for p in (reason, message) if p)[:500]

    def _error(
        self, resp: requests.Response, kind: type[errors.ViduError], *, task_id: str | None = None
    ) -> errors.ViduError:
        """The typed error for a non-200 answer (after the retry policy gave up)."""
        status = resp.status_code
        reason, message = self._error_words(resp)
        if kind is errors.InvalidRequest:
            problems = [p.strip() for p in message.split(";") if p.strip()]
            return errors.InvalidRequest(problems or [message], status=status, reason=reason)
        if kind is errors.TaskNotFound:
            what = f"task {task_id} not found" if task_id else "not found"
            return errors.TaskNotFound(f"{what}: {message}", status=status, reason=reason)
        if kind is errors.RateLimited:
            return errors.RateLimited(message, retry_after=_retry_after(resp), status=status, reason=reason)
        return kind(message, status=status, reason=reason)


def check_api_key(api_key: str) -> None:
    """Refuse, before anything is sent, a key that cannot be a bearer token: outside visible
    ASCII, requests fails deep inside http.client with a trace (or sends mangled bytes) after
    the ledger recorded an attempt. The message names the position, never the key."""
    for i, ch in enumerate(api_key):
        if not 0x21 <= ord(ch) <= 0x7E:
            raise errors.ConfigurationError(
                f"VIDU_API_KEY has a character that cannot be sent in an HTTP header at position {i + 1} "
                f"(U+{ord(ch):04X}); check for a pasted look-alike, white space or a control character"
            )


def poll_delay(result: TaskResult, min_s: float, max_s: float) -> float:
    """How long to wait before polling this task again: its eta when known, else a guess
    from its progress; clamped to [min_s, max_s]."""
    if result.eta_seconds is not None and result.eta_seconds > 0:
        delay = result.eta_seconds
    elif result.status == TaskStatus.QUEUED.value:
        delay = max_s / 2
    else:
        delay = min_s * 4
    return max(min_s, min(max_s, delay))
