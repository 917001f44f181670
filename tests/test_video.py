"""Video probing on real, small MP4s made here with PyAV: good, truncated, wrong, not video."""

from __future__ import annotations

import io
import math
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from vidu_pipeline import mp4
from vidu_pipeline.api.contract import expected_video_size
from vidu_pipeline.mp4 import (
    LABEL_BAND_PX,
    FrameAt,
    VideoInvalid,
    check_against_request,
    contact_sheet,
    frame_image,
    frame_png,
    probe_video,
)

SCALE = 0.1
FPS = 24


def make_mp4(
    path: Path,
    size: tuple[int, int],
    *,
    seconds: float = 5,
    audio: bool = False,
    faststart: bool = False,
    fmt: str | None = None,
) -> Path:
    """Frame i is uniformly grey at level 2*i, so a frame's time can be read from its pixels."""
    width, height = size
    options = {"movflags": "+faststart"} if faststart else {}
    with av.open(str(path), "w", format=fmt, options=options) as out:
        video = out.add_stream("libx264", rate=FPS, options={"preset": "ultrafast", "crf": "18"})
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        video.codec_context.thread_count = 1
        sound = out.add_stream("aac", rate=44100) if audio else None
        for i in range(round(seconds * FPS)):
            frame = av.VideoFrame.from_ndarray(np.full((height, width, 3), (2 * i) % 256, np.uint8), format="rgb24")
            out.mux(video.encode(frame))
        out.mux(video.encode())
        if sound:
            t, total, n = 0, int(seconds * 44100), 1024
            while t < total:
                samples = 0.1 * np.sin(2 * np.pi * 440 * np.arange(t, t + n) / 44100)
                chunk = av.AudioFrame.from_ndarray(samples.astype(np.float32)[None, :], format="fltp", layout="mono")
                chunk.sample_rate, chunk.pts, chunk.time_base = 44100, t, Fraction(1, 44100)
                out.mux(sound.encode(chunk))
                t += n
            out.mux(sound.encode())
    return path


def truncated(src: Path, dst: Path, keep: float) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * keep)])
    return dst


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("clips")
    landscape, portrait = expected_video_size("16:9", SCALE), expected_video_size("9:16", SCALE)
    return {
        "landscape_bgm": make_mp4(d / "landscape_bgm.mp4", landscape, audio=True, faststart=True),
        "portrait": make_mp4(d / "portrait.mp4", portrait),
        "wrong_size": make_mp4(d / "wrong_size.mp4", (160, 160)),
        "short": make_mp4(d / "short.mp4", landscape, seconds=2),
        "mkv": make_mp4(d / "clip.mkv", landscape, seconds=1, fmt="matroska"),
    }


def test_probe_landscape_with_audio(clips):
    p = probe_video(clips["landscape_bgm"])
    assert (p.width, p.height) == (192, 108)
    assert p.fps == 24.0 and p.frames == 120
    assert p.duration_s == pytest.approx(5.0, abs=0.05)
    assert (p.video_codec, p.pix_fmt, p.has_audio, p.audio_codec) == ("h264", "yuv420p", True, "aac")
    assert p.size_bytes == clips["landscape_bgm"].stat().st_size and len(p.sha256) == 64
    assert check_against_request(p, aspect_ratio="16:9", bgm=True, render_scale=SCALE) == []


def test_probe_portrait_without_audio(clips):
    p = probe_video(clips["portrait"])
    assert (p.width, p.height, p.frames, p.has_audio, p.audio_codec) == (108, 192, 120, False, None)
    assert check_against_request(p, aspect_ratio="9:16", bgm=False, render_scale=SCALE) == []


def test_on_frame_sees_every_decoded_frame_in_order(clips):
    """The quality figures ride on the verification decode: every frame, presentation order,
    audio frames not included; the sampler then measures the same as its own decode."""
    from vidu_pipeline import quality

    times = []
    sampler = quality.FrameSampler()

    def on_frame(frame):
        times.append(frame.time)
        sampler.offer(frame)

    p = probe_video(clips["landscape_bgm"], on_frame=on_frame)
    assert len(times) == p.frames == 120 and times == sorted(times)
    assert quality.measure(sampler) == quality.measure_video(clips["landscape_bgm"])


def test_on_frame_error_is_not_swallowed(clips):
    def boom(frame):
        raise RuntimeError("sampler broke")

    with pytest.raises(RuntimeError, match="sampler broke"):
        probe_video(clips["portrait"], on_frame=boom)


def test_probe_is_a_plain_dict_for_the_ledger(clips):
    d = probe_video(clips["portrait"]).to_dict()
    assert d["width"] == 108 and set(d) >= {"fps", "frames", "sha256", "has_audio"}


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.995])
def test_truncated_faststart_is_invalid(clips, tmp_path, keep):
    bad = truncated(clips["landscape_bgm"], tmp_path / "cut.mp4", keep)
    with av.open(str(bad)) as c:  # the trap: it opens and claims the full length
        assert c.streams.video[0].frames == 120
    with pytest.raises(VideoInvalid, match="truncated|corrupt|decode"):
        probe_video(bad)


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.995])
def test_truncated_faststart_is_caught_by_demux_and_decode_alone(clips, tmp_path, keep, monkeypatch):
    monkeypatch.setattr(mp4, "mp4_box_problem", lambda path: None)
    with pytest.raises(VideoInvalid, match="truncated|corrupt"):
        probe_video(truncated(clips["landscape_bgm"], tmp_path / "cut.mp4", keep))


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.995])
def test_zero_filled_tail_is_invalid(clips, tmp_path, keep):
    """A preallocated download that died: every box is complete, the media bytes are not."""
    data = clips["landscape_bgm"].read_bytes()
    cut = int(len(data) * keep)
    (tmp_path / "zeros.mp4").write_bytes(data[:cut] + bytes(len(data) - cut))
    assert mp4.mp4_box_problem(tmp_path / "zeros.mp4") is None
    with pytest.raises(VideoInvalid, match="unreadable|decode"):
        probe_video(tmp_path / "zeros.mp4")


