"""Contract tests: the real client against the simulator (and tiny fake servers) over real HTTP.

Every test speaks HTTP on loopback. Retry policies are fast; where a delay matters (Retry-After)
urllib3's sleep is recorded instead of waited, so no assertion depends on the wall clock.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import logging
import os
import re
import socket
import stat
import threading
import time
import traceback
import types
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
import urllib3.util.retry
from hostile_server import HostileServer, drip_body, drip_headers, raw, reply, truncated
from support import IMG_A, IMG_B, body, data_uri, image_bytes

from vidu_pipeline.api import client as client_mod
from vidu_pipeline.api import contract, errors
from vidu_pipeline.api.client import RetryPolicy, ViduClient
from vidu_pipeline.api.contract import GenerationRequest
from vidu_pipeline.api.task_result import TaskResult, TaskStatus, Video
from vidu_pipeline.mp4 import VideoInvalid, probe_video
from vidu_pipeline.simulator import FaultConfig, Simulator, SimulatorConfig
from vidu_pipeline.simulator.faults import Roll

KEY = "client-test-key"
SECRET = "sk-SECRET-TEST-1234"
SCALE = 0.1
FAST = RetryPolicy(retries=3, backoff_factor=0.01, backoff_max=0.1)
DATA_URI_RE = re.compile(r"data:image/[^;\s]*;base64,[A-Za-z0-9+/=]{8,}")


# --- images and bodies ------------------------------------------------------------------------


# --- servers and clients ----------------------------------------------------------------------


def sim_config(**overrides) -> SimulatorConfig:
    return SimulatorConfig(**{"api_key": KEY, "latency_s": 0.3, "render_scale": SCALE, **overrides})


@pytest.fixture
def make_sim():
    started = []

    def make(**overrides) -> Simulator:
        sim = Simulator(sim_config(**overrides)).start()
        started.append(sim)
        return sim

    yield make
    for sim in started:
        sim.stop()


@pytest.fixture(scope="module")
def shared_sim():
    """For tests that neither change faults nor count on global stats."""
    with Simulator(sim_config()) as sim:
        yield sim


@pytest.fixture
def make_client():
    made = []

    def make(base_url: str, key: str = KEY, **kw) -> ViduClient:
        kw.setdefault("retry", FAST)
        kw.setdefault("read_timeout", 20.0)
        c = ViduClient(key, base_url, **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def stats(sim: Simulator) -> dict:
    r = requests.get(
        sim.base_url + "/_simulator/stats", headers={"Authorization": f"Bearer {sim.config.api_key}"}, timeout=10
    )
    assert r.status_code == 200
    return r.json()


def fault_seed(endpoint: str, key: str, kind: str, pattern: list[bool], p: float = 0.5, first_n: int = 0) -> int:
    """A FaultConfig seed under which the next calls for (endpoint, key) draw ``kind`` as in
    ``pattern`` (faults are a documented hash of seed, endpoint, kind, key and call number)."""
    for seed in range(1, 100_000):
        config = FaultConfig(seed=seed)
        if all(
            (Roll(config, endpoint, key, first_n + i, None).uniform(kind) < p) == want for i, want in enumerate(pattern)
        ):
            return seed
    raise AssertionError("no seed found")


@pytest.fixture
def sleeps(monkeypatch):
    """Record urllib3's retry sleeps (Retry-After and backoff) instead of waiting them out."""
    recorded: list[float] = []
    monkeypatch.setattr(urllib3.util.retry, "time", types.SimpleNamespace(sleep=recorded.append, time=time.time))
    return recorded


class FakeServer:
    """A tiny loopback HTTP/1.1 server for answers the simulator never gives.

    ``routes[(method, path)] = fn(handler)``; every request is recorded in ``seen``.
    """

    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], object] = {}
        self.seen: list[dict] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _handle(self) -> None:
                path, _, query = self.path.partition("?")
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                fake.seen.append(
                    {"method": self.command, "path": path, "query": query, "headers": dict(self.headers), "body": raw}
                )
                route = fake.routes.get((self.command, path))
                if route is None:
                    return fake.json(self, 404, {"code": 404, "reason": "NOT_FOUND", "message": path})
                route(self)

            do_GET = do_POST = _handle

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def count(self, method: str, path: str) -> int:
        return sum(1 for r in self.seen if r["method"] == method and r["path"] == path)

    @staticmethod
    def send(h, status: int, data: bytes, content_type: str = "application/json", headers=None) -> None:
        h.send_response(status)
        h.send_header("Content-Type", content_type)
        h.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(data)

    @classmethod
    def json(cls, h, status: int, obj, headers=None) -> None:
        cls.send(h, status, json.dumps(obj).encode(), headers=headers)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


@pytest.fixture
def fake():
    server = FakeServer()
    yield server
    server.stop()


def task_body(task_id: str, status: str = "TASK_STATUS_PROCESSING", videos=None, **task) -> dict:
    return {
        "task": {
            "task_id": task_id,
            "task_type": contract.TASK_TYPE,
            "status": status,
            "reason": "",
            "eta": 3,
            "progress_percent": 40,
            **task,
        },
        "extra": {"seed": "158881667"},
        "videos": videos or [],
        "images": [],
        "audios": [],
    }


def succeeded(url: str, task_id: str = "t-1") -> TaskResult:
    return TaskResult(
        task_id=task_id, status=TaskStatus.SUCCEED.value, videos=(Video(url=url, ttl_seconds=3600, type="mp4"),)
    )


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in Path(folder).iterdir() if p.name.endswith(".part")]


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# --- client-side validation: every rule, broken once ----------------------------------------

GIF = image_bytes(200, 200, "GIF")
PNG_128 = image_bytes(128, 128)
CORRUPT_PNG = image_bytes(300, 300)[:200]
TOO_BIG = "data:image/png;base64," + base64.b64encode(bytes(contract.MAX_BASE64_DECODED_BYTES)).decode()
SMALL = data_uri(image_bytes(96, 96))

