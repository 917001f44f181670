"""Reference images: decide from the bytes whether an image can be sent, and what exactly to send.

Everything works on bytes, never on file names or extensions, and is safe to call from several
threads at once: no global Pillow setting or warnings filter is touched (the decompression-bomb
guard is our own explicit pixel check, done before any pixel is decoded). Encoded payloads live
only in :class:`ImageCache` on disk (image_cache.py); everything else carries hashes and sizes.
What a file is comes from image_sniff.py, the verdict record from image_verdict.py.
"""

from __future__ import annotations

import hashlib
import io
import math

import numpy as np
from PIL import Image, ImageOps, JpegImagePlugin, PngImagePlugin, WebPImagePlugin

from .api.contract import (
    MAX_ASPECT,
    MAX_BASE64_DECODED_BYTES,
    MAX_IMAGE_FILE_BYTES,
    MIN_ASPECT,
    MIN_IMAGE_SIDE_PX,
    ImageFacts,
    image_dimension_problems,
)

# The cache is reached through this module by the catalog stage, the resources and many tests.
from .image_cache import ImageCache, file_key  # noqa: F401 - re-exported
from .image_sniff import ACCEPTED_FORMATS, MIME_SUBTYPES, sniff_format
from .image_verdict import ImageVerdict, refuse

# Reading sources lives in sources.py; the names stay importable from here.
from .sources import (  # noqa: F401 - re-exported
    MAX_REDIRECTS,
    URL_DEADLINE_S,
    URL_TIMEOUT,
    SourceError,
    fetch_url,
    not_regular_reason,
    read_local,
    url_session,
)

# Explicit decompression-bomb guard: an image whose header claims more pixels than this is refused
# before decoding (64 MP is well above any useful reference image, and bounds memory at ~256 MB).
MAX_DECODE_PIXELS = 64_000_000
# Re-encoding quality: orientation/CMYK fixes keep close to the original; shrinking trades a little.
REENCODE_QUALITY = 95
SHRINK_QUALITY = 90
_ROTATING_ORIENTATIONS = {2, 3, 4, 5, 6, 7, 8}
_EXIF_ORIENTATION = 0x0112

_OPENERS = {
    "PNG": PngImagePlugin.PngImageFile,
    "JPEG": JpegImagePlugin.jpeg_factory,
    "WEBP": WebPImagePlugin.WebPImageFile,
}


def _open(data: bytes, fmt: str) -> Image.Image:
    """Open with the one plugin the sniffed format names, bypassing ``Image.open``.

    ``Image.open`` runs Pillow's own bomb check through the process-wide warnings machinery,
    which is neither thread-safe to reconfigure nor explicit; :data:`MAX_DECODE_PIXELS` is.
    """
    return _OPENERS[fmt](io.BytesIO(data))


def _orientation(im: Image.Image) -> int:
    try:
        value = im.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # a broken EXIF block is not a broken image; it just has no orientation
        return 1
    return value if isinstance(value, int) else 1


def _has_alpha(im: Image.Image) -> bool:
    return im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info


def _to_8bit(im: Image.Image) -> Image.Image:
    """16/32-bit greyscale → 8-bit by dropping the low byte (Pillow's convert would clip)."""
    arr = np.asarray(im).astype(np.uint32) >> 8
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L")


def _encode(im: Image.Image, fmt: str, quality: int, lossless: bool = False) -> bytes:
    out = io.BytesIO()
    if fmt == "JPEG":
        if im.mode not in ("RGB", "L"):
            im = im.convert("RGB")
        im.save(out, "JPEG", quality=quality, optimize=False)
    elif fmt == "WEBP":
        if im.mode not in ("RGB", "RGBA"):
            im = im.convert("RGBA" if _has_alpha(im) else "RGB")
        im.save(out, "WEBP", quality=quality, lossless=lossless, method=4)
    else:
        im.save(out, "PNG")
    return out.getvalue()


