"""``generate --regenerate-failed-quality``: which clips get a new seed, and that each is paid
for once — the rules alone, then end to end through the CLI against a simulator that renders
frozen clips."""

from __future__ import annotations

import dataclasses
import re

import pandas as pd
import pytest

from drills.run_drill import make_catalog, run_generate
from vidu_pipeline import quality
from vidu_pipeline.generation_requests import RequestSpec, request_id
from vidu_pipeline.regeneration import failing_clips, replacement_spec, replacements
from vidu_pipeline.testing import SimulatorProcess

OPTIONS = {"aspect_ratio": "16:9", "movement_amplitude": "auto", "bgm": False, "duration": 5, "resolution": "1080p"}
GOOD = {"still_share": 0.0, "blank_share": 0.0, "reference_similarity": 0.9}


def spec(seed: int, subject: str = "cat") -> RequestSpec:
    images = ("1" * 64,)
    rid = request_id(subject, "a cat", seed, OPTIONS, images)
    return RequestSpec(rid, subject, "a cat", seed, dict(OPTIONS), images, ("2" * 64,), ("png",))


def clip(s: RequestSpec, phash: list[str], **figures) -> dict:
    return {"request_id": s.request_id, "subject_id": s.subject_id, "prompt": s.prompt, **OPTIONS,
            "seed_requested": s.seed, "phash": phash, **GOOD, **figures}  # fmt: skip


def test_a_replacement_is_the_same_request_under_a_new_seed_and_the_same_on_every_run():
    original = spec(1)
    first, again, second = replacement_spec(original, 1), replacement_spec(original, 1), replacement_spec(original, 2)
    assert first == again
    assert first.seed not in (original.seed, second.seed) and first.request_id != second.request_id
    assert dataclasses.replace(first, request_id=original.request_id, seed=original.seed) == original
    assert first.request_id == request_id("cat", "a cat", first.seed, OPTIONS, original.image_sha256s)
    assert re.fullmatch(r"[a-z0-9_-]+", first.request_id)
    assert 0 <= first.seed <= 2**31 - 1


def test_failing_clips_names_each_gate_and_only_the_later_seed_of_a_duplicate_pair():
    a, b, c, d = spec(1), spec(2), spec(3), spec(4)
    same = ["ffff0000ffff0000"] * 3
    table = pd.DataFrame(
        [
            clip(a, same),
            clip(b, same),  # the same clip as seed 1
            clip(c, ["0123456789abcdef"] * 3, still_share=1.0),
            clip(d, ["fedcba9876543210"] * 3, reference_similarity=0.01),
        ]
    )
    failing = failing_clips(table, quality.Thresholds())
    assert failing == {
        b.request_id: [f"near-duplicate of {a.request_id}"],
        c.request_id: ["frozen"],
        d.request_id: ["unlike references"],
    }


def test_replacements_walk_the_rounds_and_never_plan_one_twice():
    original, good = spec(1), spec(2)
    r1, r2 = replacement_spec(original, 1), replacement_spec(original, 2)
    failing = {original.request_id: ["frozen"]}

    # Nothing planned yet: round 1 is due; a passing clip gets nothing.
    (due,) = replacements([original, good], failing, [], rounds=2)
    assert (due.original, due.reasons, due.spec, due.round) == (original.request_id, ("frozen",), r1, 1)
    # Round 1 planned and not failing (running, or good): nothing more to pay for.
    assert replacements([original], failing, [r1.request_id], rounds=2) == []
    # Round 1 failed too: round 2 is due, with round 1's reasons.
    failing[r1.request_id] = ["blank"]
    (due,) = replacements([original], failing, [r1.request_id], rounds=2)
    assert (due.spec, due.round, due.reasons) == (r2, 2, ("blank",))
    # Every round paid for and failed: nothing more, whatever happens.
    failing[r2.request_id] = ["frozen"]
    assert replacements([original], failing, [r1.request_id, r2.request_id], rounds=2) == []
    assert replacements([original], failing, [r1.request_id], rounds=1) == []
    with pytest.raises(ValueError, match="rounds must be"):
        replacements([original], failing, [], rounds=0)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_generate_regenerates_each_failing_clip_once_under_a_new_seed(tmp_path):
    """Two frozen clips → a dry run prices two replacements and pays nothing → a run pays for
    exactly two new tasks → the next run pays for none (the replacements are good)."""
    catalog, data = tmp_path / "catalog", tmp_path / "data"
    make_catalog(catalog, subjects=1, prompts=1, seeds=2, rng_seed=4)
    with SimulatorProcess(tmp_path / "sim", latency=0.3, faults={"--defect-frozen": 1.0}) as sim:
        env = sim.env(tmp_path / "dagster_home")

        def generate(*extra: str):
            result = run_generate(catalog, data, env, "--no-contact-sheet", *extra, timeout=240)
            assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
            return result, sim.stats()["submits"]["accepted"]

        _, paid = generate()
        assert paid == 2

        dry, paid = generate("--regenerate-failed-quality", "--dry-run", "--price-per-task", "0.5")
        assert paid == 2
        assert "quality: 2 failing clip(s) would be regenerated under a new seed (cost 1.00)" in dry.stdout

        sim.set_faults(defect_frozen=0.0)
        run, paid = generate("--regenerate-failed-quality")
        assert paid == 4
        regenerated = re.findall(r"regenerating (\S+) \(([^)]*)\) as (\S+)", run.stderr)
        assert len(regenerated) == 2 and all("frozen" in why for _, why, _ in regenerated)
        assert "succeeded: 4" in run.stdout

        again, paid = generate("--regenerate-failed-quality")
        assert paid == 4
        assert "quality: 0 failing clip(s) regenerated now, 2 earlier replacement(s)" in again.stderr
