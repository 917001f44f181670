"""The local Vidu simulator, spoken to over raw HTTP exactly as a client would."""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
import types
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import av
import pytest
import requests
from support import IMG_A, body, data_uri, image_bytes

from vidu_pipeline.api import contract
from vidu_pipeline.api.task_result import TERMINAL_STATUSES, TaskResult
from vidu_pipeline.simulator import FaultConfig, Simulator, SimulatorConfig, cli

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
SCALE = 0.1  # 192×108 for 16:9: fast renders, same pipeline as 1080p


@pytest.fixture
def make_sim(tmp_path):
    started = []

    def make(**overrides) -> Simulator:
        config = SimulatorConfig(**{"api_key": KEY, "latency_s": 0.3, "render_scale": SCALE, **overrides})
        sim = Simulator(config).start()
        started.append(sim)
        return sim

    yield make
    for sim in started:
        sim.stop()


@pytest.fixture(scope="module")
def shared_sim():
    """For tests that neither change faults nor count on exact stats."""
    with Simulator(SimulatorConfig(api_key=KEY, latency_s=0.3, render_scale=SCALE)) as sim:
        yield sim


def submit(sim, payload, headers=AUTH) -> requests.Response:
    return requests.post(sim.base_url + contract.SUBMIT_PATH, json=payload, headers=headers, timeout=30)


def poll(sim, task_id, headers=AUTH) -> requests.Response:
    return requests.get(
        sim.base_url + contract.TASK_RESULT_PATH, params={"task_id": task_id}, headers=headers, timeout=30
    )


def stats(sim) -> dict:
    r = requests.get(sim.base_url + "/_simulator/stats", headers=AUTH, timeout=30)
    assert r.status_code == 200
    return r.json()


def run_task(sim, payload) -> dict:
    r = submit(sim, payload)
    assert r.status_code == 200, r.text
    return wait_done(sim, r.json()["task_id"])


def wait_done(sim, task_id, timeout=60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = poll(sim, task_id)
        assert r.status_code == 200, r.text
        if r.json()["task"]["status"] in TERMINAL_STATUSES:
            return r.json()
        time.sleep(0.05)
    raise AssertionError(f"task {task_id} did not finish")


def download(result) -> bytes:
    r = requests.get(result["videos"][0]["video_url"], timeout=30)
    assert r.status_code == 200
    assert int(r.headers["Content-Length"]) == len(r.content)
    return r.content


# --- validation and auth -------------------------------------------------------------------

GIF = image_bytes(200, 200, "GIF")
TOO_BIG = "data:image/png;base64," + base64.b64encode(bytes(contract.MAX_BASE64_DECODED_BYTES)).decode()

BROKEN = {
    "one image too many": (body(images=[IMG_A] * 8), "images: 8 items, between 1 and 7"),
    "no images": (body(images=[]), "images: 0 items"),
    "non-string image": (body(images=[42]), "images[0]: must be a string, got int"),
    "bad data-URI prefix": (body(images=["data:image/png,AAAA"]), "images[0]: data URI must start with"),
    "gif subtype": (body(images=[data_uri(GIF, "gif")]), "content type image/gif is not one of"),
    "bad base64": (body(images=["data:image/png;base64,@@@@"]), "images[0]: invalid base64 payload"),
    "decoded payload 10 MB": (body(images=[TOO_BIG]), "decoded base64 payload is 10,000,000 bytes"),
    "96x96 image": (body(images=[data_uri(image_bytes(96, 96))]), "96×96 px, at least 128×128"),
    "600x100 image": (body(images=[data_uri(image_bytes(600, 100))]), "aspect ratio 600:100"),
    "gif declared as png": (body(images=[data_uri(GIF, "png")]), "images[0]: not a PNG, JPEG or WebP"),
    "prompt too long": (body(prompt="x" * 1501), "prompt: 1501 characters, at most 1500"),
    "empty prompt": (body(prompt=""), "prompt: must not be empty"),
    "duration 10": (body(duration=10), "duration: 10 is not accepted"),
    "aspect 4:3": (body(aspect_ratio="4:3"), "aspect_ratio: '4:3' is not one of"),
    "resolution 720p": (body(resolution="720p"), "resolution: '720p' is not one of"),
    "movement huge": (body(movement_amplitude="huge"), "movement_amplitude: 'huge' is not one of"),
    "bgm yes": (body(bgm="yes"), "bgm: must be true or false"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_each_broken_rule_is_a_specific_400(shared_sim, case):
    payload, expected = BROKEN[case]
    r = submit(shared_sim, payload)
    assert r.status_code == 400
    err = r.json()
    assert err["code"] == 400 and err["reason"] == "INVALID_REQUEST_BODY"
    assert expected in err["message"]
    assert err["metadata"]["problems"] and expected in " ".join(err["metadata"]["problems"])
    assert "base64," + IMG_A[30:80] not in r.text  # no payload echoed


def test_all_problems_are_reported_together(make_sim):
    sim = make_sim()
    r = submit(sim, body(images=[42], prompt="", bgm="yes"))
    problems = r.json()["metadata"]["problems"]
    assert len(problems) == 3
    assert r.json()["message"] == "; ".join(problems)
    assert stats(sim)["submits"]["rejected"] == {"INVALID_REQUEST_BODY": 1}
    assert stats(sim)["submits"]["accepted"] == 0


def test_body_that_is_not_json_is_a_400(shared_sim):
    r = requests.post(shared_sim.base_url + contract.SUBMIT_PATH, data=b"{not json", headers=AUTH, timeout=10)
    assert r.status_code == 400
    assert r.json()["reason"] == "INVALID_REQUEST_BODY"
    assert "not valid JSON" in r.json()["message"]


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}])
def test_missing_or_wrong_key_is_401_everywhere(make_sim, headers):
    sim = make_sim()
    for r in (
        submit(sim, body(), headers=headers),
        poll(sim, "whatever", headers=headers),
        requests.get(sim.base_url + "/_simulator/stats", headers=headers, timeout=10),
    ):
        assert r.status_code == 401
        assert r.json()["reason"] == "FAILED_TO_AUTH"
    assert stats(sim)["submits"]["rejected"] == {"FAILED_TO_AUTH": 1}
    assert stats(sim)["polls"]["rejected"] == {"FAILED_TO_AUTH": 1}


