"""``vidu-pipeline`` as a user runs it: in a subprocess, against a simulator over HTTP."""

import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from PIL import Image
from support import run_cli

from vidu_pipeline.api import runtime
from vidu_pipeline.lineage import LineageStore
from vidu_pipeline.mp4 import probe_video

pytestmark = pytest.mark.slow  # the CLI in subprocesses

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "catalog"
KEY = "cli-test-key"
SCALE = "0.1"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SimProcess:
    """A standalone simulator in its own process, so it outlives a killed ``generate``."""

    def __init__(self, state_dir: Path, *extra: str, latency: float = 0.5):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "VIDU_SIMULATOR_API_KEY": KEY}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "vidu_pipeline.simulator",
                "--port",
                str(self.port),
                "--latency",
                str(latency),
                "--render-scale",
                SCALE,
                "--state-dir",
                str(state_dir),
                *extra,
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                self.stats()
                return
            except requests.RequestException:
                time.sleep(0.1)
        raise RuntimeError("simulator did not start")

    def stats(self) -> dict:
        return requests.get(
            self.base_url + "/_simulator/stats", headers={"Authorization": f"Bearer {KEY}"}, timeout=5
        ).json()

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture
def sim(tmp_path):
    s = SimProcess(tmp_path / "sim")
    yield s
    s.stop()


@pytest.fixture
def work(tmp_path):
    shutil.copytree(SAMPLE, tmp_path / "catalog")
    return tmp_path


