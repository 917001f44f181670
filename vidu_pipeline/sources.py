"""Getting the bytes of a reference image, from a local file or an http(s) URL, bounded in size
and in time: nothing a catalog points at can hang a run or fill the memory.

Every failure is a :class:`SourceError` carrying the rejection rule; ``images`` re-exports
these names.
"""

from __future__ import annotations

import os
import stat
from urllib.parse import urljoin, urlsplit

from .api.contract import MAX_IMAGE_FILE_BYTES
from .api.image_refs import redact_url

URL_TIMEOUT = (5.0, 20.0)  # connect, read (seconds between bytes)
URL_DEADLINE_S = 120.0  # the whole download, so a slow drip cannot hold a worker forever
MAX_REDIRECTS = 5

_FILE_KINDS = (  # (test, name) for what is not a regular file
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


class SourceError(Exception):
    """The bytes of an image could not be obtained; ``rule`` is the rejection rule."""

    def __init__(self, rule: str, reason: str):
        super().__init__(reason)
        self.rule = rule
        self.reason = reason


def not_regular_reason(mode: int) -> str | None:
    """Why a file of this ``st_mode`` is not read (a FIFO or device could block forever)."""
    if stat.S_ISREG(mode):
        return None
    kind = next((name for test, name in _FILE_KINDS if test(mode)), "not a regular file")
    return f"it is {kind}, not a regular file"


def read_local(path: str | os.PathLike) -> bytes:
    """Read a regular file, refusing before reading when it is over the file-size limit.

    Anything else (FIFO, socket, device, directory, a symlink to one) is refused on ``stat``
    before any open; the file is then opened non-blocking and checked again with ``fstat``,
    so one swapped in between cannot block the read either.
    """
    try:
        problem = not_regular_reason(os.stat(path).st_mode)
        if problem:
            raise SourceError("unreadable", problem)
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
        with open(fd, "rb") as f:
            st = os.fstat(fd)
            problem = not_regular_reason(st.st_mode)
            if problem:
                raise SourceError("unreadable", problem)
            if st.st_size > MAX_IMAGE_FILE_BYTES:
                raise SourceError("file_size", f"{st.st_size:,} bytes, at most {MAX_IMAGE_FILE_BYTES:,} allowed")
            return f.read(MAX_IMAGE_FILE_BYTES + 1)
    except FileNotFoundError:
        raise SourceError("missing_file", "the file does not exist") from None
    except PermissionError:
        raise SourceError("unreadable", "permission denied when reading the file") from None
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        raise SourceError("unreadable", f"cannot be read ({getattr(exc, 'strerror', None) or exc})") from None


def url_session():
    """A session for catalog URLs: no retries, and sockets the total deadline of
    :func:`fetch_url` can cut (the API client's deadline mechanism, see ``api/deadline.py``)."""
    from urllib3.util.retry import Retry

    from .api.http_session import deadline_session

    return deadline_session(Retry(0, read=False))  # what requests makes of max_retries=0


def fetch_url(url: str, session, *, timeout=URL_TIMEOUT, deadline_s: float = URL_DEADLINE_S) -> bytes:
    """GET an http(s) image, following at most MAX_REDIRECTS redirects that stay http(s).

    Streamed with the 50 MB cap (Content-Length is checked first, then the running total), so a
    huge or endless body never lands in memory, and bounded by ``deadline_s`` for the whole
    download — connect, headers and body — however slowly the server sends: at the deadline
    its socket is shut down. ``session`` must come from :func:`url_session`. Every failure is a
    SourceError, never a crash.
    """
    from .api.deadline import DeadlineAdapter, deadline

    if not all(isinstance(session.get_adapter(prefix), DeadlineAdapter) for prefix in ("http://", "https://")):
        raise TypeError("fetch_url needs a session from url_session(): only its sockets obey the deadline")
    with deadline(deadline_s) as call:
        try:
            data = _fetch(url, session, timeout)
        except SourceError:
            if not call.expired:
                raise
            data = None
    if call.expired or data is None:  # a cut body can also end as a short "success"
        raise SourceError("url_fetch", f"download took longer than {deadline_s:g} s")
    return data


def _fetch(url: str, session, timeout) -> bytes:
    import requests  # only URL catalogs pay for the import

    for _ in range(MAX_REDIRECTS + 1):
        if urlsplit(url).scheme.lower() not in ("http", "https"):
            raise SourceError("url_scheme", f"redirected to a {urlsplit(url).scheme}: URL; only http(s) is fetched")
        try:
            resp = session.get(url, stream=True, timeout=timeout, allow_redirects=False)
        except requests.RequestException as exc:
            raise SourceError("url_fetch", f"request failed ({type(exc).__name__})") from None
        with resp:
            if resp.is_redirect:
                url = urljoin(url, resp.headers.get("Location", ""))
                continue
            if resp.status_code != 200:
                raise SourceError("url_fetch", f"HTTP {resp.status_code} from {redact_url(resp.url or url)}")
            return _read_body(resp)
    raise SourceError("url_fetch", f"more than {MAX_REDIRECTS} redirects")


def _read_body(resp) -> bytes:
    import requests

    declared = resp.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > MAX_IMAGE_FILE_BYTES:
        raise SourceError(
            "file_size", f"Content-Length {int(declared):,} bytes, at most {MAX_IMAGE_FILE_BYTES:,} allowed"
        )
    chunks, total = [], 0
    try:
        for chunk in resp.iter_content(1 << 16):
            total += len(chunk)
            if total > MAX_IMAGE_FILE_BYTES:
                raise SourceError("file_size", f"body exceeds {MAX_IMAGE_FILE_BYTES:,} bytes")
            chunks.append(chunk)
    except requests.RequestException as exc:
        raise SourceError("url_fetch", f"download failed ({type(exc).__name__})") from None
    return b"".join(chunks)