def test_unknown_task_is_404(shared_sim):
    r = poll(shared_sim, "no-such-task")
    assert r.status_code == 404
    assert r.json()["code"] == 404


# --- lifecycle -----------------------------------------------------------------------------


def test_lifecycle_with_sane_eta_and_progress(make_sim):
    sim = make_sim(latency_s=1.0)
    r = submit(sim, body(seed=7))
    assert r.status_code == 200 and set(r.json()) == {"task_id"}
    task_id = r.json()["task_id"]
    seen, progress = [], []
    while True:
        result = poll(sim, task_id).json()
        task = result["task"]
        assert set(result) == {"task", "extra", "videos", "images", "audios"}
        assert result["images"] == [] and result["audios"] == []
        assert task["task_id"] == task_id and task["task_type"] == contract.TASK_TYPE
        assert isinstance(task["eta"], int) and task["eta"] >= 0
        assert 0 <= task["progress_percent"] <= 100
        assert result["extra"]["seed"] == "7"
        if not seen or seen[-1] != task["status"]:
            seen.append(task["status"])
        progress.append(task["progress_percent"])
        if task["status"] in TERMINAL_STATUSES:
            break
        assert result["videos"] == [] and task["eta"] >= 1
        time.sleep(0.05)
    assert seen[-1] == "TASK_STATUS_SUCCEED" and "TASK_STATUS_PROCESSING" in seen
    assert progress == sorted(progress) and progress[-1] == 100 and task["eta"] == 0
    (video,) = result["videos"]
    assert video["video_type"] == "mp4" and video["video_url_ttl"] == "3600"
    debug = result["extra"]["debug_info"]
    assert all(isinstance(v, str) for v in debug.values())
    assert int(debug["submit_time_ms"]) <= int(debug["execute_time_ms"]) < int(debug["complete_time_ms"])
    parsed = TaskResult.from_json(result)
    assert parsed.succeeded and parsed.seed == 7 and parsed.videos[0].ttl_seconds == 3600
    # a fresh signed URL on every poll
    assert poll(sim, task_id).json()["videos"][0]["video_url"].startswith(sim.base_url)


