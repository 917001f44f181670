"""Each quality gate proven end to end: a render defect injected through the simulator's fault
flags into chosen requests, the sweep run through Dagster (`materialize` + the task sensor),
and the export's check fails listing exactly the clips that carry the defect."""

import pytest
from dagster import instance_for_test
from dataset_harness import faults_hitting, gates, make_catalog, sweep

from vidu_pipeline import catalog as catalog_mod

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


@pytest.fixture
def instance(monkeypatch):
    monkeypatch.setenv("VIDU_SIMULATOR_RENDER_SCALE", "0.1")
    with instance_for_test() as inst:
        yield inst


def one_request(hit, specs) -> bool:
    return len(hit) == 1


def one_subject_pair(hit, specs) -> bool:
    """Exactly one subject's small and large clip (same seed): the amplitude defect hits both."""
    return len(hit) == 2 and len({specs[r].subject_id for r in hit}) == 1


def one_request_all_seeds(hit, specs) -> bool:
    """Exactly one request's clips under both seeds."""
    return len(hit) == 2 and len({(specs[r].subject_id, specs[r].options["movement_amplitude"]) for r in hit}) == 1


@pytest.mark.parametrize(
    ("defect", "gate"),
    [("frozen", "no_frozen_clips"), ("black", "no_blank_clips"), ("unrelated", "clips_like_references")],
)
def test_per_clip_gate_lists_exactly_the_defective_clip(tmp_path, instance, defect, gate):
    catalog = make_catalog(tmp_path, seeds=(1,))
    pipeline, result, hit = sweep(
        tmp_path, instance, catalog=catalog, choose=lambda p: faults_hitting(p, defect, one_request)
    )
    found = gates(result)
    assert not found[gate].passed
    assert found[gate].failing == sorted(hit)
    (rid,) = hit
    assert rid in found[gate].metadata["failing"]  # the table of figures names the clip
    # A black or frozen clip may fail other gates too (it has no motion), but never names another clip.
    assert all(g.failing in ([], [rid]) for name, g in found.items() if name != "motion_follows_amplitude")


def test_amplitude_gate_lists_the_subject_whose_motion_ignores_amplitude(tmp_path, instance):
    catalog = make_catalog(tmp_path, seeds=(1,))
    pipeline, result, hit = sweep(
        tmp_path, instance, catalog=catalog, choose=lambda p: faults_hitting(p, "ignore_amplitude", one_subject_pair)
    )
    found = gates(result)
    gate = found["motion_follows_amplitude"]
    assert not gate.passed and gate.failing == sorted(hit)
    subject = next(iter(hit)).split("-s")[0]
    assert gate.metadata["notes"].startswith(f"- {subject}: movement_amplitude ignored")
    assert all(found[name].passed for name in ("no_frozen_clips", "no_blank_clips", "clips_like_references"))


def test_duplicate_gate_lists_the_seeds_that_gave_the_same_clip(tmp_path, instance):
    pipeline, result, hit = sweep(
        tmp_path, instance, choose=lambda p: faults_hitting(p, "same_clip_for_seeds", one_request_all_seeds)
    )
    found = gates(result)
    gate = found["seeds_not_near_duplicates"]
    assert not gate.passed and gate.failing == sorted(hit)
    assert "0.0 bits apart" in gate.metadata["notes"]
    assert all(found[name].passed for name in ("no_frozen_clips", "no_blank_clips", "motion_follows_amplitude"))


def test_sweep_yaml_quality_section_sets_the_thresholds(tmp_path):
    catalog = make_catalog(tmp_path, quality="quality:\n  min_reference_similarity: 0.97\n  duplicate_bits: 3\n")
    limits = catalog_mod.load_catalog(catalog).sweep.quality
    assert (limits.min_reference_similarity, limits.duplicate_bits, limits.frozen_share) == (0.97, 3.0, 0.9)


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ("quality:\n  frozen: 0.5\n", "quality.frozen is not a threshold"),
        ("quality:\n  blank_share: high\n", "quality.blank_share must be a non-negative number"),
        ("quality: 3\n", "quality must be a mapping"),
    ],
)
def test_bad_quality_section_is_a_clear_error(tmp_path, section, message):
    catalog = make_catalog(tmp_path, quality=section)
    with pytest.raises(catalog_mod.CatalogError, match=message):
        catalog_mod.load_catalog(catalog)
