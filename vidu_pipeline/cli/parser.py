"""The command line's arguments: one function per command, and the types that check values
(seeds, caps, rounds) with a message that names the flag and the limit."""

from __future__ import annotations

import argparse
import os

DESCRIPTION = (
    "vidu-pipeline: generate a dataset headless, to completion, on the same Dagster definitions and "
    "instance that `dagster dev` shows; plus status, reproduce, export and the simulator."
)


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


def regeneration_rounds(text: str) -> int:
    from ..regeneration import MAX_ROUNDS

    value = positive(text)
    if value > MAX_ROUNDS:
        raise argparse.ArgumentTypeError(f"at most {MAX_ROUNDS} rounds, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vidu-pipeline", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_generate, _status, _reproduce, _export):
        add(sub)
    from ..simulator import cli as simulator_cli

    simulator_cli.add_arguments(sub.add_parser("simulator", help="run the local Vidu simulator as a standalone server"))
    return parser


def _common(p: argparse.ArgumentParser, *, ledger: bool = True) -> None:
    """The data folder and the storage root, and the ledger's URL for the commands that read
    or write the ledger."""
    p.add_argument(
        "--data-dir",
        default=os.environ.get("VIDU_DATA_DIR", "data"),
        help="folder for the cache, ledger, videos and lineage (default: data)",
    )
    p.add_argument(
        "--storage-root",
        default=os.environ.get("VIDU_STORAGE_ROOT", "").strip(),
        help="where the dataset goes (videos, thumbnails, lineage): a folder or an fsspec URL such as "
        "s3://bucket/prefix (env VIDU_STORAGE_ROOT; default: the data folder)",
    )
    if ledger:
        p.add_argument(
            "--ledger-url",
            default=os.environ.get("VIDU_LEDGER_URL", "").strip(),
            help="the ledger's SQLAlchemy URL, e.g. postgresql+psycopg://USER:PASSWORD@HOST:5432/DB "
            "(env VIDU_LEDGER_URL; default: SQLite in the data folder)",
        )


def _generate(sub) -> None:
    g = sub.add_parser("generate", help="run the whole pipeline on a catalog until every request has ended")
    _common(g)
    g.add_argument("--catalog", help="catalog folder (default: <data-dir>/catalog)")
    g.add_argument("--seeds", type=parse_seeds, help="override the sweep's seeds, e.g. 1-4 or 1,2,7")
    g.add_argument("--dry-run", action="store_true", help="validate and plan; submit nothing")
    _caps(g, "submit at most N tasks in this run", "cap submits in any 24 h")
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
    g.add_argument(
        "--regenerate-failed-quality",
        action="store_true",
        help="pay for a new seed of each catalog clip that fails a quality gate (frozen, blank, "
        "unlike its references, a near-duplicate seed), under the spend caps",
    )
    g.add_argument(
        "--regeneration-rounds",
        type=regeneration_rounds,
        default=2,
        help="replacements paid at most per failing clip, when a replacement fails too (default 2)",
    )


def _caps(p: argparse.ArgumentParser, per_run: str, per_day: str) -> None:
    p.add_argument("--max-tasks", type=non_negative, help=f"{per_run} (env VIDU_MAX_TASKS_PER_RUN)")
    p.add_argument("--max-tasks-per-day", type=non_negative, help=f"{per_day} (env VIDU_MAX_TASKS_PER_DAY)")


def _status(sub) -> None:
    s = sub.add_parser("status", help="counts by ledger state, the oldest pending task, the unknown ones")
    _common(s)
    s.add_argument("--json", action="store_true")


def _reproduce(sub) -> None:
    r = sub.add_parser("reproduce", help="submit a finished request again (one paid task) and compare the video")
    _common(r)
    r.add_argument("request_id")
    r.add_argument("--yes", action="store_true", help="submit without asking (needed when stdin is not a terminal)")
    _caps(r, "cap as for generate", "cap as for generate")
    r.add_argument("--timeout", type=float, default=3600)


def _export(sub) -> None:
    e = sub.add_parser("export", help="write the current dataset as a videofolder, WebDataset shards and a card")
    _common(e, ledger=False)
    e.add_argument("--out", help="export folder (default: <data-dir>/export)")
    e.add_argument("--shard-size", type=positive, default=100, help="samples per WebDataset shard (default 100)")
    e.add_argument(
        "--catalog", help="catalog folder, for quality thresholds and licences (default: <data-dir>/catalog)"
    )


def _env_float(name: str) -> float | None:
    value = os.environ.get(name, "").strip()
    return float(value) if value else None
