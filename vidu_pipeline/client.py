"""HTTP client for the Vidu Q1 Reference-to-Video API (or the local simulator: same contract).

Retries are urllib3 ``Retry`` policies mounted on ``requests`` sessions, one policy per kind
of call, because the kinds differ in what is safe to repeat:

* polls and downloads are idempotent GETs: connection errors, read errors, 429 and 5xx are
  retried with capped exponential backoff and jitter, honouring ``Retry-After``;
* a submit creates a paid task, so it is retried only when it provably never reached the
  service: the connection could not be opened, or the service answered 429. A dropped
  connection, a read timeout or a 5xx after the body was sent raise
  :class:`~vidu_pipeline.errors.SubmitOutcomeUnknown` and are never resent (not even when a
  5xx carries ``Retry-After``), and a submit never follows a redirect.

The API key goes only to the API's own endpoints (never to video download hosts) and never
into a message, log line or ``repr``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError
from urllib3.util.retry import Retry

from . import contract, errors
from .contract import GenerationRequest, TaskResult

log = logging.getLogger(__name__)

RETRYABLE_STATUSES = frozenset({429, 500, 502, 503, 504})
MAX_JSON_BYTES = 8 * 1024 * 1024  # a task-result body is tiny; anything this big is broken
DEFAULT_MAX_VIDEO_BYTES = 2 * 1024 * 1024 * 1024
# A data URI's payload, wherever a server echoes one back into an error message.
_DATA_URI_PAYLOAD_RE = re.compile(r"(data:[A-Za-z0-9.+/-]*;base64,)[A-Za-z0-9+/=_-]+")


class _SubmitRetry(Retry):
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
        return Retry(
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


@dataclasses.dataclass(frozen=True)
class Download:
    path: Path
    sha256: str
    size_bytes: int
    task: TaskResult  # the poll whose URL was downloaded


class ViduClient:
    """Submit, poll and download against one base URL with one API key."""

    def __init__(
        self,
        api_key: str,
        base_url: str = contract.DEFAULT_BASE_URL,
        *,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        retry: RetryPolicy = RetryPolicy(),
        pool_size: int = 16,
        max_video_bytes: int = DEFAULT_MAX_VIDEO_BYTES,
    ) -> None:
        if not api_key:
            raise errors.AuthError("no API key given (set VIDU_API_KEY)")
        check_api_key(api_key)
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"API base URL must start with http:// or https://, got {base_url[:80]!r}")
        self._api_key = api_key
        self.base_url = base_url.rstrip("/")
        self.timeout = (connect_timeout, read_timeout)
        self.retry = retry
        self.max_video_bytes = max_video_bytes
        self._gets = _session(retry.for_gets(), pool_size)
        self._posts = _session(retry.for_submit(), pool_size)

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
        from .images import inspect_image_bytes

        body = request.to_payload() if isinstance(request, GenerationRequest) else dict(request)
        if "seed" in body and body["seed"] is None:  # "let the service pick": not sent as null
            del body["seed"]
        problems = contract.validate_payload(body, inspect=inspect_image_bytes)
        if problems:
            raise errors.InvalidRequest(problems)
        return body

    def submit(self, request: GenerationRequest | Mapping[str, Any]) -> str:
        """Queue one paid task and return its ``task_id``. Validates first: no money is
        spent on a request the service would reject."""
        body = self.validate(request)
        url = self.base_url + contract.SUBMIT_PATH
        try:
            # No redirects: requests would resend the body on a 307/308 (a second paid task,
            # perhaps to another host).
            resp = self._posts.post(
                url, json=body, headers=self._auth(), timeout=self.timeout, stream=True,
                allow_redirects=False,
            )
        except requests.RequestException as exc:
            if _never_sent(exc):
                raise errors.TransientError(
                    f"submit not sent: could not connect to {self.base_url} ({_exc_name(exc)})"
                ) from None
            raise errors.SubmitOutcomeUnknown(
                f"submit sent to {self.base_url} but no answer came back ({_exc_name(exc)}); "
                "a paid task may exist — not resending"
            ) from None
        with resp:
            if resp.status_code >= 500:
                raise errors.SubmitOutcomeUnknown(
                    f"submit answered {resp.status_code} after the body was sent; a paid task "
                    f"may exist — not resending ({self._error_text(resp)})",
                    status=resp.status_code,
                )
            if resp.status_code != 200:
                raise self._error(resp)
            try:
                task_id = self._json(resp)["task_id"]
                if not isinstance(task_id, str) or not task_id:
                    raise ValueError("task_id is not a non-empty string")
            except (KeyError, TypeError, ValueError, errors.MalformedResponse) as exc:
                raise errors.SubmitOutcomeUnknown(
                    f"submit answered 200 without a usable task_id ({exc}); a paid task may exist",
                    status=200,
                ) from None
        log.debug("submitted task %s", task_id)
        return task_id

    # --- poll ----------------------------------------------------------------------------

    def get_task_result(self, task_id: str) -> TaskResult:
        """One poll (with retries for transient errors). Unknown statuses are returned as is."""
        url = self.base_url + contract.TASK_RESULT_PATH
        try:
            resp = self._gets.get(
                url, params={"task_id": task_id}, headers=self._auth(), timeout=self.timeout, stream=True
            )
        except requests.RequestException as exc:
            raise errors.TransientError(
                f"polling task {task_id} failed: {_exc_name(exc)}"
            ) from None
        with resp:
            if resp.status_code != 200:
                raise self._error(resp, task_id=task_id)
            body = self._json(resp)
        try:
            result = TaskResult.from_json(body)
        except ValueError as exc:
            raise errors.MalformedResponse(f"task {task_id}: {exc}", status=200) from None
        if result.task_id != task_id:
            raise errors.MalformedResponse(
                f"asked for task {task_id}, the service answered for {self._scrub(result.task_id[:100])}",
                status=200,
            )
        return result

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
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                result = self.get_task_result(task_id)
            except errors.RateLimited as exc:
                result, delay = None, exc.retry_after or max_interval_s
            except (errors.TransientError, errors.MalformedResponse):
                result, delay = None, max_interval_s / 2  # keep trying until the deadline
            else:
                if result.succeeded:
                    return result
                if result.failed:
                    reason = self._scrub(result.reason)
                    raise errors.TaskFailed(f"task {task_id} failed: {reason or 'no reason given'}",
                                            reason=reason)
                delay = poll_delay(result, min_interval_s, max_interval_s)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                last = result.status if result else "no answer"
                raise TimeoutError(f"task {task_id} not finished after {timeout_s:.0f} s (last status {last})")
            time.sleep(min(delay, remaining))

    # --- download ------------------------------------------------------------------------

    def download(
        self,
        task: TaskResult | str,
        dest: Path,
        *,
        attempts: int = 3,
    ) -> Download:
        """Stream the task's video into ``dest`` atomically, hashing as it goes.

        The file appears at ``dest`` only when complete (size matches Content-Length, under
        the size cap). An expired or missing URL is refreshed by polling the task again;
        a cut-off body is fetched again, up to ``attempts`` times in all.
        """
        result = task if isinstance(task, TaskResult) else self.get_task_result(task)
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        refreshed = False
        failures = 0
        while True:
            try:
                if not result.videos:
                    raise errors.VideoURLExpired(
                        f"task {result.task_id} ({result.status}) lists no video to download"
                    )
                sha, size = self._fetch(result.videos[0].url, dest, result.task_id)
                return Download(path=dest, sha256=sha, size_bytes=size, task=result)
            except errors.VideoURLExpired:
                if refreshed:
                    raise
                log.info("video URL of task %s expired or missing; polling for a fresh one", result.task_id)
            except errors.DownloadError as exc:
                failures += 1
                if failures >= attempts:
                    raise
                log.warning("download of task %s failed (attempt %d): %s", result.task_id, failures, exc)
                time.sleep(min(self.retry.backoff_max, self.retry.backoff_factor * 2**failures))
                if refreshed:
                    continue
            result, refreshed = self.get_task_result(result.task_id), True

    def _fetch(self, url: str, dest: Path, task_id: str) -> tuple[str, int]:
        where = contract.redact_url(url)
        try:
            # identity: the size check and the hash are about the bytes of the file as stored.
            resp = self._gets.get(
                url, stream=True, timeout=self.timeout, headers={"Accept-Encoding": "identity"}
            )
        except requests.TooManyRedirects:
            raise errors.DownloadError(f"task {task_id}: too many redirects downloading {where}") from None
        except (requests.exceptions.InvalidSchema, requests.exceptions.InvalidURL,
                requests.exceptions.MissingSchema) as exc:
            # Not str(exc): it quotes the whole (redirected) URL, signature included.
            raise errors.DownloadError(
                f"task {task_id}: refused download URL {where} or a redirect from it ({_exc_name(exc)})"
            ) from None
        except requests.RequestException as exc:
            raise errors.DownloadError(f"task {task_id}: download of {where} failed: {_exc_name(exc)}") from None
        with resp:
            if resp.status_code in (401, 403, 404, 410):
                raise errors.VideoURLExpired(
                    f"task {task_id}: video URL answered {resp.status_code} (expired or revoked)",
                    status=resp.status_code,
                )
            if resp.status_code != 200:
                raise errors.DownloadError(
                    f"task {task_id}: video download answered {resp.status_code}", status=resp.status_code
                )
            expected = _int_header(resp, "Content-Length")
            if expected is not None and expected > self.max_video_bytes:
                raise errors.DownloadError(
                    f"task {task_id}: video is {expected:,} bytes, over the {self.max_video_bytes:,} cap"
                )
            digest, size = hashlib.sha256(), 0
            fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
            try:
                with os.fdopen(fd, "wb") as out:
                    try:
                        for chunk in resp.iter_content(chunk_size=1 << 20):
                            size += len(chunk)
                            if size > self.max_video_bytes:
                                raise errors.DownloadError(
                                    f"task {task_id}: video exceeds the {self.max_video_bytes:,}-byte cap"
                                )
                            digest.update(chunk)
                            out.write(chunk)
                    except requests.RequestException as exc:
                        raise errors.DownloadError(
                            f"task {task_id}: download cut off after {size:,} bytes ({_exc_name(exc)})"
                        ) from None
                    out.flush()
                    os.fsync(out.fileno())
                if expected is not None and size != expected:
                    raise errors.DownloadError(
                        f"task {task_id}: got {size:,} of {expected:,} bytes (truncated download)"
                    )
                if size == 0:
                    raise errors.DownloadError(f"task {task_id}: empty video body")
                os.replace(tmp, dest)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        return digest.hexdigest(), size

    # --- helpers -------------------------------------------------------------------------

    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._api_key}"}

    def _scrub(self, text: str) -> str:
        """Server-supplied text without our key or an echoed data-URI payload."""
        if self._api_key:
            text = text.replace(self._api_key, "***")
        return _DATA_URI_PAYLOAD_RE.sub(r"\1…", text)

    def _json(self, resp: requests.Response) -> Any:
        announced = _int_header(resp, "Content-Length")
        if announced is not None and announced > MAX_JSON_BYTES:
            raise errors.MalformedResponse(
                f"response body announced as {announced:,} bytes, over {MAX_JSON_BYTES:,}; refusing to read",
                status=resp.status_code,
            )
        raw = resp.raw.read(MAX_JSON_BYTES + 1, decode_content=True)
        if len(raw) > MAX_JSON_BYTES:
            raise errors.MalformedResponse(
                f"response body over {MAX_JSON_BYTES:,} bytes; refusing to parse", status=resp.status_code
            )
        try:
            return json.loads(raw)
        except ValueError:
            raise errors.MalformedResponse(
                f"response is not JSON: {self._scrub(raw[:120].decode('utf-8', 'replace'))!r}",
                status=resp.status_code,
            ) from None

    def _error_text(self, resp: requests.Response) -> str:
        reason, message = _error_fields(resp)
        return self._scrub(" ".join(p for p in (reason, message) if p) or resp.reason or "no details")[:500]

    def _error(self, resp: requests.Response, *, task_id: str | None = None) -> errors.ViduError:
        """The typed error for a non-200 answer (after the retry policy gave up)."""
        status = resp.status_code
        reason, message = _error_fields(resp)
        message = self._scrub(message or resp.reason or "no details")
        reason = self._scrub(reason)[:100] if reason else None
        kw = {"status": status, "reason": reason}
        if status == 400:
            problems = [p.strip() for p in message.split(";") if p.strip()]
            return errors.InvalidRequest(problems or [message], **kw)
        if status in (401, 403):
            return errors.AuthError(message, **kw)
        if status == 404:
            what = f"task {task_id} not found" if task_id else "not found"
            return errors.TaskNotFound(f"{what}: {message}", **kw)
        if status == 429:
            return errors.RateLimited(message, retry_after=_retry_after(resp), **kw)
        if status >= 500:
            return errors.TransientError(message, **kw)
        return errors.ViduError(message, **kw)


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
    elif result.status == contract.TaskStatus.QUEUED.value:
        delay = max_s / 2
    else:
        delay = min_s * 4
    return max(min_s, min(max_s, delay))


def _session(retry: Retry, pool_size: int) -> requests.Session:
    session = requests.Session()
    session.max_redirects = 5
    adapter = HTTPAdapter(max_retries=retry, pool_connections=pool_size, pool_maxsize=pool_size)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.headers["User-Agent"] = "vidu-pipeline"
    return session


def _never_sent(exc: requests.RequestException) -> bool:
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


def _error_fields(resp: requests.Response) -> tuple[str | None, str]:
    """(reason, message) from an error body; defensive: a non-JSON body is still an error."""
    try:
        raw = resp.raw.read(64 * 1024, decode_content=True) if resp.raw else b""
    except Exception:  # the body of an error answer is best effort
        raw = b""
    try:
        body = json.loads(raw)
    except ValueError:
        return None, raw[:200].decode("utf-8", "replace").strip()
    if not isinstance(body, Mapping):
        return None, str(body)[:200]
    reason = body.get("reason")
    message = body.get("message") or body.get("error") or ""
    problems = (body.get("metadata") or {}).get("problems") if isinstance(body.get("metadata"), Mapping) else None
    if isinstance(problems, list) and problems:
        message = "; ".join(map(str, problems))
    return (str(reason) if reason else None), str(message)


def _retry_after(resp: requests.Response) -> float | None:
    value = resp.headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def _int_header(resp: requests.Response, name: str) -> int | None:
    try:
        return int(resp.headers[name])
    except (KeyError, ValueError):
        return None