def cli_env(work: Path, sim: SimProcess | None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VIDU_")}
    env.update({"DAGSTER_HOME": str(work / "dagster_home"), "VIDU_SIMULATOR_RENDER_SCALE": SCALE})
    if sim:
        env.update({"VIDU_API_KEY": KEY, "VIDU_API_BASE_URL": sim.base_url})
    return env


def cli(work: Path, sim, *args, env=None, timeout=180) -> subprocess.CompletedProcess:
    return run_cli(*args, cwd=work, env=env or cli_env(work, sim), timeout=timeout)


def generate_args(work: Path, *extra: str) -> list[str]:
    return ["generate", "--catalog", str(work / "catalog"), "--data-dir", str(work / "data"), *extra]


def start_generate(work: Path, env: dict, **popen) -> subprocess.Popen:
    """``vidu-pipeline generate`` on the work folder's catalog, running in the background
    (to be signalled); output captured as text."""
    return subprocess.Popen(
        [sys.executable, "-m", "vidu_pipeline.cli", *generate_args(work)],
        cwd=work,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def test_generate_sample_catalog_end_to_end_and_rerun_pays_nothing(work, sim):
    first = cli(work, sim, *generate_args(work))
    assert first.returncode == 0, first.stderr
    assert "requests: 10  succeeded: 10" in first.stdout
    data = work / "data"
    videos = sorted((data / "videos").glob("*.mp4"))
    assert len(videos) == 10
    for path in videos:
        assert probe_video(path).frames > 0
    table = LineageStore(data / "lineage").read()
    assert sorted(table["request_id"]) == sorted(p.stem for p in videos)
    assert table["video_sha256"].notna().all()
    with Image.open(data / "contact_sheet.png") as sheet:
        columns = math.ceil(math.sqrt(10))
        rows = math.ceil(10 / columns)
        assert sheet.size == (columns * 320, rows * (320 + 24))
    assert sim.stats()["submits"]["accepted"] == 10

    second = cli(work, sim, *generate_args(work))
    assert second.returncode == 0, second.stderr
    assert sim.stats()["submits"]["accepted"] == 10  # nothing paid twice

    status = cli(work, sim, "status", "--data-dir", str(data), "--json")
    assert json.loads(status.stdout)["counts"]["succeeded"] == 10


def test_dry_run_submits_nothing_and_prices_the_plan(work, sim):
    result = cli(work, sim, *generate_args(work, "--dry-run", "--price-per-task", "0.25", "--seeds", "1-3"))
    assert result.returncode == 0, result.stderr
    assert "15 would be submitted" in result.stdout
    assert "estimated cost: 15 × 0.25 = 3.75" in result.stdout
    assert sim.stats()["submits"]["accepted"] == 0
    assert not (work / "data" / "videos").exists()


def test_per_run_cap_holds_requests_planned(work, sim):
    result = cli(work, sim, *generate_args(work, "--max-tasks", "3"))
    assert result.returncode == 3, result.stdout + result.stderr
    assert "held back by a spend cap" in result.stdout
    assert sim.stats()["submits"]["accepted"] == 3
    status = json.loads(cli(work, sim, "status", "--data-dir", str(work / "data"), "--json").stdout)
    assert status["counts"]["planned"] == 7 and status["counts"]["succeeded"] == 3


def test_daily_cap_holds_across_two_concurrent_processes(work, sim):
    procs = []
    for i in range(2):
        env = cli_env(work, sim)
        env["DAGSTER_HOME"] = str(work / f"dagster_home_{i}")
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "vidu_pipeline.cli", *generate_args(work, "--max-tasks-per-day", "4")],
                cwd=work,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outs = [p.communicate(timeout=180) for p in procs]
    assert all(p.returncode in (0, 3) for p in procs), outs
    assert sim.stats()["submits"]["accepted"] == 4


def recorded_task_ids(data: Path) -> int:
    """Requests whose task id the ledger holds (read-only, beside the running generate)."""
    import sqlite3

    try:
        with contextlib.closing(sqlite3.connect(f"file:{data / 'ledger.sqlite'}?mode=ro", uri=True)) as db:
            return db.execute("SELECT count(*) FROM requests WHERE task_id IS NOT NULL").fetchone()[0]
    except sqlite3.Error:  # not created yet
        return 0


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_interrupted_generate_resumes_without_paying_twice(work, tmp_path, sig):
    sim = SimProcess(tmp_path / "slow-sim", latency=3.0)
    try:
        env = cli_env(work, sim)
        proc = start_generate(work, env)
        # Killed once every task id is in the ledger (a SIGKILL between the service accepting a
        # submit and the ledger recording it leaves it unknown, by design: not this test's case).
        deadline = time.monotonic() + 60
        while recorded_task_ids(work / "data") < 10 and time.monotonic() < deadline:
            time.sleep(0.2)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
        if sig == signal.SIGINT:
            assert proc.returncode == 130, out + err
            assert "run the same command again to resume" in err
        accepted = sim.stats()["submits"]["accepted"]
        assert accepted == 10

        again = cli(work, sim, *generate_args(work), env=env)
        assert again.returncode == 0, again.stdout + again.stderr
        stats = sim.stats()
        assert stats["submits"]["accepted"] == 10
        assert set(stats["submits"]["accepted_by_fingerprint"].values()) == {1}
        assert len(list((work / "data" / "videos").glob("*.mp4"))) == 10
    finally:
        sim.stop()


def test_reproduce_matches_on_the_simulator(work, sim):
    assert cli(work, sim, *generate_args(work, "--seeds", "7")).returncode == 0
    table = LineageStore(work / "data" / "lineage").read()
    request_id = table["request_id"].iloc[0]
    result = cli(work, sim, "reproduce", request_id, "--yes", "--data-dir", str(work / "data"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "MATCH" in result.stdout
    assert sim.stats()["submits"]["accepted"] == 6  # 5 requests + 1 reproduction
    assert (work / "data" / "reproductions" / f"{request_id}-r1.mp4").exists()

    missing = cli(work, sim, "reproduce", "no-such-request", "--yes", "--data-dir", str(work / "data"))
    assert missing.returncode == 2 and "no request 'no-such-request' in the ledger" in missing.stderr


def test_without_a_key_the_embedded_simulator_is_used(work):
    env = cli_env(work, None)
    env.update({"VIDU_SIMULATOR_LATENCY": "0.3", "VIDU_SIMULATOR_IDLE_EXIT": "60"})
    state = work / "data" / "state" / "simulator"
    try:
        result = cli(work, None, *generate_args(work, "--seeds", "1"), env=env)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "using the embedded Vidu simulator" in result.stderr
        info = json.loads((state / "simulator.json").read_text())
        assert info["base_url"].startswith("http://127.0.0.1:")
        assert oct((state / "simulator.json").stat().st_mode & 0o777) == "0o600"
        assert len(list((work / "data" / "videos").glob("*.mp4"))) == 5
    finally:
        runtime.stop_local_simulator(state)


EXIT_NOW = """
import atexit, sys, threading, time
from pathlib import Path
from vidu_pipeline.cli import exit_now
atexit.register(lambda: print("atexit ran"))
print("buffered output")
if len(sys.argv) > 1:  # a non-daemon thread still working: the normal exit waits for it
    threading.Thread(target=lambda: (time.sleep(0.3), Path(sys.argv[1]).write_text("done"))).start()
exit_now(3)
"""


def test_the_quick_exit_keeps_the_exit_code_the_output_the_atexit_handlers_and_live_threads(tmp_path):
    """The console script skips the interpreter's teardown, not what a normal exit guarantees."""
    plain = subprocess.run([sys.executable, "-c", EXIT_NOW], capture_output=True, text=True, timeout=60)
    assert plain.returncode == 3
    assert plain.stdout.splitlines() == ["buffered output", "atexit ran"], plain.stdout + plain.stderr
    marker = tmp_path / "thread-finished"
    waited = subprocess.run([sys.executable, "-c", EXIT_NOW, str(marker)], capture_output=True, text=True, timeout=60)
    assert waited.returncode == 3 and marker.read_text() == "done", waited.stderr
