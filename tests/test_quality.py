"""Quality figures on clips rendered by the simulator's renderer, good and with each defect.

Each defect is a valid MP4 of the right size, duration and audio (checked here with the
verification probe), so only the quality figures can tell it from a good clip.
"""

from __future__ import annotations

import io
import json

import av
import numpy as np
import pyarrow as pa
import pytest
from PIL import Image, ImageDraw
from support import image_bytes

from vidu_pipeline import quality
from vidu_pipeline.mp4 import check_against_request, probe_video
from vidu_pipeline.simulator.render import DEFECTS, RenderSpec, render_video

SCALE = 0.1  # 192×108 for 16:9: fast renders, same pipeline as 1080p
PROMPT = "a red kite over green hills"
SEEDS = (1, 2, 3)


def scene(sky, ground, thing, size=(320, 240), fmt="PNG") -> bytes:
    """A small landscape: sky, a hill line, a sun-like disc and a few strokes."""
    w, h = size
    im = Image.new("RGB", size, sky)
    draw = ImageDraw.Draw(im)
    draw.polygon([(0, h * 0.6), (w * 0.3, h * 0.45), (w * 0.7, h * 0.65), (w, h * 0.5), (w, h), (0, h)], fill=ground)
    draw.ellipse((w * 0.55, h * 0.15, w * 0.7, h * 0.3), fill=thing)
    for x in range(0, w, 24):
        draw.line((x, h * 0.7, x + 12, h), fill=thing, width=3)
    buf = io.BytesIO()
    im.save(buf, fmt)
    return buf.getvalue()


REFS = (
    scene((120, 170, 230), (40, 140, 60), (220, 40, 30)),
    scene((250, 200, 120), (120, 80, 40), (30, 30, 160), size=(240, 320), fmt="JPEG"),
)
OTHER_REFS = (image_bytes(320, 240), image_bytes(200, 300, "JPEG", (30, 90, 200)))


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """Render (once per module) the clip of a spec given as keyword overrides; returns its path."""
    folder = tmp_path_factory.mktemp("quality-clips")
    made = {}

    def make(**overrides):
        key = tuple(sorted(overrides.items()))
        if key not in made:
            spec = RenderSpec(**{"images": REFS, "prompt": PROMPT, "seed": 1, "render_scale": SCALE, **overrides})
            made[key] = folder / f"clip-{len(made)}.mp4"
            render_video(spec, made[key])
        return made[key]

    return make


def figures(path, references=REFS) -> quality.VideoQuality:
    return quality.measure_video(path, references)


# --- the renderer's defects ---------------------------------------------------------------


@pytest.mark.parametrize("defect", list(DEFECTS))
def test_each_defect_is_a_valid_clip_of_the_requested_shape(clip, defect):
    path = clip(defect=defect, bgm=True, aspect_ratio="9:16")
    assert check_against_request(probe_video(path), aspect_ratio="9:16", bgm=True, render_scale=SCALE) == []


def test_an_unknown_defect_is_refused_by_name():
    with pytest.raises(ValueError, match=r"RenderSpec\.defect: 'blurry' is not one of frozen, black"):
        RenderSpec(images=REFS, prompt=PROMPT, seed=1, defect="blurry")


def test_no_defect_renders_the_same_bytes_as_before_the_option(clip):
    """defect=None must be the faithful render (the simulator's determinism tests rely on it)."""
    assert clip().read_bytes() == clip(defect=None).read_bytes()
    assert clip().read_bytes() != clip(defect="same_clip_for_seeds").read_bytes()


# --- per-clip figures ---------------------------------------------------------------------


def test_a_frozen_clip_is_frozen_and_a_good_one_is_not(clip):
    good, frozen = figures(clip()), figures(clip(defect="frozen"))
    assert not good.frozen and good.still_share < 0.1 and good.motion > 0.005
    assert frozen.frozen and frozen.still_share == 1.0 and frozen.motion < 0.001
    assert quality.problems(good) == []
    assert quality.problems(frozen) == ["frozen: 100% of sampled frames unchanged (limit 90%)"]


