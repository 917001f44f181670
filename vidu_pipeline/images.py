"""Reference images: decode untrusted bytes with Pillow and check them against the contract."""

from __future__ import annotations

import io
import warnings

from PIL import Image, ImageOps

from .contract import ImageFacts

# Pillow's decompression-bomb guard, set explicitly rather than relying on its default: an
# image claiming more pixels than this is refused before any pixel data is decoded.
MAX_DECODE_PIXELS = 64_000_000
ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP")


def inspect_image_bytes(data: bytes) -> ImageFacts:
    """Identify by content, refuse bombs, fully decode; return format and EXIF-upright size.

    Raises ValueError with a short reason ("not a PNG, JPEG or WebP image", "truncated or
    corrupt image data: …", "decompression bomb: …").
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        old_limit = Image.MAX_IMAGE_PIXELS
        try:
            Image.MAX_IMAGE_PIXELS = MAX_DECODE_PIXELS
            try:
                with Image.open(io.BytesIO(data), formats=list(ACCEPTED_FORMATS)) as im:
                    im.verify()
                with Image.open(io.BytesIO(data), formats=list(ACCEPTED_FORMATS)) as im:
                    fmt = im.format
                    im.load()
                    upright = ImageOps.exif_transpose(im)
                    width, height = upright.size
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
                raise ValueError(f"decompression bomb: {exc}") from None
            except Image.UnidentifiedImageError:
                raise ValueError("not a PNG, JPEG or WebP image") from None
            except (OSError, SyntaxError, ValueError) as exc:
                raise ValueError(f"truncated or corrupt image data: {exc}") from None
        finally:
            Image.MAX_IMAGE_PIXELS = old_limit
    return ImageFacts(format=fmt, width=width, height=height)