BROKEN = {
    "images missing": ({"prompt": "p"}, "images: required"),
    "images not a list": (body(images=IMG_A), "images: must be an array of strings, got str"),
    "no images": (body(images=[]), "images: 0 items, between 1 and 7 needed"),
    "eight images": (body(images=[IMG_A] * 8), "images: 8 items, between 1 and 7 needed"),
    "non-string image": (body(images=[IMG_A, 42]), "images[1]: must be a string, got int"),
    "ftp URL": (
        body(images=["ftp://example.com/a.png"]),
        "images[0]: must be an http(s):// URL or a data:image/<type>;base64, URI",
    ),
    "URL without host": (body(images=["https://"]), "images[0]: URL has no host"),
    "data URI without content type": (
        body(images=["data:;base64,AAAA"]),
        "images[0]: data URI must start with data:image/<png|jpeg|jpg|webp>;base64,",
    ),
    "data URI without base64": (body(images=["data:image/png,AAAA"]), "images[0]: data URI must start with"),
    "gif content type": (
        body(images=[data_uri(GIF, "gif")]),
        "images[0]: content type image/gif is not one of png, jpeg, jpg, webp",
    ),
    "bad base64": (body(images=["data:image/png;base64,@@@@"]), "images[0]: invalid base64 payload"),
    "decoded payload of 10 MB": (
        body(images=[TOO_BIG]),
        "images[0]: decoded base64 payload is 10,000,000 bytes, must be under 10,000,000",
    ),
    "96x96 as the fourth image": (
        body(images=[IMG_A, IMG_B, IMG_A, SMALL]),
        "images[3]: 96×96 px, at least 128×128 needed",
    ),
    "127 px wide": (body(images=[data_uri(image_bytes(127, 300))]), "images[0]: 127×300 px, at least 128×128 needed"),
    "600x100 too wide": (
        body(images=[data_uri(image_bytes(600, 100))]),
        "images[0]: aspect ratio 600:100 (6.000) is outside 1:4 … 4:1",
    ),
    "130x600 too tall": (
        body(images=[data_uri(image_bytes(130, 600))]),
        "images[0]: aspect ratio 130:600 (0.217) is outside 1:4 … 4:1",
    ),
    "513x128 just past 4:1": (body(images=[data_uri(image_bytes(513, 128))]), "images[0]: aspect ratio 513:128"),
    "gif declared as png": (body(images=[data_uri(GIF, "png")]), "images[0]: not a PNG, JPEG or WebP image"),
    "jpeg declared as png": (
        body(images=[data_uri(image_bytes(200, 200, "JPEG"), "png")]),
        "images[0]: declared image/png but the bytes are JPEG",
    ),
    "truncated png": (body(images=[data_uri(CORRUPT_PNG)]), "images[0]: truncated or corrupt image data"),
    "prompt missing": ({"images": [IMG_A]}, "prompt: required"),
    "prompt not a string": (body(prompt=7), "prompt: must be a string, got int"),
    "empty prompt": (body(prompt=""), "prompt: must not be empty"),
    "blank prompt": (body(prompt="   "), "prompt: must not be empty"),
    "prompt of 1501 chars": (body(prompt="x" * 1501), "prompt: 1501 characters, at most 1500"),
    "duration 10": (body(duration=10), "duration: 10 is not accepted, only 5"),
    "duration true": (body(duration=True), "duration: True is not accepted, only 5"),
    "duration as string": (body(duration="5"), "duration: '5' is not accepted, only 5"),
    "seed as string": (body(seed="42"), "seed: must be an integer, got str"),
    "seed as float": (body(seed=4.5), "seed: must be an integer, got float"),
    "aspect 4:3": (body(aspect_ratio="4:3"), "aspect_ratio: '4:3' is not one of 16:9, 9:16, 1:1"),
    "resolution 720p": (body(resolution="720p"), "resolution: '720p' is not one of 1080p"),
    "movement huge": (body(movement_amplitude="huge"), "movement_amplitude: 'huge' is not one of auto, small"),
    "bgm as string": (body(bgm="yes"), "bgm: must be true or false, got 'yes'"),
    "unknown field": (body(negative_prompt="no birds"), "negative_prompt: unknown field"),
}


@pytest.fixture(scope="module")
def validation_sim():
    """Only ever sent submits the client must stop: its stats must stay empty."""
    with Simulator(sim_config()) as sim:
        yield sim


def assert_no_submit_reached(sim: Simulator) -> None:
    submits = stats(sim)["submits"]
    assert submits["accepted"] == 0 and submits["accepted_this_process"] == 0
    assert submits["rejected"] == {}


@pytest.mark.parametrize("case", list(BROKEN))
def test_each_broken_rule_is_caught_client_side(validation_sim, make_client, case):
    payload, expected = BROKEN[case]
    client = make_client(validation_sim.base_url)
    with pytest.raises(errors.InvalidRequest) as checked:
        client.validate(payload)
    with pytest.raises(errors.InvalidRequest) as sent:
        client.submit(payload)
    for exc in (checked.value, sent.value):
        assert any(expected in p for p in exc.problems), exc.problems
        assert exc.status is None  # caught before anything was sent
        assert not exc.retryable
        assert not DATA_URI_RE.search(str(exc))
    assert sent.value.problems == checked.value.problems
    assert_no_submit_reached(validation_sim)


def test_a_typed_request_is_validated_too(validation_sim, make_client):
    client = make_client(validation_sim.base_url)
    with pytest.raises(errors.InvalidRequest) as exc:
        client.submit(GenerationRequest(images=(IMG_A, SMALL), prompt="x" * 1501, aspect_ratio="4:3"))
    assert exc.value.problems == [
        "images[1]: 96×96 px, at least 128×128 needed",
        "prompt: 1501 characters, at most 1500",
        "aspect_ratio: '4:3' is not one of 16:9, 9:16, 1:1",
    ]
    assert_no_submit_reached(validation_sim)


@pytest.mark.parametrize(
    "images",
    [
        [data_uri(PNG_128)],  # the minimum side
        [data_uri(image_bytes(512, 128))],  # exactly 4:1
        [data_uri(image_bytes(128, 512))],  # exactly 1:4
        [data_uri(image_bytes(200, 200, "JPEG"), "jpg")],
        [data_uri(image_bytes(200, 200, "WEBP"), "webp")],
        ["https://example.com/kite.png"] * 7,
    ],
)
def test_bounds_themselves_are_accepted(make_client, images):
    client = make_client("http://127.0.0.1:9")  # never contacted
    assert client.validate(body(images=images))["images"] == images


def test_seed_none_in_a_dict_body_is_not_sent_as_null(make_client):
    client = make_client("http://127.0.0.1:9")
    assert "seed" not in client.validate(body(seed=None))


RAW = ["eight images", "96x96 as the fourth image", "gif declared as png", "prompt of 1501 chars", "aspect 4:3"]


@pytest.mark.parametrize("case", RAW)
def test_same_bodies_sent_raw_get_the_simulators_400(shared_sim, make_client, case):
    payload, expected = BROKEN[case]
    with pytest.raises(errors.InvalidRequest) as client_side:
        make_client(shared_sim.base_url).validate(payload)
    r = requests.post(
        shared_sim.base_url + contract.SUBMIT_PATH, json=payload, headers={"Authorization": f"Bearer {KEY}"}, timeout=30
    )
    assert r.status_code == 400
    err = r.json()
    assert err["reason"] == "INVALID_REQUEST_BODY" and expected in err["message"]
    assert err["metadata"]["problems"] == client_side.value.problems  # one rule book, both sides


def test_a_server_400_becomes_invalid_request_with_its_problems(fake, make_client):
    problems = ["images[0]: 96×96 px, at least 128×128 needed", "prompt: required"]
    fake.routes["POST", contract.SUBMIT_PATH] = lambda h: fake.json(
        h,
        400,
        {
            "code": 400,
            "reason": "INVALID_REQUEST_BODY",
            "message": "; ".join(problems),
            "metadata": {"problems": problems},
        },
    )
    with pytest.raises(errors.InvalidRequest) as exc:
        make_client(fake.url).submit(body())
    assert exc.value.problems == problems and exc.value.status == 400
    assert exc.value.reason == "INVALID_REQUEST_BODY"
    assert fake.count("POST", contract.SUBMIT_PATH) == 1


# --- auth -----------------------------------------------------------------------------------


def test_wrong_key_is_an_auth_error_without_retry(make_sim, make_client):
    sim = make_sim()
    client = make_client(sim.base_url, key="wrong-key")
    with pytest.raises(errors.AuthError) as exc:
        client.submit(body())
    assert exc.value.status == 401 and exc.value.reason == "FAILED_TO_AUTH" and not exc.value.retryable
    with pytest.raises(errors.AuthError):
        client.get_task_result("any-task")
    s = stats(sim)
    assert s["submits"]["rejected"] == {"FAILED_TO_AUTH": 1} and s["submits"]["accepted"] == 0
    assert s["polls"]["total"] == 1 and s["polls"]["rejected"] == {"FAILED_TO_AUTH": 1}


