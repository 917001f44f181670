"""Expand subjects × prompts × seeds into generation requests with stable, readable ids.

A request's id is also its Dagster partition key, so it must be the same for the same
catalog and sweep and change when anything that shapes the video changes (prompt, options,
reference images, seed). Ids look like ``chelsea-s2-9f3c21ab``: subject, seed, and a hash of
the full spec — only ``[a-z0-9_-]``, safe in the Dagster UI.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Iterable
from typing import Any

import pandas as pd

from . import __version__
from .api.contract import GenerationRequest, fingerprint_from_digests
from .ledger.schema import PlannedRequest

OPTION_COLUMNS = ("aspect_ratio", "movement_amplitude", "bgm", "duration", "resolution")
_SLUG_RE = re.compile(r"[^a-z0-9_]+")


@dataclasses.dataclass(frozen=True)
class RequestSpec:
    """Everything needed to rebuild a submit body, with images referenced by sha256."""

    request_id: str
    subject_id: str
    prompt: str
    seed: int
    options: dict[str, Any]
    image_sha256s: tuple[str, ...]  # the bytes sent, in order
    original_sha256s: tuple[str, ...]  # the catalog files they came from
    image_mimes: tuple[str, ...]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> RequestSpec:
        raw = json.loads(text)
        for key in ("image_sha256s", "original_sha256s", "image_mimes"):
            raw[key] = tuple(raw[key])
        return cls(**raw)

    def fingerprint(self) -> str:
        """Equals ``contract.payload_fingerprint`` of the body :meth:`to_request` builds."""
        rest = GenerationRequest(images=(), prompt=self.prompt, seed=self.seed, **self.options).to_payload()
        return fingerprint_from_digests([f"sha256:{s}" for s in self.image_sha256s], rest)

    def planned(self) -> PlannedRequest:
        """The ledger row that plans this request (its fingerprint and the spec as JSON)."""
        return PlannedRequest(
            request_id=self.request_id,
            subject_id=self.subject_id,
            seed=self.seed,
            fingerprint=self.fingerprint(),
            spec_json=self.to_json(),
        )

    def to_request(self, data_uri_for) -> GenerationRequest:
        """The submit body; ``data_uri_for(sha256)`` supplies each image from the cache."""
        return GenerationRequest(
            images=tuple(data_uri_for(sha) for sha in self.image_sha256s),
            prompt=self.prompt,
            seed=self.seed,
            **self.options,
        )


def slug(text: str, max_len: int = 32) -> str:
    s = _SLUG_RE.sub("-", str(text).lower()).strip("-")
    return (s or "subject")[:max_len].strip("-") or "subject"


def request_id(subject_id: str, prompt: str, seed: int, options: dict, image_sha256s: Iterable[str]) -> str:
    identity = json.dumps(
        {
            "subject_id": subject_id,
            "prompt": prompt,
            "seed": seed,
            "options": {k: options[k] for k in sorted(options)},
            "images": list(image_sha256s),
        },
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    digest = hashlib.sha256(identity.encode("utf-8")).hexdigest()[:10]
    return f"{slug(subject_id)}-s{seed}-{digest}"


def expand(prompts: pd.DataFrame, images: pd.DataFrame, seeds: Iterable[int]) -> list[RequestSpec]:
    """One spec per (prompt row, seed). ``prompts`` has subject_id, prompt and every option
    column filled; ``images`` the accepted images (subject_id, sent_sha256, original_sha256,
    mime_subtype) in the order they are sent. Order is stable: catalog order, then seed."""
    seeds = list(seeds)
    refs: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {}
    for subject_id, group in images.groupby("subject_id", sort=False):
        refs[str(subject_id)] = (
            tuple(group["sent_sha256"]),
            tuple(group["original_sha256"]),
            tuple(group["mime_subtype"]),
        )
    specs: list[RequestSpec] = []
    seen: set[str] = set()
    for row in prompts.itertuples(index=False):
        subject_id = str(row.subject_id)
        if subject_id not in refs:
            continue
        sent, original, mimes = refs[subject_id]
        options = {
            "aspect_ratio": str(row.aspect_ratio),
            "movement_amplitude": str(row.movement_amplitude),
            "bgm": bool(row.bgm),
            "duration": int(row.duration),
            "resolution": str(row.resolution),
        }
        for seed in seeds:
            rid = request_id(subject_id, row.prompt, int(seed), options, sent)
            if rid in seen:  # an exact duplicate prompt row: one request, paid once
                continue
            seen.add(rid)
            specs.append(
                RequestSpec(
                    request_id=rid,
                    subject_id=subject_id,
                    prompt=str(row.prompt),
                    seed=int(seed),
                    options=options,
                    image_sha256s=sent,
                    original_sha256s=original,
                    image_mimes=mimes,
                )
            )
    return specs


PIPELINE_VERSION = __version__


def plan_digest(specs, rejections) -> str:
    """A digest of what a plan run records: every request's fingerprint and every refused
    input. The CLI makes no plan run when it equals the last plan's (nothing would change)."""
    digest = hashlib.sha256()
    for spec in specs:
        digest.update(f"{spec.request_id} {spec.fingerprint()}\n".encode())
    digest.update(rejections.to_csv(index=False).encode())
    return digest.hexdigest()