def _shrink(im: Image.Image) -> tuple[bytes, str, Image.Image]:
    """Re-encode lossy (WebP when there is alpha, else JPEG), downscaling until under the cap.

    Never goes below MIN_IMAGE_SIDE_PX on the short side; raises ValueError if even that is too
    big (not reachable with real images within MAX_DECODE_PIXELS, but checked all the same).
    """
    fmt = "WEBP" if _has_alpha(im) else "JPEG"
    current = im
    while True:
        data = _encode(current, fmt, SHRINK_QUALITY)
        if len(data) < MAX_BASE64_DECODED_BYTES:
            return data, fmt, current
        short = min(current.size)
        if short <= MIN_IMAGE_SIDE_PX:
            raise ValueError(f"still {len(data):,} bytes at {current.width}×{current.height} px")
        scale = max(math.sqrt(MAX_BASE64_DECODED_BYTES / len(data)) * 0.9, MIN_IMAGE_SIDE_PX / short)
        width, height = max(1, round(current.width * scale)), max(1, round(current.height * scale))
        if min(width, height) < MIN_IMAGE_SIDE_PX:  # rounding must not take the short side under the floor
            short_side = min(width, height)
            width, height = (MIN_IMAGE_SIDE_PX if s == short_side else s for s in (width, height))
        size = (width, height)
        current = im.resize(size, Image.Resampling.LANCZOS)


def check_image_bytes(
    data: bytes, *, strict: bool = False, sha256: str | None = None
) -> tuple[ImageVerdict, bytes | None]:
    """Apply every image rule to ``data``; return the verdict and the bytes to send (or None).

    ``sha256`` of ``data``, when the caller already has it, saves hashing unchanged bytes again.

    Order: size, format by content, header, pixel guard, dimensions (all before decoding), then a
    real decode (PNG CRCs via verify, reopen, full load), then the fixes: first frame of an
    animation, CMYK → RGB JPEG, 16-bit → 8-bit, EXIF orientation applied, and a lossy re-encode
    (plus downscaling) when the payload would reach MAX_BASE64_DECODED_BYTES. In strict mode every
    fix is a refusal instead: the bytes sent are always the original bytes.
    """
    size = len(data)
    if size == 0:
        return refuse("empty_file", "the file is empty (0 bytes)"), None
    if size > MAX_IMAGE_FILE_BYTES:
        return refuse("file_size", f"{size:,} bytes, at most {MAX_IMAGE_FILE_BYTES:,} allowed"), None
    fmt = sniff_format(data[:4096])
    if fmt not in ACCEPTED_FORMATS:
        return refuse("format", f"the content is {fmt}, not PNG, JPEG or WebP", fmt), None
    try:
        im = _open(data, fmt)
    except Exception as exc:  # Pillow raises SyntaxError/OSError/struct.error… on bad headers
        return refuse("corrupt", f"not a readable {fmt} header ({exc})", fmt), None
    width, height = im.size
    if width * height > MAX_DECODE_PIXELS:
        return refuse(
            "decompression_bomb",
            f"the {fmt} header claims {width}×{height} = {width * height:,} px, more than the "
            f"{MAX_DECODE_PIXELS:,} px decode limit; refused before decoding",
            fmt,
        ), None
    # Both dimension rules are symmetric in width and height, so checking the stored size here
    # gives the same answer as checking the EXIF-upright size (only known after decoding a PNG).
    problems = []
    if min(width, height) < MIN_IMAGE_SIDE_PX:
        problems.append(("min_size", image_dimension_problems(width, height)[0]))
    if not MIN_ASPECT <= width / height <= MAX_ASPECT:
        problems.append(("aspect_ratio", image_dimension_problems(width, height)[-1]))
    if problems:
        return ImageVerdict(problems=tuple(problems), format=fmt), None
    try:
        im.verify()
        im = _open(data, fmt)
        im.load()
    except Exception as exc:
        return refuse("corrupt", f"truncated or corrupt {fmt} data ({exc})", fmt), None
    return _normalise(data, im, fmt, strict, sha256)


def _normalise(data: bytes, im: Image.Image, fmt: str, strict: bool, sha256: str | None):
    """The verdict on a decoded image and the bytes to send: fixed, re-encoded and shrunk as needed."""
    fixed = _fix(data, im, fmt, strict)
    if isinstance(fixed, ImageVerdict):
        return fixed, None
    im, out_fmt, notes, changed = fixed
    if changed:
        lossless = fmt == "WEBP" and data[12:16] == b"VP8L"
        sent = _encode(im, out_fmt, REENCODE_QUALITY, lossless)
    else:
        sent = data
    if len(sent) >= MAX_BASE64_DECODED_BYTES:
        fitted = _fit_payload(im, len(sent), fmt, strict)
        if isinstance(fitted, ImageVerdict):
            return fitted, None
        sent, out_fmt, im, note = fitted
        notes.append(note)
    return ImageVerdict(
        format=fmt,
        mime_subtype=MIME_SUBTYPES[out_fmt],
        width=im.width,
        height=im.height,
        sent_sha256=sha256 if sent is data and sha256 else hashlib.sha256(sent).hexdigest(),
        sent_bytes=len(sent),
        notes=tuple(notes),
    ), sent