@pytest.mark.parametrize("keep", [0.5, 0.95, 0.999])
def test_truncated_index_at_end_is_invalid(clips, tmp_path, keep):
    with pytest.raises(VideoInvalid, match="truncated"):
        probe_video(truncated(clips["portrait"], tmp_path / "cut.mp4", keep))


def test_not_an_mp4(clips, tmp_path):
    with pytest.raises(VideoInvalid, match="not an MP4"):
        probe_video(clips["mkv"])
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(VideoInvalid, match="empty"):
        probe_video(tmp_path / "empty.mp4")
    (tmp_path / "text.mp4").write_text("<html>403 Forbidden</html>")
    with pytest.raises(VideoInvalid, match="not an MP4"):
        probe_video(tmp_path / "text.mp4")
    buf = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buf, "PNG")
    (tmp_path / "image.mp4").write_bytes(buf.getvalue())
    with pytest.raises(VideoInvalid, match="not an MP4"):
        probe_video(tmp_path / "image.mp4")


def test_no_video_stream(tmp_path):
    path = tmp_path / "audio_only.mp4"
    with av.open(str(path), "w") as out:
        sound = out.add_stream("aac", rate=44100)
        chunk = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        chunk.sample_rate, chunk.pts, chunk.time_base = 44100, 0, Fraction(1, 44100)
        out.mux(sound.encode(chunk))
        out.mux(sound.encode())
    with pytest.raises(VideoInvalid, match="no video stream"):
        probe_video(path)


def test_mismatches_are_reported_specifically(clips):
    wrong = probe_video(clips["wrong_size"])
    assert check_against_request(wrong, aspect_ratio="16:9", bgm=True, render_scale=SCALE) == [
        "size 160×160, expected 192×108 for 16:9",
        "no audio track although bgm was requested",
    ]
    with_audio = probe_video(clips["landscape_bgm"])
    assert check_against_request(with_audio, aspect_ratio="9:16", bgm=False, render_scale=SCALE) == [
        "size 192×108, expected 108×192 for 9:16",
        "audio track present although bgm was not requested",
    ]
    short = probe_video(clips["short"])
    assert check_against_request(short, aspect_ratio="16:9", bgm=False, render_scale=SCALE) == [
        "duration 2.000 s, expected 5 ± 0.2 s"
    ]
    full_size = check_against_request(short, aspect_ratio="16:9", bgm=False, duration_s=2)
    assert full_size == ["size 192×108, expected 1920×1080 for 16:9"]


def test_frame_png_is_the_requested_moment(clips):
    png = frame_png(clips["landscape_bgm"], at_s=1.0, max_side=64)
    im = Image.open(io.BytesIO(png))
    assert im.format == "PNG" and im.size == (64, 36)
    assert np.asarray(im.convert("L")).mean() == pytest.approx(2 * FPS, abs=4)  # frame 24
    last = Image.open(io.BytesIO(frame_png(clips["portrait"], at_s=60)))
    assert last.size == (108, 192)  # never upscaled
    assert np.asarray(last.convert("L")).mean() == pytest.approx(2 * 119, abs=4)


def test_contact_sheet_dimensions_are_exact(clips, tmp_path):
    items = [
        ("cat · seed 1", clips["landscape_bgm"]),
        ("cat · seed 2", clips["portrait"]),
        ("dog · seed 1", clips["wrong_size"]),
        ("dog · seed 2", clips["short"]),
        ("broken · with a label far too long to fit in one cell", tmp_path / "missing.mp4"),
    ]
    sheet = contact_sheet(items, columns=3, cell_width=100)
    assert sheet.size == (3 * 100, math.ceil(5 / 3) * (100 + LABEL_BAND_PX))
    px = np.asarray(sheet.convert("L"))
    assert px[50, 50] > 24 + 10  # first cell: a frame (grey level 48) centred in the cell
    assert px[0, 50] == 24  # letterbox above the 16:9 frame
    assert contact_sheet(items[:2], columns=4, cell_width=64, cell_height=36).size == (4 * 64, 36 + LABEL_BAND_PX)
    with pytest.raises(ValueError):
        contact_sheet([], columns=2)


def test_the_thumbnail_frame_rides_on_the_verification_decode(clips):
    """FrameAt picks, from probe_video's own decode, the very frame frame_image seeks and
    decodes again: the first at or after the moment, else the last."""
    for name, at_s in (("landscape_bgm", 1.0), ("portrait", 60.0), ("landscape_bgm", 0.0)):
        still = FrameAt(at_s)
        probe_video(clips[name], on_frame=still.offer)
        expected = frame_image(clips[name], at_s)
        assert still.image().tobytes() == expected.tobytes(), (name, at_s)
