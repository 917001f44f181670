"""Image references as a request carries them — a data URI or a URL — read without I/O.

Apart from the contract's rules because both sides need them: the request's identity (a data
URI's digest), messages and logs (a description without the payload, a URL without its signed
query) and the task result's video URL, which is a bearer credential too.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Sequence
from typing import Any

DATA_URI_RE = re.compile(r"^data:image/([A-Za-z0-9.+-]+);base64,", re.ASCII)


def parse_data_uri(ref: str) -> tuple[str, bytes]:
    """``data:image/<subtype>;base64,<payload>`` → (subtype, decoded bytes); ValueError if not."""
    m = DATA_URI_RE.match(ref)
    if not m:
        raise ValueError("not a data:image/<type>;base64, URI")
    try:
        raw = base64.b64decode(ref[m.end() :], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"invalid base64 payload ({exc})") from None
    return m.group(1).lower(), raw


def image_digest(ref: str) -> str:
    """Identity of one image reference: sha256 of the decoded bytes for a data URI (the same
    image gives the same digest however it was encoded), the URL itself otherwise."""
    if DATA_URI_RE.match(ref):
        return "sha256:" + hashlib.sha256(parse_data_uri(ref)[1]).hexdigest()
    return "url:" + ref


def describe_image_ref(ref: Any) -> str:
    """A short, payload-free description of one image reference for messages and logs."""
    if not isinstance(ref, str):
        return type(ref).__name__
    m = DATA_URI_RE.match(ref)
    if m:
        return f"data:image/{m.group(1)};base64 ({len(ref) - m.end()} base64 chars)"
    if ref.startswith("data:"):
        return f"data URI ({len(ref)} chars)"
    return redact_url(ref)


def describe_images(images: Sequence[Any]) -> str:
    return ", ".join(describe_image_ref(i) for i in images)


def redact_url(url: str) -> str:
    """Drop the query string (signed URLs carry credentials there) and cap the length."""
    base = url.split("?", 1)[0]
    return base if len(base) <= 200 else base[:200] + "…"