def test_no_key_or_bad_base_url_fails_at_construction():
    with pytest.raises(errors.AuthError):
        ViduClient("", "http://127.0.0.1:9")
    with pytest.raises(ValueError):
        ViduClient(KEY, "ftp://127.0.0.1:9")


# --- lifecycle ------------------------------------------------------------------------------


@pytest.mark.parametrize("aspect, bgm", [("16:9", True), ("9:16", False), ("1:1", True)])
def test_full_lifecycle(make_sim, make_client, tmp_path, aspect, bgm):
    sim = make_sim(latency_s=1.0)
    client = make_client(sim.base_url)
    task_id = client.submit(body(seed=42, aspect_ratio=aspect, bgm=bgm, movement_amplitude="small"))
    first = client.get_task_result(task_id)
    assert first.task_id == task_id
    assert first.status in (TaskStatus.QUEUED.value, TaskStatus.PROCESSING.value)
    assert not first.terminal and first.known_status and not first.videos
    assert first.eta_seconds is not None and first.eta_seconds >= 1
    assert first.progress_percent is not None and 0 <= first.progress_percent < 100
    assert first.seed == 42

    result = client.wait(task_id, timeout_s=60, min_interval_s=0.05, max_interval_s=0.2)
    assert result.succeeded and result.terminal and result.reason == ""
    assert result.seed == 42 and isinstance(result.seed, int)
    assert result.progress_percent == 100 and result.eta_seconds == 0
    (video,) = result.videos
    assert video.ttl_seconds == 3600 and video.type == "mp4" and video.url.startswith(sim.base_url)
    assert "sig=" not in repr(video)  # the signed part stays out of reprs
    assert set(result.debug_times_ms) == {"submit_time_ms", "execute_time_ms", "complete_time_ms"}

    dest = tmp_path / "out" / "video.mp4"
    download = client.download(result, dest)
    assert download.path == dest and dest.exists()
    assert download.sha256 == file_sha256(dest) and download.size_bytes == dest.stat().st_size
    assert download.sha256 == file_sha256(sim.video_path(task_id))  # the bytes the service holds
    assert leftovers(dest.parent) == []
    probe = probe_video(dest)
    assert (probe.width, probe.height) == contract.expected_video_size(aspect, SCALE)
    assert probe.video_codec == "h264" and probe.has_audio == bgm
    assert probe.sha256 == download.sha256
    assert stats(sim)["downloads"]["ok"] == 1


def test_random_seed_comes_back_as_an_int(shared_sim, make_client):
    client = make_client(shared_sim.base_url)
    task_id = client.submit(body(images=[IMG_A]))
    result = client.get_task_result(task_id)
    assert isinstance(result.seed, int) and result.seed >= 0


def test_same_request_and_seed_same_bytes(shared_sim, make_client, tmp_path):
    client = make_client(shared_sim.base_url)

    def run(seed: int, name: str) -> str:
        task_id = client.submit(body(images=[IMG_A], seed=seed))
        result = client.wait(task_id, timeout_s=60, min_interval_s=0.05, max_interval_s=0.2)
        return client.download(result, tmp_path / name).sha256

    one, two, other = run(123, "a.mp4"), run(123, "b.mp4"), run(124, "c.mp4")
    assert one == two
    assert other != one


def test_download_by_task_id(shared_sim, make_client, tmp_path):
    client = make_client(shared_sim.base_url)
    task_id = client.submit(body(images=[IMG_A], seed=5))
    client.wait(task_id, timeout_s=60, min_interval_s=0.05, max_interval_s=0.2)
    download = client.download(task_id, tmp_path / "v.mp4")
    assert download.task.task_id == task_id and download.sha256 == file_sha256(tmp_path / "v.mp4")


def test_failed_task_raises_task_failed(make_sim, make_client):
    sim = make_sim(faults=FaultConfig(fail_tasks=1.0))
    client = make_client(sim.base_url)
    task_id = client.submit(body())
    with pytest.raises(errors.TaskFailed) as exc:
        client.wait(task_id, timeout_s=60, min_interval_s=0.05, max_interval_s=0.2)
    assert exc.value.reason.startswith("simulated failure")