def test_black_frames_are_counted_as_blank(clip):
    good, black = figures(clip()), figures(clip(defect="black"))
    assert good.blank_share == 0.0 and not good.blank
    assert black.blank_share == 1.0 and black.blank
    assert any(p.startswith("blank: 100% of sampled frames") for p in quality.problems(black))


def test_motion_follows_the_amplitude_and_a_misread_amplitude_is_caught(clip):
    def motion(amplitude, seed, defect=None):
        return figures(clip(movement_amplitude=amplitude, seed=seed, defect=defect)).motion

    good = {a: [motion(a, s) for s in SEEDS] for a in ("small", "large")}
    misread = {a: [motion(a, s, "ignore_amplitude") for s in SEEDS] for a in ("small", "large")}
    assert all(s < lg for s, lg in zip(good["small"], good["large"], strict=True))
    assert all(s > lg for s, lg in zip(misread["small"], misread["large"], strict=True))
    assert quality.amplitude_problem(good) is None
    assert quality.amplitude_problem(misread).startswith("movement_amplitude ignored: large clips move")


def test_seeds_give_distant_clips_unless_the_seed_is_ignored(clip):
    hashes = {s: figures(clip(seed=s)).phash for s in SEEDS}
    same = {s: figures(clip(seed=s, defect="same_clip_for_seeds")).phash for s in SEEDS}
    assert min(quality.clip_distance(hashes[1], hashes[s]) for s in SEEDS[1:]) > 15
    assert max(quality.clip_distance(same[1], same[s]) for s in SEEDS[1:]) < 1
    assert quality.near_duplicates(hashes) == []
    assert {(a, b) for a, b, _ in quality.near_duplicates(same)} == {(1, 2), (1, 3), (2, 3)}


def test_a_clip_is_closer_to_its_references_than_an_unrelated_clip(clip):
    own = [figures(clip(seed=s)).reference_similarity for s in SEEDS]
    made_up = [figures(clip(seed=s, defect="unrelated")).reference_similarity for s in SEEDS]
    from_other_refs = [figures(clip(seed=s, images=OTHER_REFS)).reference_similarity for s in SEEDS]
    assert min(own) > max(made_up + from_other_refs) + 0.3, (own, made_up, from_other_refs)
    assert min(own) >= quality.Thresholds().min_reference_similarity
    assert all(0.0 <= s <= 1.0 for s in own + made_up + from_other_refs)
    unrelated = figures(clip(defect="unrelated"))
    assert any(p.startswith("unlike its references: similarity") for p in quality.problems(unrelated))
    # The clip made from OTHER_REFS does match those.
    assert figures(clip(seed=1, images=OTHER_REFS), OTHER_REFS).reference_similarity > 0.6


# --- how the figures are made -------------------------------------------------------------


@pytest.mark.parametrize(("aspect_ratio", "scale", "size"), [("16:9", 0.1, (128, 72)), ("9:16", 0.2, (72, 128))])
def test_figures_come_from_few_small_samples(clip, aspect_ratio, scale, size):
    q = figures(clip(aspect_ratio=aspect_ratio, render_scale=scale))
    assert q.decoded_frames == 120  # 5 s at 24 fps
    assert q.sampled_frames == 40  # 5 s at SAMPLE_FPS = 8
    assert (q.sample_width, q.sample_height) == size
    assert len(q.phash) == 40 and all(len(h) == 16 for h in q.phash)


def test_figures_are_deterministic_and_plain_data(clip):
    first, second = figures(clip()), figures(clip())
    assert first == second
    row = first.to_dict()
    assert json.loads(json.dumps(row)) == row
    assert pa.Table.from_pylist([row, figures(clip(), ()).to_dict()]).num_rows == 2


def test_frames_of_a_verification_style_decode_give_the_same_figures(clip):
    """Riding on a decode that also demuxes audio (as video.probe_video does) changes nothing."""
    path = clip(bgm=True)
    sampler = quality.FrameSampler()
    with av.open(str(path)) as container:
        video, audio = container.streams.video[0], container.streams.audio[0]
        for packet in container.demux(video, audio):
            for frame in packet.decode():
                if packet.stream is video:
                    sampler.offer(frame)
    assert quality.measure(sampler, REFS) == figures(path)


