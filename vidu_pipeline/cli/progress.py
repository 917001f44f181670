"""What ``generate`` shows: the progress line, the dataset's contact sheet and the final
summary with its exit code."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from .. import quality
from ..defs.resources import PipelineResource
from ..ledger import FAILED, PLANNED, SUCCEEDED, UNKNOWN
from .exit_codes import EXIT_CAPPED, EXIT_FAILED, EXIT_OK


class Progress:
    """One status line: rewritten in place on a terminal, printed now and then otherwise."""

    def __init__(self):
        self.tty = sys.stderr.isatty()
        self.last = 0.0
        self.text = ""

    def show(self, s: dict) -> None:
        total = sum(s[k] for k in ("planned", "submitted", "running", "done", "mismatched", "failed", "unknown"))
        width = 24
        ended = s["done"] + s["mismatched"] + s["failed"] + s["unknown"]
        filled = int(width * ended / total) if total else width
        self.text = (
            f"[{'#' * filled}{'.' * (width - filled)}] submitted {s['submitted']} | running {s['running']} "
            f"| done {s['done']} | "
            + (f"mismatched {s['mismatched']} | " if s["mismatched"] else "")
            + f"failed {s['failed']} | unknown {s['unknown']} | planned {s['planned']}"
        )
        now = time.monotonic()
        if self.tty:
            print("\r" + self.text, end="", file=sys.stderr, flush=True)
        elif now - self.last > 5:
            print(self.text, file=sys.stderr, flush=True)
            self.last = now

    def done(self) -> None:
        print(("\r" if self.tty else "") + self.text, file=sys.stderr, flush=True)


def write_contact_sheet(pipeline: PipelineResource) -> Path | None:
    """The dataset's contact sheet: every current video of the data dir (the dataset, not one
    run's requests), paged past ``sheets.TILES_PER_PAGE`` tiles
    (contact_sheet.png, contact_sheet-2.png, …), each tile labelled with its request id and
    quality flags. Returns the first page, or None when there is no video yet."""
    from .. import sheets
    from ..export import ExportProblem, thresholds_for

    try:
        thresholds = thresholds_for(pipeline.catalog_path)
    except ExportProblem:  # a broken sweep.yaml is reported by the catalog asset
        thresholds = quality.Thresholds()
    current = sheets.current_rows(pipeline.ledger().rows(states=[SUCCEEDED]), pipeline.videos_dir)
    items = [(sheets.tile_label(r, thresholds), _thumbnail_or_video(pipeline, r)) for r in current]
    pages = sheets.write_pages(pipeline.root, items) if items else []
    return pages[0] if pages else None


def _thumbnail_or_video(pipeline: PipelineResource, row) -> Path:
    """The frame the videos asset already saved (no second decode), else the video itself."""
    thumb = pipeline.root / "thumbnails" / f"{row.request_id}.png"
    return thumb if thumb.exists() else Path(row.video_path)


def video_problems(row) -> list[str]:
    """How a stored video differs from its request (size, duration, audio), from its probe."""
    return list((row.probe or {}).get("problems") or [])


def summarize(pipeline: PipelineResource, rows, rejected, sheet: Path | None, *, timed_out: bool) -> int:
    """Print the summary; exit 0 only when every request has a video that matches it."""
    by_state: dict[str, int] = {}
    failed = []
    for row in rows:
        if row is None:
            continue
        stored = row.state == SUCCEEDED and row.video_sha256
        problems = video_problems(row) if stored else []
        key = ("mismatched" if problems else "succeeded") if stored else row.state
        by_state[key] = by_state.get(key, 0) + 1
        if problems:
            failed.append(f"  {row.request_id}: mismatched: video does not match its request: {'; '.join(problems)}")
        elif row.state in (FAILED, UNKNOWN) or (row.state == SUCCEEDED and not row.video_sha256):
            failed.append(f"  {row.request_id}: {row.state}: {row.last_error or 'no video yet'}")
    print("\nsummary")
    print(f"  requests: {len(rows)}  " + "  ".join(f"{k}: {v}" for k, v in sorted(by_state.items())))
    print(
        f"  rejected inputs: {len(rejected)}"
        + (f" (see {pipeline.reports_dir / 'rejections.csv'})" if len(rejected) else "")
    )
    print(f"  videos: {pipeline.videos_dir}")
    print(f"  lineage: {pipeline.lineage().location}")
    if sheet:
        print(f"  contact sheet: {sheet}")
    if failed:
        print("not succeeded:")
        print("\n".join(failed[:50]))
    planned = by_state.get(PLANNED, 0)
    if planned:
        print(f"  {planned} request(s) held back by a spend cap: they stay planned; run again to continue")
    if timed_out:
        print("  stopped at --timeout; run again to continue")
    if failed or timed_out:
        return EXIT_FAILED
    return EXIT_CAPPED if planned else EXIT_OK