def test_file_appears_only_when_complete(fake, make_client, tmp_path):
    payload = bytes(range(256)) * 8192  # 2 MiB
    half_sent, release = threading.Event(), threading.Event()

    def slow(h):
        h.send_response(200)
        h.send_header("Content-Type", "video/mp4")
        h.send_header("Content-Length", str(len(payload)))
        h.end_headers()
        h.wfile.write(payload[: len(payload) // 2])
        h.wfile.flush()
        half_sent.set()
        release.wait(20)
        h.wfile.write(payload[len(payload) // 2 :])

    fake.routes["GET", "/v.mp4"] = slow
    client = make_client(fake.url)
    dest = tmp_path / "video.mp4"
    outcome = {}

    def run():
        try:
            outcome["download"] = client.download(succeeded(fake.url + "/v.mp4?sig=abc"), dest)
        except BaseException as exc:  # pragma: no cover - reported below
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    try:
        assert half_sent.wait(20)
        deadline = time.monotonic() + 20
        while not leftovers(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert leftovers(tmp_path), "the body is streamed into a temporary file"
        assert not dest.exists(), "the destination must not exist while the body is incomplete"
    finally:
        release.set()
        thread.join(30)
    assert "error" not in outcome, outcome.get("error")
    assert dest.read_bytes() == payload
    assert outcome["download"].sha256 == hashlib.sha256(payload).hexdigest()
    assert leftovers(tmp_path) == []
    assert "Authorization" not in fake.seen[0]["headers"]  # the key never goes to video hosts


def test_download_asks_for_the_stored_bytes_not_a_compressed_copy(fake, make_client, tmp_path):
    payload = b"\x00\x00\x00\x18ftypmp42" + bytes(5000)

    def maybe_gzip(h):
        if "gzip" in h.headers.get("Accept-Encoding", ""):
            packed = gzip.compress(payload)
            fake.send(h, 200, packed, "video/mp4", {"Content-Encoding": "gzip"})
        else:
            fake.send(h, 200, payload, "video/mp4")

    fake.routes["GET", "/v.mp4"] = maybe_gzip
    download = make_client(fake.url).download(succeeded(fake.url + "/v.mp4"), tmp_path / "v.mp4")
    assert (tmp_path / "v.mp4").read_bytes() == payload and download.size_bytes == len(payload)


# --- unknown tasks and malformed answers ------------------------------------------------------


def test_unknown_task_is_task_not_found(make_sim, make_client):
    sim = make_sim()
    with pytest.raises(errors.TaskNotFound) as exc:
        make_client(sim.base_url).get_task_result("no-such-task")
    assert exc.value.status == 404
    assert stats(sim)["polls"]["rejected"] == {"TASK_NOT_FOUND": 1}  # not retried


def poll_route(fake, answer):
    fake.routes["GET", contract.TASK_RESULT_PATH] = answer


def test_non_json_poll_is_malformed(fake, make_client):
    poll_route(fake, lambda h: fake.send(h, 200, b"<html>gateway says hi</html>", "text/html"))
    with pytest.raises(errors.MalformedResponse):
        make_client(fake.url).get_task_result("t-1")


@pytest.mark.parametrize(
    "broken",
    [
        {"task": {"task_id": "t-1"}},  # no status
        {"task": {"task_id": "t-1", "status": 3}},
        {"videos": []},  # no task at all
        ["not", "an", "object"],
        {"task": {"task_id": "t-1", "status": "TASK_STATUS_SUCCEED"}, "videos": [{"video_type": "mp4"}]},
    ],
)
def test_wrong_shapes_are_malformed(fake, make_client, broken):
    poll_route(fake, lambda h: fake.json(h, 200, broken))
    with pytest.raises(errors.MalformedResponse):
        make_client(fake.url).get_task_result("t-1")


def test_answer_for_another_task_is_malformed(fake, make_client):
    poll_route(fake, lambda h: fake.json(h, 200, task_body("someone-else")))
    with pytest.raises(errors.MalformedResponse, match="someone-else"):
        make_client(fake.url).get_task_result("t-1")


def test_unknown_status_is_returned_as_is_and_is_not_terminal(fake, make_client):
    poll_route(fake, lambda h: fake.json(h, 200, task_body("t-1", "TASK_STATUS_CANCELED", eta="")))
    client = make_client(fake.url)
    result = client.get_task_result("t-1")
    assert result.status == "TASK_STATUS_CANCELED"
    assert not result.terminal and not result.known_status and not result.succeeded and not result.failed
    assert result.seed == 158881667
    # an unknown status keeps a task alive only until its deadline
    with pytest.raises(TimeoutError, match="TASK_STATUS_CANCELED"):
        client.wait("t-1", timeout_s=0.3, min_interval_s=0.05, max_interval_s=0.1)


@pytest.mark.parametrize("framing", ["content-length", "close-delimited"])
def test_huge_body_is_refused_without_reading_it_all(fake, make_client, framing):
    total = 8 * client_mod.MAX_JSON_BYTES
    written, done = [0], threading.Event()

    def huge(h):
        try:
            h.send_response(200)
            h.send_header("Content-Type", "application/json")
            if framing == "content-length":
                h.send_header("Content-Length", str(total))
            else:
                h.send_header("Connection", "close")
                h.close_connection = True
            h.end_headers()
            chunk = b'{"pad": "' + b"x" * 65536
            while written[0] < total:
                h.wfile.write(chunk)
                written[0] += len(chunk)
        except OSError:
            pass
        finally:
            done.set()

    poll_route(fake, huge)
    with pytest.raises(errors.MalformedResponse):
        make_client(fake.url).get_task_result("t-1")
    assert done.wait(20)
    assert written[0] < total / 2


@pytest.mark.parametrize("ttl", [3600, "3600"])
def test_video_url_ttl_as_int_or_string(fake, make_client, ttl):
    videos = [{"video_url": fake.url + "/v.mp4", "video_url_ttl": ttl, "video_type": "mp4"}]
    poll_route(fake, lambda h: fake.json(h, 200, task_body("t-1", "TASK_STATUS_SUCCEED", videos)))
    result = make_client(fake.url).get_task_result("t-1")
    assert result.succeeded and result.videos[0].ttl_seconds == 3600 and result.seed == 158881667


def test_succeed_without_videos_fails_after_one_refresh(fake, make_client, tmp_path):
    poll_route(fake, lambda h: fake.json(h, 200, task_body("t-1", "TASK_STATUS_SUCCEED")))
    client = make_client(fake.url)
    result = client.get_task_result("t-1")
    with pytest.raises(errors.DownloadError):
        client.download(result, tmp_path / "v.mp4")
    assert fake.count("GET", contract.TASK_RESULT_PATH) == 2  # the first poll and one refresh
    assert not (tmp_path / "v.mp4").exists()


def test_redirect_loop_on_download(fake, make_client, tmp_path):
    fake.routes["GET", "/v.mp4"] = lambda h: fake.send(h, 302, b"", headers={"Location": "/v.mp4"})
    with pytest.raises(errors.DownloadError, match="redirect"):
        make_client(fake.url).download(succeeded(fake.url + "/v.mp4"), tmp_path / "v.mp4", attempts=1)
    assert 2 <= fake.count("GET", "/v.mp4") <= 6
    assert not (tmp_path / "v.mp4").exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "target", ["ftp://files.example.invalid/v.mp4?sig=TOPSECRETSIG", "file:///etc/passwd?sig=TOPSECRETSIG"]
)
def test_redirect_to_a_non_http_scheme(fake, make_client, tmp_path, target):
    fake.routes["GET", "/v.mp4"] = lambda h: fake.send(h, 302, b"", headers={"Location": target})
    with pytest.raises(errors.DownloadError) as exc:
        make_client(fake.url).download(succeeded(fake.url + "/v.mp4"), tmp_path / "v.mp4", attempts=1)
    assert "TOPSECRETSIG" not in str(exc.value)  # a signed URL's query is a credential
    assert not (tmp_path / "v.mp4").exists()


def test_submit_answered_200_without_task_id_is_outcome_unknown(fake, make_client):
    fake.routes["POST", contract.SUBMIT_PATH] = lambda h: fake.send(h, 200, b"not json")
    with pytest.raises(errors.SubmitOutcomeUnknown):
        make_client(fake.url).submit(body())
    fake.routes["POST", contract.SUBMIT_PATH] = lambda h: fake.json(h, 200, {"id": "x"})
    with pytest.raises(errors.SubmitOutcomeUnknown):
        make_client(fake.url).submit(body())
    assert fake.count("POST", contract.SUBMIT_PATH) == 2


def test_submit_503_with_retry_after_is_not_resent(fake, make_client, sleeps):
    """urllib3 retries any 503 with Retry-After unless told otherwise: a duplicate paid task."""
    fake.routes["POST", contract.SUBMIT_PATH] = lambda h: fake.json(
        h, 503, {"code": 503, "reason": "SERVER_ERROR", "message": "busy"}, headers={"Retry-After": "1"}
    )
    with pytest.raises(errors.SubmitOutcomeUnknown):
        make_client(fake.url).submit(body())
    assert fake.count("POST", contract.SUBMIT_PATH) == 1


@pytest.mark.parametrize("status", [302, 307, 308])
def test_submit_redirect_is_not_followed(fake, make_client, status):
    fake.routes["POST", contract.SUBMIT_PATH] = lambda h: fake.send(h, status, b"", headers={"Location": "/elsewhere"})
    fake.routes["POST", "/elsewhere"] = lambda h: fake.json(h, 200, {"task_id": "dup"})
    fake.routes["GET", "/elsewhere"] = lambda h: fake.json(h, 200, {"task_id": "dup"})
    with pytest.raises(errors.ViduError) as exc:
        make_client(fake.url).submit(body())
    assert exc.value.status == status
    assert [r["path"] for r in fake.seen] == [contract.SUBMIT_PATH]


# --- URL expiry -----------------------------------------------------------------------------


def test_expired_url_is_refreshed_once(make_sim, make_client, tmp_path):
    sim = make_sim(url_ttl_s=1)
    client = make_client(sim.base_url)
    task_id = client.submit(body(images=[IMG_A]))
    stale = client.wait(task_id, timeout_s=60, min_interval_s=0.05, max_interval_s=0.2)
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(stale.videos[0].url).query)
    expires = int(query["expires"][0])
    while time.time() < expires + 0.05:
        time.sleep(0.05)
    polls_before = stats(sim)["polls"]["ok"]
    download = client.download(stale, tmp_path / "v.mp4")
    assert download.task.videos[0].url != stale.videos[0].url
    assert download.sha256 == file_sha256(sim.video_path(task_id))
    s = stats(sim)
    assert s["downloads"]["expired"] == 1 and s["downloads"]["ok"] == 1
    assert s["polls"]["ok"] == polls_before + 1


# --- faults ---------------------------------------------------------------------------------


def submitted(sim, client) -> str:
    """A task submitted before any fault is switched on (its polls start at call 0)."""
    return client.submit(body(images=[IMG_A]))


def test_poll_429_with_retry_after_is_retried(make_sim, make_client, sleeps):
    sim = make_sim()
    client = make_client(sim.base_url)
    task_id = submitted(sim, client)
    seed = fault_seed("poll", task_id, "rate_limit", [True, False])
    sim.set_faults(FaultConfig(seed=seed, poll_rate_limit=0.5, retry_after_s=1))
    result = client.get_task_result(task_id)
    assert result.task_id == task_id
    assert stats(sim)["faults"] == {"poll.rate_limit": 1}
    assert sleeps == [1]  # the server's Retry-After, honoured


def test_poll_429_that_persists_is_rate_limited(make_sim, make_client, sleeps):
    sim = make_sim(faults=FaultConfig(poll_rate_limit=1.0, retry_after_s=2))
    with pytest.raises(errors.RateLimited) as exc:
        make_client(sim.base_url).get_task_result("any")
    assert exc.value.retry_after == 2.0 and exc.value.status == 429 and exc.value.retryable
    assert stats(sim)["faults"] == {"poll.rate_limit": 4}  # the first try and three retries
    assert sleeps == [2, 2, 2]


def test_poll_429_without_retry_after_backs_off(make_sim, make_client, sleeps):
    sim = make_sim(faults=FaultConfig(poll_rate_limit=1.0, rate_limit_without_retry_after=1.0))
    with pytest.raises(errors.RateLimited) as exc:
        make_client(sim.base_url).get_task_result("any")
    assert exc.value.retry_after is None
    assert stats(sim)["faults"]["poll.rate_limit"] == 4
    # urllib3 retries the first failure at once, then backs off (capped, with jitter)
    assert sleeps and all(0 < s <= FAST.backoff_max + FAST.jitter for s in sleeps)


def test_poll_5xx_is_retried(make_sim, make_client):
    sim = make_sim()
    client = make_client(sim.base_url)
    task_id = submitted(sim, client)
    seed = fault_seed("poll", task_id, "server_error", [True, True, False])
    sim.set_faults(FaultConfig(seed=seed, poll_server_error=0.5))
    assert client.get_task_result(task_id).task_id == task_id
    assert stats(sim)["faults"]["poll.server_error"] == 2
    sim.set_faults(FaultConfig(poll_server_error=1.0))
    with pytest.raises(errors.TransientError) as exc:
        client.get_task_result(task_id)
    assert exc.value.status in (500, 502, 503) and exc.value.retryable
    assert stats(sim)["faults"]["poll.server_error"] == 2 + 4


def test_poll_dropped_connection_is_retried(make_sim, make_client):
    sim = make_sim()
    client = make_client(sim.base_url)
    task_id = submitted(sim, client)
    seed = fault_seed("poll", task_id, "drop", [True, False])
    sim.set_faults(FaultConfig(seed=seed, poll_drop=0.5))
    assert client.get_task_result(task_id).task_id == task_id
    assert stats(sim)["faults"] == {"poll.drop": 1}
    sim.set_faults(FaultConfig(poll_drop=1.0))
    with pytest.raises(errors.TransientError):
        client.get_task_result(task_id)
    assert stats(sim)["faults"] == {"poll.drop": 1 + 4}


def test_submit_429_is_retried_and_accepted_once(make_sim, make_client, sleeps):
    payload = body(seed=11)
    fingerprint = contract.payload_fingerprint(payload)
    seed = fault_seed("submit", fingerprint, "rate_limit", [True, False])
    sim = make_sim(faults=FaultConfig(seed=seed, submit_rate_limit=0.5, retry_after_s=1))
    task_id = make_client(sim.base_url).submit(payload)
    s = stats(sim)
    assert s["submits"]["accepted_by_fingerprint"] == {fingerprint: 1}
    assert s["submits"]["rejected"] == {"RATE_LIMIT_EXCEEDED": 1}
    assert sleeps == [1]
    assert task_id


def test_submit_429_that_persists_is_rate_limited_and_nothing_accepted(make_sim, make_client, sleeps):
    sim = make_sim(faults=FaultConfig(submit_rate_limit=1.0, retry_after_s=1))
    with pytest.raises(errors.RateLimited) as exc:
        make_client(sim.base_url).submit(body())
    assert exc.value.retry_after == 1.0
    s = stats(sim)
    assert s["submits"]["accepted"] == 0 and s["submits"]["rejected"] == {"RATE_LIMIT_EXCEEDED": 4}


@pytest.mark.parametrize("after_accept", [1.0, 0.0])
def test_submit_5xx_is_outcome_unknown_and_not_resent(make_sim, make_client, after_accept):
    sim = make_sim(faults=FaultConfig(submit_server_error=1.0, server_error_after_accept=after_accept))
    payload = body()
    with pytest.raises(errors.SubmitOutcomeUnknown) as exc:
        make_client(sim.base_url).submit(payload)
    assert exc.value.status in (500, 502, 503) and not exc.value.retryable
    s = stats(sim)
    assert s["faults"]["submit.server_error"] == 1  # exactly one POST
    expected = {contract.payload_fingerprint(payload): 1} if after_accept else {}
    assert s["submits"]["accepted_by_fingerprint"] == expected


@pytest.mark.parametrize("after_accept", [1.0, 0.0])
def test_submit_dropped_is_outcome_unknown_and_not_resent(make_sim, make_client, after_accept):
    sim = make_sim(faults=FaultConfig(submit_drop=1.0, drop_after_accept=after_accept))
    with pytest.raises(errors.SubmitOutcomeUnknown):
        make_client(sim.base_url).submit(body())
    s = stats(sim)
    assert s["faults"]["submit.drop"] == 1  # exactly one POST
    assert s["submits"]["accepted"] == (1 if after_accept else 0)


def test_submit_to_a_closed_port_says_it_was_not_sent(make_client):
    client = make_client(f"http://127.0.0.1:{closed_port()}")
    with pytest.raises(errors.TransientError) as exc:
        client.submit(body())
    assert not isinstance(exc.value, errors.SubmitOutcomeUnknown)
    assert "not sent" in str(exc.value) and exc.value.retryable


def done_task(sim, client) -> TaskResult:
    task_id = client.submit(body(images=[IMG_A]))
    return client.wait(task_id, timeout_s=60, min_interval_s=0.05, max_interval_s=0.2)


def test_truncated_download_is_fetched_again(make_sim, make_client, tmp_path):
    sim = make_sim()
    client = make_client(sim.base_url)
    result = done_task(sim, client)
    seed = fault_seed("download", result.task_id, "truncate", [True, False])
    sim.set_faults(FaultConfig(seed=seed, truncate=0.5))
    dest = tmp_path / "v.mp4"
    download = client.download(result, dest)
    assert download.sha256 == file_sha256(dest) == file_sha256(sim.video_path(result.task_id))
    probe_video(dest)
    s = stats(sim)["downloads"]
    assert s["truncated"] == 1 and s["ok"] == 1
    assert leftovers(tmp_path) == []


def test_download_that_stays_truncated_leaves_no_file(make_sim, make_client, tmp_path):
    sim = make_sim()
    client = make_client(sim.base_url)
    result = done_task(sim, client)
    sim.set_faults(FaultConfig(truncate=1.0))
    with pytest.raises(errors.DownloadError):
        client.download(result, tmp_path / "v.mp4", attempts=3)
    assert stats(sim)["downloads"]["truncated"] == 3
    assert not (tmp_path / "v.mp4").exists() and leftovers(tmp_path) == []


def test_truncated_with_matching_length_is_caught_by_the_probe(make_sim, make_client, tmp_path):
    sim = make_sim()
    client = make_client(sim.base_url)
    result = done_task(sim, client)
    sim.set_faults(FaultConfig(truncate=1.0, truncate_matching_length=1.0))
    download = client.download(result, tmp_path / "v.mp4")  # the client cannot tell
    assert download.size_bytes < sim.video_path(result.task_id).stat().st_size
    with pytest.raises(VideoInvalid):
        probe_video(download.path)


# --- secrets --------------------------------------------------------------------------------


def assert_clean(*texts: str) -> None:
    for text in texts:
        assert SECRET not in text, text
        assert not DATA_URI_RE.search(text), text[:300]


def check_error(exc: BaseException) -> None:
    assert_clean(str(exc), repr(exc), "".join(traceback.format_exception(exc)))


def test_no_secret_in_messages_reprs_or_logs(make_sim, make_client, fake, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    logging.getLogger("urllib3").setLevel(logging.DEBUG)
    seen: list[BaseException] = []

    def expect(kind, call):
        with pytest.raises(kind) as exc:
            call()
        seen.append(exc.value)

    small = body(images=[IMG_A, SMALL])
    # 401: the service does not know our key
    other = make_sim(api_key="another-key")
    client = make_client(other.base_url, key=SECRET)
    assert_clean(repr(client), str(client))
    expect(errors.AuthError, lambda: client.submit(body()))
    expect(errors.AuthError, lambda: client.get_task_result("t"))
    # 400 before sending, and from the service
    sim = make_sim(api_key=SECRET)
    client = make_client(sim.base_url, key=SECRET)
    expect(errors.InvalidRequest, lambda: client.submit(small))
    expect(errors.InvalidRequest, lambda: client.get_task_result(""))
    # 5xx and dropped connections
    sim.set_faults(FaultConfig(submit_server_error=1.0, poll_server_error=1.0))
    expect(errors.SubmitOutcomeUnknown, lambda: client.submit(body()))
    expect(errors.TransientError, lambda: client.get_task_result("t"))
    sim.set_faults(FaultConfig(submit_drop=1.0, poll_drop=1.0))
    expect(errors.SubmitOutcomeUnknown, lambda: client.submit(body()))
    expect(errors.TransientError, lambda: client.get_task_result("t"))
    expect(errors.TransientError, lambda: make_client(f"http://127.0.0.1:{closed_port()}", key=SECRET).submit(body()))

    # a gateway that echoes our key and image back in every error
    def echo(status, content_type="application/json"):
        def answer(h):
            text = f"{h.headers.get('Authorization')} sent {IMG_A[:200]}"
            if content_type == "application/json":
                fake.json(
                    h,
                    status,
                    {
                        "code": status,
                        "reason": f"BAD {SECRET}",
                        "message": text,
                        "metadata": {"problems": [text]} if status == 400 else {},
                    },
                )
            else:
                fake.send(h, status, text.encode(), content_type)

        return answer

    echoing = make_client(fake.url, key=SECRET)
    for status, kind in ((400, errors.InvalidRequest), (401, errors.AuthError), (500, errors.SubmitOutcomeUnknown)):
        fake.routes["POST", contract.SUBMIT_PATH] = echo(status)
        expect(kind, lambda: echoing.submit(body()))
    for status, kind, ctype in (
        (401, errors.AuthError, "text/plain"),
        (503, errors.TransientError, "text/html"),
        (200, errors.MalformedResponse, "text/plain"),
        (404, errors.TaskNotFound, "application/json"),
    ):
        fake.routes["GET", contract.TASK_RESULT_PATH] = echo(status, ctype)
        expect(kind, lambda: echoing.get_task_result("t"))

    assert len(seen) == 16
    for exc in seen:
        check_error(exc)
        if isinstance(exc, errors.InvalidRequest):
            assert_clean(*exc.problems)
    assert any("96×96" in p for exc in seen if isinstance(exc, errors.InvalidRequest) for p in exc.problems)
    assert any(r.name.startswith("urllib3") for r in caplog.records)  # the logs were really captured
    for record in caplog.records:
        assert_clean(record.getMessage(), caplog.handler.format(record))


# --- every submit answer, classified exactly (issue 10, case 2) ------------------------------

SUBMIT_KINDS = {
    200: None,
    **{s: errors.SubmitOutcomeUnknown for s in (100, 101, 201, 202, 203, 204, 206, 299)},
    **{s: errors.SubmitOutcomeUnknown for s in (300, 301, 302, 303, 304, 307, 308)},
    400: errors.InvalidRequest,
    401: errors.AuthError,
    403: errors.AuthError,
    **{s: errors.SubmitRejected for s in (402, 404, 405, 409, 410, 413, 415, 418, 422, 451, 499)},
    429: errors.RateLimited,
    **{s: errors.SubmitOutcomeUnknown for s in (500, 501, 502, 503, 504, 520, 599, 600, 999)},
}


@pytest.mark.parametrize("status", sorted(SUBMIT_KINDS))
def test_submit_status_classification(status):
    from vidu_pipeline.api.answers import submit_error_kind

    assert submit_error_kind(status) is SUBMIT_KINDS[status]


def test_only_a_4xx_proves_no_task_was_created():
    """Across every status: a submit is 'maybe paid' unless it is a 200 or a 4xx."""
    from vidu_pipeline.api.answers import submit_error_kind

    for status in range(100, 600):
        kind = submit_error_kind(status)
        assert (kind is errors.SubmitOutcomeUnknown) == (status != 200 and not 400 <= status < 500), status


@pytest.mark.parametrize(
    "status, kind",
    [
        (200, None),
        (202, errors.TransientError),
        (301, errors.TransientError),
        (400, errors.InvalidRequest),
        (401, errors.AuthError),
        (403, errors.AuthError),
        (404, errors.TaskNotFound),
        (418, errors.ViduError),
        (429, errors.RateLimited),
        (500, errors.TransientError),
        (503, errors.TransientError),
    ],
)
def test_poll_status_classification(status, kind):
    from vidu_pipeline.api.answers import poll_error_kind

    assert poll_error_kind(status) is kind


@pytest.mark.parametrize(
    "body, task_id",
    [
        ({"task_id": "t-1"}, "t-1"),
        ({"task_id": "a" * 256}, "a" * 256),
        ({"task_id": ""}, None),
        ({"task_id": "a" * 257}, None),
        ({"task_id": 42}, None),
        ({"task_id": None}, None),
        ({"id": "x"}, None),
        ({"task_id": "has space"}, None),
        ({"task_id": "t\u20131"}, None),
        (["t-1"], None),
        ("t-1", None),
    ],
)
def test_usable_task_id(body, task_id):
    from vidu_pipeline.api.answers import task_id_in

    assert task_id_in(body) == task_id


@pytest.fixture
def hostile():
    server = HostileServer()
    yield server
    server.stop()


def echo_words(status: int):
    """An error answer whose words echo the request's Authorization header back."""

    def script(h):
        auth = h.headers.get("Authorization", "")
        reply(status, {"code": status, "reason": "NOPE", "message": f"refused {auth} ({urllib.parse.quote(auth)})"})(h)

    return script


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "status, kind",
    [
        (202, errors.SubmitOutcomeUnknown),
        (201, errors.SubmitOutcomeUnknown),
        (204, errors.SubmitOutcomeUnknown),
        (301, errors.SubmitOutcomeUnknown),
        (401, errors.AuthError),
        (403, errors.AuthError),
        (404, errors.SubmitRejected),
        (409, errors.SubmitRejected),
        (418, errors.SubmitRejected),
        (422, errors.SubmitRejected),
        (500, errors.SubmitOutcomeUnknown),
    ],
)
def test_submit_answers_end_to_end(hostile, make_client, status, kind):
    """Each answer raises its kind once, is never resent, and says the status and the
    service's words without our key."""
    if status == 202:
        script = reply(202, {"task_id": "t-accepted-later"})
    elif status == 301:
        script = reply(301, b"", {"Location": hostile.url + "/elsewhere"})
    elif status == 204:
        script = reply(204)
    else:
        script = echo_words(status)
    hostile.on("POST", contract.SUBMIT_PATH, script)
    with pytest.raises(errors.ViduError) as info:
        make_client(hostile.url, key=SECRET).submit(body())
    assert type(info.value) is kind
    assert info.value.status == status
    assert [r["path"] for r in hostile.seen] == [contract.SUBMIT_PATH]  # once, nowhere else
    check_error(info.value)
    if status not in (202, 301, 204):  # the echoing ones: the words are kept, the key is not
        assert "refused Bearer ***" in str(info.value)
        assert f"HTTP {status}" in str(info.value)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "answer",
    [
        truncated(200, {"task_id": "t-0123456789"}, keep=12),
        raw(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"),  # headers never finished
        raw(b"HTTP/1.1 2OO OK\r\n\r\n"),  # not a status line
        raw(b""),  # closed without a word
        reply(200, b'{"task_id": "t-1"'),  # whole but not JSON
        reply(200, {"task_id": "t 1"}),
    ],
)
def test_a_broken_200_on_submit_is_outcome_unknown(hostile, make_client, answer):
    hostile.on("POST", contract.SUBMIT_PATH, answer)
    with pytest.raises(errors.SubmitOutcomeUnknown):
        make_client(hostile.url).submit(body())
    assert hostile.count("POST") == 1


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "answer",
    [
        truncated(200, task_body("t-1"), keep=30),
        raw(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"),
        raw(b"HTTP/1.1 2OO OK\r\n\r\n"),
        raw(b"HTTP/1.1 200 OK\r\n" + b"X-Long: " + b"a" * 70_000 + b"\r\n\r\n"),
    ],
)
def test_a_broken_poll_answer_is_transient(hostile, make_client, answer):
    """Cut off, unparsable or oversized: a retryable typed error, never urllib3's own."""
    hostile.on("GET", contract.TASK_RESULT_PATH, answer)
    with pytest.raises((errors.TransientError, errors.MalformedResponse)):
        make_client(hostile.url, retry=RetryPolicy(retries=1, backoff_factor=0.01)).get_task_result("t-1")


@pytest.mark.timeout(60)
def test_an_unreadable_retry_after_is_a_rate_limit_not_a_crash(hostile, make_client, sleeps):
    hostile.on("GET", contract.TASK_RESULT_PATH, reply(429, {"message": "slow"}, {"Retry-After": "soon"}))
    with pytest.raises(errors.RateLimited):
        make_client(hostile.url).get_task_result("t-1")
    hostile.on("POST", contract.SUBMIT_PATH, reply(429, {"message": "slow"}, {"Retry-After": "soon"}))
    with pytest.raises(errors.RateLimited):
        make_client(hostile.url).submit(body())


def test_a_key_no_header_can_carry_is_refused_before_connecting(hostile):
    with pytest.raises(errors.ConfigurationError) as info:
        ViduClient("abc\u2013def", hostile.url)
    assert "position 4" in str(info.value) and "abc" not in str(info.value)
    assert hostile.connections == 0


# --- every call has a total deadline (issue 10, case 6) --------------------------------------

DRIP = 0.2  # seconds between bytes: far below the read timeout, so only a total deadline ends it
SHORT = {"submit_deadline_s": 1.0, "poll_deadline_s": 1.0, "download_deadline_s": 1.0}
ENDLESS = b"x" * 100_000


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "answer",
    [drip_headers(200, {"task_id": "t-1"}), drip_body(200, ENDLESS), drip_body(200, ENDLESS, length=False)],
    ids=["headers", "body", "close-delimited"],
)
def test_a_dripping_submit_is_outcome_unknown(hostile, make_client, answer):
    hostile.on("POST", contract.SUBMIT_PATH, answer)
    with pytest.raises(errors.SubmitOutcomeUnknown) as info:
        make_client(hostile.url, **SHORT).submit(body())
    assert "deadline" in str(info.value)
    assert hostile.count("POST") == 1


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "answer",
    [drip_headers(200, task_body("t-1")), drip_body(200, ENDLESS), drip_body(200, ENDLESS, length=False)],
    ids=["headers", "body", "close-delimited"],
)
def test_a_dripping_poll_is_transient(hostile, make_client, answer):
    hostile.on("GET", contract.TASK_RESULT_PATH, answer)
    with pytest.raises(errors.TransientError) as info:
        make_client(hostile.url, **SHORT).get_task_result("t-1")
    assert "deadline" in str(info.value)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "answer",
    [drip_headers(200, ENDLESS), drip_body(200, ENDLESS), drip_body(200, ENDLESS, length=False)],
    ids=["headers", "body", "close-delimited"],
)
def test_a_dripping_download_is_a_download_error(hostile, make_client, tmp_path, answer):
    hostile.on("GET", "/v.mp4", answer)
    with pytest.raises(errors.DownloadError) as info:
        make_client(hostile.url, **SHORT).download(succeeded(hostile.url + "/v.mp4"), tmp_path / "v.mp4", attempts=1)
    assert "deadline" in str(info.value)
    assert not (tmp_path / "v.mp4").exists() and leftovers(tmp_path) == []


