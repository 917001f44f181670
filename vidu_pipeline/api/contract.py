"""The Vidu Q1 Reference-to-Video contract as code: the request side.

Every endpoint, limit, enum and default of ``shared/api/vidu-q1-reference2video.md`` lives
here, once, with the request model, its fingerprint, the pipeline's seed policy and the rules
a submit body must meet. The client validates with it before spending money, the simulator
answers 400 with it, and the catalog stage uses the same limits. The task-result answer is in
task_result.py and image references (data URIs, redacted URLs) in image_refs.py. Nothing here
does I/O except decoding the data URIs a request carries (to check image limits on the bytes).
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

# Image references (data URIs, digests) and the task-result answer have modules of their own.
from .image_refs import DATA_URI_RE, describe_images, image_digest, parse_data_uri

# --- endpoints -------------------------------------------------------------------------------

DEFAULT_BASE_URL = "https://api.highwayapi.ai"
SUBMIT_PATH = "/v3/async/vidu-q1-reference2video"
TASK_RESULT_PATH = "/v3/async/task-result"
TASK_TYPE = "VIDU_Q1_REFERENCE2VIDEO"

# --- limits ----------------------------------------------------------------------------------

MIN_IMAGES = 1
MAX_IMAGES = 7
MAX_PROMPT_CHARS = 1500
MIN_IMAGE_SIDE_PX = 128
# Width / height. The page says "less than 1:4 or 4:1"; we read 1:4 and 4:1 themselves as the
# outer bounds (inclusive), as the contract document asks.
MIN_ASPECT = 1 / 4
MAX_ASPECT = 4.0
# "50MB" and "10MB" are read as decimal megabytes, the stricter reading: a careful client of a
# paid API never sends a file the service might measure as too big.
MAX_IMAGE_FILE_BYTES = 50_000_000
# The decoded base64 payload must be *under* this many bytes.
MAX_BASE64_DECODED_BYTES = 10_000_000
DURATIONS = (5,)
RESOLUTIONS = ("1080p",)
DATA_URI_SUBTYPES = ("png", "jpeg", "jpg", "webp")
VIDEO_DURATION_S = 5

# The service takes "any integer" as a seed. We send only 0..2^31-1: the effective seeds it
# returns lie there, and every integer type a gateway or a trainer's loader might use (int32,
# float64, int64, Parquet INT64) holds it exactly. Sweeps list at most MAX_SWEEP_SEEDS seeds.
SEED_MIN = 0
SEED_MAX = 2**31 - 1
MAX_SWEEP_SEEDS = 10_000


def seed_problem(value: object) -> str | None:
    """Why ``value`` is not a seed this pipeline sends, or None."""
    if isinstance(value, bool) or not isinstance(value, int):
        return f"seed {value!r} is not an integer"
    if not SEED_MIN <= value <= SEED_MAX:
        return f"seed {value} is outside {SEED_MIN}..{SEED_MAX} (0 to 2^31-1)"
    return None


class AspectRatio(str, enum.Enum):
    LANDSCAPE = "16:9"
    PORTRAIT = "9:16"
    SQUARE = "1:1"


class MovementAmplitude(str, enum.Enum):
    AUTO = "auto"
    SMALL = "small"
    MEDIUM = "medium"
    LARGE = "large"


ASPECT_RATIOS = tuple(a.value for a in AspectRatio)
MOVEMENT_AMPLITUDES = tuple(m.value for m in MovementAmplitude)

# Output frame size per aspect ratio at 1080p.
VIDEO_SIZES: dict[str, tuple[int, int]] = {
    "16:9": (1920, 1080),
    "9:16": (1080, 1920),
    "1:1": (1080, 1080),
}

DEFAULTS: dict[str, Any] = {
    "duration": 5,
    "aspect_ratio": "16:9",
    "resolution": "1080p",
    "movement_amplitude": "auto",
    "bgm": False,
}


# --- the request -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    """One submit body. ``seed=None`` means "let the service pick" (and is then not sent)."""

    images: tuple[str, ...]
    prompt: str
    duration: int = 5
    seed: int | None = None
    aspect_ratio: str = "16:9"
    resolution: str = "1080p"
    movement_amplitude: str = "auto"
    bgm: bool = False

    def to_payload(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "images": list(self.images),
            "prompt": self.prompt,
            "duration": self.duration,
            "aspect_ratio": self.aspect_ratio,
            "resolution": self.resolution,
            "movement_amplitude": self.movement_amplitude,
            "bgm": self.bgm,
        }
        if self.seed is not None:
            body["seed"] = self.seed
        return body

    @classmethod
    def from_payload(cls, body: Mapping[str, Any]) -> GenerationRequest:
        """Build from a body that :func:`validate_payload` accepted, filling the defaults."""
        return cls(
            images=tuple(body["images"]),
            prompt=body["prompt"],
            duration=body.get("duration", DEFAULTS["duration"]),
            seed=body.get("seed"),
            aspect_ratio=body.get("aspect_ratio", DEFAULTS["aspect_ratio"]),
            resolution=body.get("resolution", DEFAULTS["resolution"]),
            movement_amplitude=body.get("movement_amplitude", DEFAULTS["movement_amplitude"]),
            bgm=body.get("bgm", DEFAULTS["bgm"]),
        )

    def fingerprint(self) -> str:
        """sha256 of the canonical body: the identity of "the same paid request"."""
        return payload_fingerprint(self.to_payload())

    def options(self) -> dict[str, Any]:
        """Everything but the images and prompt: what a lineage row records as options."""
        return {
            "duration": self.duration,
            "aspect_ratio": self.aspect_ratio,
            "resolution": self.resolution,
            "movement_amplitude": self.movement_amplitude,
            "bgm": self.bgm,
        }

    def __repr__(self) -> str:  # never print image payloads
        return (
            f"GenerationRequest(images=[{len(self.images)} image(s), {describe_images(self.images)}], "
            f"prompt={self.prompt[:60]!r}{'…' if len(self.prompt) > 60 else ''}, seed={self.seed}, "
            f"aspect_ratio={self.aspect_ratio!r}, movement_amplitude={self.movement_amplitude!r}, "
            f"bgm={self.bgm}, duration={self.duration}, resolution={self.resolution!r})"
        )

    __str__ = __repr__


def payload_fingerprint(body: Mapping[str, Any]) -> str:
    """sha256 of a submit body with defaults filled in, keys sorted and images reduced to
    their digests: equal requests, equal prints — computable from image hashes alone."""
    return fingerprint_from_digests(
        [image_digest(i) for i in body.get("images", [])],
        {k: v for k, v in body.items() if k != "images"},
    )


def fingerprint_from_digests(image_digests: Sequence[str], rest: Mapping[str, Any]) -> str:
    """The fingerprint when the images are already known by digest (no payload needed)."""
    canonical = {**DEFAULTS, **{k: v for k, v in rest.items() if k != "seed" or v is not None}}
    canonical["images"] = list(image_digests)
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def expected_video_size(aspect_ratio: str, render_scale: float = 1.0) -> tuple[int, int]:
    """Frame size for an aspect ratio; ``render_scale`` < 1 is the simulator's fast mode.

    Both sides round each side to an even number (H.264 with 4:2:0 chroma needs even sizes).
    """
    width, height = VIDEO_SIZES[aspect_ratio]
    if render_scale == 1.0:
        return width, height
    return max(2, round(width * render_scale / 2) * 2), max(2, round(height * render_scale / 2) * 2)


# --- validation ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ImageFacts:
    """What an image inspector learned from the bytes: enough to apply the contract's rules."""

    format: str  # "PNG" | "JPEG" | "WEBP"
    width: int  # after EXIF orientation
    height: int


