"""Downloading a task's video: streamed to a temp file, hashed as it goes, size-capped and renamed
into place only when complete; an expired URL is refreshed by polling the task again.

Split out of :mod:`vidu_pipeline.api.client`: :class:`DownloadMixin` is part of ``ViduClient``,
which re-exports :class:`Download`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import secrets
import time
from pathlib import Path

import requests

from . import errors
from .deadline import Call, deadline
from .http_session import _TRANSFER_ERRORS, RetryPolicy, _exc_name, _int_header
from .image_refs import redact_url
from .task_result import TaskResult

# The client's logger: these lines are the client's, wherever the code lives.
log = logging.getLogger("vidu_pipeline.api.client")

DEFAULT_MAX_VIDEO_BYTES = 2 * 1024 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class Download:
    path: Path
    sha256: str
    size_bytes: int
    task: TaskResult  # the poll whose URL was downloaded


class DownloadMixin:
    """``ViduClient``'s download calls; the attributes below are set by ``ViduClient.__init__``."""

    _gets: requests.Session
    timeout: tuple[float, float]
    download_deadline_s: float
    retry: RetryPolicy
    max_video_bytes: int

    def get_task_result(self, task_id: str) -> TaskResult:
        raise NotImplementedError

    @staticmethod
    def _cut_reason(exc: BaseException | None, call: Call) -> str:
        if call.expired:
            return f"the {call.seconds:g} s deadline passed"
        return _exc_name(exc) if exc is not None else "ended early"

    def download(
        self,
        task: TaskResult | str,
        dest: Path,
        *,
        attempts: int = 3,
    ) -> Download:
        """Stream the task's video into ``dest`` atomically, hashing as it goes.

        The file appears at ``dest`` only when complete (size matches Content-Length, under
        the size cap), with the mode a new file gets under the umask. An expired or missing URL
        is refreshed by polling the task again; a cut-off body is fetched again, up to
        ``attempts`` times in all.
        """
        result = task if isinstance(task, TaskResult) else self.get_task_result(task)
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        refreshed = False
        failures = 0
        while True:
            try:
                if not result.videos:
                    raise errors.VideoURLExpired(f"task {result.task_id} ({result.status}) lists no video to download")
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
        where = redact_url(url)
        with deadline(self.download_deadline_s) as call:
            try:
                # identity: the size check and the hash are about the bytes of the file as stored.
                resp = self._gets.get(url, stream=True, timeout=self.timeout, headers={"Accept-Encoding": "identity"})
            except requests.TooManyRedirects:
                raise errors.DownloadError(f"task {task_id}: too many redirects downloading {where}") from None
            except (
                requests.exceptions.InvalidSchema,
                requests.exceptions.InvalidURL,
                requests.exceptions.MissingSchema,
            ) as exc:
                # Not str(exc): it quotes the whole (redirected) URL, signature included.
                raise errors.DownloadError(
                    f"task {task_id}: refused download URL {where} or a redirect from it ({_exc_name(exc)})"
                ) from None
            except _TRANSFER_ERRORS as exc:
                what = f"no answer within the {call.seconds:g} s download deadline" if call.expired else _exc_name(exc)
                raise errors.DownloadError(f"task {task_id}: download of {where} failed: {what}") from None
            with resp:
                self._check_video_answer(resp, task_id)
                return self._stream_to(resp, dest, task_id, call)

    def _check_video_answer(self, resp: requests.Response, task_id: str) -> None:
        status = resp.status_code
        if status in (401, 403, 404, 410):
            raise errors.VideoURLExpired(
                f"task {task_id}: video URL answered {status} (expired or revoked)", status=status
            )
        if status != 200:
            raise errors.DownloadError(f"task {task_id}: video download answered {status}", status=status)
        expected = _int_header(resp, "Content-Length")
        if expected is not None and expected > self.max_video_bytes:
            raise errors.DownloadError(
                f"task {task_id}: video is {expected:,} bytes, over the {self.max_video_bytes:,} cap"
            )

    def _stream_to(self, resp: requests.Response, dest: Path, task_id: str, call: Call) -> tuple[str, int]:
        """Write the body next to ``dest`` and rename it into place once complete."""
        expected = _int_header(resp, "Content-Length")
        digest, size = hashlib.sha256(), 0
        tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(6)}.part")
        # O_EXCL with 0o666: the umask decides the mode, as for any new file (mkstemp's is 0600).
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
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
                except _TRANSFER_ERRORS as exc:
                    raise errors.DownloadError(
                        f"task {task_id}: download cut off after {size:,} bytes ({self._cut_reason(exc, call)})"
                    ) from None
                if call.expired:  # a close-delimited body ends "normally" when its socket is cut
                    raise errors.DownloadError(
                        f"task {task_id}: download cut off after {size:,} bytes (the "
                        f"{call.seconds:g} s download deadline passed)"
                    )
                out.flush()
                os.fsync(out.fileno())
            if expected is not None and size != expected:
                raise errors.DownloadError(f"task {task_id}: got {size:,} of {expected:,} bytes (truncated download)")
            if size == 0:
                raise errors.DownloadError(f"task {task_id}: empty video body")
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return digest.hexdigest(), size