def _fix(
    data: bytes, im: Image.Image, fmt: str, strict: bool
) -> ImageVerdict | tuple[Image.Image, str, list[str], bool]:
    """First frame, CMYK → RGB JPEG, 16 → 8 bits, EXIF orientation: the fixed image, the format
    to send it in, notes and whether anything changed — or, in strict mode, the refusal."""
    notes: list[str] = []
    out_fmt = fmt
    changed = False

    def fix(rule: str, what: str, note: str) -> ImageVerdict | None:
        nonlocal changed
        if strict:
            return refuse(rule, f"{what}; strict mode sends original bytes only", fmt)
        notes.append(note)
        changed = True
        return None

    frames = getattr(im, "n_frames", 1)
    if frames > 1:
        if r := fix(
            "animated",
            f"animated {fmt} with {frames} frames",
            f"animated {fmt} ({frames} frames): only the first frame is sent",
        ):
            return r
    if im.mode == "CMYK":
        if r := fix("cmyk", "CMYK colour", "CMYK converted to RGB JPEG (no ICC colour management)"):
            return r
        im, out_fmt = im.convert("RGB"), "JPEG"
    if (fmt == "PNG" and data[24] == 16) or im.mode.startswith("I") or im.mode == "F":
        if r := fix("bit_depth", "16 bits per channel", "16-bit PNG converted to 8 bits per channel"):
            return r
        if im.mode.startswith("I") or im.mode == "F":
            im = _to_8bit(im)  # RGB(A) 16-bit PNGs are already read as 8-bit by Pillow
    orientation = _orientation(im)
    if orientation in _ROTATING_ORIENTATIONS:
        if r := fix(
            "exif_orientation",
            f"EXIF orientation {orientation}",
            f"EXIF orientation {orientation} applied (pixels rotated, tag removed)",
        ):
            return r
        im = ImageOps.exif_transpose(im)
    if im.mode == "P":
        notes.append("palette image, sent as is")
    if _has_alpha(im):
        notes.append("has transparency, sent as is")
    return im, out_fmt, notes, changed


def _fit_payload(
    im: Image.Image, size: int, fmt: str, strict: bool
) -> ImageVerdict | tuple[bytes, str, Image.Image, str]:
    """A payload of ``size`` bytes is too big: shrink it (bytes, format, image, note), or refuse."""
    reason = f"payload of {size:,} bytes; the decoded base64 payload must be under {MAX_BASE64_DECODED_BYTES:,}"
    if strict:
        return refuse("payload_size", f"{reason}; strict mode does not re-encode", fmt)
    before = im.size
    try:
        sent, out_fmt, im = _shrink(im)
    except ValueError as exc:
        return refuse("payload_size", f"{reason} and cannot be shrunk ({exc})", fmt)
    scaled = "" if im.size == before else f", downscaled from {before[0]}×{before[1]}"
    return (
        sent,
        out_fmt,
        im,
        f"re-encoded as {out_fmt} to fit the {MAX_BASE64_DECODED_BYTES:,}-byte payload limit{scaled}",
    )


def inspect_image_bytes(data: bytes) -> ImageFacts:
    """Identify by content, refuse bombs, fully decode; return format and EXIF-upright size.

    The simulator's inspector: it reports facts and leaves the dimension rules to the caller.
    Raises ValueError with a short reason ("not a PNG, JPEG or WebP image", "truncated or
    corrupt image data: …", "decompression bomb: …").
    """
    fmt = sniff_format(data[:4096])
    if fmt not in ACCEPTED_FORMATS:
        raise ValueError("not a PNG, JPEG or WebP image")
    try:
        im = _open(data, fmt)
        if im.width * im.height > MAX_DECODE_PIXELS:
            raise ValueError(f"decompression bomb: {im.width}×{im.height} px exceeds {MAX_DECODE_PIXELS:,} px")
        im.verify()
        im = _open(data, fmt)
        im.load()
        width, height = im.size
        if _orientation(im) in (5, 6, 7, 8):
            width, height = height, width
    except ValueError as exc:
        if str(exc).startswith("decompression bomb"):
            raise
        raise ValueError(f"truncated or corrupt image data: {exc}") from None
    except Exception as exc:
        raise ValueError(f"truncated or corrupt image data: {exc}") from None
    return ImageFacts(format=fmt, width=width, height=height)
