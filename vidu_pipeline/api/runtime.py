"""Where the API is: the real service when ``VIDU_API_KEY`` is set, else the local simulator.

Without a key the pipeline never needs the network or money: it starts the bundled simulator
as a background process on a free loopback port, shared by every process of the project
(the CLI, ``dagster dev``'s daemon running the sensor, and the run processes that submit and
download), and it stops by itself after a quiet spell. Its address and throwaway key are
announced in ``<state_dir>/simulator.json``; its tasks persist in ``state_dir`` so a
restarted simulator still knows them.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import requests

from . import contract

log = logging.getLogger(__name__)

ENV_KEY = "VIDU_API_KEY"
ENV_BASE_URL = "VIDU_API_BASE_URL"
ENV_RENDER_SCALE = "VIDU_SIMULATOR_RENDER_SCALE"
ENV_LATENCY = "VIDU_SIMULATOR_LATENCY"
ENV_CONCURRENCY = "VIDU_SIMULATOR_CONCURRENCY"
ENV_IDLE_EXIT = "VIDU_SIMULATOR_IDLE_EXIT"
_announced: set[str] = set()


@dataclasses.dataclass(frozen=True)
class Endpoint:
    base_url: str
    api_key: str = dataclasses.field(repr=False)
    simulated: bool
    render_scale: float = 1.0  # frame scale the videos will have (< 1 only on a simulator)

    def describe(self) -> str:
        where = "embedded simulator" if self.simulated else "Vidu API"
        return f"{where} at {self.base_url}"


@dataclasses.dataclass(frozen=True)
class SimulatorSettings:
    latency_s: float = 8.0
    concurrency: int = 5
    render_scale: float = 1.0
    idle_exit_s: float = 900.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> SimulatorSettings:
        d = cls()
        return cls(
            latency_s=float(env.get(ENV_LATENCY, d.latency_s)),
            concurrency=int(env.get(ENV_CONCURRENCY, d.concurrency)),
            render_scale=float(env.get(ENV_RENDER_SCALE, d.render_scale)),
            idle_exit_s=float(env.get(ENV_IDLE_EXIT, d.idle_exit_s)),
        )


def resolve_endpoint(state_dir: Path, env: Mapping[str, str] = os.environ) -> Endpoint:
    """The endpoint to talk to; starts (or reuses) the local simulator when there is no key."""
    settings = SimulatorSettings.from_env(env)
    key = env.get(ENV_KEY, "").strip()
    if key:
        base_url = env.get(ENV_BASE_URL, "").strip() or contract.DEFAULT_BASE_URL
        # A key pointed at a standalone simulator may render small frames for speed.
        return Endpoint(base_url, key, simulated=False, render_scale=settings.render_scale)
    endpoint = ensure_local_simulator(Path(state_dir), settings)
    if endpoint.base_url not in _announced:
        _announced.add(endpoint.base_url)
        log.warning(
            "No %s set: using the embedded Vidu simulator at %s (nothing is paid; videos are "
            "rendered locally). Set %s to use the real API.",
            ENV_KEY,
            endpoint.base_url,
            ENV_KEY,
        )
    return endpoint


def ensure_local_simulator(state_dir: Path, settings: SimulatorSettings, timeout_s: float = 60.0) -> Endpoint:
    """Reuse the simulator announced in ``state_dir`` if it answers, else start one.

    A simulator found alive is remembered: while its announcement is unchanged, its process
    runs and it cannot have gone idle, later calls in this process skip the lock and the HTTP
    check (every client and sensor tick asks, and the check itself is a request)."""
    state_dir = Path(state_dir).resolve()
    known = _known.get((state_dir, settings))
    if known and known.still_alive(state_dir / "simulator.json", settings):
        return known.endpoint
    endpoint, announced = _reuse_or_start(state_dir, settings, timeout_s)
    _known[(state_dir, settings)] = _KnownSimulator(endpoint, announced, _clock())
    return endpoint


@dataclasses.dataclass(frozen=True)
class _KnownSimulator:
    """A simulator this process found answering: its endpoint, its announcement's text then,
    and when (``_clock``) it answered."""

    endpoint: Endpoint
    announced: str = dataclasses.field(repr=False)
    checked_at: float

    def still_alive(self, announce: Path, settings: SimulatorSettings) -> bool:
        """Alive without asking it: same announcement, its process runs, and less than half
        its idle exit has passed since it answered (our check counted as a request)."""
        if settings.idle_exit_s > 0 and _clock() - self.checked_at > settings.idle_exit_s / 2:
            return False
        try:
            same = announce.read_text() == self.announced
        except OSError:
            return False
        return same and _runs(json.loads(self.announced).get("pid"))


def _runs(pid: object) -> bool:
    """The process exists and is not a zombie (a killed simulator whose starter, perhaps
    this process, has not reaped it yet)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except PermissionError:
        pass  # another user's process holds the pid: it exists
    except OSError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc here (or it just ended): the signal said it exists
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


