"""Reference images: decide from the bytes whether an image can be sent, and what exactly to send.

Everything works on bytes, never on file names or extensions, and is safe to call from several
threads at once: no global Pillow setting or warnings filter is touched (the decompression-bomb
guard is our own explicit pixel check, done before any pixel is decoded). Encoded payloads live
only in :class:`ImageCache` on disk; everything else carries hashes and sizes.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import json
import math
import os
import sqlite3
import tempfile
import threading
from collections.abc import Iterable
from pathlib import Path

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

# Reading sources lives in sources.py; the names stay importable from here.
from .sources import (  # noqa: F401 - re-exported
    MAX_REDIRECTS,
    URL_DEADLINE_S,
    URL_TIMEOUT,
    SourceError,
    fetch_url,
    not_regular_reason,
    read_local,
)

# Bump whenever a rule or an encoding choice changes: cached verdicts of older versions are ignored.
VALIDATION_VERSION = "1"
# Explicit decompression-bomb guard: an image whose header claims more pixels than this is refused
# before decoding (64 MP is well above any useful reference image, and bounds memory at ~256 MB).
MAX_DECODE_PIXELS = 64_000_000
ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP")
MIME_SUBTYPES = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp"}
# Re-encoding quality: orientation/CMYK fixes keep close to the original; shrinking trades a little.
REENCODE_QUALITY = 95
SHRINK_QUALITY = 90
_ROTATING_ORIENTATIONS = {2, 3, 4, 5, 6, 7, 8}
_EXIF_ORIENTATION = 0x0112


# --- sniffing --------------------------------------------------------------------------------

_FTYP_BRANDS = {
    b"heic": "HEIC",
    b"heix": "HEIC",
    b"hevc": "HEIC",
    b"hevx": "HEIC",
    b"heim": "HEIC",
    b"heis": "HEIC",
    b"mif1": "HEIF",
    b"msf1": "HEIF",
    b"avif": "AVIF",
    b"avis": "AVIF",
}
_SIGNATURES = (  # (offset, magic, name), checked in order
    (0, b"\x89PNG\r\n\x1a\n", "PNG"),
    (0, b"\xff\xd8\xff", "JPEG"),
    (0, b"GIF87a", "GIF"),
    (0, b"GIF89a", "GIF"),
    (0, b"II*\x00", "TIFF"),
    (0, b"MM\x00*", "TIFF"),
    (0, b"BM", "BMP"),
    (0, b"\x00\x00\x01\x00", "ICO"),
    (0, b"%PDF", "PDF"),
    (0, b"8BPS", "PSD"),
    (0, b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000"),
    (0, b"\xff\x4f\xff\x51", "JPEG 2000"),
    (0, b"\x00\x00\x00\x0cJXL \r\n\x87\n", "JPEG XL"),
    (0, b"\xff\x0a", "JPEG XL"),
    (0, b"qoif", "QOI"),
    (0, b"PK\x03\x04", "ZIP archive"),
    (0, b"\x1f\x8b", "gzip data"),
)


def sniff_format(head: bytes) -> str:
    """Name what the first bytes of a file are, by content: "PNG", "JPEG", "WEBP", "GIF", "SVG"…

    Only PNG, JPEG and WEBP are accepted; the other names exist so a refusal can say what the
    file really is ("HEIC", "SVG", "HTML", "text", "unknown binary data", "empty").
    """
    if not head:
        return "empty"
    for offset, magic, name in _SIGNATURES:
        if head[offset : offset + len(magic)] == magic:
            return name
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[:4] == b"RIFF":
        return f"RIFF {head[8:12].decode('latin-1').strip()} (not an image)"
    if head[4:8] == b"ftyp":
        return _FTYP_BRANDS.get(head[8:12], "MP4/QuickTime video")
    if b"\x00" in head[:1024]:
        return "unknown binary data"
    text = head[:4096].decode("utf-8", errors="replace").lstrip("\ufeff \t\r\n").lower()
    if "<svg" in text and text.startswith(("<svg", "<?xml", "<!--", "<!doctype svg")):
        return "SVG"
    if text.startswith(("<!doctype html", "<html")):
        return "HTML"
    if text.startswith("<?xml"):
        return "XML"
    if text.startswith(("{", "[")):
        return "JSON or text"
    return "text"


# --- checking and normalising one image -------------------------------------------------------


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
            return r, None
    if im.mode == "CMYK":
        if r := fix("cmyk", "CMYK colour", "CMYK converted to RGB JPEG (no ICC colour management)"):
            return r, None
        im, out_fmt = im.convert("RGB"), "JPEG"
    if (fmt == "PNG" and data[24] == 16) or im.mode.startswith("I") or im.mode == "F":
        if r := fix("bit_depth", "16 bits per channel", "16-bit PNG converted to 8 bits per channel"):
            return r, None
        if im.mode.startswith("I") or im.mode == "F":
            im = _to_8bit(im)  # RGB(A) 16-bit PNGs are already read as 8-bit by Pillow
    orientation = _orientation(im)
    if orientation in _ROTATING_ORIENTATIONS:
        if r := fix(
            "exif_orientation",
            f"EXIF orientation {orientation}",
            f"EXIF orientation {orientation} applied (pixels rotated, tag removed)",
        ):
            return r, None
        im = ImageOps.exif_transpose(im)
    if im.mode == "P":
        notes.append("palette image, sent as is")
    if _has_alpha(im):
        notes.append("has transparency, sent as is")

    if changed:
        lossless = fmt == "WEBP" and data[12:16] == b"VP8L"
        sent = _encode(im, out_fmt, REENCODE_QUALITY, lossless)
    else:
        sent = data
    if len(sent) >= MAX_BASE64_DECODED_BYTES:
        reason = (
            f"payload of {len(sent):,} bytes; the decoded base64 payload must be under {MAX_BASE64_DECODED_BYTES:,}"
        )
        if strict:
            return refuse("payload_size", f"{reason}; strict mode does not re-encode", fmt), None
        before = im.size
        try:
            sent, out_fmt, im = _shrink(im)
        except ValueError as exc:
            return refuse("payload_size", f"{reason} and cannot be shrunk ({exc})", fmt), None
        scaled = "" if im.size == before else f", downscaled from {before[0]}×{before[1]}"
        notes.append(f"re-encoded as {out_fmt} to fit the {MAX_BASE64_DECODED_BYTES:,}-byte payload limit{scaled}")
    return ImageVerdict(
        format=fmt,
        mime_subtype=MIME_SUBTYPES[out_fmt],
        width=im.width,
        height=im.height,
        sent_sha256=sha256 if sent is data and sha256 else hashlib.sha256(sent).hexdigest(),
        sent_bytes=len(sent),
        notes=tuple(notes),
    ), sent


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


# --- the cache -------------------------------------------------------------------------------


def file_key(st: os.stat_result) -> tuple[int, int, int, int]:
    """What identifies an unchanged local file: size, mtime, ctime (not settable by users), inode."""
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


class ImageCache:
    """Content-addressed store of the bytes to send (by sha256), plus two indexes in SQLite.

    * ``verdicts``: (original sha256, VALIDATION_VERSION, strict) → :class:`ImageVerdict`, so the
      same content is never decoded twice;
    * ``files``: local path → (size, mtime_ns, ctime_ns, inode, sha256), so an unchanged file is
      not even re-read or re-hashed, while any write to it changes the key.

    Blobs are written to a temp file and renamed, SQLite runs in WAL mode: several processes may
    share one cache. One connection, guarded by a lock, serves the worker threads.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        (self.root / "blobs").mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.root / "index.sqlite", timeout=60, check_same_thread=False)
        with self._lock, self._db:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, size INT, mtime_ns INT,"
                " ctime_ns INT, inode INT, sha256 TEXT)"
            )
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS verdicts (sha256 TEXT, version TEXT, strict INT,"
                " verdict TEXT, PRIMARY KEY (sha256, version, strict))"
            )

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # blobs
    def blob_path(self, sha256: str) -> Path:
        return self.root / "blobs" / sha256[:2] / sha256

    def has_bytes(self, sha256: str) -> bool:
        return self.blob_path(sha256).is_file()

    def put_bytes(self, data: bytes, sha256: str | None = None) -> str:
        sha256 = sha256 or hashlib.sha256(data).hexdigest()
        path = self.blob_path(sha256)
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        return sha256

    def get_bytes(self, sha256: str) -> bytes:
        """The stored bytes, checked against their hash; KeyError if absent or damaged."""
        try:
            data = self.blob_path(sha256).read_bytes()
        except FileNotFoundError:
            raise KeyError(f"image {sha256[:12]}… is not in the cache at {self.root}") from None
        if hashlib.sha256(data).hexdigest() != sha256:
            raise KeyError(f"cached image {sha256[:12]}… is damaged (hash mismatch)")
        return data

    def data_uri(self, sent_sha256: str) -> str:
        """``data:image/<type>;base64,…`` of the stored bytes; the type is sniffed, not stored."""
        data = self.get_bytes(sent_sha256)
        fmt = sniff_format(data[:64])
        if fmt not in MIME_SUBTYPES:
            raise KeyError(f"cached image {sent_sha256[:12]}… is {fmt}, not a sendable image")
        return f"data:image/{MIME_SUBTYPES[fmt]};base64,{base64.b64encode(data).decode('ascii')}"

    # indexes
    def known_files(self, keys: dict[str, tuple[int, int, int, int]]) -> dict[str, str]:
        """path → sha256 for the paths whose stored (size, mtime, ctime, inode) still match."""
        found: dict[str, str] = {}
        paths = list(keys)
        with self._lock:
            for i in range(0, len(paths), 500):
                chunk = paths[i : i + 500]
                rows = self._db.execute(
                    f"SELECT path, size, mtime_ns, ctime_ns, inode, sha256 FROM files WHERE path IN"
                    f" ({','.join('?' * len(chunk))})",
                    chunk,
                ).fetchall()
                for path, *key, sha in rows:
                    if tuple(key) == keys[path]:
                        found[path] = sha
        return found

    def remember_files(self, rows: Iterable[tuple[str, tuple[int, int, int, int], str]]) -> None:
        with self._lock, self._db:
            self._db.executemany(
                "INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?)",
                [(path, *key, sha) for path, key, sha in rows],
            )

    def verdicts(self, shas: Iterable[str], strict: bool) -> dict[str, ImageVerdict]:
        """Cached verdicts for these contents; an accepted one counts only if its blob is there."""
        shas = list(dict.fromkeys(shas))
        found: dict[str, ImageVerdict] = {}
        with self._lock:
            for i in range(0, len(shas), 500):
                chunk = shas[i : i + 500]
                rows = self._db.execute(
                    f"SELECT sha256, verdict FROM verdicts WHERE version = ? AND strict = ? AND"
                    f" sha256 IN ({','.join('?' * len(chunk))})",
                    [VALIDATION_VERSION, int(strict), *chunk],
                ).fetchall()
                for sha, text in rows:
                    found[sha] = ImageVerdict.from_json(text)
        return {s: v for s, v in found.items() if not v.ok or self.has_bytes(v.sent_sha256)}

    def remember_verdicts(self, verdicts: dict[str, ImageVerdict], strict: bool) -> None:
        with self._lock, self._db:
            self._db.executemany(
                "INSERT OR REPLACE INTO verdicts VALUES (?, ?, ?, ?)",
                [(sha, VALIDATION_VERSION, int(strict), v.to_json()) for sha, v in verdicts.items()],
            )
