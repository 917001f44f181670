"""What the image rules decided about one image's bytes: the record the cache keeps by content.

Apart from the rules themselves so the cache can store and read verdicts without the decoding
machinery, and the rules can build them without the cache.
"""

from __future__ import annotations

import dataclasses
import json

# Bump whenever a rule or an encoding choice changes: cached verdicts of older versions are ignored.
VALIDATION_VERSION = "1"


@dataclasses.dataclass(frozen=True)
class ImageVerdict:
    """What the rules decided about one image's bytes; cached by the bytes' sha256.

    ``problems`` holds (rule, reason) pairs; reasons are sentences without the file name, so a
    verdict can be reused for every row that points at the same content.
    """

    problems: tuple[tuple[str, str], ...] = ()
    format: str = ""  # what the original bytes are, e.g. "PNG"
    mime_subtype: str = ""  # of the bytes sent: "png" | "jpeg" | "webp"
    width: int = 0  # of the bytes sent (upright)
    height: int = 0
    sent_sha256: str = ""
    sent_bytes: int = 0
    notes: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> ImageVerdict:
        d = json.loads(text)
        d["problems"] = tuple(tuple(p) for p in d["problems"])
        d["notes"] = tuple(d["notes"])
        return cls(**d)


def refuse(rule: str, reason: str, fmt: str = "") -> ImageVerdict:
    return ImageVerdict(problems=((rule, reason),), format=fmt)
