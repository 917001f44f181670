"""The catalog stage end to end: a corpus of bad rows, images and sweep files beside good ones."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image, ImageOps
from test_images import (
    OTHER_FORMATS,
    animated,
    bad_crc_png,
    bomb_png,
    encode,
    jpeg,
    photo,
    png,
)

from vidu_pipeline import catalog as cat
from vidu_pipeline import images as img

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "catalog"


def write_catalog(
    root: Path, images: list[tuple[str, str, str]], prompts: list[dict], sweep: str = "seeds: [1, 2]\n"
) -> None:
    root.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(images, columns=["subject_id", "image", "view"]).to_csv(root / "images.csv", index=False)
    pd.DataFrame(prompts).to_csv(root / "prompts.csv", index=False)
    (root / "sweep.yaml").write_text(sweep)


# --- the corpus ---------------------------------------------------------------------------------

# (subject, image cell, expected rule or None for accepted); files are made by `corpus` below.
IMAGE_ROWS = [
    ("mixed", "good.png", None),
    ("mixed", "good-really-jpeg.png", None),  # the extension lies: accepted, noted
    ("mixed", "exactly-4-to-1.png", None),
    ("mixed", "palette.png", None),
    ("mixed", "animated.png", None),  # default mode: first frame, noted
    *[("mixed", f"bad/{name}.img", "format") for name in sorted(OTHER_FORMATS)],  # 10 formats
    ("mixed", "bad/empty.png", "empty_file"),
    ("mixed", "bad/truncated.png", "corrupt"),
    ("mixed", "bad/truncated.jpg", "corrupt"),
    ("mixed", "bad/bad-crc.png", "corrupt"),
    ("mixed", "bad/small.png", "min_size"),
    ("mixed", "bad/wide.png", "aspect_ratio"),
    ("mixed", "bad/tall.jpg", "aspect_ratio"),
    ("mixed", "bad/bomb.png", "decompression_bomb"),
    ("mixed", "bad/huge.png", "file_size"),
    ("mixed", "bad/does-not-exist.png", "missing_file"),
    ("mixed", "bad/a-directory.png", "unreadable"),
    ("mixed", "../outside.png", "path_escape"),
    ("mixed", "{outside}", "path_escape"),  # absolute path outside the folder
    ("mixed", "link-to-outside.png", "path_escape"),
    ("mixed", "ftp://example.com/x.png", "url_scheme"),
    ("mixed", "file:///etc/hostname", "url_scheme"),
    ("mixed", "{http}/ok.png", None),
    ("mixed", "{http}/missing.png", "url_fetch"),
    ("mixed", "{http}/huge", "file_size"),
    ("mixed", "{http}/endless", "file_size"),
    ("mixed", "{http}/text", "format"),
    ("mixed", "{http}/to-file", "url_scheme"),
    ("mixed", "good.png", "duplicate_row"),
    ("mixed", "copy-of-good.png", "duplicate_image"),
    ("mixed", "", "missing_value"),
    ("", "good.png", "missing_value"),
    ("allbad", "bad/small.png", "min_size"),
    ("allbad", "bad/bomb.png", "decompression_bomb"),
    *[("many", f"many/{i}.png", None) for i in range(9)],  # two of them: too_many_images
]

PROMPTS = [
    {"subject_id": "mixed", "prompt": "a good one", "aspect_ratio": "9:16", "bgm": "TRUE"},
    {"subject_id": "many", "prompt": "another good one", "duration": "5", "movement_amplitude": "Large"},
    {"subject_id": "nobody", "prompt": "unknown subject"},
    {"subject_id": "mixed", "prompt": "   "},
    {"subject_id": "mixed", "prompt": "x" * 1501},
    {"subject_id": "mixed", "prompt": "bad aspect", "aspect_ratio": "4:3"},
    {"subject_id": "mixed", "prompt": "bad movement", "movement_amplitude": "huge"},
    {"subject_id": "mixed", "prompt": "bad bgm", "bgm": "maybe"},
    {"subject_id": "mixed", "prompt": "bad duration", "duration": "10"},
    {"subject_id": "mixed", "prompt": "bad resolution", "resolution": "720p"},
    {"subject_id": "mixed", "prompt": "a good one", "aspect_ratio": "9:16", "bgm": "true"},
    {"subject_id": "allbad", "prompt": "its images are all bad"},
]
PROMPT_RULES = {
    3: "unknown_subject",
    4: "prompt_empty",
    5: "prompt_too_long",
    6: "bad_option",
    7: "bad_option",
    8: "bad_option",
    9: "bad_option",
    10: "bad_option",
    11: "duplicate_row",
    12: "no_valid_images",
}
PROMPT_FIELDS = {6: "aspect_ratio", 7: "movement_amplitude", 8: "bgm", 9: "duration", 10: "resolution"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, http_images):
    base = tmp_path_factory.mktemp("corpus")
    root = base / "catalog"
    files = {
        "good.png": png(seed=1),
        "copy-of-good.png": png(seed=1),
        "good-really-jpeg.png": jpeg(seed=2),
        "exactly-4-to-1.png": png(512, 128, seed=3),
        "palette.png": encode(photo(seed=4).convert("P")),
        "animated.png": animated("PNG"),
        "bad/empty.png": b"",
        "bad/truncated.png": png(seed=5)[:3000],
        "bad/truncated.jpg": jpeg(seed=5)[:1500],
        "bad/bad-crc.png": bad_crc_png(),
        "bad/small.png": png(100, 100),
        "bad/wide.png": png(600, 128),
        "bad/tall.jpg": jpeg(128, 600),
        "bad/bomb.png": bomb_png(),
        **{f"bad/{name}.img": make() for name, make in OTHER_FORMATS.items()},
        **{f"many/{i}.png": png(130, 130, seed=100 + i) for i in range(9)},
    }
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    with open(root / "bad/huge.png", "wb") as f:  # sparse: costs nothing, refused by its size
        f.write(b"\x89PNG\r\n\x1a\n")
        f.truncate(50_000_001)
    (root / "bad/a-directory.png").mkdir()
    (base / "outside.png").write_bytes(png(seed=9))
    os.symlink(base / "outside.png", root / "link-to-outside.png")
    rows = [(s, i.format(outside=base / "outside.png", http=http_images), "") for s, i, _ in IMAGE_ROWS]
    write_catalog(root, rows, PROMPTS, "seeds: [1, 2, 2]\n")
    loaded = cat.load_catalog(root)
    validated = cat.validate_images(loaded, img.ImageCache(base / "cache"))
    prompts, prompt_rejections = cat.valid_prompts(loaded, validated)
    return root, rows, loaded, validated, prompts, prompt_rejections


def all_rejections(corpus):
    _, _, loaded, validated, _, prompt_rejections = corpus
    return [*loaded.rejections, *validated.rejections, *prompt_rejections]


@pytest.mark.parametrize("index", [i for i, row in enumerate(IMAGE_ROWS) if row[2]])
def test_each_bad_image_row_is_rejected_with_its_rule(corpus, index):
    root, rows, *_ = corpus
    subject, cell, _ = rows[index]
    rule = IMAGE_ROWS[index][2]
    item = f"images.csv row {index + 1}: {cell}"
    found = [r for r in all_rejections(corpus) if r.item == item]
    assert [r.rule for r in found] == [rule], found
    assert found[0].kind == "image" and found[0].subject_id == (subject or None)
    assert found[0].detail.startswith(item + ": ")


@pytest.mark.parametrize("row,rule", sorted(PROMPT_RULES.items()))
def test_each_bad_prompt_row_is_rejected_with_its_rule(corpus, row, rule):
    found = [r for r in all_rejections(corpus) if r.item == f"prompts.csv row {row}"]
    assert [r.rule for r in found] == [rule], found
    assert found[0].kind == "prompt" and found[0].detail.startswith(f"prompts.csv row {row}: ")
    if row in PROMPT_FIELDS:
        assert f"{PROMPT_FIELDS[row]}: " in found[0].detail


def test_details_name_the_limits(corpus):
    details = {r.rule: r.detail for r in all_rejections(corpus)}
    everything = " ".join(r.detail for r in all_rejections(corpus))
    assert "at most 1500" in details["prompt_too_long"]
    assert "aspect_ratio: '4:3' is not one of 16:9, 9:16, 1:1" in everything
    assert "at least 128×128" in details["min_size"]
    assert "50,000,000" in details["file_size"]
    assert "outside the catalog folder" in details["path_escape"]
    assert "content is GIF" in everything


def test_valid_rows_beside_bad_ones_go_through(corpus):
    _, rows, _, validated, prompts, _ = corpus
    accepted = validated.accepted
    mixed = accepted[accepted.subject_id == "mixed"]
    assert sorted(mixed["row"]) == [i + 1 for i, (s, _, rule) in enumerate(IMAGE_ROWS) if s == "mixed" and rule is None]
    assert list(prompts["prompt"]) == ["a good one", "another good one"]
    first = prompts.iloc[0]
    assert (first.aspect_ratio, first.bgm, first.duration, first.movement_amplitude) == ("9:16", True, 5, "auto")
    assert prompts.iloc[1].movement_amplitude == "large"
    assert prompts["bgm"].dtype == bool and prompts["duration"].dtype.kind == "i"


def test_accepted_images_carry_hashes_and_notes_not_payloads(corpus):
    accepted = corpus[3].accepted
    assert list(accepted.columns) == list(cat.ACCEPTED_COLUMNS)
    notes = dict(zip(accepted["image"], accepted["notes"]))
    assert "extension says PNG but the content is JPEG" in notes["good-really-jpeg.png"]
    assert "palette" in notes["palette.png"] and "first frame" in notes["animated.png"]
    assert notes["good.png"] == ""
    assert accepted["sent_bytes"].max() < 1_000_000
    assert not any(isinstance(v, str) and v.startswith("data:") for v in accepted.to_numpy().ravel())


def test_more_than_seven_images_keeps_seven_by_view_then_hash(corpus):
    validated = corpus[3]
    many = validated.accepted[validated.accepted.subject_id == "many"]
    assert len(many) == 7
    dropped = [r for r in validated.rejections if r.rule == "too_many_images"]
    assert len(dropped) == 2 and all(r.subject_id == "many" for r in dropped)
    kept = sorted(many["original_sha256"])
    dropped_rows = {int(r.item.split()[2].rstrip(":")) for r in dropped}
    assert len(dropped_rows) == 2
    all_shas = sorted(img.hashlib.sha256(png(130, 130, seed=100 + i)).hexdigest() for i in range(9))
    assert kept == all_shas[:7]


def test_subject_without_valid_images_is_rejected_with_reasons(corpus):
    subject = [r for r in corpus[3].rejections if r.kind == "subject"]
    assert [(r.subject_id, r.rule) for r in subject] == [("allbad", "no_valid_images")]
    assert "min_size" in subject[0].detail and "decompression_bomb" in subject[0].detail


def test_duplicate_seeds_are_used_once(corpus):
    loaded = corpus[2]
    assert loaded.sweep.seeds == (1, 2)
    assert [r.rule for r in loaded.rejections if r.kind == "sweep"] == ["duplicate_seed"]


def test_rejections_frame(corpus):
    frame = cat.rejections_frame(all_rejections(corpus))
    assert list(frame.columns) == ["kind", "subject_id", "item", "rule", "detail"]
    assert len(frame) >= 30
    assert list(cat.rejections_frame([]).columns) == list(frame.columns)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_permission_denied_is_unreadable(tmp_path):
    root = tmp_path / "c"
    write_catalog(root, [("a", "locked.png", ""), ("a", "ok.png", "")], [{"subject_id": "a", "prompt": "p"}])
    (root / "locked.png").write_bytes(png())
    (root / "ok.png").write_bytes(png(seed=3))
    (root / "locked.png").chmod(0)
    validated = cat.validate_images(cat.load_catalog(root), img.ImageCache(tmp_path / "cache"))
    assert [r.rule for r in validated.rejections] == ["unreadable"] and len(validated.accepted) == 1


def test_outside_paths_allowed_when_asked(corpus):
    loaded = cat.load_catalog(corpus[0], allow_outside_paths=True)
    escaped = [r for r in loaded.rejections if r.rule == "path_escape"]
    assert escaped == []
    assert (loaded.images["image"] == "../outside.png").any()
    # the absolute path and the symlink name the same file: duplicates of the first row
    assert {r.item.split(":")[0] for r in loaded.rejections if r.rule == "duplicate_row"} >= {
        "images.csv row 28",
        "images.csv row 29",
    }


def test_unknown_columns_are_reported_and_ignored(tmp_path):
    write_catalog(tmp_path, [("a", "x.png", "")], [{"subject_id": "a", "prompt": "p", "aspect": "9:16"}])
    (tmp_path / "x.png").write_bytes(png())
    loaded = cat.load_catalog(tmp_path)
    assert [(r.kind, r.rule) for r in loaded.rejections] == [("catalog", "unknown_column")]
    assert "'aspect'" in loaded.rejections[0].detail and loaded.prompts.iloc[0].aspect_ratio == "16:9"


# --- whole-catalog errors -------------------------------------------------------------------------

GOOD_IMAGES = [("a", "x.png", "")]
GOOD_PROMPTS = [{"subject_id": "a", "prompt": "p"}]


@pytest.mark.parametrize(
    "sweep,words",
    [
        ("", "must be a mapping"),
        ("seeds: [1, 2\n", "not valid YAML"),
        ("seeds: []\n", "non-empty list"),
        ("seeds: [1, two]\n", "seeds[1] must be an integer, got 'two'"),
        ("seeds: [true]\n", "seeds[0] must be an integer, got True"),
        ("seeds: [1]\nseed_start: 1\nseed_count: 2\n", "not both"),
        ("seed_start: 1\n", "seed_count"),
        ("seed_start: 1\nseed_count: 0\n", "seed_count: 0 seeds, it must be between 1 and 10000"),
        # the seed policy (contract.SEED_MIN..SEED_MAX, MAX_SWEEP_SEEDS): issue 10, case 11
        (
            "seeds: [1, 2, 3, 9223372036854775808]\n",
            "sweep.yaml: seeds[3]: seed 9223372036854775808 is outside 0..2147483647",
        ),
        ("seeds: [2147483648]\n", "seeds[0]: seed 2147483648 is outside 0..2147483647"),
        ("seeds: [5, -1]\n", "seeds[1]: seed -1 is outside 0..2147483647"),
        ("seeds: [1.5]\n", "seeds[0] must be an integer, got 1.5"),
        ("seed_start: -3\nseed_count: 5\n", "seed_start: seed -3 is outside 0..2147483647"),
        (
            "seed_start: 2147483647\nseed_count: 2\n",
            "seed_start + seed_count - 1: seed 2147483648 is outside 0..2147483647",
        ),
        ("seed_start: 9223372036854775807\nseed_count: 1\n", "seed_start: seed 9223372036854775807 is outside"),
        ("seed_start: 1\nseed_count: 200000\n", "seed_count: 200000 seeds, it must be between 1 and 10000"),
        ("seeds: [%s]\n" % ", ".join(map(str, range(10_001))), "sweep.yaml: seeds: 10001 seeds, at most 10000"),
        ("seeds: [1]\nseed: 3\n", "unknown field(s) seed"),
        ("seeds: [1]\ndefaults:\n  aspect_ratio: '4:3'\n", "defaults.aspect_ratio"),
        ("seeds: [1]\ndefaults:\n  aspect: 9:16\n", "defaults.aspect is not an option"),
        ("seeds: [1]\ndefaults:\n  bgm: sometimes\n", "defaults.bgm"),
        ("seeds: [1]\ndefaults: [1]\n", "defaults must be a mapping"),
        ("seeds: [1]\nmax_images_per_subject: 9\n", "max_images_per_subject"),
    ],
)
def test_bad_sweep_files_are_catalog_errors(tmp_path, sweep, words):
    write_catalog(tmp_path, GOOD_IMAGES, GOOD_PROMPTS, sweep)
    with pytest.raises(cat.CatalogError) as err:
        cat.load_catalog(tmp_path)
    assert "sweep.yaml" in str(err.value) and words in str(err.value)


def test_sweep_range_and_unquoted_aspect_ratio(tmp_path):
    write_catalog(
        tmp_path,
        GOOD_IMAGES,
        GOOD_PROMPTS,
        "seed_start: 10\nseed_count: 3\ndefaults:\n  aspect_ratio: 9:16\n  bgm: yes\nmax_images_per_subject: 3\n",
    )
    sweep = cat.load_catalog(tmp_path).sweep
    assert sweep.seeds == (10, 11, 12) and sweep.max_images_per_subject == 3
    assert sweep.defaults == {
        "duration": 5,
        "aspect_ratio": "9:16",
        "resolution": "1080p",
        "movement_amplitude": "auto",
        "bgm": True,
    }


@pytest.mark.parametrize(
    "breakage,words",
    [
        (lambda r: shutil.rmtree(r), "catalog folder does not exist"),
        (lambda r: (r / "images.csv").unlink(), "neither images.csv nor images.parquet"),
        (lambda r: (r / "prompts.csv").unlink(), "neither prompts.csv nor prompts.parquet"),
        (lambda r: (r / "sweep.yaml").unlink(), "sweep.yaml: missing"),
        (lambda r: (r / "images.csv").write_text("subject_id,picture\na,x.png\n"), "required column(s) image"),
        (lambda r: (r / "prompts.csv").write_text(""), "prompts.csv: cannot be parsed"),
        (lambda r: (r / "images.parquet").write_bytes(b"PAR1 not really"), "both images.csv and images.parquet"),
    ],
)
def test_whole_catalog_problems_are_catalog_errors(tmp_path, breakage, words):
    root = tmp_path / "c"
    write_catalog(root, GOOD_IMAGES, GOOD_PROMPTS)
    breakage(root)
    with pytest.raises(cat.CatalogError, match=None) as err:
        cat.load_catalog(root)
    assert words in str(err.value)


def test_unparseable_parquet_is_a_catalog_error(tmp_path):
    write_catalog(tmp_path, GOOD_IMAGES, GOOD_PROMPTS)
    (tmp_path / "images.csv").unlink()
    (tmp_path / "images.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(cat.CatalogError, match="images.parquet: cannot be parsed"):
        cat.load_catalog(tmp_path)


# --- the sample catalog, parquet, and the cache ------------------------------------------------------


@pytest.fixture
def sample(tmp_path):
    root = tmp_path / "catalog"
    shutil.copytree(SAMPLE, root)
    return root


def test_sample_catalog_validates_without_rejections(sample, tmp_path):
    loaded = cat.load_catalog(sample)
    validated = cat.validate_images(loaded, img.ImageCache(tmp_path / "cache"))
    prompts, prompt_rejections = cat.valid_prompts(loaded, validated)
    assert loaded.rejections == validated.rejections == prompt_rejections == []
    assert len(validated.accepted) == 10 and set(validated.accepted["mime_subtype"]) == {"png", "jpeg"}
    assert validated.accepted.groupby("subject_id").size().between(2, 3).all()
    assert {"9:16", "1:1"} <= set(prompts["aspect_ratio"]) and prompts["bgm"].any()
    assert len(loaded.sweep.seeds) == 2


def test_sample_catalog_is_small():
    files = [p for p in SAMPLE.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 1_500_000
    assert all(p.stat().st_size <= 150_000 for p in files)
    licences = (SAMPLE / "LICENSES.md").read_text()
    assert all(str(p.relative_to(SAMPLE)) in licences for p in files if p.suffix in (".png", ".jpg"))


def test_parquet_catalog_reads_like_csv(sample):
    for stem in ("images", "prompts"):
        frame = pd.read_csv(sample / f"{stem}.csv", dtype=str, keep_default_na=False)
        if stem == "prompts":
            frame["bgm"] = frame["bgm"].map({"true": True, "false": False, "": None})
            frame["duration"] = pd.to_numeric(frame["duration"]).astype("Int64")
        frame.to_parquet(sample / f"{stem}.parquet")
        (sample / f"{stem}.csv").unlink()
    loaded = cat.load_catalog(sample)
    assert loaded.rejections == [] and len(loaded.images) == 10
    assert list(loaded.prompts["bgm"]) == [True, False, False, False, False]


def test_rerun_decodes_nothing_and_a_changed_file_is_revalidated(sample, tmp_path, monkeypatch):
    cache_dir = tmp_path / "cache"
    loaded = cat.load_catalog(sample)
    first = cat.validate_images(loaded, img.ImageCache(cache_dir))
    assert (first.cache_hits, first.cache_misses) == (0, 10)

    # Behaviour, not a stopwatch: count reads, validations and decodes on the re-run.
    calls = {"check": 0, "read": 0, "decode": 0}
    real_check, real_read, real_open = img.check_image_bytes, img.read_local, img._open

    def counting_check(*a, **kw):
        calls["check"] += 1
        return real_check(*a, **kw)

    def counting_read(*a, **kw):
        calls["read"] += 1
        return real_read(*a, **kw)

    def counting_open(*a, **kw):
        calls["decode"] += 1
        return real_open(*a, **kw)

    monkeypatch.setattr(img, "check_image_bytes", counting_check)
    monkeypatch.setattr(img, "read_local", counting_read)
    monkeypatch.setattr(img, "_open", counting_open)
    second = cat.validate_images(cat.load_catalog(sample), img.ImageCache(cache_dir))
    assert (second.cache_hits, second.cache_misses) == (10, 0)
    assert calls == {"check": 0, "read": 0, "decode": 0}  # not decoded, not even read
    pd.testing.assert_frame_equal(first.accepted, second.accepted)

    os.utime(sample / "images/cat/wide.jpg")  # touched, same content: re-hashed, not decoded
    third = cat.validate_images(cat.load_catalog(sample), img.ImageCache(cache_dir))
    assert (third.cache_hits, calls) == (10, {"check": 0, "read": 1, "decode": 0})

    changed = sample / "images/cat/face.png"
    ImageOps.flip(Image.open(changed)).save(changed)
    fourth = cat.validate_images(cat.load_catalog(sample), img.ImageCache(cache_dir))
    assert (fourth.cache_hits, fourth.cache_misses, calls["check"]) == (9, 1, 1)
    assert calls["decode"] >= 1  # the changed file, and only it, was decoded again
    before = first.accepted.set_index("image").loc["images/cat/face.png", "sent_sha256"]
    after = fourth.accepted.set_index("image").loc["images/cat/face.png", "sent_sha256"]
    assert before != after


def test_strict_mode_has_its_own_verdicts(tmp_path):
    root = tmp_path / "c"
    write_catalog(root, [("a", "anim.png", ""), ("a", "ok.png", "")], GOOD_PROMPTS)
    (root / "anim.png").write_bytes(animated("PNG"))
    (root / "ok.png").write_bytes(png())
    loaded = cat.load_catalog(root)
    cache = img.ImageCache(tmp_path / "cache")
    assert len(cat.validate_images(loaded, cache).accepted) == 2
    strict = cat.validate_images(loaded, cache, strict=True)
    assert [r.rule for r in strict.rejections] == ["animated"] and len(strict.accepted) == 1


def test_large_image_is_reencoded_through_the_catalog(tmp_path):
    from test_images import noisy_png

    root = tmp_path / "c"
    write_catalog(root, [("a", "noisy.png", "")], GOOD_PROMPTS)
    (root / "noisy.png").write_bytes(noisy_png())
    cache = img.ImageCache(tmp_path / "cache")
    accepted = cat.validate_images(cat.load_catalog(root), cache).accepted.iloc[0]
    assert accepted.original_sha256 != accepted.sent_sha256 and accepted.mime_subtype == "jpeg"
    payload = cache.get_bytes(accepted.sent_sha256)
    assert len(payload) == accepted.sent_bytes < 10_000_000 and min(accepted.width, accepted.height) >= 128
    assert cache.data_uri(accepted.sent_sha256).startswith("data:image/jpeg;base64,")
    strict = cat.validate_images(cat.load_catalog(root), cache, strict=True)
    assert [r.rule for r in strict.rejections] == ["payload_size", "no_valid_images"]


# --- issue 10, case 11: seeds, special files, hostile cells, formula injection --------------------


def test_seed_range_ends_are_accepted(tmp_path):
    write_catalog(tmp_path, GOOD_IMAGES, GOOD_PROMPTS, "seeds: [0, 2147483647]\n")
    assert cat.load_catalog(tmp_path).sweep.seeds == (0, 2147483647)
    write_catalog(tmp_path, GOOD_IMAGES, GOOD_PROMPTS, "seed_start: 2147473648\nseed_count: 10000\n")
    seeds = cat.load_catalog(tmp_path).sweep.seeds
    assert (len(seeds), seeds[0], seeds[-1]) == (10_000, 2_147_473_648, 2_147_483_647)


@pytest.mark.timeout(60)
def test_a_200000_seed_sweep_is_refused_at_once(tmp_path):
    # Before: no cap, and a quadratic duplicate check (`seeds.count` per seed) ran for hours.
    write_catalog(tmp_path, GOOD_IMAGES, GOOD_PROMPTS, "seeds: [%s]\n" % ", ".join(map(str, range(200_000))))
    size = (tmp_path / "sweep.yaml").stat().st_size
    with pytest.raises(cat.CatalogError) as err:
        cat.load_catalog(tmp_path)
    assert str(err.value) == f"sweep.yaml: {size:,} bytes, at most 1,000,000 (a sweep has at most 10000 seeds)"


@pytest.mark.timeout(60)
def test_many_duplicate_seeds_are_reported_once_each(tmp_path):
    seeds = [i // 2 for i in range(10_000)]  # 5,000 seeds, each listed twice
    write_catalog(tmp_path, GOOD_IMAGES, GOOD_PROMPTS, "seeds: %s\n" % seeds)
    loaded = cat.load_catalog(tmp_path)
    assert loaded.sweep.seeds == tuple(range(5_000))
    dups = [r for r in loaded.rejections if r.rule == "duplicate_seed"]
    assert len(dups) == 5_000 and dups[0].detail == "sweep.yaml: seed 0 is listed 2 times; used once"


@pytest.mark.timeout(60)
def test_a_fifo_named_png_is_rejected_and_the_run_goes_on(tmp_path):
    # Before: open() on the FIFO waited for a writer forever and the run hung.
    root = tmp_path / "c"
    write_catalog(
        root,
        [("a", "x.png", ""), ("a", "good.png", ""), ("b", "link.png", ""), ("b", "other.jpg", "")],
        [{"subject_id": "a", "prompt": "p"}, {"subject_id": "b", "prompt": "q"}],
    )
    os.mkfifo(root / "x.png")
    os.symlink("x.png", root / "link.png")
    (root / "good.png").write_bytes(png())
    (root / "other.jpg").write_bytes(jpeg())
    validated = cat.validate_images(cat.load_catalog(root), img.ImageCache(tmp_path / "cache"))
    assert sorted(validated.accepted["image"]) == ["good.png", "other.jpg"]
    assert [(r.subject_id, r.item, r.rule, r.detail) for r in validated.rejections] == [
        (
            "a",
            "images.csv row 1: x.png",
            "unreadable",
            "images.csv row 1: x.png: it is a FIFO (named pipe), not a regular file",
        ),
        (
            "b",
            "images.csv row 3: link.png",
            "unreadable",
            "images.csv row 3: link.png: it is a FIFO (named pipe), not a regular file",
        ),
    ]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", ["images.csv", "prompts.csv", "sweep.yaml"])
def test_a_catalog_file_that_is_a_fifo_is_a_catalog_error(tmp_path, name):
    write_catalog(tmp_path, GOOD_IMAGES, GOOD_PROMPTS)
    (tmp_path / name).unlink()
    os.mkfifo(tmp_path / name)
    with pytest.raises(cat.CatalogError) as err:
        cat.load_catalog(tmp_path)
    assert str(err.value) == f"{name}: it is a FIFO (named pipe), not a regular file"


def test_a_table_over_the_size_limit_is_a_catalog_error(tmp_path, monkeypatch):
    write_catalog(tmp_path, GOOD_IMAGES, [{"subject_id": "a", "prompt": "x" * 5000}])
    monkeypatch.setattr(cat, "MAX_TABLE_BYTES", 1000)
    with pytest.raises(cat.CatalogError) as err:
        cat.load_catalog(tmp_path)
    assert str(err.value) == "prompts.csv: 5,021 bytes, at most 1,000"


def test_a_table_that_is_not_utf8_is_a_catalog_error(tmp_path):
    write_catalog(tmp_path, GOOD_IMAGES, GOOD_PROMPTS)
    (tmp_path / "prompts.csv").write_bytes("subject_id,prompt\na,café au lait\n".encode("latin-1"))
    with pytest.raises(cat.CatalogError) as err:
        cat.load_catalog(tmp_path)
    assert str(err.value) == "prompts.csv: is not UTF-8 text (found byte 0xe9); save it as UTF-8"


def test_bom_in_every_file_is_accepted(tmp_path):
    write_catalog(tmp_path, GOOD_IMAGES, GOOD_PROMPTS)
    for name in ("images.csv", "prompts.csv", "sweep.yaml"):
        path = tmp_path / name
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    (tmp_path / "x.png").write_bytes(png())
    loaded = cat.load_catalog(tmp_path)
    assert loaded.sweep.seeds == (1, 2) and list(loaded.images["subject_id"]) == ["a"]
    assert loaded.rejections == [] and list(loaded.prompts["prompt"]) == ["p"]


def test_nul_characters_and_overlong_cells_are_row_rejections(tmp_path):
    # Before: a NUL in an image path made os.path.realpath raise ValueError: the whole load crashed.
    long_subject = "s" * 201
    write_catalog(
        tmp_path,
        [
            ("a", "x.png", ""),
            ("a", "bad\x00name.png", ""),
            ("b\x00", "x.png", ""),
            (long_subject, "x.png", ""),
            ("a", "y" * 5000 + ".png", ""),
        ],
        [
            {"subject_id": "a", "prompt": "p"},
            {"subject_id": "a", "prompt": "nul\x00here"},
            {"subject_id": "a", "prompt": "z" * 10_000_000},
        ],
    )
    (tmp_path / "x.png").write_bytes(png())
    loaded = cat.load_catalog(tmp_path)
    assert list(loaded.images["row"]) == [1] and list(loaded.prompts["prompt"]) == ["p"]
    long_item = "images.csv row 5: " + "y" * 200 + "…"  # cells in messages stop at 200 characters
    found = sorted((r.item, r.rule, r.detail) for r in loaded.rejections)
    assert found == [
        (
            "images.csv row 2: bad\\x00name.png",
            "control_character",
            "images.csv row 2: bad\\x00name.png: image contains a NUL character",
        ),
        (
            "images.csv row 3: x.png",
            "control_character",
            "images.csv row 3: x.png: subject_id contains a NUL character",
        ),
        ("images.csv row 4: x.png", "too_long", "images.csv row 4: x.png: subject_id is 201 characters, at most 200"),
        (long_item, "too_long", long_item + ": image is 5,004 characters, at most 4,096"),
        ("prompts.csv row 2", "control_character", "prompts.csv row 2: prompt contains a NUL character"),
        ("prompts.csv row 3", "prompt_too_long", "prompts.csv row 3: prompt is 10000000 characters, at most 1500"),
    ]
    assert [r.subject_id for r in loaded.rejections if r.item == "images.csv row 4: x.png"] == ["s" * 200 + "…"]


FORMULA = "=cmd|' /C calc'!A0"


@pytest.mark.timeout(120)
def test_rejections_csv_escapes_formulas_through_dagster(tmp_path):
    import csv

    from dagster import AssetKey, materialize

    from vidu_pipeline.defs.assets import ALL_ASSETS
    from vidu_pipeline.defs.checks import ALL_CHECKS
    from vidu_pipeline.defs.resources import PipelineResource, ViduResource

    root = tmp_path / "catalog"
    write_catalog(
        root,
        [(FORMULA, FORMULA, ""), ("a", "good.png", ""), ("@SUM(1+1)", "+1.png", "")],
        [{"subject_id": "a", "prompt": FORMULA}, {"subject_id": "-2+3", "prompt": "p"}],
    )
    (root / "good.png").write_bytes(png())
    pipeline = PipelineResource(data_dir=str(tmp_path / "data"), catalog_dir=str(root))
    unused = ViduResource(api_key="test-key", base_url="http://127.0.0.1:9")  # nothing is sent
    result = materialize(
        [*ALL_ASSETS, *ALL_CHECKS],
        resources={"pipeline": pipeline, "vidu": unused},
        selection=[AssetKey(k) for k in ("catalog", "reference_images", "rejections")],
    )
    assert result.success
    frame = result.output_for_node("rejections")
    assert FORMULA in set(frame["subject_id"])  # the asset's own output keeps the text

    with open(tmp_path / "data" / "reports" / "rejections.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert rows and list(rows[0]) == list(cat.REJECTION_COLUMNS)
    subjects = {r["subject_id"] for r in rows}
    assert {"'" + FORMULA, "'@SUM(1+1)", "'-2+3"} <= subjects
    assert not [cell for r in rows for cell in r.values() if cell[:1] in ("=", "+", "-", "@", "\t", "\r")]
    assert len(rows) == len(frame) and not list((tmp_path / "data" / "reports").glob(".*"))


def test_spreadsheet_safe_follows_the_owasp_rule():
    assert [cat.spreadsheet_safe(v) for v in ("=1", "+1", "-1", "@x", "\tx", "\rx", "a=1", "", None, 5)] == [
        "'=1",
        "'+1",
        "'-1",
        "'@x",
        "'\tx",
        "'\rx",
        "a=1",
        "",
        None,
        5,
    ]


def test_folder_wise_path_resolution_agrees_with_realpath(tmp_path):
    """Resolving each folder once must not change a single answer: symlinked folders and files,
    '..', a link that leaves the tree, and missing files."""
    from vidu_pipeline.catalog import _realpath

    (tmp_path / "cat" / "images" / "sub").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "x.png").write_bytes(b"x")
    (tmp_path / "cat" / "images" / "a.png").write_bytes(b"a")
    (tmp_path / "cat" / "images" / "out").symlink_to(tmp_path / "outside")
    (tmp_path / "cat" / "images" / "link.png").symlink_to(tmp_path / "outside" / "x.png")
    (tmp_path / "cat" / "images" / "sub" / "up").symlink_to(tmp_path / "cat")
    folders: dict[str, str] = {}
    for rel in (
        "images/a.png",
        "images/out/x.png",
        "images/link.png",
        "images/sub/up/images/a.png",
        "images/sub/../a.png",
        "images/missing.png",
        "images/out/missing.png",
        "images/.",
    ):
        path = str(tmp_path / "cat" / rel)
        assert _realpath(path, folders) == os.path.realpath(path), rel
