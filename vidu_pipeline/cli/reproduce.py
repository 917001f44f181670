"""``vidu-pipeline reproduce``: a finished request submitted again (one paid task, after
confirmation and under the spend caps) and its video compared with the original."""

from __future__ import annotations

import dataclasses
import sys
import time
import uuid

from .. import tasks
from ..api import errors
from ..defs.resources import PipelineResource, vidu_resource_from_env
from ..generation_requests import RequestSpec
from ..ledger import PLANNED, SUBMITTED, SUBMITTING, SUCCEEDED
from ..mp4 import VideoInvalid
from ..videos import collect_video, lineage_row
from .exit_codes import EXIT_CAPPED, EXIT_FAILED, EXIT_OK
from .progress import video_problems
from .settings import CatalogProblem, check_endpoint_settings, pipeline_from_args


def reproduce(args) -> int:
    """Submit a finished request again as its own ledger row ``<request_id>-r<N>`` (same spec,
    the effective seed), under the spend caps and after confirmation, then compare videos.

    Paid for once like any request: an interrupted reproduction is resumed by the next
    ``reproduce``, not submitted again. Files are named after request ids, never task ids.
    """
    pipeline = pipeline_from_args(args)
    if not (pipeline.root / "ledger.sqlite").exists() and not pipeline.ledger_url:
        raise CatalogProblem(f"no ledger in {pipeline.root}: nothing generated yet")
    ledger = pipeline.ledger()
    original = ledger.get(args.request_id)
    if original is None:
        raise CatalogProblem(f"no request {args.request_id!r} in the ledger of {pipeline.root}")
    if original.state != SUCCEEDED or not original.video_sha256:
        raise CatalogProblem(f"request {args.request_id} has no video to compare (state {original.state})")
    check_endpoint_settings()
    tasks.recover_abandoned(ledger)
    with vidu_resource_from_env().get_client(pipeline.simulator_state_dir) as (client, endpoint):
        row, number = open_reproduction(ledger, original)
        if row is None or row.state == PLANNED:
            confirm_paid_submit(args, endpoint, original.request_id)
            row = row or plan_reproduction(ledger, original, number)
            code = submit_reproduction(pipeline, ledger, client, row.request_id)
            if code is not None:
                return code
        elif row.state == SUBMITTING:
            raise CatalogProblem(f"{row.request_id} is being submitted by {row.owner}; wait for it and run again")
        else:
            print(f"resuming {row.request_id} (task {row.task_id}): nothing new is submitted", file=sys.stderr)
        row = wait_for_reproduction(ledger, client, ledger.get(row.request_id), args.timeout)
        if row.state != SUCCEEDED:
            print(f"{row.request_id}: {row.state}: {row.last_error}", file=sys.stderr)
            return EXIT_FAILED
        if not row.video_sha256:
            try:
                collect_video(
                    ledger,
                    client,
                    row.request_id,
                    videos_dir=pipeline.root / "reproductions",
                    render_scale=endpoint.render_scale,
                )
            except (VideoInvalid, errors.ViduError) as exc:
                print(
                    f"error: {row.request_id}: no good video ({exc}); run reproduce again to retry the "
                    "download (nothing new is submitted)",
                    file=sys.stderr,
                )
                return EXIT_FAILED
        row = _must_get(ledger, row.request_id)
    pipeline.lineage().append([lineage_row(row)])
    ledger.mark_lineage([row])
    same = row.video_sha256 == original.video_sha256
    for problem in video_problems(row):
        print(f"{row.request_id}: video does not match its request: {problem}", file=sys.stderr)
    print(
        f"original   {original.video_sha256}\nreproduced {row.video_sha256}\n"
        f"{'MATCH' if same else 'DIFFERENT'}: {row.video_path}"
    )
    return EXIT_OK if same else EXIT_FAILED


def open_reproduction(ledger, original):
    """The latest reproduction if it is still open (planned, in flight, or succeeded without
    its video), else None; and the number a new one would take."""
    n, latest = 1, None
    while (row := ledger.get(f"{original.request_id}-r{n}")) is not None:
        latest, n = row, n + 1
    if latest is not None and (
        latest.state in (PLANNED, SUBMITTING, SUBMITTED) or (latest.state == SUCCEEDED and not latest.video_sha256)
    ):
        return latest, n
    return None, n


def plan_reproduction(ledger, original, n: int):
    """A planned ledger row ``<request_id>-r<n>``: the original's spec with its effective seed."""
    spec = RequestSpec.from_json(original.spec_json)
    seed = original.effective_seed if original.effective_seed is not None else spec.seed
    spec = dataclasses.replace(spec, request_id=f"{original.request_id}-r{n}", seed=seed)
    ledger.plan([spec.planned()])
    return ledger.get(spec.request_id)


def confirm_paid_submit(args, endpoint, request_id: str) -> None:
    """Ask before paying: on a terminal, a y/N question; otherwise ``--yes`` is required."""
    if endpoint.simulated:
        print(f"reproducing {request_id} on the {endpoint.describe()}: nothing is paid", file=sys.stderr)
        return
    if args.yes:
        return
    if not sys.stdin.isatty():
        raise CatalogProblem(
            f"reproducing {request_id} submits 1 paid task to the {endpoint.describe()}; "
            "stdin is not a terminal, so pass --yes to confirm (nothing was submitted)"
        )
    answer = input(f"Submit 1 paid task to reproduce {request_id}? [y/N] ")
    if answer.strip().lower() not in ("y", "yes"):
        raise CatalogProblem("not confirmed: nothing was submitted")


def submit_reproduction(pipeline: PipelineResource, ledger, client, request_id: str) -> int | None:
    """Claim (caps checked in the claim) and submit; an exit code when nothing was submitted."""
    [outcome] = tasks.submit_requests(
        ledger,
        client,
        [request_id],
        data_uri_for=pipeline.image_cache().data_uri,
        caps=pipeline.caps(uuid.uuid4().hex[:12]),
        owner=tasks.owner_id(),
        retry_budget=pipeline.retry_budget,
        policy=pipeline.polling(),
        workers=1,
    )
    if outcome.submitted:
        print(f"submitted {request_id} as task {outcome.task_id}; waiting…", file=sys.stderr)
        return None
    print(f"error: {request_id} not submitted: {outcome.message}", file=sys.stderr)
    return EXIT_CAPPED if outcome.message.startswith("cap reached") else EXIT_FAILED


def wait_for_reproduction(ledger, client, row, timeout_s: float):
    """Poll the reproduction's task to its end and record the outcome in the ledger."""
    if row.state != SUBMITTED:
        return row
    try:
        result = client.wait(row.task_id, timeout_s=timeout_s)
    except errors.TaskFailed as exc:
        ledger.record_failed(row.request_id, exc.reason or str(exc), task_id=row.task_id)
    except TimeoutError as exc:
        raise CatalogProblem(f"{exc}; run reproduce again to keep waiting (nothing new is submitted)") from None
    else:
        finished = (result.debug_times_ms.get("complete_time_ms") or time.time() * 1000) / 1000.0
        ledger.record_succeeded(row.request_id, task_id=row.task_id, effective_seed=result.seed, finished_at=finished)
    return ledger.get(row.request_id)


def _must_get(ledger, request_id: str):
    """A row this command planned itself: its absence is a broken ledger, said plainly."""
    row = ledger.get(request_id)
    if row is None:
        raise CatalogProblem(f"{request_id} vanished from the ledger while reproducing it")
    return row
