"""Paying once more for the clips that fail the quality gates: which clips, and with which seed.

A clip that is frozen, blank, unlike its references, or a near-duplicate of another seed of the
same prompt gets a replacement request: the same subject, prompt, options and images under a
new seed. The new seed is derived from the original request id and the round, so the same
failing clip always gets the same replacement id: running the regeneration twice plans nothing
new, and a crash in between loses nothing. A replacement that fails too gets the next round's
seed, up to ``rounds`` paid replacements per catalog request. Submitting them goes through the
ordinary path, under the same spend caps.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable, Mapping, Sequence

import pandas as pd

from . import quality
from .api.contract import SEED_MAX
from .generation_requests import OPTION_COLUMNS, RequestSpec, request_id

SAME_PROMPT = ["subject_id", "prompt", *OPTION_COLUMNS]  # clips that differ only by seed
MAX_ROUNDS = 10


@dataclasses.dataclass(frozen=True)
class Replacement:
    """A catalog request whose clip failed, the new request that replaces it, and why."""

    original: str
    reasons: tuple[str, ...]
    spec: RequestSpec
    round: int


def near_duplicate_pairs(table: pd.DataFrame, thresholds: quality.Thresholds) -> list[tuple[str, str, float]]:
    """Pairs of clips of one prompt (same subject, prompt and options) whose frames are closer
    than ``duplicate_bits``: the seeds made the same video twice."""
    pairs: list[tuple[str, str, float]] = []
    if not len(table):
        return pairs
    for _, group in table.groupby([c for c in SAME_PROMPT if c in table.columns], dropna=False):
        hashes: dict[str, Sequence[str]] = {
            str(row.request_id): [str(h) for h in row.phash] for row in group.itertuples() if len(row.phash)
        }
        pairs += quality.near_duplicates(hashes, thresholds)
    return pairs


def failing_clips(table: pd.DataFrame, thresholds: quality.Thresholds) -> dict[str, list[str]]:
    """Request id → the gates its clip fails, from the current dataset's rows (lineage columns).

    Of two near-duplicate seeds only the one with the larger seed is listed: one of the pair
    is kept, and paying for both again would make the same mistake twice as likely."""
    failing: dict[str, list[str]] = {}
    for row in table.to_dict("records"):
        flags = quality.quality_flags(row, thresholds)
        if flags:
            failing[str(row["request_id"])] = flags
    seeds = dict(zip(table["request_id"].astype(str), table["seed_requested"], strict=True)) if len(table) else {}
    for a, b, _ in near_duplicate_pairs(table, thresholds):
        later, earlier = (a, b) if seeds.get(a, 0) >= seeds.get(b, 0) else (b, a)
        failing.setdefault(later, []).append(f"near-duplicate of {earlier}")
    return failing


def replacement_seed(original_id: str, round_: int) -> int:
    """The seed of round ``round_``'s replacement: a hash, so it is the same on every run."""
    digest = hashlib.sha256(f"{original_id}:regenerate:{round_}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % (SEED_MAX + 1)


def replacement_spec(original: RequestSpec, round_: int) -> RequestSpec:
    seed = replacement_seed(original.request_id, round_)
    rid = request_id(original.subject_id, original.prompt, seed, original.options, original.image_sha256s)
    return dataclasses.replace(original, request_id=rid, seed=seed)


def replacements(
    originals: Iterable[RequestSpec],
    failing: Mapping[str, Sequence[str]],
    planned: Iterable[str],
    rounds: int,
) -> list[Replacement]:
    """The replacement requests to plan now, one per failing catalog request at most.

    ``planned`` are the request ids the ledger already holds. For each failing original, the
    rounds are walked in order: a round's replacement not yet planned is the one to plan; one
    that is planned and not failing (still running, or good) ends the walk; one that failed
    too moves on to the next round, until ``rounds`` have been paid for.
    """
    if not 1 <= rounds <= MAX_ROUNDS:
        raise ValueError(f"rounds must be 1..{MAX_ROUNDS}, not {rounds}")
    known = set(planned)
    out = []
    for spec in originals:
        reasons = failing.get(spec.request_id)
        for round_ in range(1, rounds + 1):
            if not reasons:
                break
            new = replacement_spec(spec, round_)
            if new.request_id not in known:
                out.append(Replacement(spec.request_id, tuple(reasons), new, round_))
                break
            reasons = failing.get(new.request_id)
    return out