@pytest.mark.timeout(60)
def test_wait_keeps_its_own_deadline_through_dripping_polls(hostile, make_client):
    hostile.on("GET", contract.TASK_RESULT_PATH, drip_body(200, ENDLESS))
    with pytest.raises(TimeoutError):
        make_client(hostile.url, **SHORT).wait("t-1", timeout_s=2, min_interval_s=0.05, max_interval_s=0.1)
    assert hostile.count("GET") >= 2


@pytest.mark.timeout(60)
def test_a_deadline_ends_only_its_own_call(hostile, make_client):
    """After a call was cut at its deadline, the next one through the same pool works."""
    client = make_client(hostile.url, **SHORT)
    hostile.on("GET", contract.TASK_RESULT_PATH, drip_body(200, ENDLESS))
    with pytest.raises(errors.TransientError):
        client.get_task_result("t-1")
    hostile.on("GET", contract.TASK_RESULT_PATH, reply(200, task_body("t-1")))
    assert client.get_task_result("t-1").status == "TASK_STATUS_PROCESSING"


def test_deadlines_must_be_positive():
    with pytest.raises(ValueError, match="poll_deadline_s"):
        ViduClient(KEY, "http://127.0.0.1:9", poll_deadline_s=0)


# --- the service's words never carry our key (issue 10, case 5) ------------------------------


