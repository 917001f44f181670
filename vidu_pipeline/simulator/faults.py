"""Reproducible misbehaviour for tests and drills.

Each decision hashes (seed, endpoint, kind, key, n) where n counts the calls made so far for
that (endpoint, key) — the fingerprint for submits, the task id for polls and downloads. The
same sequence of calls per key therefore sees the same faults whatever the thread interleaving
across keys.
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
from collections import Counter


@dataclasses.dataclass(frozen=True)
class FaultConfig:
    """Fractions in 0..1 of calls that misbehave; all off by default."""

    seed: int = 0
    submit_rate_limit: float = 0.0
    poll_rate_limit: float = 0.0
    # Share of 429s sent without a Retry-After header (the contract does not guarantee one).
    rate_limit_without_retry_after: float = 0.0
    retry_after_s: int = 1
    submit_server_error: float = 0.0
    poll_server_error: float = 0.0
    # Share of submit 5xx answered after the task was created: a paid task the client never saw.
    server_error_after_accept: float = 0.5
    submit_drop: float = 0.0
    poll_drop: float = 0.0
    # Share of dropped submits that created the task first: the "unknown outcome" case.
    drop_after_accept: float = 0.5
    slow: float = 0.0
    slow_s: float = 2.0
    fail_tasks: float = 0.0
    # Share of tasks that FAIL with a reason echoing the submit's Authorization header (as is
    # and URL-encoded), as careless gateways do: the key must not travel further.
    echo_auth_in_reason: float = 0.0
    # Share of submit and poll answers sent one byte every drip_s seconds (a submit's task is
    # created first): only a total deadline ends such a call.
    drip: float = 0.0
    drip_s: float = 5.0
    # Shares of requests rendered with one of render.DEFECTS: valid MP4s that only the quality
    # figures can tell from good ones. Decided per request (not per call), so a resubmitted
    # request, every seed of it (same_clip_for_seeds) or every amplitude (ignore_amplitude)
    # shows the same defect.
    defect_frozen: float = 0.0
    defect_black: float = 0.0
    defect_ignore_amplitude: float = 0.0
    defect_same_clip_for_seeds: float = 0.0
    defect_unrelated: float = 0.0
    truncate: float = 0.0
    # Share of truncated downloads whose Content-Length matches the short body (only the MP4
    # itself reveals the damage) instead of announcing the full size.
    truncate_matching_length: float = 0.0

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            if field.name in ("seed", "retry_after_s", "slow_s", "drip_s"):
                continue
            value = getattr(self, field.name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"FaultConfig.{field.name} must be within 0..1, got {value}")
        if self.retry_after_s < 0 or self.slow_s < 0 or self.drip_s < 0:
            raise ValueError("FaultConfig.retry_after_s, slow_s and drip_s must not be negative")

    @classmethod
    def from_dict(cls, data: dict) -> FaultConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown fault fields: {', '.join(unknown)}")
        return cls(**data)


class FaultDice:
    """Draws the faults of one call; counts what it injected for the stats."""

    def __init__(self, config: FaultConfig) -> None:
        self._lock = threading.Lock()
        self._config = config
        self._calls: Counter[tuple[str, str]] = Counter()
        self.injected: Counter[str] = Counter()

    @property
    def config(self) -> FaultConfig:
        return self._config

    def set_config(self, config: FaultConfig) -> None:
        with self._lock:
            self._config = config

    def roll(self, endpoint: str, key: str) -> Roll:
        """Take the next call number for (endpoint, key) and return its dice."""
        with self._lock:
            n = self._calls[endpoint, key]
            self._calls[endpoint, key] = n + 1
            return Roll(self._config, endpoint, key, n, self)

    def count(self, endpoint: str, kind: str) -> None:
        with self._lock:
            self.injected[f"{endpoint}.{kind}"] += 1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(sorted(self.injected.items()))


@dataclasses.dataclass(frozen=True)
class Roll:
    """The dice of one call: ``hit(kind, p)`` is a fixed uniform draw compared with p.

    Variants of a fault already drawn (a 429 without Retry-After, a 5xx after the task was
    created) are drawn the same way under their own kind, so the stats count them apart.
    """

    config: FaultConfig
    endpoint: str
    key: str
    n: int
    dice: FaultDice

    def uniform(self, kind: str) -> float:
        text = f"{self.config.seed}|{self.endpoint}|{kind}|{self.key}|{self.n}"
        digest = hashlib.sha256(text.encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64

    def hit(self, kind: str, probability: float) -> bool:
        """True when this call suffers ``kind``; counted under "<endpoint>.<kind>"."""
        if probability <= 0.0 or self.uniform(kind) >= probability:
            return False
        self.dice.count(self.endpoint, kind)
        return True


# What must not decide a defect's draw, per defect: the request varies in it, and the defect
# is about exactly that variation.
_DEFECT_IGNORES = {"same_clip_for_seeds": "seed", "ignore_amplitude": "movement_amplitude"}


def pick_defect(config: FaultConfig, body: dict) -> str | None:
    """The render defect of this request, if any: a seeded draw per defect over the request's
    fingerprint (without the field the defect is about), first hit wins."""
    from ..api import contract

    for name in ("frozen", "black", "ignore_amplitude", "same_clip_for_seeds", "unrelated"):
        rate = getattr(config, f"defect_{name}")
        if rate <= 0.0:
            continue
        ignored = _DEFECT_IGNORES.get(name)
        key = contract.payload_fingerprint({k: v for k, v in body.items() if k != ignored})
        draw = hashlib.sha256(f"{config.seed}|defect|{name}|{key}".encode()).digest()
        if int.from_bytes(draw[:8], "big") / 2**64 < rate:
            return name
    return None