_known: dict[tuple[Path, SimulatorSettings], _KnownSimulator] = {}
_clock = time.monotonic  # a name of our own, so a test can move this module's clock alone


def _reuse_or_start(state_dir: Path, settings: SimulatorSettings, timeout_s: float) -> tuple[Endpoint, str]:
    """Under the state folder's lock: the announced simulator if it answers, else a new one;
    with the announcement's text."""
    state_dir.mkdir(parents=True, exist_ok=True)
    announce = state_dir / "simulator.json"
    with open(state_dir / "simulator.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one starter at a time across processes
        found = _live_endpoint(announce, settings)
        if found:
            return found
        announce.unlink(missing_ok=True)
        proc = _start_simulator(state_dir, announce, settings)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"the local simulator exited with status {proc.returncode}; see {state_dir / 'simulator.log'}"
                )
            found = _live_endpoint(announce, settings)
            if found:
                return found
            time.sleep(0.1)
        proc.kill()
        raise RuntimeError(f"the local simulator did not start within {timeout_s:.0f} s")


def _start_simulator(state_dir: Path, announce: Path, settings: SimulatorSettings) -> subprocess.Popen:
    """The simulator process, in its own session (it outlives us), with a throwaway key."""
    cmd = [
        sys.executable,
        "-m",
        "vidu_pipeline.simulator",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--state-dir",
        str(state_dir),
        "--announce",
        str(announce),
        "--latency",
        str(settings.latency_s),
        "--concurrency",
        str(settings.concurrency),
        "--render-scale",
        str(settings.render_scale),
        "--idle-exit",
        str(settings.idle_exit_s),
    ]
    env = {k: v for k, v in os.environ.items() if k != ENV_KEY}
    env["VIDU_SIMULATOR_API_KEY"] = secrets.token_urlsafe(18)  # throwaway, never on argv
    with open(state_dir / "simulator.log", "ab") as out:
        return subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
            env=env,
        )


def stop_local_simulator(state_dir: Path) -> bool:
    """Stop the announced simulator process, if any. True when one was stopped."""
    announce = Path(state_dir) / "simulator.json"
    try:
        pid = json.loads(announce.read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return False
    try:
        os.kill(pid, 15)
    except ProcessLookupError:
        return False
    announce.unlink(missing_ok=True)
    return True


def _live_endpoint(announce: Path, settings: SimulatorSettings) -> tuple[Endpoint, str] | None:
    """The announced simulator and its announcement's text, if it answers with our settings."""
    try:
        announced = announce.read_text()
        info = json.loads(announced)
    except (OSError, ValueError):
        return None
    wanted = {
        "latency_s": settings.latency_s,
        "render_scale": settings.render_scale,
        "concurrency": settings.concurrency,
    }
    if any(info.get(k) != v for k, v in wanted.items()):
        # Different settings asked for: retire the old one rather than silently mismatch.
        stop_local_simulator(announce.parent)
        return None
    try:
        resp = requests.get(
            info["base_url"] + "/_simulator/stats",
            headers={"Authorization": f"Bearer {info['api_key']}"},
            timeout=2,
        )
    except (requests.RequestException, KeyError):
        return None
    if resp.status_code != 200:
        return None
    return Endpoint(info["base_url"], info["api_key"], simulated=True, render_scale=settings.render_scale), announced