# An inspector decodes image bytes and returns their facts, or raises ValueError with a reason.
ImageInspector = Callable[[bytes], ImageFacts]


def image_dimension_problems(width: int, height: int) -> list[str]:
    """The contract's pixel rules; each problem is a sentence without the field name."""
    problems = []
    if width < MIN_IMAGE_SIDE_PX or height < MIN_IMAGE_SIDE_PX:
        problems.append(f"{width}×{height} px, at least {MIN_IMAGE_SIDE_PX}×{MIN_IMAGE_SIDE_PX} needed")
    if height and width:
        ratio = width / height
        if ratio < MIN_ASPECT or ratio > MAX_ASPECT:
            problems.append(f"aspect ratio {width}:{height} ({ratio:.3f}) is outside 1:4 … 4:1")
    return problems


def validate_image_ref(field: str, ref: Any, inspect: ImageInspector | None) -> list[str]:
    """Problems with one entry of ``images``, each prefixed with ``field`` (e.g. ``images[2]``)."""
    if not isinstance(ref, str):
        return [f"{field}: must be a string, got {type(ref).__name__}"]
    if ref.startswith(("http://", "https://")):
        return [] if len(ref) > len("https://") else [f"{field}: URL has no host"]
    if not ref.startswith("data:"):
        return [f"{field}: must be an http(s):// URL or a data:image/<type>;base64, URI"]
    m = DATA_URI_RE.match(ref)
    if not m:
        return [f"{field}: data URI must start with data:image/<png|jpeg|jpg|webp>;base64,"]
    subtype = m.group(1).lower()
    if subtype not in DATA_URI_SUBTYPES:
        return [f"{field}: content type image/{subtype} is not one of png, jpeg, jpg, webp"]
    try:
        _, raw = parse_data_uri(ref)
    except ValueError as exc:
        return [f"{field}: {exc}"]
    if len(raw) >= MAX_BASE64_DECODED_BYTES:
        return [f"{field}: decoded base64 payload is {len(raw):,} bytes, must be under {MAX_BASE64_DECODED_BYTES:,}"]
    if inspect is None:
        return []
    try:
        facts = inspect(raw)
    except ValueError as exc:
        return [f"{field}: {exc}"]
    problems = [f"{field}: {p}" for p in image_dimension_problems(facts.width, facts.height)]
    declared = "jpeg" if subtype == "jpg" else subtype
    if facts.format.lower() != declared:
        problems.append(f"{field}: declared image/{subtype} but the bytes are {facts.format}")
    return problems


