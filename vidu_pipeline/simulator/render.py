"""Render the simulator's video: a deterministic 5 s H.264 MP4 made from the reference images.

Each image gets a slice of the timeline with a seeded pan/zoom ("Ken Burns") path, slices
cross-fade, a seeded shape moves over the picture and a seeded tint colours it; every motion
grows with ``movement_amplitude``. With ``bgm`` an AAC track of seeded tones is added.

Same spec ⇒ same bytes: one encoder thread, ``+bitexact`` on the muxer and both codecs (drops
the library version tags), fixed time bases and pts, and all randomness from a ``random.Random``
seeded by the spec. ``+faststart`` rewrites the file, so we write a real temp file next to the
target and rename it into place: readers never see a half-written video.

``RenderSpec.defect`` renders what a generator can get wrong while still delivering a valid MP4
of the right size, duration and audio, so only the quality figures (``vidu_pipeline.quality``)
can tell: see ``DEFECTS``. Without a defect the output is exactly what it was before.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import math
import os
import random
import tempfile
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageDraw, ImageOps

from ..api import contract

# (zoom change, share of the free pan range travelled, shape path radius) per amplitude.
MOTION = {
    "small": (0.04, 0.15, 0.08),
    "medium": (0.15, 0.45, 0.22),
    "large": (0.35, 1.0, 0.38),
}
MOTION["auto"] = MOTION["medium"]
BASE_ZOOM = 1.05  # a little zoom from the start, so panning has room on both axes
TINT_STRENGTH = 0.14
AUDIO_RATE = 48_000
AUDIO_FRAME = 1024
PENTATONIC = (0, 2, 4, 7, 9, 12, 14, 16)

# What each defect does to the clip.
DEFECTS = {
    "frozen": "the first frame held still for the whole clip",
    "black": "every frame black",
    "ignore_amplitude": "movement_amplitude misread: `small` moves like `large` and vice versa",
    "same_clip_for_seeds": "the seed is ignored: every seed of a request gives the same clip",
    "unrelated": "pictures made up from the seed instead of the reference images",
}
AMPLITUDE_MISREAD = {"small": "large", "large": "small"}


@dataclasses.dataclass(frozen=True)
class RenderSpec:
    """Everything the output depends on. The task id is deliberately not part of it."""

    images: tuple[bytes, ...]
    prompt: str
    seed: int
    aspect_ratio: str = "16:9"
    movement_amplitude: str = "auto"
    bgm: bool = False
    render_scale: float = 1.0
    fps: int = 24
    defect: str | None = None  # one of DEFECTS, or None for a faithful render

    def __post_init__(self) -> None:
        if self.defect is not None and self.defect not in DEFECTS:
            raise ValueError(f"RenderSpec.defect: {self.defect!r} is not one of {', '.join(DEFECTS)}")

    def rng(self, purpose: str) -> random.Random:
        digests = ",".join(hashlib.sha256(b).hexdigest() for b in self.images)
        seed = 0 if self.defect == "same_clip_for_seeds" else self.seed
        text = f"{purpose}|{seed}|{self.prompt}|{self.aspect_ratio}|{self.movement_amplitude}|{digests}"
        return random.Random(hashlib.sha256(text.encode("utf-8")).hexdigest())

    @property
    def motion(self) -> tuple[float, float, float]:
        """The motion actually rendered: the requested amplitude's, unless it is misread."""
        amplitude = self.movement_amplitude
        if self.defect == "ignore_amplitude":
            amplitude = AMPLITUDE_MISREAD.get(amplitude, amplitude)
        return MOTION[amplitude]


