"""Signed download URLs: what lets anyone holding a video URL fetch it until it expires.

Kept apart from the HTTP code because the key outlives the process: it sits in the state
folder, so URLs handed out before a restart still download after it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

VIDEO_PREFIX = "/_simulator/videos/"


class UrlSigner:
    """Signs and checks ``<task_id>:<expires>`` with the state folder's secret."""

    def __init__(self, secret_path: Path) -> None:
        self._secret = _url_secret(secret_path)

    def video_url(self, base_url: str, task_id: str, now: float, ttl_s: int) -> str:
        expires = int(now) + 1 + ttl_s  # never shorter than the ttl
        return f"{base_url}{VIDEO_PREFIX}{task_id}.mp4?expires={expires}&sig={self._sign(task_id, expires)}"

    def check(self, task_id: str, expires: str, sig: str) -> bool:
        return expires.isdigit() and hmac.compare_digest(self._sign(task_id, int(expires)), sig)

    def _sign(self, task_id: str, expires: int) -> str:
        return hmac.new(self._secret, f"{task_id}:{expires}".encode(), hashlib.sha256).hexdigest()


def _url_secret(path: Path) -> bytes:
    """The key that signs download URLs, kept in the state folder so URLs survive restarts."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return bytes.fromhex(path.read_text().strip())
    secret = secrets.token_bytes(32)
    with os.fdopen(fd, "w") as f:
        f.write(secret.hex())
        f.flush()
        os.fsync(f.fileno())
    return secret