def _check_enum(body: Mapping[str, Any], name: str, allowed: Sequence[Any]) -> list[str]:
    if name not in body:
        return []
    value = body[name]
    if not isinstance(value, str) or value not in allowed:
        return [f"{name}: {value!r} is not one of {', '.join(map(str, allowed))}"]
    return []


def validate_payload(body: Any, inspect: ImageInspector | None = None) -> list[str]:
    """Every rule the submit body breaks, as specific messages; ``[]`` means it is valid.

    ``inspect`` decodes data-URI images to check format and pixel limits; without it only the
    structural rules (count, prefix, base64, size) are checked. Messages never include an image
    payload.
    """
    if not isinstance(body, Mapping):
        return [f"body: must be a JSON object, got {type(body).__name__}"]
    problems: list[str] = []
    known = {"images", "prompt", *DEFAULTS, "seed"}
    images = body.get("images")
    if "images" not in body:
        problems.append("images: required")
    elif not isinstance(images, list):
        problems.append(f"images: must be an array of strings, got {type(images).__name__}")
    elif not MIN_IMAGES <= len(images) <= MAX_IMAGES:
        problems.append(f"images: {len(images)} items, between {MIN_IMAGES} and {MAX_IMAGES} needed")
    else:
        for i, ref in enumerate(images):
            problems += validate_image_ref(f"images[{i}]", ref, inspect)
    prompt = body.get("prompt")
    if "prompt" not in body:
        problems.append("prompt: required")
    elif not isinstance(prompt, str):
        problems.append(f"prompt: must be a string, got {type(prompt).__name__}")
    elif not prompt.strip():
        problems.append("prompt: must not be empty")
    elif len(prompt) > MAX_PROMPT_CHARS:
        problems.append(f"prompt: {len(prompt)} characters, at most {MAX_PROMPT_CHARS}")
    if "duration" in body:
        d = body["duration"]
        if isinstance(d, bool) or not isinstance(d, int) or d not in DURATIONS:
            problems.append(f"duration: {d!r} is not accepted, only {', '.join(map(str, DURATIONS))}")
    if "seed" in body:
        s = body["seed"]
        if s is not None and (isinstance(s, bool) or not isinstance(s, int)):
            problems.append(f"seed: must be an integer, got {type(s).__name__}")
    problems += _check_enum(body, "aspect_ratio", ASPECT_RATIOS)
    problems += _check_enum(body, "resolution", RESOLUTIONS)
    problems += _check_enum(body, "movement_amplitude", MOVEMENT_AMPLITUDES)
    if "bgm" in body and not isinstance(body["bgm"], bool):
        problems.append(f"bgm: must be true or false, got {body['bgm']!r}")
    for name in sorted(set(body) - known):
        problems.append(f"{name}: unknown field")
    return problems