def test_concurrency_limit_queues_fifo(make_sim):
    sim = make_sim(concurrency=2, latency_s=1.0)
    ids = [submit(sim, body(seed=i)).json()["task_id"] for i in range(5)]
    first = [poll(sim, i).json()["task"] for i in ids]
    assert [t["status"] for t in first[2:]] == ["TASK_STATUS_QUEUED"] * 3
    assert first[4]["eta"] > first[0]["eta"]  # queue wait counts in the eta
    while True:
        by_status = stats(sim)["tasks"]["by_status"]  # one consistent instant
        assert by_status["TASK_STATUS_PROCESSING"] <= 2
        if by_status["TASK_STATUS_SUCCEED"] == 5:
            break
        time.sleep(0.05)
    results = [poll(sim, i).json() for i in ids]
    spans = [
        (int(r["extra"]["debug_info"]["execute_time_ms"]), int(r["extra"]["debug_info"]["complete_time_ms"]))
        for r in results
    ]
    starts = [s for s, _ in spans]
    assert starts == sorted(starts)  # FIFO
    for s, _ in spans:
        assert sum(1 for a, b in spans if a <= s < b) <= 2
    assert stats(sim)["max_concurrent_processing"] == 2


# --- the video -----------------------------------------------------------------------------


def probe(data: bytes, tmp_path: Path) -> dict:
    path = tmp_path / f"{hashlib.sha256(data).hexdigest()[:12]}.mp4"
    path.write_bytes(data)
    with av.open(str(path)) as c:
        v = c.streams.video[0]
        return {
            "size": (v.codec_context.width, v.codec_context.height),
            "codec": v.codec_context.name,
            "pix_fmt": v.codec_context.pix_fmt,
            "frames": sum(1 for p in c.demux(v) if p.size),
            "duration": c.duration / av.time_base,
            "audio": [a.codec_context.name for a in c.streams.audio],
        }


@pytest.mark.parametrize(
    "aspect, movement, bgm",
    [("16:9", "auto", True), ("9:16", "small", False), ("1:1", "large", True)],
)
def test_video_matches_request(shared_sim, tmp_path, aspect, movement, bgm):
    result = run_task(shared_sim, body(aspect_ratio=aspect, movement_amplitude=movement, bgm=bgm))
    info = probe(download(result), tmp_path)
    assert info["size"] == contract.expected_video_size(aspect, SCALE)
    assert info["codec"] == "h264" and info["pix_fmt"] == "yuv420p"
    assert info["frames"] == 120
    assert 4.9 <= info["duration"] <= 5.2
    assert info["audio"] == (["aac"] if bgm else [])


def test_full_hd_video(make_sim, tmp_path):
    sim = make_sim(render_scale=1.0, latency_s=0.1)
    info = probe(download(run_task(sim, body(images=[IMG_A]))), tmp_path)
    assert info["size"] == (1920, 1080) and info["codec"] == "h264" and info["frames"] == 120


def test_same_request_and_seed_give_the_same_bytes(shared_sim):
    one = download(run_task(shared_sim, body(seed=123, bgm=True)))
    two = download(run_task(shared_sim, body(seed=123, bgm=True)))
    other = download(run_task(shared_sim, body(seed=124, bgm=True)))
    assert hashlib.sha256(one).digest() == hashlib.sha256(two).digest()
    assert hashlib.sha256(other).digest() != hashlib.sha256(one).digest()


def test_seed_is_a_string_and_random_when_omitted(shared_sim):
    seeds = [run_task(shared_sim, body(images=[IMG_A]))["extra"]["seed"] for _ in range(2)]
    assert all(isinstance(s, str) and s.lstrip("-").isdigit() for s in seeds)
    assert seeds[0] != seeds[1]


# --- download URLs -------------------------------------------------------------------------


def test_download_urls_expire_and_a_new_poll_gives_a_working_one(make_sim):
    sim = make_sim(url_ttl_s=1)
    result = run_task(sim, body(images=[IMG_A]))
    url = result["videos"][0]["video_url"]
    assert result["videos"][0]["video_url_ttl"] == "1"
    expires = int(urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)["expires"][0])
    while time.time() < expires + 0.05:
        time.sleep(0.1)
    r = requests.get(url, timeout=10)
    assert r.status_code == 403 and "expired" in r.text
    tampered = url.replace("sig=", "sig=0")
    assert requests.get(tampered, timeout=10).status_code == 403
    download(poll(sim, result["task"]["task_id"]).json())
    assert {k: stats(sim)["downloads"][k] for k in ("ok", "expired", "bad_signature")} == {
        "ok": 1,
        "expired": 1,
        "bad_signature": 1,
    }


# --- image URLs ----------------------------------------------------------------------------


