"""Request identity: the request id is the Dagster partition key and the ledger's primary key,
so the same inputs must give the same id, any change a new one, and ids stay UI-safe."""

from __future__ import annotations

import re

import pandas as pd
import pytest

from vidu_pipeline import generation_requests

OPTIONS = {"aspect_ratio": "16:9", "movement_amplitude": "auto", "bgm": False, "duration": 5, "resolution": "1080p"}
IMAGES = ("a" * 64, "b" * 64)
KEY_RE = re.compile(r"^[a-z0-9_-]+$")


def rid(**changes) -> str:
    args = {"subject_id": "Cat", "prompt": "a cat walks", "seed": 1, "options": OPTIONS, "image_sha256s": IMAGES}
    return generation_requests.request_id(**{**args, **changes})


def test_the_same_inputs_give_the_same_id():
    assert rid() == rid()
    # Option order is not identity.
    assert rid(options=dict(reversed(list(OPTIONS.items())))) == rid()


@pytest.mark.parametrize(
    "change",
    [
        {"subject_id": "Dog"},
        {"prompt": "a cat walks."},
        {"seed": 2},
        {"options": {**OPTIONS, "aspect_ratio": "9:16"}},
        {"options": {**OPTIONS, "movement_amplitude": "large"}},
        {"options": {**OPTIONS, "bgm": True}},
        {"image_sha256s": tuple(reversed(IMAGES))},  # the order of the references is sent
        {"image_sha256s": IMAGES[:1]},
    ],
)
def test_any_change_that_shapes_the_video_gives_a_new_id(change):
    assert rid(**change) != rid()


@pytest.mark.parametrize(
    "subject", ["Cat", "Ünïcødé subject", "../../etc/passwd", "a b\tc\n", "", "🐈" * 50, "UPPER_lower-1"]
)
def test_ids_use_only_partition_safe_characters(subject):
    key = rid(subject_id=subject)
    assert KEY_RE.match(key), key
    assert len(key) <= 64


def test_expand_is_subjects_times_prompts_times_seeds_in_catalog_order_and_drops_exact_duplicates():
    prompts = pd.DataFrame(
        [
            {"subject_id": "cat", "prompt": "p1", **OPTIONS},
            {"subject_id": "cat", "prompt": "p1", **OPTIONS},  # exact duplicate row: one request
            {"subject_id": "dog", "prompt": "p2", **OPTIONS},
            {"subject_id": "ghost", "prompt": "p3", **OPTIONS},  # no accepted image: no request
        ]
    )
    images = pd.DataFrame(
        [
            {"subject_id": "cat", "sent_sha256": "1" * 64, "original_sha256": "2" * 64, "mime_subtype": "png"},
            {"subject_id": "dog", "sent_sha256": "3" * 64, "original_sha256": "4" * 64, "mime_subtype": "jpeg"},
        ]
    )
    specs = generation_requests.expand(prompts, images, [7, 8])
    assert [(s.subject_id, s.seed) for s in specs] == [("cat", 7), ("cat", 8), ("dog", 7), ("dog", 8)]
    assert len({s.request_id for s in specs}) == 4
    again = generation_requests.expand(prompts, images, [7, 8])
    assert [s.request_id for s in again] == [s.request_id for s in specs]
    spec = specs[0]
    assert generation_requests.RequestSpec.from_json(spec.to_json()) == spec
    assert spec.image_sha256s == ("1" * 64,)


def test_plan_digest_changes_exactly_when_what_a_plan_records_changes():
    """The CLI skips the plan run when the digest equals the last plan's: it must change with
    any request or any refused input, and only then."""
    prompts = pd.DataFrame([{"subject_id": "cat", "prompt": "p1", **OPTIONS}])
    images = pd.DataFrame(
        [{"subject_id": "cat", "sent_sha256": "1" * 64, "original_sha256": "2" * 64, "mime_subtype": "png"}]
    )
    none_refused = pd.DataFrame({"path": [], "reason": []})
    one_refused = pd.DataFrame({"path": ["cat/b.png"], "reason": ["too small"]})
    digest = generation_requests.plan_digest
    base = digest(generation_requests.expand(prompts, images, [7]), none_refused)
    assert digest(generation_requests.expand(prompts, images, [7]), none_refused) == base
    assert digest(generation_requests.expand(prompts, images, [8]), none_refused) != base
    assert digest(generation_requests.expand(prompts, images, [7]), one_refused) != base
    assert digest([], none_refused) != base
