"""sweep.yaml: the seeds to pay for, the option defaults, the images-per-subject limit and the
quality thresholds, each checked with a one-line CatalogError naming the field.

Split out of :mod:`vidu_pipeline.catalog`, which re-exports it.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from .api.contract import (
    ASPECT_RATIOS,
    DEFAULTS,
    DURATIONS,
    MAX_IMAGES,
    MAX_SWEEP_SEEDS,
    MOVEMENT_AMPLITUDES,
    RESOLUTIONS,
    seed_problem,
)
from .catalog_files import open_regular
from .catalog_model import OPTION_COLUMNS, CatalogError, Rejection, Sweep, _short
from .quality import Thresholds

# 10,000 seeds fit in ~150 KB of YAML.
MAX_SWEEP_BYTES = 1_000_000

# --- options ---------------------------------------------------------------------------------

_BOOLS = {"true": True, "false": False, "yes": True, "no": False, "1": True, "0": False}


def parse_option(name: str, raw: Any) -> tuple[Any, str | None]:
    """One option value (a cell or a YAML scalar) → (typed value, None) or (None, problem)."""
    text = str(raw).strip()
    if name == "bgm":
        flag = _BOOLS.get(text.lower())
        return (flag, None) if flag is not None else (None, f"{text!r} is not true or false")
    if name == "duration":
        try:
            number = float(text)
        except ValueError:
            number = None
        if number in DURATIONS:
            return int(number), None
        return None, f"{text!r} is not accepted, only {', '.join(map(str, DURATIONS))}"
    allowed = {"aspect_ratio": ASPECT_RATIOS, "movement_amplitude": MOVEMENT_AMPLITUDES, "resolution": RESOLUTIONS}[
        name
    ]
    value = text if name == "aspect_ratio" else text.lower()
    if value in allowed:
        return value, None
    return None, f"{text!r} is not one of {', '.join(allowed)}"


# --- reading the files -----------------------------------------------------------------------


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader without YAML 1.1's base-60 numbers, so an unquoted ``16:9`` stays a string."""


_YamlLoader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:int", re.compile(r"^[-+]?(?:0|[1-9][0-9_]*)$"), list("-+0123456789")
)
_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)?\.[0-9_]+(?:[eE][-+]?[0-9]+)?$"),
    list("-+.0123456789"),
)


def _integer(name: str, field: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise CatalogError(f"{name}: {field} must be an integer, got {_short(repr(value))}")
    return value


def _sweep_seeds(name: str, doc: dict) -> list[int]:
    """The seeds sweep.yaml asks for, every one within contract.SEED_MIN..SEED_MAX.

    The count is checked before any seed is looked at or any range built, so a 200,000-seed
    sweep is refused at once; any bad seed makes the whole sweep a CatalogError (the seeds
    decide what is paid for: a silently shortened sweep is worse than a clear stop).
    """
    if "seeds" in doc and ({"seed_start", "seed_count"} & set(doc)):
        raise CatalogError(f"{name}: give either `seeds` or `seed_start` + `seed_count`, not both")
    if "seeds" in doc:
        listed = doc["seeds"]
        if not isinstance(listed, list) or not listed:
            raise CatalogError(f"{name}: seeds must be a non-empty list of integers")
        if len(listed) > MAX_SWEEP_SEEDS:
            raise CatalogError(f"{name}: seeds: {len(listed)} seeds, at most {MAX_SWEEP_SEEDS}")
        for i, seed in enumerate(listed):
            problem = seed_problem(_integer(name, f"seeds[{i}]", seed))
            if problem:
                raise CatalogError(f"{name}: seeds[{i}]: {_short(problem)}")
        return listed
    if "seed_start" not in doc or "seed_count" not in doc:
        raise CatalogError(f"{name}: needs `seeds: [...]` or both `seed_start` and `seed_count`")
    start, count = _integer(name, "seed_start", doc["seed_start"]), _integer(name, "seed_count", doc["seed_count"])
    if not 1 <= count <= MAX_SWEEP_SEEDS:
        raise CatalogError(f"{name}: seed_count: {count} seeds, it must be between 1 and {MAX_SWEEP_SEEDS}")
    for field, seed in (("seed_start", start), ("seed_start + seed_count - 1", start + count - 1)):
        problem = seed_problem(seed)
        if problem:
            raise CatalogError(f"{name}: {field}: {problem}")
    return list(range(start, start + count))


def read_sweep(path: Path, rejections: list[Rejection]) -> Sweep:
    if not os.path.lexists(path):
        raise CatalogError(f"{path}: missing; it needs `seeds: [...]` or `seed_start` + `seed_count`")
    with open_regular(path, MAX_SWEEP_BYTES, f"a sweep has at most {MAX_SWEEP_SEEDS} seeds") as f:
        data = f.read()
    try:
        doc = yaml.load(data.decode("utf-8-sig"), Loader=_YamlLoader)
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise CatalogError(f"{path.name}: not valid YAML ({exc})") from None
    if not isinstance(doc, dict):
        raise CatalogError(f"{path.name}: must be a mapping with `seeds` or `seed_start` + `seed_count`")
    unknown = set(doc) - {"seeds", "seed_start", "seed_count", "defaults", "max_images_per_subject", "quality"}
    if unknown:
        raise CatalogError(f"{path.name}: unknown field(s) {_short(', '.join(sorted(map(str, unknown))))}")
    seeds = _sweep_seeds(path.name, doc)
    counts = Counter(seeds)
    for seed in sorted(s for s, n in counts.items() if n > 1):
        rejections.append(
            Rejection(
                "sweep",
                None,
                f"{path.name} seeds",
                "duplicate_seed",
                f"{path.name}: seed {seed} is listed {counts[seed]} times; used once",
            )
        )

    defaults = dict(DEFAULTS)
    given = doc.get("defaults") or {}
    if not isinstance(given, dict):
        raise CatalogError(f"{path.name}: defaults must be a mapping of option: value")
    for name, raw in given.items():
        if name not in OPTION_COLUMNS:
            raise CatalogError(
                f"{path.name}: defaults.{_short(str(name))} is not an option ({', '.join(OPTION_COLUMNS)})"
            )
        value, problem = parse_option(name, raw)
        if problem:
            raise CatalogError(f"{path.name}: defaults.{name}: {_short(problem)}")
        defaults[name] = value
    max_images = _integer(path.name, "max_images_per_subject", doc.get("max_images_per_subject", MAX_IMAGES))
    if not 1 <= max_images <= MAX_IMAGES:
        raise CatalogError(f"{path.name}: max_images_per_subject must be between 1 and {MAX_IMAGES}")
    quality = _quality_thresholds(path.name, doc.get("quality"))
    return Sweep(seeds=tuple(counts), defaults=defaults, max_images_per_subject=max_images, quality=quality)


def _quality_thresholds(name: str, given: Any) -> Thresholds:
    """sweep.yaml's ``quality:`` section over :class:`quality.Thresholds`'s defaults."""
    if given is None:
        return Thresholds()
    if not isinstance(given, dict):
        raise CatalogError(f"{name}: quality must be a mapping of threshold: number")
    known = {f.name for f in dataclasses.fields(Thresholds)}
    values = {}
    for key, value in given.items():
        if key not in known:
            raise CatalogError(f"{name}: quality.{_short(str(key))} is not a threshold ({', '.join(sorted(known))})")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1e6:
            raise CatalogError(f"{name}: quality.{key} must be a non-negative number, got {_short(repr(value))}")
        values[key] = float(value)
    return Thresholds(**values)


# --- row checks ------------------------------------------------------------------------------
