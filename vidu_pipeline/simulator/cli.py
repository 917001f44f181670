"""The standalone simulator: ``vidu-pipeline simulator …`` or ``python -m vidu_pipeline.simulator``.

Serves until SIGINT or SIGTERM. General fault flags (``--rate-limit`` …) apply to submits and
polls alike; ``--submit-…``/``--poll-…`` flags override one side.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading
import time
from pathlib import Path

from .faults import FaultConfig
from .service import Simulator, SimulatorConfig

API_KEY_ENV = "VIDU_SIMULATOR_API_KEY"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    parser.add_argument("--port", type=int, default=8765, help="0 picks a free port")
    parser.add_argument("--latency", type=float, default=20.0, help="seconds a task processes")
    parser.add_argument("--concurrency", type=int, default=5, help="tasks processing at once")
    parser.add_argument("--render-scale", type=float, default=1.0, help="<1 renders smaller, faster videos")
    parser.add_argument("--url-ttl", type=int, default=3600, help="seconds a download URL stays valid")
    parser.add_argument("--fps", type=int, default=24)
    parser.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV, "sim-key"),
        help=f"the Bearer key to accept (default: ${API_KEY_ENV} or 'sim-key')",
    )
    parser.add_argument("--state-dir", type=Path, default=None, help="keep tasks and videos here across restarts")
    parser.add_argument(
        "--announce",
        type=Path,
        default=None,
        help="write {base_url, api_key, pid, settings} to this JSON file once serving (mode 0600)",
    )
    parser.add_argument(
        "--idle-exit", type=float, default=0.0, help="stop after this many seconds without a request (0: never)"
    )
    faults = parser.add_argument_group("fault injection (fractions 0..1, reproducible from --fault-seed)")
    faults.add_argument("--fault-seed", type=int, default=0)
    for name in ("rate-limit", "server-errors", "drop"):
        faults.add_argument(f"--{name}", type=float, default=0.0, help="submits and polls")
        faults.add_argument(f"--submit-{name}", type=float, default=None)
        faults.add_argument(f"--poll-{name}", type=float, default=None)
    faults.add_argument("--no-retry-after", type=float, default=0.0, help="share of 429s without Retry-After")
    faults.add_argument("--retry-after", type=int, default=1, help="Retry-After seconds on 429")
    faults.add_argument(
        "--server-errors-after-accept",
        type=float,
        default=0.5,
        help="share of submit 5xx sent after the task was created",
    )
    faults.add_argument(
        "--drop-after-accept", type=float, default=0.5, help="share of dropped submits that created the task first"
    )
    faults.add_argument("--slow", type=float, default=0.0, help="calls delayed by --slow-seconds")
    faults.add_argument("--slow-seconds", type=float, default=2.0)
    faults.add_argument("--fail-tasks", type=float, default=0.0, help="tasks that end FAILED")
    faults.add_argument(
        "--echo-auth-in-reason",
        type=float,
        default=0.0,
        help="tasks that FAIL with a reason echoing the Authorization header",
    )
    faults.add_argument("--drip", type=float, default=0.0, help="answers sent one byte at a time")
    faults.add_argument("--drip-seconds", type=float, default=5.0, help="seconds between dripped bytes")
    for defect in ("frozen", "black", "ignore-amplitude", "same-clip-for-seeds", "unrelated"):
        faults.add_argument(
            f"--defect-{defect}",
            type=float,
            default=0.0,
            help=f"requests rendered with the {defect!r} defect (a valid but wrong clip)",
        )
    faults.add_argument("--truncate", type=float, default=0.0, help="downloads cut short")
    faults.add_argument(
        "--truncate-matching-length",
        type=float,
        default=0.0,
        help="share of truncated downloads whose Content-Length matches the short body",
    )


def fault_config(args: argparse.Namespace) -> FaultConfig:
    def side(side: str, name: str) -> float:
        specific = getattr(args, f"{side}_{name}")
        return getattr(args, name) if specific is None else specific

    return FaultConfig(
        seed=args.fault_seed,
        submit_rate_limit=side("submit", "rate_limit"),
        poll_rate_limit=side("poll", "rate_limit"),
        rate_limit_without_retry_after=args.no_retry_after,
        retry_after_s=args.retry_after,
        submit_server_error=side("submit", "server_errors"),
        poll_server_error=side("poll", "server_errors"),
        server_error_after_accept=args.server_errors_after_accept,
        submit_drop=side("submit", "drop"),
        poll_drop=side("poll", "drop"),
        drop_after_accept=args.drop_after_accept,
        slow=args.slow,
        slow_s=args.slow_seconds,
        fail_tasks=args.fail_tasks,
        echo_auth_in_reason=args.echo_auth_in_reason,
        drip=args.drip,
        drip_s=args.drip_seconds,
        defect_frozen=args.defect_frozen,
        defect_black=args.defect_black,
        defect_ignore_amplitude=args.defect_ignore_amplitude,
        defect_same_clip_for_seeds=args.defect_same_clip_for_seeds,
        defect_unrelated=args.defect_unrelated,
        truncate=args.truncate,
        truncate_matching_length=args.truncate_matching_length,
    )


def announce(path: Path, sim: Simulator, args: argparse.Namespace) -> None:
    """Tell other processes where this simulator is (the pipeline's embedded default)."""
    info = {
        "base_url": sim.base_url,
        "api_key": sim.config.api_key,
        "pid": os.getpid(),
        "latency_s": args.latency,
        "render_scale": args.render_scale,
        "concurrency": args.concurrency,
    }
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(info, f)
    os.replace(tmp, path)


def run(args: argparse.Namespace) -> int:
    config = SimulatorConfig(
        api_key=args.api_key,
        latency_s=args.latency,
        concurrency=args.concurrency,
        render_scale=args.render_scale,
        url_ttl_s=args.url_ttl,
        state_dir=args.state_dir,
        faults=fault_config(args),
        host=args.host,
        port=args.port,
        fps=args.fps,
    )
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with Simulator(config) as sim:
            print(f"Vidu simulator serving on {sim.base_url}", flush=True)
            # A key given through the environment stays out of logs; the default one is public.
            shown = f"from ${API_KEY_ENV}" if os.environ.get(API_KEY_ENV) else config.api_key
            print(f"API key: {shown}", flush=True)
            print(f"state: {config.state_dir or 'temporary (lost on exit)'}", flush=True)
            if args.announce:
                announce(args.announce, sim, args)
            while not stop.wait(1.0):
                if args.idle_exit and time.monotonic() - sim.last_request_at > args.idle_exit:
                    print(f"idle for {args.idle_exit:.0f} s", flush=True)
                    break
            print("stopping", flush=True)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