@pytest.fixture
def image_server():
    payload = image_bytes(256, 256)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/kite.png"
    server.shutdown()
    server.server_close()


def test_loopback_image_urls_are_fetched_others_fail_the_task(make_sim, image_server):
    sim = make_sim()
    assert run_task(sim, body(images=[image_server]))["task"]["status"] == "TASK_STATUS_SUCCEED"
    failed = run_task(sim, body(images=["https://example.invalid/kite.png"]))["task"]
    assert failed["status"] == "TASK_STATUS_FAILED"
    assert "loopback" in failed["reason"]


# --- persistence ---------------------------------------------------------------------------


def test_tasks_survive_a_killed_process(make_sim, tmp_path):
    state = tmp_path / "state"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vidu_pipeline.simulator",
            "--port",
            "0",
            "--latency",
            "0.5",
            "--render-scale",
            str(SCALE),
            "--api-key",
            KEY,
            "--state-dir",
            str(state),
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    try:
        base_url = proc.stdout.readline().split()[-1]
        old = types.SimpleNamespace(base_url=base_url)
        done_id = submit(old, body(seed=1)).json()["task_id"]
        old_result = wait_done(old, done_id)
        pending_id = submit(old, body(seed=2)).json()["task_id"]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
    sim = make_sim(state_dir=state, latency_s=0.5)
    again = wait_done(sim, done_id)
    assert again["task"]["status"] == "TASK_STATUS_SUCCEED"
    assert again["extra"] == old_result["extra"]
    pending = wait_done(sim, pending_id)
    assert pending["task"]["status"] == "TASK_STATUS_SUCCEED"
    download(pending)
    s = stats(sim)
    assert s["submits"]["accepted"] == 2
    assert s["submits"]["accepted_by_fingerprint"] == {
        contract.payload_fingerprint(body(seed=1)): 1,
        contract.payload_fingerprint(body(seed=2)): 1,
    }


def test_restart_in_process_keeps_videos_and_url_signatures(make_sim, tmp_path):
    first = make_sim(state_dir=tmp_path)
    result = run_task(first, body(seed=5))
    first.stop()
    second = make_sim(state_dir=tmp_path)
    url = result["videos"][0]["video_url"].replace(first.base_url, second.base_url)
    assert requests.get(url, timeout=10).status_code == 200
    assert stats(second)["tasks"]["by_status"]["TASK_STATUS_SUCCEED"] == 1


def test_state_folder_is_single_owner_and_survives_a_torn_log(make_sim, tmp_path):
    first = make_sim(state_dir=tmp_path)
    task_id = submit(first, body(seed=9)).json()["task_id"]
    with pytest.raises(RuntimeError, match="in use"):
        make_sim(state_dir=tmp_path)
    first.stop()
    with open(tmp_path / "tasks.jsonl", "a") as log:
        log.write('{"event": "submit", "task_id": "half-writ')  # a writer killed mid-line
    second = make_sim(state_dir=tmp_path)
    later_id = submit(second, body(seed=10)).json()["task_id"]
    second.stop()
    third = make_sim(state_dir=tmp_path)
    assert wait_done(third, task_id)["task"]["status"] == "TASK_STATUS_SUCCEED"
    assert wait_done(third, later_id)["task"]["status"] == "TASK_STATUS_SUCCEED"


# --- faults --------------------------------------------------------------------------------


def test_rate_limits_with_and_without_retry_after(make_sim):
    sim = make_sim(faults=FaultConfig(submit_rate_limit=1.0, retry_after_s=3))
    r = submit(sim, body())
    assert r.status_code == 429 and r.json()["reason"] == "RATE_LIMIT_EXCEEDED"
    assert r.headers["Retry-After"] == "3"
    sim.set_faults(FaultConfig(poll_rate_limit=1.0, rate_limit_without_retry_after=1.0))
    r = poll(sim, "any")
    assert r.status_code == 429 and "Retry-After" not in r.headers
    s = stats(sim)
    assert s["faults"] == {"submit.rate_limit": 1, "poll.rate_limit": 1, "poll.rate_limit_without_retry_after": 1}
    assert s["submits"]["rejected"] == {"RATE_LIMIT_EXCEEDED": 1} and s["submits"]["accepted"] == 0


