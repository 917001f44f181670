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
import sys

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_CAPPED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

DAGSTER_YAML = """\
# Written by vidu-pipeline. Pools cap how many API-calling steps run at once across runs.
concurrency:
  pools:
    default_limit: 2
telemetry:
  enabled: false
"""


def parse_seeds(text: str) -> list[int]:
    """``1,2,5`` or ``1-10`` or a mix: ``1-3,7``."""
    seeds: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        lo, sep, hi = part.partition("-") if not part.startswith("-") else (part, "", "")
        try:
            seeds += list(range(int(lo), int(hi) + 1)) if sep else [int(part)]
        except ValueError:
            raise argparse.ArgumentTypeError(f"--seeds: {part!r} is not an integer or a range a-b") from None
    if not seeds:
        raise argparse.ArgumentTypeError("--seeds: no seed given")
    return list(dict.fromkeys(seeds))


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
        p.add_argument("--data-dir", default=os.environ.get("VIDU_DATA_DIR", "data"),
                       help="folder for the cache, ledger, videos and lineage (default: data)")

    g = sub.add_parser("generate", help="run the whole pipeline on a catalog until every request has ended")
    data_dir_arg(g)
    g.add_argument("--catalog", help="catalog folder (default: <data-dir>/catalog)")
    g.add_argument("--seeds", type=parse_seeds, help="override the sweep's seeds, e.g. 1-4 or 1,2,7")
    g.add_argument("--dry-run", action="store_true", help="validate and plan; submit nothing")
    g.add_argument("--max-tasks", type=non_negative, help="submit at most N tasks in this run (env VIDU_MAX_TASKS_PER_RUN)")
    g.add_argument("--max-tasks-per-day", type=non_negative, help="cap submits in any 24 h (env VIDU_MAX_TASKS_PER_DAY)")
    g.add_argument("--price-per-task", type=float, default=_env_float("VIDU_PRICE_PER_TASK"),
                   help="price of one task, to show the cost of a dry run (env VIDU_PRICE_PER_TASK)")
    g.add_argument("--retry-budget", type=positive, default=3, help="submit attempts per request (default 3)")
    g.add_argument("--resubmit-unknown", action="store_true",
                   help="also resubmit requests whose earlier submit had an unknown outcome (may pay twice)")
    g.add_argument("--strict-images", action="store_true", help="reject images that would need re-encoding")
    g.add_argument("--allow-outside-paths", action="store_true", help="let catalog paths leave the catalog folder")
    g.add_argument("--timeout", type=float, default=6 * 3600, help="give up waiting after this many seconds")
    g.add_argument("--no-contact-sheet", action="store_true")

    s = sub.add_parser("status", help="counts by ledger state, the oldest pending task, the unknown ones")
    data_dir_arg(s)
    s.add_argument("--json", action="store_true")

    r = sub.add_parser("reproduce", help="resubmit a finished request from its lineage row and compare the video")
    data_dir_arg(r)
    r.add_argument("request_id")
    r.add_argument("--timeout", type=float, default=3600)

    from .simulator import cli as simulator_cli

    sim = sub.add_parser("simulator", help="run the local Vidu simulator as a standalone server")
    simulator_cli.add_arguments(sim)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "simulator":
        from .simulator import cli as simulator_cli

        return simulator_cli.run(args)
    quiet_dagster()
    from .generate import CatalogProblem, generate, reproduce, status

    try:
        if args.command == "generate":
            return generate(args)
        if args.command == "status":
            return status(args)
        return reproduce(args)
    except CatalogProblem as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("\ninterrupted: the ledger is consistent; run the same command again to resume "
              "(nothing already submitted is paid for twice)", file=sys.stderr)
        return EXIT_INTERRUPTED


def quiet_dagster() -> None:
    """Dagster's beta notices and per-event INFO lines are for library authors and the UI;
    on the command line the progress line and the summary say what matters."""
    import warnings

    import dagster

    for category in (dagster.BetaWarning, dagster.PreviewWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    logging.getLogger("dagster").setLevel(logging.WARNING)


def _env_float(name: str) -> float | None:
    value = os.environ.get(name, "").strip()
    return float(value) if value else None


if __name__ == "__main__":
    sys.exit(main())
