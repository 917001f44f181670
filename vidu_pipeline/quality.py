"""Quality figures for a generated clip, from a few small frames.

What the dataset gates need to catch in generated clips: a clip that does not move (frozen),
black or one-colour frames, a clip that ignores ``movement_amplitude``, the same clip returned
for different seeds (near-duplicates), and a clip that has nothing to do with its reference
images. Every figure comes from frames *sampled* at ``SAMPLE_FPS`` and shrunk to
``SAMPLE_SIDE`` px on their longest side, so the pixel work is small next to decoding.

Decoding itself cannot be made cheaper for H.264: FFmpeg's low-resolution decoding does not
exist for it, every P-frame needs the one before, and skipping to keyframes leaves one frame
per clip when the encoder puts a keyframe only every 250 frames (x264's default). The cheap way is therefore to measure the
frames the verification decode (``video.probe_video``) already produces: feed each decoded
video frame to :meth:`FrameSampler.offer`, then call :func:`measure`. :func:`measure_video`
decodes the file itself, for when no verification decode runs.

The figures (all plain types, see :class:`VideoQuality`):

* ``motion``: mean absolute luma difference between consecutive samples, in 0..1. Not optical
  flow: a difference needs no extra dependency (OpenCV) and already orders clips by how much
  they move; it grows with speed and with texture, so compare it between clips of the same
  references (e.g. ``small`` against ``large`` of one request), not across unrelated pictures.
* ``still_share`` / ``frozen``: the share of consecutive samples that differ by less than
  ``Thresholds.still_diff``; frozen when that share reaches ``Thresholds.frozen_share``.
* ``blank_share`` / ``blank``: the share of samples that are near-black (mean luma below
  ``dark_luma``) or near-uniform (luma std below ``flat_std``); blank from ``blank_share``.
* ``phash``: a 64-bit DCT perceptual hash (as imagehash's ``phash``) per sample, hex strings;
  :func:`clip_distance` compares two clips (mean Hamming distance, in bits).
* ``reference_similarity``: how well the clip's colours match each reference image (best
  colour-histogram intersection over the samples, averaged over the references), in 0..1. The
  histograms are taken after per-channel normalisation, so a colour cast or grading does not
  count as a different picture (the simulator tints every clip by 14 %).
"""

from __future__ import annotations

import dataclasses
import functools
import io
import itertools
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import av
import numpy as np
from av.video.reformatter import VideoReformatter
from PIL import Image, ImageOps

SAMPLE_FPS = 8.0  # samples per second of video
SAMPLE_SIDE = 128  # px, longest side of a sample
MAX_SAMPLES = 64  # bounds memory for long videos: later frames are not sampled
FALLBACK_FPS = 24  # to time frames that carry no timestamp
COLOUR_SPREAD = 0.7  # std from a channel's mean at which a pixel is fully "below"/"above" (histograms)
HASH_SIZE = 8  # 8×8 DCT coefficients: 64-bit hashes
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601


@dataclasses.dataclass(frozen=True)
class Thresholds:
    """Where the gates draw the line; every default is documented by the figure it applies to."""

    # Two samples 1/8 s apart whose mean luma differs by less than this (0..1; 0.002 is half a
    # grey level) show the same picture: encoder noise on a still frame stays far below it.
    still_diff: float = 0.002
    # Frozen when at least this share of consecutive sample pairs are still.
    frozen_share: float = 0.9
    # A sample is blank when its mean luma is below dark_luma (near-black) or its luma std is
    # below flat_std (one flat colour: a fade, a missing picture).
    dark_luma: float = 0.06
    flat_std: float = 0.02
    # Blank clip when at least this share of its samples are blank.
    blank_share: float = 0.5
    # Two clips whose clip_distance is below this many bits (of 64) are near-duplicates; clips
    # of one request under different seeds measured 24–33 bits apart on the simulator's renders.
    duplicate_bits: float = 6.0
    # A clip matches its references when reference_similarity is at least this. On the
    # simulator's renders: 0.78–0.93 against their own references, 0.11–0.27 against unrelated
    # ones. A real model recomposes its references more freely: calibrate on real clips.
    min_reference_similarity: float = 0.5
    # Across a sweep, mean motion of `large` clips over that of `small` clips must reach this.
    amplitude_ratio: float = 1.3


@dataclasses.dataclass(frozen=True)
class VideoQuality:
    """The quality figures of one video; plain types only (JSON- and Parquet-friendly)."""

    decoded_frames: int
    sampled_frames: int
    sample_width: int
    sample_height: int
    motion: float
    still_share: float
    frozen: bool
    blank_share: float
    blank: bool
    phash: tuple[str, ...]
    reference_similarity: float | None  # None when no references were given

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["phash"] = list(self.phash)
        return data