def test_submit_server_errors_before_and_after_the_task_exists(make_sim):
    sim = make_sim(faults=FaultConfig(submit_server_error=1.0, server_error_after_accept=0.0))
    assert submit(sim, body()).status_code in (500, 502, 503)
    assert stats(sim)["submits"]["accepted"] == 0
    sim.set_faults(FaultConfig(submit_server_error=1.0, server_error_after_accept=1.0))
    assert submit(sim, body()).status_code in (500, 502, 503)
    s = stats(sim)
    assert s["submits"]["accepted_by_fingerprint"] == {contract.payload_fingerprint(body()): 1}
    assert s["faults"]["submit.server_error"] == 2 and s["faults"]["submit.server_error_after_accept"] == 1


def test_dropped_submits_before_and_after_the_task_exists(make_sim):
    sim = make_sim(faults=FaultConfig(submit_drop=1.0, drop_after_accept=0.0))
    with pytest.raises(requests.ConnectionError):
        submit(sim, body())
    assert stats(sim)["submits"]["accepted"] == 0
    sim.set_faults(FaultConfig(submit_drop=1.0, drop_after_accept=1.0))
    with pytest.raises(requests.ConnectionError):
        submit(sim, body())
    s = stats(sim)
    assert s["submits"]["accepted"] == 1
    assert s["faults"] == {"submit.drop": 2, "submit.drop_after_accept": 1}


def test_poll_faults_and_slow_answers(make_sim):
    sim = make_sim(faults=FaultConfig(poll_server_error=1.0))
    assert poll(sim, "any").status_code in (500, 502, 503)
    sim.set_faults(FaultConfig(poll_drop=1.0))
    with pytest.raises(requests.ConnectionError):
        poll(sim, "any")
    sim.set_faults(FaultConfig(slow=1.0, slow_s=0.2))
    assert poll(sim, "any").status_code == 404
    assert stats(sim)["faults"] == {"poll.server_error": 1, "poll.drop": 1, "poll.slow": 1}


def test_faults_can_be_switched_over_http(make_sim):
    sim = make_sim()
    url = sim.base_url + "/_simulator/faults"
    assert requests.post(url, json={"poll_rate_limit": 1.0}, headers=AUTH, timeout=10).status_code == 200
    assert poll(sim, "any").status_code == 429
    assert requests.post(url, json={"poll_rate_limit": 2}, headers=AUTH, timeout=10).status_code == 400
    assert requests.post(url, json={}, timeout=10).status_code == 401
    assert requests.post(url, json={}, headers=AUTH, timeout=10).status_code == 200
    assert poll(sim, "any").status_code == 404


def test_failed_tasks_carry_a_reason(make_sim):
    sim = make_sim(faults=FaultConfig(fail_tasks=1.0))
    task = run_task(sim, body())["task"]
    assert task["status"] == "TASK_STATUS_FAILED" and task["reason"].startswith("simulated failure")
    assert stats(sim)["faults"] == {"submit.fail_task": 1}


def test_failure_reasons_that_echo_the_authorization_header(make_sim):
    sim = make_sim(faults=FaultConfig(echo_auth_in_reason=1.0))
    task = run_task(sim, body())["task"]
    assert task["status"] == "TASK_STATUS_FAILED"
    assert f"Authorization: Bearer {KEY}" in task["reason"]
    assert urllib.parse.quote(f"Bearer {KEY}") in task["reason"]
    assert stats(sim)["faults"] == {"submit.echo_auth_in_reason": 1}
    with pytest.raises(ValueError, match="echo_auth_in_reason"):
        FaultConfig(echo_auth_in_reason=1.5)


def read_in_pieces(sock) -> list[bytes]:
    pieces = []
    while chunk := sock.recv(65536):
        pieces.append(chunk)
    return pieces


