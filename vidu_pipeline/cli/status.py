"""``vidu-pipeline status``: the ledger's counts, read-only (works on a read-only folder)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..defs.resources import PipelineResource
from ..ledger import UNKNOWN
from .exit_codes import EXIT_OK
from .settings import check_ledger_reachable


def status(args) -> int:
    pipeline = PipelineResource(data_dir=str(Path(args.data_dir).resolve()), ledger_url=args.ledger_url or "")
    if not pipeline.ledger_url and not (pipeline.root / "ledger.sqlite").exists():
        print(f"no ledger in {pipeline.root}: nothing generated yet")
        return EXIT_OK
    check_ledger_reachable(pipeline.ledger_location)
    ledger = pipeline.read_only_ledger()  # looking writes nothing: works on a read-only folder
    try:
        if not ledger.exists():
            print(f"no ledger at {ledger.url}: nothing generated yet")
            return EXIT_OK
        counts = ledger.counts_by_state()
        oldest = ledger.oldest_pending()
        unknown = ledger.rows(states=[UNKNOWN])
    finally:
        ledger.close()
    if args.json:
        print(
            json.dumps(
                {
                    "counts": counts,
                    "oldest_pending": oldest
                    and {
                        "request_id": oldest.request_id,
                        "state": oldest.state,
                        "task_id": oldest.task_id,
                        "age_s": round(time.time() - oldest.created_at),
                    },
                    "unknown": [
                        {"request_id": r.request_id, "task_id": r.task_id, "reason": r.last_error} for r in unknown
                    ],
                },
                indent=2,
            )
        )
        return EXIT_OK
    print("  ".join(f"{k}: {v}" for k, v in counts.items()))
    if oldest:
        print(
            f"oldest pending: {oldest.request_id} ({oldest.state}, task {oldest.task_id or '-'}, "
            f"{time.time() - oldest.created_at:.0f} s old)"
        )
    for row in unknown:
        print(f"unknown: {row.request_id} (task {row.task_id or '?'}): {row.last_error}")
    return EXIT_OK