def render_video(spec: RenderSpec, target: Path) -> None:
    """Write the MP4 for ``spec`` to ``target`` atomically (temp file in the same folder)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.stem}-", suffix=".part")
    os.close(fd)
    try:
        _encode(spec, tmp_name)
        with open(tmp_name, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp_name, target)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)


def _encode(spec: RenderSpec, path: str) -> None:
    width, height = contract.expected_video_size(spec.aspect_ratio, spec.render_scale)
    n_frames = contract.VIDEO_DURATION_S * spec.fps
    container = av.open(path, "w", format="mp4", options={"movflags": "+faststart", "fflags": "+bitexact"})
    try:
        video = container.add_stream(
            "libx264", rate=spec.fps, options={"preset": "ultrafast", "crf": "23", "flags": "+bitexact"}
        )
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        video.codec_context.thread_count = 1
        video.codec_context.time_base = Fraction(1, spec.fps)
        audio = None
        if spec.bgm:
            audio = container.add_stream("aac", rate=AUDIO_RATE, layout="mono", options={"flags": "+bitexact"})
            audio.codec_context.thread_count = 1
        for i, image in enumerate(_defective(spec, width, height, n_frames)):
            frame = av.VideoFrame.from_image(image)
            frame.pts = i
            container.mux(video.encode(frame))
        container.mux(video.encode())
        if audio is not None:
            samples = _music(spec)
            for start in range(0, len(samples), AUDIO_FRAME):
                chunk = samples[start : start + AUDIO_FRAME]
                frame = av.AudioFrame.from_ndarray(chunk[None, :], format="flt", layout="mono")
                frame.sample_rate = AUDIO_RATE
                frame.pts = start
                frame.time_base = Fraction(1, AUDIO_RATE)
                container.mux(audio.encode(frame))
            container.mux(audio.encode())
    finally:
        container.close()


# --- pictures ---------------------------------------------------------------------------------


@dataclasses.dataclass
class _Shot:
    """One reference image and its camera path (zoom and normalised pan position over time)."""

    picture: Image.Image
    zoom: tuple[float, float]
    pan: tuple[tuple[float, float], tuple[float, float]]


def _defective(spec: RenderSpec, width: int, height: int, n_frames: int):
    """The frames of ``spec``, with its picture-level defect (frozen, black) applied."""
    if spec.defect == "black":
        black = Image.new("RGB", (width, height))
        return (black for _ in range(n_frames))
    frames = _frames(spec, width, height, n_frames)
    if spec.defect == "frozen":
        still = next(frames)
        return (still for _ in range(n_frames))
    return frames


def _frames(spec: RenderSpec, width: int, height: int, n_frames: int):
    rng = spec.rng("pictures")
    zoom_delta, pan_share, shape_radius = spec.motion
    max_zoom = BASE_ZOOM + 2 * zoom_delta
    tint = tuple(rng.randrange(256) for _ in range(3))
    shots = []
    for data in spec.images:
        if spec.defect == "unrelated":
            data = _unrelated_picture(rng, width, height)
        picture = _prepare(data, width, height, max_zoom, tint)
        z0 = BASE_ZOOM + rng.uniform(0, zoom_delta)
        z1 = z0 + zoom_delta * rng.choice((-1, 1))
        start = (rng.random(), rng.random())
        aim = (rng.random(), rng.random())
        end = (start[0] + pan_share * (aim[0] - start[0]), start[1] + pan_share * (aim[1] - start[1]))
        shots.append(_Shot(picture, (z0, max(1.0, z1)), (start, end)))

    shape_colours = [tuple(rng.randrange(256) for _ in range(3)) for _ in range(2)]
    phase = [rng.uniform(0, 2 * math.pi) for _ in range(2)]
    turns = [rng.choice((1, 2, 3)) for _ in range(2)]
    size = max(2, round(min(width, height) * rng.uniform(0.06, 0.12)))

    n = len(shots)
    fade = min(0.5, 0.5 * n / contract.VIDEO_DURATION_S)  # ~0.5 s, in image slots
    for i in range(n_frames):
        p = i * n / n_frames  # position on the timeline, in image slots
        b = round(p)
        if 1 <= b <= n - 1 and abs(p - b) < fade / 2:
            weight = (p - (b - fade / 2)) / fade
            outgoing = _view(shots[b - 1], min(1.0, p - (b - 1)), width, height)
            incoming = _view(shots[b], max(0.0, p - b), width, height)
            image = Image.blend(outgoing, incoming, weight)
        else:
            k = min(n - 1, int(p))
            image = _view(shots[k], p - k, width, height)
        t = i / n_frames
        x = width * (0.5 + shape_radius * math.sin(2 * math.pi * turns[0] * t + phase[0]))
        y = height * (0.5 + shape_radius * math.sin(2 * math.pi * turns[1] * t + phase[1]))
        draw = ImageDraw.Draw(image)
        draw.ellipse((x - size, y - size, x + size, y + size), fill=shape_colours[0])
        draw.ellipse((x - size / 2, y - size / 2, x + size / 2, y + size / 2), fill=shape_colours[1])
        yield image


def _unrelated_picture(rng: random.Random, width: int, height: int) -> bytes:
    """A made-up picture (a two-colour gradient with a few blocks), as PNG bytes like a reference."""
    top, bottom = (np.array([rng.randrange(256) for _ in range(3)]) for _ in range(2))
    ramp = np.linspace(0.0, 1.0, height)[:, None, None]
    pixels = (top + (bottom - top) * ramp) * np.ones((1, width, 1))
    picture = Image.fromarray(pixels.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(picture)
    for _ in range(6):
        x, y = rng.randrange(width), rng.randrange(height)
        w, h = rng.randrange(width // 8 + 1, width // 3 + 2), rng.randrange(height // 8 + 1, height // 3 + 2)
        draw.rectangle((x, y, x + w, y + h), fill=tuple(rng.randrange(256) for _ in range(3)))
    buf = io.BytesIO()
    picture.save(buf, "PNG")
    return buf.getvalue()


def _prepare(data: bytes, width: int, height: int, max_zoom: float, tint: tuple) -> Image.Image:
    """Decode upright RGB, shrink to what the deepest zoom needs (never enlarge), tint once."""
    with Image.open(io.BytesIO(data)) as im:
        picture = ImageOps.exif_transpose(im).convert("RGB")
    cover = max(width * max_zoom / picture.width, height * max_zoom / picture.height)
    if cover < 1:
        size = (max(1, round(picture.width * cover)), max(1, round(picture.height * cover)))
        picture = picture.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)
    return Image.blend(picture, Image.new("RGB", picture.size, tint), TINT_STRENGTH)


def _view(shot: _Shot, t: float, width: int, height: int) -> Image.Image:
    """The camera's frame of ``shot`` at progress ``t`` (0..1), with eased motion."""
    ease = t * t * (3 - 2 * t)
    zoom = shot.zoom[0] + (shot.zoom[1] - shot.zoom[0]) * ease
    (u0, v0), (u1, v1) = shot.pan
    u, v = u0 + (u1 - u0) * ease, v0 + (v1 - v0) * ease
    pw, ph = shot.picture.size
    # The largest window of the output's aspect inside the picture, then zoomed in.
    win_w = min(pw, ph * width / height) / zoom
    win_h = win_w * height / width
    x0 = u * (pw - win_w)
    y0 = v * (ph - win_h)
    return shot.picture.resize((width, height), Image.Resampling.BILINEAR, box=(x0, y0, x0 + win_w, y0 + win_h))


# --- music ------------------------------------------------------------------------------------


def _music(spec: RenderSpec) -> np.ndarray:
    """Seeded pentatonic notes over a soft drone, as float32 mono samples in -1..1."""
    rng = spec.rng("music")
    n = AUDIO_RATE * contract.VIDEO_DURATION_S
    t = np.arange(n, dtype=np.float64) / AUDIO_RATE
    root = 110.0 * 2 ** (rng.randrange(12) / 12)
    out = 0.12 * np.sin(2 * np.pi * root * t) + 0.06 * np.sin(2 * np.pi * root * 1.5 * t)
    beat = rng.choice((0.25, 0.5))
    for start in np.arange(0.0, contract.VIDEO_DURATION_S, beat):
        a, b = int(start * AUDIO_RATE), min(n, int((start + beat) * AUDIO_RATE))
        freq = root * 4 * 2 ** (rng.choice(PENTATONIC) / 12)
        local = t[a:b] - start
        envelope = np.exp(-local * 6.0) * np.minimum(1.0, local * 200)
        out[a:b] += 0.25 * envelope * np.sin(2 * np.pi * freq * local)
    return np.clip(out, -1.0, 1.0).astype(np.float32)