def echoed_failure(h):
    """A FAILED task whose reason and status echo the request's Authorization header."""
    auth = h.headers.get("Authorization", "")
    key = auth.removeprefix("Bearer ")
    fake_reply = task_body(
        "t-1",
        status="TASK_STATUS_FAILED",
        reason=f"auth {auth} / {urllib.parse.quote(auth)} / {key.upper()} / {json.dumps(key)}",
    )
    reply(200, fake_reply)(h)


SLASHY = "sk/SECRET+key=1234"  # URL-encodes differently from itself


@pytest.mark.parametrize("key", [SECRET, SLASHY])
def test_a_failure_reason_that_echoes_the_key_is_scrubbed(hostile, make_client, key):
    hostile.on("GET", contract.TASK_RESULT_PATH, echoed_failure)
    client = make_client(hostile.url, key=key)
    forms = [key, urllib.parse.quote(key, safe=""), urllib.parse.quote_plus(key), key.upper()]
    result = client.get_task_result("t-1")
    assert result.failed and "auth Bearer ***" in result.reason
    assert not [f for f in forms if f in result.reason], result.reason
    with pytest.raises(errors.TaskFailed) as info:
        client.wait("t-1", timeout_s=10)
    text = str(info.value) + repr(info.value) + (info.value.reason or "")
    assert "***" in text and not [f for f in forms if f in text], text