class FrameSampler:
    """Keeps a small RGB copy of one decoded frame every ``1 / fps`` seconds of video."""

    def __init__(self, fps: float = SAMPLE_FPS, side: int = SAMPLE_SIDE, max_samples: int = MAX_SAMPLES):
        self.interval = 1.0 / fps
        self.side = side
        self.max_samples = max_samples
        self.samples: list[np.ndarray] = []  # height × width × 3, uint8
        self.decoded = 0
        self._next_t = 0.0
        self._reformatter = VideoReformatter()  # keeps its scaler: a new one per frame costs 3×

    def offer(self, frame: av.VideoFrame) -> None:
        """Look at the next decoded frame (in presentation order); keep it if a sample is due."""
        self.decoded += 1
        t = frame.time if frame.time is not None else (self.decoded - 1) / FALLBACK_FPS
        if t + 1e-6 < self._next_t or len(self.samples) >= self.max_samples:
            return
        scale = self.side / max(frame.width, frame.height)
        width, height = max(1, round(frame.width * scale)), max(1, round(frame.height * scale))
        small = self._reformatter.reformat(
            frame, width=width, height=height, format="rgb24", interpolation="FAST_BILINEAR"
        )
        self.samples.append(small.to_ndarray())
        self._next_t = (math.floor(t / self.interval + 1e-6) + 1) * self.interval  # next slot after t


def measure_video(
    path: str | Path, references: Sequence[bytes] = (), thresholds: Thresholds | None = None
) -> VideoQuality:
    """Decode ``path`` once and measure it; raises ``av.FFmpegError`` or ValueError if unreadable."""
    sampler = FrameSampler()
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError(f"{path}: no video stream")
        for frame in container.decode(container.streams.video[0]):
            sampler.offer(frame)
    return measure(sampler, references, thresholds)


def measure(
    sampler: FrameSampler, references: Sequence[bytes] = (), thresholds: Thresholds | None = None
) -> VideoQuality:
    """The figures of the frames ``sampler`` kept (see the module docstring)."""
    if not sampler.samples:
        raise ValueError("no decoded video frames to measure")
    limits = thresholds or Thresholds()
    rgb = sampler.samples
    if len({frame.shape for frame in rgb}) == 1:  # one clip's samples: one matrix product for all
        luma: np.ndarray | list[np.ndarray] = (np.stack(rgb).astype(np.float32) @ _LUMA) / 255.0
    else:
        luma = [(frame.astype(np.float32) @ _LUMA) / 255.0 for frame in rgb]
    diffs = [float(np.mean(np.abs(b - a))) for a, b in itertools.pairwise(luma)]
    still_share = float(np.mean([d < limits.still_diff for d in diffs])) if diffs else 1.0
    blank = [float(y.mean()) < limits.dark_luma or float(y.std()) < limits.flat_std for y in luma]
    blank_share = float(np.mean(blank))
    similarity = reference_similarity(rgb, references) if references else None
    return VideoQuality(
        decoded_frames=sampler.decoded,
        sampled_frames=len(rgb),
        sample_width=int(rgb[0].shape[1]),
        sample_height=int(rgb[0].shape[0]),
        motion=round(float(np.mean(diffs)) if diffs else 0.0, 6),
        still_share=round(still_share, 6),
        frozen=still_share >= limits.frozen_share,
        blank_share=round(blank_share, 6),
        blank=blank_share >= limits.blank_share,
        phash=tuple(phashes(luma)),
        reference_similarity=None if similarity is None else round(similarity, 6),
    )


# --- perceptual hashes --------------------------------------------------------------------


def _dct_matrix(n: int) -> np.ndarray:
    """The (unscaled) DCT-II basis: ``m @ x`` is the DCT of the columns of ``x``."""
    k = np.arange(n)[:, None]
    return np.cos(np.pi * (2 * np.arange(n)[None, :] + 1) * k / (2 * n))


_DCT_LOW = _dct_matrix(4 * HASH_SIZE)[:HASH_SIZE]  # the 8 lowest frequencies of a 32-point DCT


def phashes(lumas: Iterable[np.ndarray]) -> list[str]:
    """A 64-bit perceptual hash of each grey image (0..1 floats), as 16 hex digits.

    As imagehash's ``phash``: shrink to 32×32, 2-D DCT, keep the 8×8 lowest frequencies, one
    bit per coefficient above their median. (imagehash shrinks with Lanczos; a box filter is
    a third of the cost and the 8×8 lowest frequencies hardly differ.) The DCTs of all the
    images are one matrix product.
    """
    shrunk = np.stack(
        [
            np.asarray(
                Image.fromarray(np.clip(luma * 255.0, 0, 255).astype(np.uint8), "L").resize(
                    (4 * HASH_SIZE,) * 2, Image.Resampling.BOX
                ),
                dtype=np.float64,
            )
            for luma in lumas
        ]
    )
    low = (_DCT_LOW @ shrunk @ _DCT_LOW.T).reshape(len(shrunk), -1)
    bits = np.packbits(low > np.median(low, axis=1, keepdims=True), axis=1)  # row-major, first bit highest
    return [row.tobytes().hex() for row in bits]


