"""The API key and image payloads stay where they belong.

A sweep runs through ``vidu-pipeline generate`` in a subprocess with a distinctive key against a
standalone simulator that accepts only that key (given to it through the environment, never on
its command line), with server errors injected so error paths are logged too. Then the key is
searched for in the captured output, every file under the data folder and DAGSTER_HOME (also
decoded: SQLite rows and Parquet values, since zstd pages could hide a plain-text match), the
simulator's log, and ``repr()`` of resources, clients and endpoints; and no image that was sent
(its base64) may appear anywhere — only the small inline thumbnails the UI shows. The simulator also fails some tasks with
a reason that echoes the request's Authorization header (the ``echo_auth_in_reason`` fault), so
the key comes back from the service too: as is, after ``Bearer`` and URL-encoded. It must be
scrubbed before anything keeps or prints it.

Catalog image URLs other than http(s) are refused before anything is sent: see
tests/test_images.py and the ``url_scheme`` rows of tests/test_catalog.py.
"""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest
import requests

from drills.run_drill import SimulatorProcess, make_catalog, run_generate

pytestmark = pytest.mark.slow  # starts processes (CLI, simulator, drills)

KEY = "sk-vidu/LEAK+CHECK=7f3a9c"  # '/', '+' and '=' make its URL-encoded form differ
KEY_FORMS = [KEY, urllib.parse.quote(KEY, safe=""), urllib.parse.quote_plus(KEY)]


def decoded_texts(path: Path):
    """Plain views of a file whose bytes may not show a secret: SQLite rows, Parquet values."""
    head = path.read_bytes()[:16]
    if head.startswith(b"SQLite format 3"):
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")]
            for table in tables:
                for row in con.execute(f'SELECT * FROM "{table}"'):
                    yield (
                        f"{table}",
                        " ".join(v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in row),
                    )
        finally:
            con.close()
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        yield "parquet", json.dumps(pq.read_table(path).to_pylist(), default=str)


def scan(roots: list[Path], needles: list[bytes]) -> list[str]:
    hits = []
    for root in roots:
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            data = path.read_bytes()
            hits += [f"{path}: raw bytes contain {n!r}" for n in needles if n in data]
            try:
                for where, text in decoded_texts(path):
                    hits += [f"{path} ({where}): {n!r}" for n in needles if n.decode() in text]
            except (sqlite3.DatabaseError, OSError, ValueError):
                pass  # e.g. a -wal/-shm side file: its raw bytes were searched above
    return hits


@pytest.fixture
def leak_sim(tmp_path):
    sim = SimulatorProcess(
        tmp_path / "sim",
        api_key=KEY,
        latency=0.5,
        fault_seed=5,
        faults={"--server-errors": 0.3, "--rate-limit": 0.1, "--truncate": 0.2},
    )
    try:
        yield sim.start()
    finally:
        sim.stop()