def test_an_unknown_status_that_echoes_the_key_is_scrubbed(hostile, make_client):
    hostile.on(
        "GET",
        contract.TASK_RESULT_PATH,
        lambda h: reply(200, task_body("t-1", status=f"STUCK {h.headers['Authorization']}"))(h),
    )
    result = make_client(hostile.url, key=SECRET).get_task_result("t-1")
    assert result.status == "STUCK Bearer ***"


def test_a_task_id_that_echoes_the_key_is_not_taken(hostile, make_client):
    hostile.on("POST", contract.SUBMIT_PATH, lambda h: reply(200, {"task_id": f"t-{SECRET}"})(h))
    with pytest.raises(errors.SubmitOutcomeUnknown) as info:
        make_client(hostile.url, key=SECRET).submit(body())
    check_error(info.value)


def test_scrubbing_before_shortening_leaves_no_prefix(hostile, make_client):
    """A key straddling the point where the words are cut must not leave its first half."""
    for pad in range(190, 210):
        hostile.on("POST", contract.SUBMIT_PATH, reply(418, {"message": "x" * pad + SECRET + "y" * 600}))
        with pytest.raises(errors.SubmitRejected) as info:
            make_client(hostile.url, key=SECRET).submit(body())
        assert SECRET[:8] not in str(info.value), pad


