"""How the service's answers are read: which typed error an HTTP status means, and the
service's words made safe to keep.

Kept apart from the client so the rules can be tested as plain functions. The rule for a
submit is strict because a submit is paid: only a 200 carrying a task id is a task; a refusal
the contract names (400, 401/403, 429) or any other 4xx means no task was created; everything
else once the body may have been sent (5xx, 1xx, a 2xx other than 200, a 3xx) might have
created one, so it is an unknown outcome and never resent.
"""

from __future__ import annotations

import json
import re
import urllib.parse
from collections.abc import Mapping
from typing import Any

from . import errors

# A data URI's payload, wherever a server echoes one back into an error message.
_DATA_URI_PAYLOAD_RE = re.compile(r"(data:[A-Za-z0-9.+/-]*;base64,)[A-Za-z0-9+/=_-]+")
MAX_TASK_ID_CHARS = 256


def submit_error_kind(status: int) -> type[errors.ViduError] | None:
    """The error a submit answered with ``status`` raises; None for 200 (read its task id)."""
    if status == 200:
        return None
    if status == 400:
        return errors.InvalidRequest
    if status in (401, 403):
        return errors.AuthError
    if status == 429:
        return errors.RateLimited
    if 400 <= status < 500:
        return errors.SubmitRejected
    return errors.SubmitOutcomeUnknown  # 1xx, 201/202/204…, 3xx, 5xx, nonsense


def poll_error_kind(status: int) -> type[errors.ViduError] | None:
    """The error a poll answered with ``status`` raises; None for 200 (read the task)."""
    if status == 200:
        return None
    if status == 400:
        return errors.InvalidRequest
    if status in (401, 403):
        return errors.AuthError
    if status == 404:
        return errors.TaskNotFound
    if status == 429:
        return errors.RateLimited
    if 400 <= status < 500:
        return errors.ViduError
    return errors.TransientError  # 5xx, or a 1xx/2xx/3xx a gateway should not have given


class Scrubber:
    """Takes our API key (as is, URL-encoded, JSON-escaped; any letter case) and data-URI
    payloads out of text that came from the service. Scrub before cutting text short: a cut
    can split a key and leave a prefix nothing matches any more."""

    def __init__(self, api_key: str) -> None:
        forms = {
            api_key,
            urllib.parse.quote(api_key, safe=""),
            urllib.parse.quote_plus(api_key),
            json.dumps(api_key)[1:-1],
        } - {""}
        alternatives = "|".join(re.escape(f) for f in sorted(forms, key=len, reverse=True))
        self._key_re = re.compile(alternatives, re.IGNORECASE) if alternatives else None

    def __call__(self, text: str) -> str:
        if self._key_re is not None:
            text = self._key_re.sub("***", text)
        return _DATA_URI_PAYLOAD_RE.sub(r"\1…", text)

    def has_key(self, text: str) -> bool:
        return self._key_re is not None and self._key_re.search(text) is not None


def task_id_in(body: Any) -> str | None:
    """The task id of a submit's 200 body, or None when it has no usable one: a non-empty
    string of visible ASCII, short enough to be an id."""
    task_id = body.get("task_id") if isinstance(body, Mapping) else None
    if not isinstance(task_id, str) or not 0 < len(task_id) <= MAX_TASK_ID_CHARS:
        return None
    if not all(0x21 <= ord(ch) <= 0x7E for ch in task_id):
        return None
    return task_id


def error_fields(raw: bytes) -> tuple[str | None, str]:
    """(reason, message) from an error body, unscrubbed; a non-JSON body is still an error."""
    try:
        body = json.loads(raw)
    except ValueError:
        return None, raw[:2000].decode("utf-8", "replace").strip()
    if not isinstance(body, Mapping):
        return None, str(body)[:2000]
    reason = body.get("reason")
    message = body.get("message") or body.get("error") or ""
    metadata = body.get("metadata")
    problems = metadata.get("problems") if isinstance(metadata, Mapping) else None
    if isinstance(problems, list) and problems:
        message = "; ".join(map(str, problems))
    return (str(reason) if reason else None), str(message)