@pytest.mark.timeout(180)
def test_key_and_payloads_never_stored_or_printed(tmp_path, leak_sim, monkeypatch):
    assert KEY not in " ".join(leak_sim.args), "the simulator's key must come from the environment"
    make_catalog(tmp_path / "catalog", subjects=2, prompts=2, seeds=2, rng_seed=3)
    home, data = tmp_path / "dagster_home", tmp_path / "data"
    env = leak_sim.env(home)
    leak_sim.set_faults(echo_auth_in_reason=0.4)
    result = run_generate(tmp_path / "catalog", data, env, timeout=120)
    assert result.returncode in (0, 1), result.stdout[-2000:] + result.stderr[-2000:]
    assert "succeeded: " in result.stdout  # something went through: the key was really used
    # Error paths ran too (5xx answers, truncated downloads), so their messages were produced,
    # and the service sent the key back in failure reasons, which were kept (scrubbed).
    faults = leak_sim.stats()["faults"]
    assert faults.get("submit.server_error", 0) + faults.get("poll.server_error", 0) > 0
    assert faults.get("submit.echo_auth_in_reason", 0) > 0
    kept = [data / "ledger.sqlite", *(data / "lineage").glob("*.parquet")]
    assert any("Authorization: Bearer ***" in text for path in kept for _, text in decoded_texts(path))

    status = subprocess.run(
        [sys.executable, "-m", "vidu_pipeline.cli", "status", "--data-dir", str(data)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    for name, text in (
        ("generate stdout", result.stdout),
        ("generate stderr", result.stderr),
        ("status output", status.stdout + status.stderr),
    ):
        assert not [f for f in KEY_FORMS if f in text], f"the key is in the {name}"
        assert "data:image/" not in text, f"an image payload is in the {name}"

    # Every file of the data folder and of the Dagster instance (event log DBs, compute logs).
    # Small inline thumbnails are metadata on purpose (the UI shows them); what was SENT — the
    # reference images as base64 — must be nowhere.
    assert list(home.rglob("*.db")), "expected Dagster's SQLite storage under DAGSTER_HOME"
    assert (data / "ledger.sqlite").exists() and list((data / "lineage").glob("*.parquet"))
    payloads = sent_payload_markers(data)
    hits = scan([data, home], [f.encode() for f in KEY_FORMS] + [p.encode() for p in payloads])
    assert not hits, "\n".join(hits[:20])
    # The simulator's own log says where its key came from, not the key.
    assert KEY not in leak_sim.log_path.read_text()

    # Dagster's event records, through its API: no key, no base64 image in any metadata.
    from dagster import DagsterInstance

    monkeypatch.setenv("DAGSTER_HOME", str(home))
    with DagsterInstance.get() as instance:
        runs = instance.get_runs()
        assert runs
        for run in runs:
            for record in instance.all_logs(run.run_id):
                text = repr(record)
                assert not [f for f in KEY_FORMS if f in text], run.run_id
                assert not [p for p in payloads if p in text], f"a submitted image is in run {run.run_id}"
                assert all(len(m) < 40_000 for m in INLINE_IMAGE_RE.findall(text)), "an inline image is not small"
            assert not [f for f in KEY_FORMS if f in repr(run.run_config) + repr(run.tags)]


INLINE_IMAGE_RE = re.compile(r"data:image/[a-z]+;base64,[A-Za-z0-9+/=]+")


def sent_payload_markers(data: Path) -> list[str]:
    """A distinctive stretch of the base64 of every image the sweep sent (from the cache)."""
    from vidu_pipeline.image_cache import ImageCache

    cache = ImageCache(data / "cache" / "images")
    blobs = [p for p in (data / "cache" / "images").rglob("*") if p.is_file() and len(p.stem) == 64]
    markers = []
    for blob in blobs:
        uri = cache.data_uri(blob.stem)
        payload = uri.split(",", 1)[1]
        markers.append(payload[200:300])  # past the format header, which all PNGs share
    assert markers, "expected the sent images in the cache"
    return markers


def test_repr_of_resources_clients_and_endpoints(monkeypatch, tmp_path):
    from vidu_pipeline.api import errors
    from vidu_pipeline.defs.resources import PipelineResource, ViduResource, vidu_resource_from_env

    monkeypatch.setenv("VIDU_API_KEY", KEY)
    monkeypatch.setenv("VIDU_API_BASE_URL", "http://127.0.0.1:9")
    from_env = vidu_resource_from_env()
    literal = ViduResource(api_key=KEY, base_url="http://127.0.0.1:9")
    client, endpoint = from_env.client(tmp_path)
    objects = [from_env, literal, client, endpoint, PipelineResource(data_dir=str(tmp_path))]
    for obj in objects:
        for text in (repr(obj), str(obj)):
            assert KEY not in text, f"{type(obj).__name__} shows the key: {text}"
    assert endpoint.api_key == KEY  # it is there, just not shown
    # A refused call's error does not echo the key either (the simulator is not running: the
    # connection is refused, and the message names the host only).
    with pytest.raises(errors.ViduError) as info:
        client.get_task_result("t-1")
    assert KEY not in str(info.value) and KEY not in repr(info.value)
    client.close()


def test_simulator_refuses_wrong_or_missing_key_and_binds_loopback(tmp_path):
    # No --host given: the default must be loopback only.
    sim = SimulatorProcess(tmp_path / "sim", api_key=KEY)
    try:
        sim.start()
        assert sim.base_url.startswith("http://127.0.0.1:"), sim.base_url
        from vidu_pipeline.simulator.service import SimulatorConfig

        assert SimulatorConfig().host == "127.0.0.1"
        submit = sim.base_url + "/v3/async/vidu-q1-reference2video"
        poll = sim.base_url + "/v3/async/task-result?task_id=x"
        body = {"images": ["https://example.com/a.png"], "prompt": "p"}
        for headers in (
            {},
            {"Authorization": "Bearer wrong"},
            {"Authorization": KEY},
            {"Authorization": f"Bearer {KEY}x"},
            {"Authorization": f"Basic {KEY}"},
        ):
            for method, url in (
                ("POST", submit),
                ("GET", poll),
                ("GET", sim.base_url + "/_simulator/stats"),
                ("POST", sim.base_url + "/_simulator/faults"),
            ):
                resp = requests.request(
                    method, url, json=body if method == "POST" else None, headers=headers, timeout=10
                )
                assert resp.status_code == 401, (method, url, headers, resp.status_code)
                assert resp.json()["reason"] == "FAILED_TO_AUTH"
                assert KEY not in resp.text
        assert sim.stats()["submits"]["accepted"] == 0
        # The right key opens the door (a 404 for an unknown task, not a 401).
        ok = requests.get(poll, headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
        assert ok.status_code == 404
    finally:
        sim.stop()
    # It printed where the key came from, never the key.
    assert KEY not in sim.log_path.read_text()
    assert "from $VIDU_SIMULATOR_API_KEY" in sim.log_path.read_text()


def test_simulator_cli_defaults_loopback_and_takes_its_key_from_the_environment(monkeypatch):
    import argparse

    from vidu_pipeline.simulator.cli import add_arguments

    def parse(*argv: str) -> argparse.Namespace:
        parser = argparse.ArgumentParser()
        add_arguments(parser)
        return parser.parse_args(list(argv))

    monkeypatch.delenv("VIDU_SIMULATOR_API_KEY", raising=False)
    assert parse().host == "127.0.0.1"
    assert parse().api_key == "sim-key"
    monkeypatch.setenv("VIDU_SIMULATOR_API_KEY", KEY)
    assert parse().api_key == KEY  # not the built-in default
    assert parse("--api-key", "other").api_key == "other"