def test_scrubber_forms():
    from vidu_pipeline.api.answers import Scrubber

    scrub = Scrubber(SLASHY)
    for form in (
        SLASHY,
        "sk%2FSECRET%2Bkey%3D1234",
        "sk%2fsecret%2bkey%3d1234",
        "sk%2FSECRET%2Bkey%3D1234",
        "sk\\/SECRET+key=1234".replace("\\/", "/"),
    ):
        assert scrub(f"a {form} b") == "a *** b", form
    assert scrub(f"Authorization: Bearer {SLASHY}") == "Authorization: Bearer ***"
    assert scrub(IMG_A) == "data:image/png;base64,…"
    assert scrub("nothing here") == "nothing here"


# --- downloads get a new file's normal mode (issue 10, case 12) ------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_downloaded_video_gets_the_umask_mode(hostile, make_client, tmp_path, umask):
    hostile.on("GET", "/v.mp4", reply(200, b"\x00\x00\x00\x18ftypmp42" + bytes(1000)))
    old = os.umask(umask)
    try:
        make_client(hostile.url).download(succeeded(hostile.url + "/v.mp4"), tmp_path / "v.mp4")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "v.mp4").stat().st_mode) == 0o666 & ~umask


@pytest.mark.timeout(60)
def test_simulator_drip_ends_at_the_deadline_with_the_task_created(make_sim, make_client):
    """The drill's version: the simulator creates the task, then drips its answer."""
    sim = make_sim(faults=FaultConfig(drip=1.0, drip_s=0.5))
    with pytest.raises(errors.SubmitOutcomeUnknown):
        make_client(sim.base_url, **SHORT).submit(body(images=[IMG_A]))
    assert stats(sim)["submits"]["accepted"] == 1  # paid, and never resent


def test_simulator_echoed_key_is_scrubbed_by_the_client(make_sim, make_client):
    sim = make_sim(api_key=SECRET, faults=FaultConfig(echo_auth_in_reason=1.0))
    client = make_client(sim.base_url, key=SECRET)
    task_id = client.submit(body(images=[IMG_A]))
    with pytest.raises(errors.TaskFailed) as info:
        client.wait(task_id, timeout_s=60, min_interval_s=0.05, max_interval_s=0.2)
    assert "Authorization: Bearer ***" in info.value.reason
    check_error(info.value)
    assert SECRET not in client.get_task_result(task_id).reason


def test_urllib3_log_lines_do_not_carry_signed_url_queries(hostile, make_client, tmp_path, caplog):
    """urllib3 logs each request line at DEBUG; a signed URL's query is a credential."""
    caplog.set_level(logging.DEBUG)
    logging.getLogger("urllib3").setLevel(logging.DEBUG)
    hostile.on("GET", "/v.mp4", reply(200, b"\x00\x00\x00\x18ftypmp42" + bytes(100)))
    hostile.on("GET", "/moved.mp4", reply(302, b"", {"Location": "/v.mp4?sig=TOPSECRETSIG2&expires=9"}))
    client = make_client(hostile.url)
    client.download(succeeded(hostile.url + "/moved.mp4?sig=TOPSECRETSIG&expires=9"), tmp_path / "v.mp4")
    assert hostile.count("GET", "/v.mp4") == 1
    lines = [caplog.handler.format(r) for r in caplog.records if r.name.startswith("urllib3")]
    assert any("/moved.mp4" in line for line in lines)  # the request lines were logged
    assert not [line for line in lines if "TOPSECRETSIG" in line], lines


@pytest.mark.timeout(60)
@pytest.mark.parametrize("call", ["submit", "poll"])
def test_retry_waits_count_against_the_deadline(hostile, make_client, call):
    """A Retry-After longer than the time left is not waited out: the 429 is the answer."""
    answer = reply(429, {"message": "slow down"}, {"Retry-After": "30"})
    hostile.on("POST", contract.SUBMIT_PATH, answer)
    hostile.on("GET", contract.TASK_RESULT_PATH, answer)
    client = make_client(hostile.url, retry=RetryPolicy(retries=3, retry_after_max=60), **SHORT)
    with pytest.raises(errors.RateLimited) as info:
        client.submit(body()) if call == "submit" else client.get_task_result("t-1")
    assert info.value.retry_after == 30
    assert len(hostile.seen) == 1


@pytest.mark.timeout(60)
def test_deadlines_of_concurrent_calls_cut_only_their_own_sockets(hostile, make_client):
    """One client, one pool, eight threads: dripping polls end at their deadline, the others
    (reusing the pool's kept-alive connections) all get their answer."""
    import concurrent.futures

    def answer(h):
        task_id = urllib.parse.parse_qs(h.path.partition("?")[2])["task_id"][0]
        if task_id.startswith("slow"):
            drip_body(200, ENDLESS)(h)
        else:
            reply(200, task_body(task_id), keep_alive=True)(h)

    hostile.on("GET", contract.TASK_RESULT_PATH, answer)
    client = make_client(hostile.url, **SHORT)

    def poll(task_id):
        try:
            return client.get_task_result(task_id).task_id
        except errors.TransientError:
            return "cut"

    ids = [f"{'slow' if i % 2 else 'fast'}-{i}" for i in range(40)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        outcomes = dict(zip(ids, pool.map(poll, ids), strict=True))
    assert outcomes == {i: ("cut" if i.startswith("slow") else i) for i in ids}
    assert hostile.connections < len(ids)  # connections were reused between calls