@pytest.mark.timeout(60)
def test_dripped_answers_arrive_byte_by_byte(make_sim):
    """A dripped submit creates its task and then answers one byte at a time."""
    import json
    import socket

    sim = make_sim(faults=FaultConfig(drip=1.0, drip_s=0.01))
    payload = json.dumps(body(images=[IMG_A])).encode()
    host, port = sim.base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(
            f"POST {contract.SUBMIT_PATH} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        pieces = read_in_pieces(sock)
    answer = b"".join(pieces)
    assert answer.startswith(b"HTTP/1.1 200 ") and b'"task_id"' in answer
    assert len(pieces) > 20  # not one write: many separate trickles
    assert stats(sim)["submits"]["accepted"] == 1
    assert stats(sim)["faults"] == {"submit.drip": 1}


@pytest.mark.timeout(60)
def test_stopping_ends_a_drip(make_sim):
    sim = make_sim()
    task_id = submit(sim, body(images=[IMG_A])).json()["task_id"]
    sim.set_faults(FaultConfig(drip=1.0, drip_s=30))
    outcome = []

    def poll_in_background():
        try:
            outcome.append(poll(sim, task_id).status_code)
        except requests.RequestException as exc:
            outcome.append(type(exc).__name__)

    thread = threading.Thread(target=poll_in_background)
    thread.start()
    while not sim.dice.snapshot():
        time.sleep(0.05)
    sim.stop()
    thread.join(timeout=30)
    assert not thread.is_alive() and outcome == ["ConnectionError"]


def test_truncated_downloads(make_sim):
    sim = make_sim(faults=FaultConfig(truncate=1.0))
    result = run_task(sim, body(images=[IMG_A]))
    url = result["videos"][0]["video_url"]
    full = os.path.getsize(sim.video_path(result["task"]["task_id"]))
    with pytest.raises(requests.exceptions.RequestException):
        requests.get(url, timeout=10)
    sim.set_faults(FaultConfig(truncate=1.0, truncate_matching_length=1.0))
    r = requests.get(url, timeout=10)
    assert r.status_code == 200 and len(r.content) == int(r.headers["Content-Length"]) < full
    assert stats(sim)["downloads"]["truncated"] == 2


def test_fault_decisions_are_reproducible_from_the_seed(make_sim):
    def pattern():
        sim = make_sim(faults=FaultConfig(seed=7, poll_rate_limit=0.5))
        return [poll(sim, "task-x").status_code for _ in range(20)]

    first = pattern()
    assert set(first) == {404, 429}
    assert pattern() == first


# --- throughput and CLI --------------------------------------------------------------------


def test_many_polls_from_several_threads(shared_sim):
    task_id = submit(shared_sim, body(images=[IMG_A])).json()["task_id"]
    codes = []

    def worker():
        with requests.Session() as s:
            s.headers.update(AUTH)
            for _ in range(75):
                codes.append(
                    s.get(
                        shared_sim.base_url + contract.TASK_RESULT_PATH, params={"task_id": task_id}, timeout=10
                    ).status_code
                )

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert codes == [200] * 300


def test_cli_fault_flags_set_both_sides_unless_overridden():
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--rate-limit", "0.1", "--poll-rate-limit", "0", "--drop", "0.05", "--truncate", "0.2"])
    faults = cli.fault_config(args)
    assert (faults.submit_rate_limit, faults.poll_rate_limit) == (0.1, 0.0)
    assert (faults.submit_drop, faults.poll_drop, faults.truncate) == (0.05, 0.05, 0.2)


def test_defect_flags_deliver_valid_but_wrong_clips_per_request(make_sim, tmp_path):
    """A render defect is decided per request (every seed of it shows it), delivered as a valid
    MP4 over the normal endpoints, counted in the stats — and only the quality figures tell."""
    from vidu_pipeline import quality
    from vidu_pipeline.mp4 import probe_video

    sim = make_sim(faults=FaultConfig(defect_frozen=1.0))
    clips = []
    for seed in (1, 2):
        result = run_task(sim, body(seed=seed))
        assert result["task"]["status"] == "TASK_STATUS_SUCCEED"
        path = tmp_path / f"seed{seed}.mp4"
        path.write_bytes(download(result))
        probe_video(path)  # decodes end to end: a valid file
        clips.append(quality.measure_video(path))
    assert all(q.frozen for q in clips), [q.still_share for q in clips]
    assert stats(sim)["faults"].get("submit.defect_frozen") == 2

    good = make_sim()
    result = run_task(good, body(seed=1))
    path = tmp_path / "good.mp4"
    path.write_bytes(download(result))
    assert not quality.measure_video(path).frozen


def test_the_defect_draw_ignores_what_the_defect_is_about():
    from vidu_pipeline.simulator.faults import pick_defect

    config = FaultConfig(defect_same_clip_for_seeds=0.5, seed=3)
    picks = {pick_defect(config, body(seed=s)) for s in range(20)}
    assert len(picks) == 1  # all seeds of one request share the draw
    other = [pick_defect(config, body(prompt=f"prompt {i}")) for i in range(40)]
    assert "same_clip_for_seeds" in other and None in other  # across requests it varies
