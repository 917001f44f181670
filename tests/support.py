"""Small builders shared by the test modules: images and submit bodies made on the spot."""

import base64
import io
from pathlib import Path

import numpy as np
from PIL import Image


def image_bytes(width: int, height: int, fmt: str = "PNG", colour=(200, 60, 40)) -> bytes:
    """A striped image, so the simulator's pans and zooms change pixels."""
    im = Image.new("RGB", (width, height), colour)
    for x in range(0, width, 16):
        im.paste((x % 255, 255 - x % 255, 90), (x, 0, x + 8, height))
    buf = io.BytesIO()
    im.save(buf, fmt)
    return buf.getvalue()


def data_uri(data: bytes, subtype: str = "png") -> str:
    return f"data:image/{subtype};base64,{base64.b64encode(data).decode()}"


IMG_A = data_uri(image_bytes(320, 240))
IMG_B = data_uri(image_bytes(200, 300, "JPEG", (30, 90, 200)), "jpeg")


def body(**overrides) -> dict:
    return {"images": [IMG_A, IMG_B], "prompt": "a red kite over blue hills", **overrides}


def encode(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    out = io.BytesIO()
    im.save(out, fmt, **kw)
    return out.getvalue()


def photo(w: int = 200, h: int = 150, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """A small image with some structure, distinct per seed."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (max(1, h // 8), max(1, w // 8), 3), dtype=np.uint8)
    return Image.fromarray(base, "RGB").resize((w, h), Image.Resampling.BILINEAR).convert(mode)


def png(w=200, h=150, seed=0) -> bytes:
    return encode(photo(w, h, seed))


def fill(disk: Path) -> Path:
    """Write zeros until the file system says it is full (ENOSPC); the filler's path."""
    filler = disk / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    return filler
