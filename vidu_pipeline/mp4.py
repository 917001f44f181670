"""Verify and look at downloaded MP4s with PyAV.

A truncated *faststart* MP4 still opens and reports its full duration from the index, so a
probe that only reads metadata would pass a broken download. :func:`probe_video` therefore
demuxes every packet and decodes every stream end to end, and compares what it read with what
the index promised. It also walks the MP4's top-level boxes: a file cut inside its trailing
``moov`` (e.g. only the metadata lost) can still decode completely, but its boxes overrun the
file end.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import math
import struct
from collections.abc import Callable, Sequence
from pathlib import Path

import av
from PIL import Image, ImageDraw, ImageFont

from .api.contract import VIDEO_DURATION_S, expected_video_size

DURATION_TOLERANCE_S = 0.2
EXPECTED_CODEC = "h264"
LABEL_BAND_PX = 24  # height of the text band under each contact-sheet cell
_BACKGROUND = (24, 24, 24)
_LABEL_COLOUR = (235, 235, 235)


class VideoInvalid(Exception):
    """The file is not a complete, decodable MP4 with a video stream; ``reason`` says why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class VideoProbe:
    width: int
    height: int
    fps: float
    frames: int  # decoded video frames
    duration_s: float  # of the video stream
    video_codec: str
    pix_fmt: str
    has_audio: bool
    audio_codec: str | None
    size_bytes: int
    sha256: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def file_sha256(path: str | Path) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def mp4_box_problem(path: str | Path) -> str | None:
    """Why the top-level box structure is not a complete MP4 (``ftyp`` … ``moov``), or None."""
    seen = []  # box types, in order
    with open(path, "rb") as f:
        end = f.seek(0, 2)
        if end == 0:
            return "empty file"
        offset = 0
        while offset < end:
            f.seek(offset)
            header = f.read(16)
            if len(header) < 8:
                return f"truncated: {end - offset} stray bytes after the last box"
            size, kind = struct.unpack(">I4s", header[:8])
            if size == 1:
                if len(header) < 16:
                    return "truncated: incomplete box header"
                size = struct.unpack(">Q", header[8:16])[0]
            elif size == 0:
                size = end - offset  # "extends to the end of the file"
            if offset == 0 and kind != b"ftyp":
                return "not an MP4: no leading 'ftyp' box"
            if size < 8 or not kind.isascii() or not kind.decode("ascii").isprintable():
                return f"not an MP4: bad box at offset {offset}"
            if offset + size > end:
                return f"truncated: '{kind.decode()}' box needs {offset + size - end} more bytes"
            seen.append(kind)
            offset += size
    if b"moov" not in seen:
        return "truncated: no 'moov' box"
    return None


def probe_video(path: str | Path, on_frame: Callable[[av.VideoFrame], None] | None = None) -> VideoProbe:
    """Check the box structure, demux every packet, decode every frame; raise :class:`VideoInvalid`
    if anything is broken.

    ``on_frame`` sees every decoded video frame in presentation order (e.g.
    ``quality.FrameSampler.offer``), so quality figures ride on this decode instead of a second one.
    """
    if problem := mp4_box_problem(path):
        raise VideoInvalid(problem)
    sha256, size = file_sha256(path)
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoInvalid("no video stream")
            video = container.streams.video[0]
            if video.codec_context is None:
                raise VideoInvalid("video stream has no usable codec parameters (damaged index?)")
            audio = container.streams.audio[0] if container.streams.audio else None
            packets = {s.index: 0 for s in container.streams}
            decoded = 0
            for packet in container.demux(video, *([audio] if audio else [])):
                if packet.is_corrupt:
                    raise VideoInvalid(f"corrupt {packet.stream.type} packet at pts {packet.pts} (truncated?)")
                if packet.size:
                    packets[packet.stream.index] += 1
                frames = packet.decode()  # audio too: cheap, and catches zero-filled tails
                if packet.stream is video:
                    decoded += len(frames)
                    if on_frame is not None:
                        for frame in frames:
                            if isinstance(frame, av.VideoFrame):
                                on_frame(frame)
            for stream in filter(None, (video, audio)):
                promised = stream.frames
                if promised and packets[stream.index] < promised:
                    raise VideoInvalid(
                        f"truncated: {packets[stream.index]} of {promised} {stream.type} packets present"
                    )
            if decoded == 0:
                raise VideoInvalid("no decodable video frames")
            if video.frames and decoded < video.frames:
                raise VideoInvalid(f"only {decoded} of {video.frames} video frames decode")
            fps = float(video.average_rate) if video.average_rate else 0.0
            if video.duration is not None and video.time_base is not None:
                duration = float(video.duration * video.time_base)
            elif container.duration is not None:
                duration = container.duration / av.time_base
            else:
                duration = decoded / fps if fps else 0.0
            return VideoProbe(
                width=video.codec_context.width,
                height=video.codec_context.height,
                fps=fps,
                frames=decoded,
                duration_s=duration,
                video_codec=video.codec_context.name,
                pix_fmt=video.codec_context.pix_fmt or "",
                has_audio=audio is not None,
                audio_codec=audio.codec_context.name if audio is not None else None,
                size_bytes=size,
                sha256=sha256,
            )
    except av.FFmpegError as exc:
        raise VideoInvalid(f"unreadable: {exc}") from None


