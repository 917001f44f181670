"""``vidu-pipeline``: generate a dataset headless, to completion, on the same Dagster
definitions and instance that ``dagster dev`` shows; plus status, reproduce and the simulator.

``generate`` materializes the catalog assets, submits the new requests, then evaluates the
task sensor in a loop and executes the runs it asks for in this process (no daemon needed),
until every request of the catalog has reached an end.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import sys
import threading
from typing import NoReturn

from .exit_codes import EXIT_CAPPED, EXIT_FAILED, EXIT_OK, EXIT_USAGE
from .parser import build_parser
from .signals import disk_full, disk_message, install_stop_handlers, quiet_dagster

__all__ = ["EXIT_CAPPED", "EXIT_FAILED", "EXIT_OK", "EXIT_USAGE", "build_parser", "main", "run"]


def run() -> NoReturn:
    """The ``vidu-pipeline`` script: :func:`main`, then :func:`exit_now`."""
    exit_now(main())


def exit_now(code: int) -> NoReturn:
    """Exit without the interpreter's teardown of every module and object (Dagster's heap took
    ~0.7 s of every command's wall time). By now every ledger write is committed and every file
    closed; the atexit handlers (logging's flush, stopping an embedded simulator, removing the
    scratch folder) still run. With another non-daemon thread alive, the normal exit waits for it.
    """
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.exit(code)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe or stream: nothing to keep
            stream.flush()
    os._exit(code)


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