def clip_distance(a: Sequence[str], b: Sequence[str]) -> float:
    """Mean Hamming distance in bits (0..64) between two clips' hash sequences.

    Samples are paired by their relative position, so clips of different lengths compare too.
    """
    return _bit_distance(_hash_array(a), _hash_array(b))


def _hash_array(hashes: Sequence[str]) -> np.ndarray:
    return np.array([int(h, 16) for h in hashes], dtype=np.uint64)


def _bit_distance(a: np.ndarray, b: np.ndarray) -> float:
    if not len(a) or not len(b):
        raise ValueError("clip_distance needs two non-empty hash sequences")
    longer, shorter = (a, b) if len(a) >= len(b) else (b, a)
    paired = shorter[np.arange(len(longer)) * len(shorter) // len(longer)]
    return float(np.bitwise_count(longer ^ paired).sum()) / len(longer)


# --- reference images ---------------------------------------------------------------------


def reference_similarity(frames: Sequence[np.ndarray], references: Iterable[bytes]) -> float:
    """How well the clip's colours match each reference, in 0..1.

    Per reference, the best colour-histogram intersection over the sampled frames (a crop,
    pan or zoom of a picture keeps its colours); the mean over references, so a clip must show
    every reference to score high.
    """
    frame_hists = _histograms(frames)
    scores = [float(np.minimum(frame_hists, _reference_histogram(data)).sum(axis=1).max()) for data in references]
    return float(np.mean(scores))


@functools.lru_cache(maxsize=64)
def _reference_histogram(data: bytes) -> np.ndarray:
    """A reference's histogram, kept: one subject's references serve every seed and prompt."""
    hist = _histograms([_reference_pixels(data)])[0]
    hist.flags.writeable = False
    return hist


def _reference_pixels(data: bytes) -> np.ndarray:
    """An upright RGB reference image, shrunk like the samples."""
    try:
        with Image.open(io.BytesIO(data), formats=["PNG", "JPEG", "WEBP"]) as im:
            im.draft("RGB", (2 * SAMPLE_SIDE, 2 * SAMPLE_SIDE))  # a JPEG decodes at 1/2…1/8 size
            picture = ImageOps.exif_transpose(im).convert("RGB")
    except OSError as exc:
        raise ValueError(f"reference image unreadable: {exc}") from None
    picture.thumbnail((SAMPLE_SIDE, SAMPLE_SIDE))
    return np.asarray(picture)


def _histograms(frames: Sequence[np.ndarray]) -> np.ndarray:
    """One row per frame: the shares of 27 colour classes (each channel below / near / above
    its mean), summing to 1. Frames of one shape (a clip's samples) are done in one go.

    Each channel is standardised over the image first, so a tint, an exposure or a white-balance
    change (a per-channel ``a * x + b``) does not matter. Pixels are shared between neighbouring
    classes in proportion to where they sit (soft binning, full weight at ``COLOUR_SPREAD``
    std): a flat region near a class boundary must not flip wholesale between two renders.
    """
    if len({frame.shape for frame in frames}) > 1:
        return np.concatenate([_histograms([frame]) for frame in frames])
    # every other pixel (plenty for 27 classes), channel-major: frame, channel, pixel
    pixels = np.stack([frame[::2, ::2].reshape(-1, 3) for frame in frames]).astype(np.float32)
    pixels = np.ascontiguousarray(pixels.transpose(0, 2, 1))
    spread = (pixels.std(axis=2, keepdims=True) + 1e-6) * COLOUR_SPREAD
    z = np.clip((pixels - pixels.mean(axis=2, keepdims=True)) / spread, -1.0, 1.0)
    weights = np.stack(
        [np.maximum(-z, 0.0), 1.0 - np.abs(z), np.maximum(z, 0.0)], axis=2
    )  # frame, channel, class, pixel
    red_green = (weights[:, 0, :, None, :] * weights[:, 1, None, :, :]).reshape(len(frames), 9, -1)
    joint = (red_green @ weights[:, 2].transpose(0, 2, 1)).reshape(len(frames), 27)  # (red * 3 + green) * 3 + blue
    return joint / joint.sum(axis=1, keepdims=True)


# --- gates --------------------------------------------------------------------------------


def problems(figures: VideoQuality, thresholds: Thresholds | None = None) -> list[str]:
    """Why one clip fails the per-clip gates (frozen, blank, unrelated to its references); [] if none."""
    limits = thresholds or Thresholds()
    found = []
    if figures.still_share >= limits.frozen_share:
        found.append(f"frozen: {figures.still_share:.0%} of sampled frames unchanged (limit {limits.frozen_share:.0%})")
    if figures.blank_share >= limits.blank_share:
        found.append(
            f"blank: {figures.blank_share:.0%} of sampled frames black or one colour (limit {limits.blank_share:.0%})"
        )
    similarity = figures.reference_similarity
    if similarity is not None and similarity < limits.min_reference_similarity:
        found.append(
            f"unlike its references: similarity {similarity:.2f} (at least {limits.min_reference_similarity:.2f})"
        )
    return found


def quality_flags(figures: Mapping[str, Any], thresholds: Thresholds | None = None) -> list[str]:
    """Short names of the per-clip gates a clip fails ("frozen", "blank", "unlike references"),
    from stored figures (a lineage row or ``VideoQuality.to_dict()``); [] when unmeasured."""
    limits = thresholds or Thresholds()
    flags = []
    if _number(figures.get("still_share")) is not None and figures["still_share"] >= limits.frozen_share:
        flags.append("frozen")
    if _number(figures.get("blank_share")) is not None and figures["blank_share"] >= limits.blank_share:
        flags.append("blank")
    similarity = _number(figures.get("reference_similarity"))
    if similarity is not None and similarity < limits.min_reference_similarity:
        flags.append("unlike references")
    return flags


def _number(value: Any) -> float | None:
    """A stored figure as a float; None when absent or NaN (rows from before quality existed)."""
    if value is None or isinstance(value, bool):
        return None
    number = float(value)
    return None if math.isnan(number) else number


def near_duplicates(
    hashes: dict[str, Sequence[str]], thresholds: Thresholds | None = None
) -> list[tuple[str, str, float]]:
    """Pairs of clips (by key) closer than ``duplicate_bits``: e.g. one request's seeds.

    Compares every pair, so call it per group (one prompt and its references), not per dataset.
    """
    limits = thresholds or Thresholds()
    keys = sorted(hashes)
    arrays = {key: _hash_array(hashes[key]) for key in keys}  # parsed once, not once per pair
    pairs = []
    for i, a in enumerate(keys):
        for b in keys[i + 1 :]:
            distance = _bit_distance(arrays[a], arrays[b])
            if distance < limits.duplicate_bits:
                pairs.append((a, b, distance))
    return pairs


def amplitude_problem(motion: dict[str, Sequence[float]], thresholds: Thresholds | None = None) -> str | None:
    """Why clips asked for ``large`` movement do not move clearly more than ``small`` ones, or None.

    ``motion`` maps a movement_amplitude to the motion figures of its clips (same prompts and
    references on both sides); None too when either side has no clips.
    """
    limits = thresholds or Thresholds()
    if not motion.get("small") or not motion.get("large"):
        return None
    small, large = float(np.mean(motion["small"])), float(np.mean(motion["large"]))
    if large >= limits.amplitude_ratio * small:
        return None
    return (
        f"movement_amplitude ignored: large clips move {large:.4f}, small {small:.4f} "
        f"(large must be at least {limits.amplitude_ratio}× small)"
    )


# --- cost ---------------------------------------------------------------------------------


def cost_ratio(path: str | Path, references: Sequence[bytes] = (), repeats: int = 3) -> dict[str, float]:
    """CPU time of the quality figures over that of the verification decode, for one video.

    ``standalone``: :func:`measure_video` (its own decode) / ``video.probe_video``.
    ``on_probe_frames``: the CPU spent in :meth:`FrameSampler.offer` and :func:`measure` when
    the frames come from a decode that runs anyway (the verification decode) / ``probe_video``.
    Best of ``repeats`` each, in ``time.process_time`` (all threads of this process).
    """
    from .mp4 import probe_video

    def best(run) -> float:
        times = []
        for _ in range(repeats):
            start = time.process_time()
            run()
            times.append(time.process_time() - start)
        return min(times)

    def riding() -> float:
        sampler, spent = FrameSampler(), 0.0
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.codec_context.thread_count = 1  # no decoder thread runs while we measure
            for frame in container.decode(stream):
                start = time.process_time()
                sampler.offer(frame)
                spent += time.process_time() - start
        start = time.process_time()
        measure(sampler, references)
        return spent + time.process_time() - start

    probe = best(lambda: probe_video(path))
    return {
        "probe_cpu_s": round(probe, 4),
        "standalone": round(best(lambda: measure_video(path, references)) / probe, 3),
        "on_probe_frames": round(min(riding() for _ in range(repeats)) / probe, 3),
    }
