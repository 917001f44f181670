"""Turn an accepted request's image references into bytes, and keep them by content hash.

Data URIs are decoded. URLs are fetched only from loopback hosts — the simulator never touches
the network — with a short timeout, no proxy, no redirects and a size cap; any other host, or
an image that breaks the contract once fetched, makes the task fail (as the real service fails
a task whose image it cannot use) rather than the submit.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from ..api import contract
from ..api.image_refs import parse_data_uri, redact_url
from ..images import inspect_image_bytes

FETCH_TIMEOUT_S = 5.0
LOOPBACK_NAMES = {"localhost"}


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        raise urllib.error.HTTPError(req.full_url, code, "redirects are not followed", headers, fp)


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect())


def is_loopback_host(host: str | None) -> bool:
    if not host:
        return False
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def fetch_image(url: str) -> bytes:
    """GET a loopback image URL; ValueError with a payload-free reason otherwise."""
    shown = redact_url(url)
    host = urllib.parse.urlsplit(url).hostname
    if not is_loopback_host(host):
        raise ValueError(f"cannot fetch {shown}: the simulator only fetches images from loopback hosts")
    try:
        with _OPENER.open(url, timeout=FETCH_TIMEOUT_S) as response:
            data = response.read(contract.MAX_IMAGE_FILE_BYTES + 1)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot fetch {shown}: {exc}") from None
    if len(data) > contract.MAX_IMAGE_FILE_BYTES:
        raise ValueError(f"{shown} is larger than {contract.MAX_IMAGE_FILE_BYTES:,} bytes")
    facts = inspect_image_bytes(data)
    problems = contract.image_dimension_problems(facts.width, facts.height)
    if problems:
        raise ValueError(f"{shown}: {'; '.join(problems)}")
    return data


def collect_images(refs: list[str]) -> tuple[list[bytes], str]:
    """The bytes of each validated reference, or ``([], reason)`` when one is unusable."""
    images = []
    for i, ref in enumerate(refs):
        try:
            if ref.startswith("data:"):
                images.append(parse_data_uri(ref)[1])
            else:
                images.append(fetch_image(ref))
        except ValueError as exc:
            return [], f"images[{i}]: {exc}"
    return images, ""


class ImageStore:
    """Reference images by sha256, written once, atomically, so a restarted simulator renders."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def put(self, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        path = self.folder / digest
        if not path.exists():
            fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".", suffix=".part")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        return digest

    def get(self, digest: str) -> bytes:
        return (self.folder / digest).read_bytes()