def check_against_request(
    probe: VideoProbe,
    *,
    aspect_ratio: str,
    bgm: bool,
    render_scale: float = 1.0,
    duration_s: float = VIDEO_DURATION_S,
    tolerance_s: float = DURATION_TOLERANCE_S,
) -> list[str]:
    """What about a valid video does not match what was asked; ``[]`` when it all does."""
    problems = []
    expected = expected_video_size(aspect_ratio, render_scale)
    if (probe.width, probe.height) != expected:
        problems.append(f"size {probe.width}×{probe.height}, expected {expected[0]}×{expected[1]} for {aspect_ratio}")
    if abs(probe.duration_s - duration_s) > tolerance_s:
        problems.append(f"duration {probe.duration_s:.3f} s, expected {duration_s} ± {tolerance_s} s")
    if bgm and not probe.has_audio:
        problems.append("no audio track although bgm was requested")
    if not bgm and probe.has_audio:
        problems.append("audio track present although bgm was not requested")
    if probe.video_codec != EXPECTED_CODEC:
        problems.append(f"video codec {probe.video_codec}, expected {EXPECTED_CODEC}")
    return problems


class FrameAt:
    """Keeps the frame :func:`frame_image` would pick (the first at or after ``at_s``, else the
    last) from a decode that runs anyway: pass :meth:`offer` as ``probe_video(on_frame=…)``."""

    def __init__(self, at_s: float = 1.0):
        self.at_s = at_s
        self.frame: av.VideoFrame | None = None
        self._found = False

    def offer(self, frame: av.VideoFrame) -> None:
        if not self._found:
            self.frame = frame
            self._found = frame.time is not None and frame.time >= self.at_s - 1e-6

    def image(self) -> Image.Image | None:
        return None if self.frame is None else self.frame.to_image()


def frame_image(path: str | Path, at_s: float = 1.0) -> Image.Image:
    """The first frame at or after ``at_s`` (the last frame if the video is shorter)."""
    try:
        with av.open(str(path)) as container:
            if not container.streams.video or container.streams.video[0].codec_context is None:
                raise VideoInvalid("no usable video stream")
            stream = container.streams.video[0]
            if at_s > 0 and stream.time_base is not None:
                container.seek(int(at_s / stream.time_base), stream=stream, backward=True)
            last = None
            for frame in container.decode(stream):
                last = frame
                if frame.time is not None and frame.time >= at_s - 1e-6:
                    break
            if last is None:
                raise VideoInvalid("no decodable video frames")
            return last.to_image()
    except av.FFmpegError as exc:
        raise VideoInvalid(f"unreadable: {exc}") from None


def frame_png(path: str | Path, at_s: float = 1.0, max_side: int = 320) -> bytes:
    """A PNG thumbnail of one frame, longest side at most ``max_side``."""
    image = frame_image(path, at_s)
    image.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def jpeg_data_uri(image: Image.Image, width: int = 320, quality: int = 75) -> str:
    """A small inline JPEG (``data:image/jpeg;base64,…``), at most ``width`` pixels wide: the
    Dagster UI shows it in Markdown metadata without serving any file."""
    small = image.convert("RGB")
    if small.width > width:
        small = small.resize((width, max(1, round(small.height * width / small.width))), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    small.save(buf, format="JPEG", quality=quality, optimize=True)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def contact_sheet(
    items: Sequence[tuple[str, Path]],
    columns: int,
    cell_width: int = 320,
    cell_height: int | None = None,
    at_s: float = 1.0,
) -> Image.Image:
    """A grid with one frame per video, each above a band with its label (e.g. "cat · seed 2").

    Every cell is ``cell_width × cell_height`` (square by default, so 16:9, 9:16 and 1:1 frames
    all fit, letterboxed and centred) plus a ``LABEL_BAND_PX`` band below; the sheet is exactly
    ``columns * cell_width`` wide and ``ceil(len(items) / columns) * (cell_height +
    LABEL_BAND_PX)`` high. An unreadable video gets a blank cell saying so, not an exception.
    """
    if not items:
        raise ValueError("no videos for the contact sheet")
    if columns < 1:
        raise ValueError("columns must be at least 1")
    cell_height = cell_height or cell_width
    rows = math.ceil(len(items) / columns)
    sheet = Image.new("RGB", (columns * cell_width, rows * (cell_height + LABEL_BAND_PX)), _BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=LABEL_BAND_PX * 0.6)
    for i, (label, path) in enumerate(items):
        x = (i % columns) * cell_width
        y = (i // columns) * (cell_height + LABEL_BAND_PX)
        try:
            frame = _still(path) if Path(path).suffix.lower() == ".png" else frame_image(path, at_s)
            frame.thumbnail((cell_width, cell_height))
            sheet.paste(frame, (x + (cell_width - frame.width) // 2, y + (cell_height - frame.height) // 2))
        except VideoInvalid as exc:
            label = f"{label} (unreadable: {exc.reason})"
        text = _fit(draw, label, font, cell_width - 8)
        draw.text((x + 4, y + cell_height + LABEL_BAND_PX // 2), text, fill=_LABEL_COLOUR, font=font, anchor="lm")
    return sheet


def _still(path: Path) -> Image.Image:
    """A saved frame (a thumbnail PNG), so a sheet need not decode every video again."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except OSError as exc:
        raise VideoInvalid(f"unreadable thumbnail: {exc}") from None


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """Shorten ``text`` with an ellipsis until it fits ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"
