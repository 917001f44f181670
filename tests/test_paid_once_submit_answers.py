"""Issue 10, case 2: what each submit answer does to the ledger, over real HTTP on loopback.

Only answers that prove no task was created may put a request back to ``planned`` (counting
against nothing): 429, a connection that never opened, a refused key. A refused request
(400, another 4xx) ends ``failed`` with the service's words and counts against the retry
budget. Anything else (a redirect, 202, …) may have been paid for: ``unknown``, counted against
the caps, never resent. A refused key stops the batch and is raised once the submits in flight
are recorded.
"""

from __future__ import annotations

import http.server
import json
import socket
import threading

import pytest
from dagster import AssetKey, instance_for_test, materialize
from support import plan_catalog

from drills.run_drill import make_catalog
from vidu_pipeline import tasks
from vidu_pipeline.api import errors
from vidu_pipeline.api.client import RetryPolicy, ViduClient
from vidu_pipeline.api.contract import SUBMIT_PATH
from vidu_pipeline.defs.assets import ALL_ASSETS
from vidu_pipeline.defs.resources import PipelineResource, ViduResource
from vidu_pipeline.ledger import Ledger, SpendCaps

KEY = "answers-key"
CAPS = SpendCaps(per_run=None, per_day=None, run_id="answers")


class AnsweringServer:
    """Answers every submit with ``status`` (and a JSON error body like the API's)."""

    def __init__(self):
        self.status = 200
        self.task_id_padding = ""  # appended to each task id: services choose their ids' length
        self.posts = 0
        self.followed = 0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _answer(self, status, body: bytes, headers=()):
                self.send_response(status)
                for name, value in headers:
                    self.send_header(name, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.path != SUBMIT_PATH:
                    server.followed += 1
                    return self._answer(200, b'{"task_id": "followed-redirect"}')
                server.posts += 1
                status = server.status
                if status == 200:
                    return self._answer(
                        200, json.dumps({"task_id": f"task-{server.posts}{server.task_id_padding}"}).encode()
                    )
                if status == 301:
                    return self._answer(301, b"", [("Location", "/moved/reference2video")])
                if status == 202:
                    return self._answer(202, b'{"state": "accepted"}')
                reason = {
                    401: "FAILED_TO_AUTH",
                    404: "NOT_FOUND",
                    429: "RATE_LIMIT_EXCEEDED",
                    400: "INVALID_REQUEST_BODY",
                }.get(status, "OTHER")
                body = {"code": status, "reason": reason, "message": f"service says {reason.lower()}"}
                self._answer(status, json.dumps(body).encode())

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def planned_catalog(tmp_path_factory):
    """Six requests planned through Dagster (the image cache holds their references)."""
    root = tmp_path_factory.mktemp("answers")
    pipeline, ids = plan_catalog(root, prompts=6)
    return pipeline, ids


@pytest.fixture
def world(planned_catalog, tmp_path):
    """A fresh ledger holding the planned requests, the answering server, a client without
    retries (so a 429 is seen once)."""
    pipeline, ids = planned_catalog
    source = Ledger(f"sqlite:///{pipeline.root / 'ledger.sqlite'}")
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.sqlite'}")
    from vidu_pipeline.ledger import PlannedRequest

    ledger.plan(PlannedRequest(r.request_id, r.subject_id, r.seed, r.fingerprint, r.spec_json) for r in source.rows())
    source.close()
    with AnsweringServer() as server, ViduClient(KEY, server.base_url, retry=RetryPolicy(retries=0)) as client:

        def submit(request_ids, *, budget=3, workers=1, client_=client):
            return tasks.submit_requests(
                ledger,
                client_,
                request_ids,
                data_uri_for=pipeline.image_cache().data_uri,
                caps=CAPS,
                owner=tasks.owner_id("answers"),
                retry_budget=budget,
                workers=workers,
            )

        yield ledger, server, submit, ids
    ledger.close()


def outcomes(ledger, rid):
    return [a.outcome for a in ledger.attempts_for(rid)]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("status", [301, 202])
def test_an_answer_that_does_not_prove_nothing_was_created_is_unknown_and_never_resent(world, status):
    ledger, server, submit, ids = world
    server.status = status
    [out] = submit(ids[:1])
    assert not out.submitted and out.message.startswith("outcome unknown")
    row = ledger.get(ids[0])
    assert row.state == "unknown" and "a paid task may exist" in row.last_error
    assert outcomes(ledger, ids[0]) == ["unknown"]
    assert ledger.submits_since(0) == 1  # counted against the spend caps
    assert server.followed == 0  # a submit never follows a redirect
    server.status = 200
    [again] = submit(ids[:1])
    assert again.message == "unknown outcome: not resubmitted" and server.posts == 1


@pytest.mark.timeout(120)
def test_a_404_is_never_put_back_to_planned(world):
    """Before the fix a 404 (or any unforeseen 4xx) went back to ``planned`` with a
    non-billable attempt: each run sent it again. Now it ends failed with the service's words
    (SubmitRejected) — or unknown while the client still calls it TaskNotFound."""
    ledger, server, submit, ids = world
    server.status = 404
    submit(ids[:1], budget=1)
    row = ledger.get(ids[0])
    assert row.state in ("failed", "unknown"), row
    assert "service says not_found" in row.last_error
    assert outcomes(ledger, ids[0]) in (["refused"], ["unknown"])
    [again] = submit(ids[:1], budget=1)
    assert not again.submitted and server.posts == 1  # within its budget of one: never again


@pytest.mark.timeout(120)
def test_a_refused_key_stops_the_batch_and_is_raised(world):
    ledger, server, submit, ids = world
    server.status = 401
    with pytest.raises(errors.AuthError, match="service says failed_to_auth"):
        submit(ids[:4], budget=1)
    assert server.posts == 1  # nothing more was sent after the refusal
    first = ledger.get(ids[0])
    assert (first.state, first.attempts) == ("planned", 1)
    assert outcomes(ledger, ids[0]) == ["rejected"]
    assert all(ledger.get(r).attempts == 0 for r in ids[1:4])  # never claimed
    assert ledger.submits_since(0) == 0  # not billable
    # Not counted against the budget: with the key fixed it is sent, even with a budget of 1.
    server.status = 200
    [out] = submit(ids[:1], budget=1)
    assert out.submitted and ledger.get(ids[0]).state == "submitted"


@pytest.mark.timeout(120)
def test_a_refused_key_with_submits_in_flight(world):
    """Four workers: whatever was in flight is recorded before AuthError is raised; nothing is
    left ``submitting`` and no request is lost."""
    ledger, server, submit, ids = world
    server.status = 401
    with pytest.raises(errors.AuthError):
        submit(ids, workers=4)
    states = {ledger.get(r).state for r in ids}
    assert states == {"planned"}
    assert all(set(outcomes(ledger, r)) <= {"rejected"} for r in ids)
    assert server.posts <= 4


@pytest.mark.timeout(120)
def test_rate_limited_and_connection_refused_go_back_to_planned(world, planned_catalog):
    ledger, server, submit, ids = world
    server.status = 429
    submit(ids[:1], budget=1)
    assert ledger.get(ids[0]).state == "planned" and outcomes(ledger, ids[0]) == ["rejected"]
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    with ViduClient(KEY, closed, retry=RetryPolicy(retries=0)) as refused:
        [out] = submit(ids[1:2], budget=1, client_=refused)
    assert out.message.startswith("not sent") and ledger.get(ids[1]).state == "planned"
    # Neither counted: both are sent once the service takes them, within a budget of one.
    server.status = 200
    assert [o.submitted for o in submit(ids[:2], budget=1)] == [True, True]


class RefusingClient:
    """A client whose service refuses the request for good (what the finished client raises
    for a 4xx other than 400/401/403/429)."""

    def __init__(self):
        self.calls = 0

    def submit(self, request):
        self.calls += 1
        raise errors.SubmitRejected("model not available for this account", status=422, reason="UNPROCESSABLE")


@pytest.mark.timeout(120)
def test_submit_rejected_fails_with_the_services_words_and_uses_the_budget(world):
    ledger, _server, submit, ids = world
    client = RefusingClient()
    for _ in range(3):
        submit(ids[:1], budget=2, client_=client)
    assert client.calls == 2  # the budget of two, then no more
    row = ledger.get(ids[0])
    assert row.state == "failed" and row.last_error == "HTTP 422 UNPROCESSABLE: model not available for this account"
    assert outcomes(ledger, ids[0]) == ["refused", "refused"]
    assert ledger.submits_since(0) == 0  # no task was created: nothing billable


@pytest.mark.timeout(180)
def test_a_refused_key_fails_the_dagster_step_with_auth_error(tmp_path):
    """Through ``materialize``: the ``video_tasks`` step fails with AuthError (what the CLI
    maps to exit 2), after recording the one refused attempt; nothing else was sent."""
    make_catalog(tmp_path / "catalog", subjects=1, prompts=3, seeds=1)
    pipeline = PipelineResource(
        data_dir=str(tmp_path / "data"), catalog_dir=str(tmp_path / "catalog"), submit_workers=1
    )
    with AnsweringServer() as server, instance_for_test() as instance:
        server.status = 403
        resources = {"pipeline": pipeline, "vidu": ViduResource(api_key=KEY, base_url=server.base_url)}
        planned = materialize(
            ALL_ASSETS,
            selection=[AssetKey(k) for k in ("catalog", "reference_images", "generation_requests")],
            instance=instance,
            resources=resources,
        )
        ids = sorted(planned.output_for_node("generation_requests")["request_id"])
        keys = instance.get_dynamic_partitions("vidu_requests")
        result = materialize(
            ALL_ASSETS,
            selection=[AssetKey("video_tasks")],
            instance=instance,
            resources=resources,
            raise_on_error=False,
            tags={"dagster/asset_partition_range_start": keys[0], "dagster/asset_partition_range_end": keys[-1]},
        )
        assert not result.success
        [failure] = [e for e in result.all_events if e.is_step_failure]
        error = failure.step_failure_data.error
        assert (error.cause or error).cls_name == "AuthError"
        assert "HTTP 403" in (error.cause or error).message
        assert server.posts == 1
        ledger = pipeline.ledger()
        assert {ledger.get(r).state for r in ids} == {"planned"}
        assert sum(len(ledger.attempts_for(r)) for r in ids) == 1
