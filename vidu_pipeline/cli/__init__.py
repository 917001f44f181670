"""``vidu-pipeline``: generate a dataset headless, to completion, on the same Dagster
definitions and instance that ``dagster dev`` shows; plus status, reproduce and the simulator.

``generate`` materializes the catalog assets, submits the new requests, then evaluates the
task sensor in a loop and executes the runs it asks for in this process (no daemon needed),
until every request of the catalog has reached an end.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from .exit_codes import EXIT_CAPPED, EXIT_FAILED, EXIT_OK, EXIT_USAGE
from .signals import disk_full, disk_message, install_stop_handlers, quiet_dagster

__all__ = ["EXIT_CAPPED", "EXIT_FAILED", "EXIT_OK", "EXIT_USAGE", "build_parser", "main"]


def parse_seeds(text: str) -> list[int]:
    """``1,2,5`` or ``1-10`` or a mix: ``1-3,7``. Each seed within the pipeline's seed range,
    at most ``MAX_SWEEP_SEEDS`` in all (counted before a range is expanded), none twice."""
    from ..api.contract import MAX_SWEEP_SEEDS

    seeds: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        lo, hi = _seed_range(part)
        if len(seeds) + (hi - lo + 1) > MAX_SWEEP_SEEDS:
            raise argparse.ArgumentTypeError(
                f"--seeds: more than {MAX_SWEEP_SEEDS:,} seeds (at {part!r}); split the sweep into several runs"
            )
        seeds += range(lo, hi + 1)
    if not seeds:
        raise argparse.ArgumentTypeError("--seeds: no seed given")
    seen: set[int] = set()
    for seed in seeds:
        if seed in seen:
            raise argparse.ArgumentTypeError(f"--seeds: seed {seed} is given more than once")
        seen.add(seed)
    return seeds


def _seed_range(part: str) -> tuple[int, int]:
    """``a-b`` or ``a`` as (first, last), both checked against the seed policy."""
    from ..api.contract import seed_problem

    lo, sep, hi = part.partition("-") if not part.startswith("-") else (part, "", "")
    try:
        first, last = (int(lo), int(hi)) if sep else (int(part), int(part))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds: {part!r} is not an integer or a range a-b") from None
    for seed in (first, last):
        if problem := seed_problem(seed):
            raise argparse.ArgumentTypeError(f"--seeds: {problem}")
    if last < first:
        raise argparse.ArgumentTypeError(f"--seeds: range {part!r} ends before it starts")
    return first, last


def non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative; a cap must be 0 or more")
    return value


def positive(text: str) -> int:
    value = non_negative(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is too small; at least 1 is needed")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vidu-pipeline", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def data_dir_arg(p):
        p.add_argument(
            "--data-dir",
            default=os.environ.get("VIDU_DATA_DIR", "data"),
            help="folder for the cache, ledger, videos and lineage (default: data)",
        )

    def ledger_url_arg(p):
        p.add_argument(
            "--ledger-url",
            default=os.environ.get("VIDU_LEDGER_URL", "").strip(),
            help="the ledger's SQLAlchemy URL, e.g. postgresql+psycopg://USER:PASSWORD@HOST:5432/DB "
            "(env VIDU_LEDGER_URL; default: SQLite in the data folder)",
        )

    g = sub.add_parser("generate", help="run the whole pipeline on a catalog until every request has ended")
    data_dir_arg(g)
    ledger_url_arg(g)
    g.add_argument("--catalog", help="catalog folder (default: <data-dir>/catalog)")
    g.add_argument("--seeds", type=parse_seeds, help="override the sweep's seeds, e.g. 1-4 or 1,2,7")
    g.add_argument("--dry-run", action="store_true", help="validate and plan; submit nothing")
    g.add_argument(
        "--max-tasks", type=non_negative, help="submit at most N tasks in this run (env VIDU_MAX_TASKS_PER_RUN)"
    )
    g.add_argument(
        "--max-tasks-per-day", type=non_negative, help="cap submits in any 24 h (env VIDU_MAX_TASKS_PER_DAY)"
    )
    g.add_argument(
        "--price-per-task",
        type=float,
        default=_env_float("VIDU_PRICE_PER_TASK"),
        help="price of one task, to show the cost of a dry run (env VIDU_PRICE_PER_TASK)",
    )
    g.add_argument("--retry-budget", type=positive, default=3, help="submit attempts per request (default 3)")
    g.add_argument(
        "--resubmit-unknown",
        action="store_true",
        help="also resubmit requests whose earlier submit had an unknown outcome (may pay twice)",
    )
    g.add_argument("--strict-images", action="store_true", help="reject images that would need re-encoding")
    g.add_argument("--allow-outside-paths", action="store_true", help="let catalog paths leave the catalog folder")
    g.add_argument("--timeout", type=float, default=6 * 3600, help="give up waiting after this many seconds")
    g.add_argument("--no-contact-sheet", action="store_true")

    s = sub.add_parser("status", help="counts by ledger state, the oldest pending task, the unknown ones")
    data_dir_arg(s)
    ledger_url_arg(s)
    s.add_argument("--json", action="store_true")

    r = sub.add_parser("reproduce", help="submit a finished request again (one paid task) and compare the video")
    data_dir_arg(r)
    ledger_url_arg(r)
    r.add_argument("request_id")
    r.add_argument("--yes", action="store_true", help="submit without asking (needed when stdin is not a terminal)")
    r.add_argument("--max-tasks", type=non_negative, help="cap as for generate (env VIDU_MAX_TASKS_PER_RUN)")
    r.add_argument("--max-tasks-per-day", type=non_negative, help="cap as for generate (env VIDU_MAX_TASKS_PER_DAY)")
    r.add_argument("--timeout", type=float, default=3600)

    e = sub.add_parser("export", help="write the current dataset as a videofolder, WebDataset shards and a card")
    data_dir_arg(e)
    e.add_argument("--out", help="export folder (default: <data-dir>/export)")
    e.add_argument("--shard-size", type=positive, default=100, help="samples per WebDataset shard (default 100)")
    e.add_argument(
        "--catalog", help="catalog folder, for quality thresholds and licences (default: <data-dir>/catalog)"
    )

    from ..simulator import cli as simulator_cli

    sim = sub.add_parser("simulator", help="run the local Vidu simulator as a standalone server")
    simulator_cli.add_arguments(sim)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "simulator":
        from ..simulator import cli as simulator_cli

        return simulator_cli.run(args)
    install_stop_handlers()
    quiet_dagster()
    from ..api import errors
    from ..export import ExportProblem
    from .generate import generate
    from .reproduce import reproduce
    from .settings import CatalogProblem
    from .status import status

    try:
        if args.command == "generate":
            return generate(args)
        if args.command == "status":
            return status(args)
        if args.command == "export":
            from ..export import command as export_command

            return export_command(args.data_dir, args.out, args.shard_size, args.catalog)
        return reproduce(args)
    except (CatalogProblem, errors.ConfigurationError, ExportProblem) as exc:
        return fail(str(exc), EXIT_USAGE)
    except errors.AuthError as exc:
        return fail(
            f"the Vidu API refused the key ({exc}); check VIDU_API_KEY (and the account's credit); "
            "nothing more was submitted",
            EXIT_USAGE,
        )
    except Exception as exc:
        if not disk_full(exc):
            raise
        return fail(
            f"{disk_message(exc)}; free some space and run the same command again (what was recorded is kept)",
            EXIT_FAILED,
        )
    except KeyboardInterrupt as exc:
        print(
            "\ninterrupted: the ledger is consistent; run the same command again to resume "
            "(nothing already submitted is paid for twice)",
            file=sys.stderr,
        )
        return 128 + getattr(exc, "signum", signal.SIGINT)


def fail(message: str, code: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def _env_float(name: str) -> float | None:
    value = os.environ.get(name, "").strip()
    return float(value) if value else None
