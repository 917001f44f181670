"""``vidu-pipeline``: generate a dataset headless, to completion, on the same Dagster
definitions and instance that ``dagster dev`` shows; plus status, reproduce and the simulator.

``generate`` materializes the catalog assets, submits the new requests, then evaluates the
task sensor in a loop and executes the runs it asks for in this process (no daemon needed),
until every request of the catalog has reached an end.
"""

from __future__ import annotations

import logging
import signal
import sys

from .exit_codes import EXIT_CAPPED, EXIT_FAILED, EXIT_OK, EXIT_USAGE
from .parser import build_parser
from .signals import disk_full, disk_message, install_stop_handlers, quiet_dagster

__all__ = ["EXIT_CAPPED", "EXIT_FAILED", "EXIT_OK", "EXIT_USAGE", "build_parser", "main"]


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

            return export_command(args.data_dir, args.out, args.shard_size, args.catalog, args.storage_root)
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