def test_thresholds_change_the_verdicts(clip):
    good = figures(clip())
    strict = quality.Thresholds(frozen_share=0.0, blank_share=0.0, min_reference_similarity=1.0)
    assert len(quality.problems(good, strict)) == 3
    assert quality.measure_video(clip(), REFS, strict).frozen


def test_a_colour_cast_or_exposure_change_keeps_a_picture_similar():
    """Generators grade colours (the simulator tints every clip): that is not a different picture."""
    picture = quality._reference_pixels(REFS[0]).astype(float)
    for gain, offset in [(1.0, 0.0), (0.86, 30.0), (1.0, 3.0), (0.7, 60.0), (1.1, -12.0)]:
        cast = [np.clip(picture * gain + offset, 0, 255).astype(np.uint8)]
        assert quality.reference_similarity(cast, REFS[:1]) > 0.9, (gain, offset)
    assert quality.reference_similarity([quality._reference_pixels(OTHER_REFS[0])], REFS[:1]) < 0.5


def test_one_picture_at_two_render_scales_scores_alike(clip):
    """Small changes in a frame (here: thin strokes blurred by a smaller render) must not flip a
    large flat region from one colour class to another and halve the similarity."""
    small, larger = (figures(clip(defect="frozen", render_scale=s)).reference_similarity for s in (0.3, 0.5))
    assert abs(small - larger) < 0.1, (small, larger)


# --- small parts --------------------------------------------------------------------------


def test_clip_distance_pairs_samples_by_position():
    a = ["0" * 16, "f" * 16]
    assert quality.clip_distance(a, a) == 0
    assert quality.clip_distance(a, ["0" * 16] * 4) == 32  # halves compared: 0 + 0 + 64 + 64 bits
    with pytest.raises(ValueError, match="non-empty"):
        quality.clip_distance(a, [])


def test_an_unreadable_reference_is_a_clear_error(clip):
    with pytest.raises(ValueError, match="reference image unreadable"):
        quality.measure_video(clip(), [b"GIF89a not a picture"])


def test_a_file_without_video_is_refused(tmp_path):
    path = tmp_path / "silence.m4a"
    with av.open(str(path), "w", format="mp4") as out:
        out.add_stream("aac", rate=48000)
    with pytest.raises((ValueError, av.FFmpegError)):
        quality.measure_video(path)


def test_cost_ratio_reports_both_ways_of_measuring(clip):
    ratio = quality.cost_ratio(clip(), REFS, repeats=1)
    assert set(ratio) == {"probe_cpu_s", "standalone", "on_probe_frames"}
    assert all(value > 0 for value in ratio.values())


def test_a_references_histogram_is_made_once_for_all_its_clips(clip, monkeypatch):
    """One subject's references serve every prompt and seed: decoding them again for each clip
    cost more than the clip's own figures. Frames of mixed sizes still get one row each."""
    decoded = []
    real = quality._reference_pixels
    monkeypatch.setattr(quality, "_reference_pixels", lambda data: decoded.append(data) or real(data))
    quality._reference_histogram.cache_clear()
    refs = [scene((200, 40, 40), (40, 200, 40), (250, 250, 250)), scene((30, 30, 200), (200, 200, 0), (0, 0, 0))]
    sampler = quality.FrameSampler()
    with av.open(str(clip())) as container:
        for frame in container.decode(container.streams.video[0]):
            sampler.offer(frame)
    first = quality.measure(sampler, refs)
    assert [quality.measure(sampler, refs) for _ in range(3)] == [first] * 3
    assert decoded == refs
    mixed = [sampler.samples[0], sampler.samples[1][:40, :50]]
    assert quality._histograms(mixed).shape == (2, 27)
    assert np.allclose(quality._histograms(mixed).sum(axis=1), 1.0)
