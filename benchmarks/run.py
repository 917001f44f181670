"""Benchmarks for vidu_pipeline: one command, every figure with its goal.

    python benchmarks/run.py            # full run (a few minutes on 2 cores)
    python benchmarks/run.py --quick    # tiny N, for the smoke test (well under a minute)
    python benchmarks/run.py --only e2e,tick   # a subset (e2e, overhead, tick, images, lineage, quality)

Every simulator this starts is a child process stopped at the end (also on Ctrl-C). Timing
figures are ratios measured within one run wherever possible, because the machine is shared
and noisy. See benchmarks/README.md for what each figure means and what limits it.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures as cf
import io
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from vidu_pipeline.testing import SimulatorProcess

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PY = sys.executable
API_KEY = "bench-key"
RESULTS: list[dict] = []  # figure, value, goal, met


def log(msg: str) -> None:
    print(msg, flush=True)


def figure(name: str, value: float | str, goal: str, met: bool | None, fmt: str = "{:.3g}") -> None:
    text = fmt.format(value) if isinstance(value, (int, float)) else str(value)
    RESULTS.append(
        {"figure": name, "value": text, "goal": goal, "met": "n/a" if met is None else ("yes" if met else "NO")}
    )
    log(f"FIGURE {name}: {text}  (goal {goal}; met: {RESULTS[-1]['met']})")


# --- inputs ----------------------------------------------------------------------------------

ASPECTS = ("16:9", "9:16", "1:1")


def picture(rng: random.Random, w: int, h: int, mode: str = "RGB") -> Image.Image:
    """A cheap but non-trivial picture: a gradient with a few shapes (compresses like a photo-ish
    image rather than like noise or a flat fill)."""
    x = np.linspace(0, 1, w, dtype=np.float32)[None, :]
    y = np.linspace(0, 1, h, dtype=np.float32)[:, None]
    c = [rng.random() for _ in range(6)]
    arr = np.stack(
        [(255 * (c[i] * x + c[i + 3] * y) / 2) % 256 + np.zeros((h, w), np.float32) for i in range(3)], axis=-1
    ).astype(np.uint8)
    im = Image.fromarray(arr, "RGB")
    d = ImageDraw.Draw(im)
    for _ in range(6):
        x0, y0 = rng.randrange(w), rng.randrange(h)
        d.ellipse(
            [x0, y0, x0 + rng.randrange(10, max(11, w // 3)), y0 + rng.randrange(10, max(11, h // 3))],
            fill=tuple(rng.randrange(256) for _ in range(3)),
        )
    return im.convert(mode) if mode != "RGB" else im


def make_catalog(
    root: Path, subjects: int, prompts_per_subject: int, images_per_subject: int = 2, seed: int = 0
) -> Path:
    """A small valid catalog: PNG/JPEG references of 256-480 px, prompts cycling the aspect ratios."""
    rng = random.Random(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    img_rows, prompt_rows = ["subject_id,image,view"], ["subject_id,prompt,aspect_ratio"]
    for s in range(subjects):
        sid = f"subj{s:03d}"
        for i in range(images_per_subject):
            fmt, ext = (("PNG", "png"), ("JPEG", "jpg"))[i % 2]
            name = f"images/{sid}_{i}.{ext}"
            picture(rng, rng.randrange(256, 480), rng.randrange(256, 480)).save(root / name, fmt)
            img_rows.append(f"{sid},{name},view{i}")
        for p in range(prompts_per_subject):
            prompt_rows.append(f'{sid},"Subject {s} moves gently, take {p}.",{ASPECTS[(s + p) % 3]}')
    (root / "images.csv").write_text("\n".join(img_rows) + "\n")
    (root / "prompts.csv").write_text("\n".join(prompt_rows) + "\n")
    (root / "sweep.yaml").write_text("seeds: [1]\n")
    return root


def make_mixed_images(root: Path, n: int, seed: int = 1) -> Path:
    """``n`` mixed reference images (PNG/JPEG/WebP; RGB, RGBA, greyscale; 160-1600 px) and a
    catalog over them (one subject per 5 images)."""
    rng = random.Random(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = ["subject_id,image,view"]
    for i in range(n):
        fmt, ext = (("PNG", "png"), ("JPEG", "jpg"), ("WEBP", "webp"))[i % 3]
        long_side = rng.choice((160, 320, 512, 800, 1200, 1600))
        short = max(128, int(long_side * rng.uniform(0.5, 1.0)))
        w, h = (long_side, short) if rng.random() < 0.5 else (short, long_side)
        mode = rng.choice(("RGB", "RGB", "RGBA", "L")) if fmt != "JPEG" else rng.choice(("RGB", "L"))
        im = picture(rng, w, h, mode)
        name = f"images/img{i:04d}.{ext}"
        kw = {"quality": 85} if fmt in ("JPEG", "WEBP") else {}
        im.save(root / name, fmt, **kw)
        rows.append(f"s{i // 5:04d},{name},v{i % 5}")
    (root / "images.csv").write_text("\n".join(rows) + "\n")
    (root / "prompts.csv").write_text(
        "subject_id,prompt\n" + "".join(f"s{s:04d},a prompt\n" for s in range(math.ceil(n / 5)))
    )
    (root / "sweep.yaml").write_text("seeds: [1]\n")
    return root


# --- processes -------------------------------------------------------------------------------


def simulator(work: Path, *, latency: float, concurrency: int, render_scale: float) -> SimulatorProcess:
    """A standalone simulator in a child process (its own state folder, fresh counters)."""
    state = Path(tempfile.mkdtemp(prefix="sim-", dir=work)) / "state"
    return SimulatorProcess(state, api_key=API_KEY, latency=latency, concurrency=concurrency, render_scale=render_scale)


def run_child(cmd: list[str], env: dict, out_path: Path, timeout: float) -> dict:
    """Run a child to the end; wall time and its own rusage (CPU, peak RSS) via wait4."""
    with open(out_path, "wb") as out:
        t0 = time.time()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        killer = threading.Timer(timeout, proc.kill)
        killer.start()
        peak_kb = [0]
        done = threading.Event()

        def sample() -> None:
            # VmHWM of the child's own address space. (ru_maxrss from wait4 would not do: Linux
            # carries the forking parent's high-water mark across exec, i.e. this process's.)
            while not done.wait(0.05):
                try:
                    with open(f"/proc/{proc.pid}/status") as f:
                        for line in f:
                            if line.startswith("VmHWM:"):
                                peak_kb[0] = max(peak_kb[0], int(line.split()[1]))
                except (OSError, ValueError):
                    pass

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            _, status, ru = os.wait4(proc.pid, 0)
        finally:
            done.set()
            killer.cancel()
        t1 = time.time()
        sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {
        "rc": proc.returncode,
        "start": t0,
        "end": t1,
        "wall": t1 - t0,
        "cpu": ru.ru_utime + ru.ru_stime,
        "maxrss_mb": peak_kb[0] / 1024.0,
        "output": out_path.read_text(errors="replace"),
    }


def generate_command(sim: SimulatorProcess, home: Path, catalog: Path, data: Path, seeds: str) -> tuple[list, dict]:
    """``vidu-pipeline generate`` as a user runs it (the console script), pointed at ``sim``."""
    env = {
        **os.environ,
        "VIDU_API_KEY": API_KEY,
        "VIDU_API_BASE_URL": sim.base_url,
        "VIDU_SIMULATOR_RENDER_SCALE": str(sim.render_scale),
        "DAGSTER_HOME": str(home),
    }
    script = Path(PY).parent / "vidu-pipeline"
    entry = [str(script)] if script.exists() else [PY, "-m", "vidu_pipeline.cli"]
    return [*entry, "generate", "--catalog", str(catalog), "--data-dir", str(data), "--seeds", seeds], env


def run_generate(
    workdir: Path, catalog: Path, sim: SimulatorProcess, seeds: str, tag: str, timeout: float = 900
) -> dict:
    data = workdir / f"data-{tag}"
    home = Path(tempfile.mkdtemp(prefix=f"dagster-{tag}-", dir=workdir))
    cmd, env = generate_command(sim, home, catalog, data, seeds)
    res = run_child(cmd, env, workdir / f"generate-{tag}.log", timeout)
    if res["rc"] != 0:
        raise RuntimeError(f"generate ({tag}) exited {res['rc']}:\n{res['output'][-3000:]}")
    res["data"] = data
    from vidu_pipeline.ledger import Ledger

    ledger = Ledger(f"sqlite:///{data / 'ledger.sqlite'}")
    with ledger.engine.connect() as conn:
        res["first_submit"] = conn.exec_driver_sql("SELECT min(started_at) FROM attempts").scalar()
        res["last_submit_end"] = conn.exec_driver_sql("SELECT max(ended_at) FROM attempts").scalar()
        res["last_server_finish"] = conn.exec_driver_sql("SELECT max(finished_at) FROM requests").scalar()
        res["videos"] = conn.exec_driver_sql("SELECT count(*) FROM requests WHERE video_sha256 IS NOT NULL").scalar()
        res["requests"] = conn.exec_driver_sql("SELECT count(*) FROM requests").scalar()
    ledger.close()
    return res


# --- figures ---------------------------------------------------------------------------------


def bench_e2e(work: Path, quick: bool) -> None:
    if quick:
        subjects, prompts, seeds, n_seeds, C, L = 2, 2, "1-2", 2, 4, 1.0
    else:
        subjects, prompts, seeds, n_seeds, C, L = 10, 2, "1-10", 10, 20, 2.0
    N = subjects * prompts * n_seeds
    scale = 0.05
    catalog = make_catalog(work / "catalog-e2e", subjects, prompts)
    ideal = math.ceil(N / C) * L
    log(f"\n== end to end: N={N}, C={C}, L={L:g} s, render_scale={scale}; ideal ceil(N/C)*L = {ideal:g} s")

    with simulator(work, latency=L, concurrency=C, render_scale=scale) as sim:
        res = run_generate(work, catalog, sim, seeds, "e2e")
        stats = sim.stats()
    with simulator(work, latency=L, concurrency=C, render_scale=scale) as sim:
        env = dict(os.environ)
        naive = run_child(
            [
                PY,
                str(HERE / "naive_script.py"),
                "--catalog",
                str(catalog),
                "--out",
                str(work / "naive-out"),
                "--seeds",
                seeds,
                "--base-url",
                sim.base_url,
                "--api-key",
                API_KEY,
            ],
            env,
            work / "naive.log",
            600,
        )
        if naive["rc"] != 0:
            raise RuntimeError(f"naive script failed:\n{naive['output'][-2000:]}")
    naive_info = json.loads(naive["output"].strip().splitlines()[-1])

    assert res["videos"] == N, f"generate stored {res['videos']} of {N} videos"
    wall = res["wall"]
    from_submit = res["end"] - res["first_submit"]
    startup = res["first_submit"] - res["start"]
    server = res["last_server_finish"] - res["first_submit"]
    tail = res["end"] - res["last_server_finish"]
    log(
        f"generate: makespan {wall:.2f} s (process start -> exit) = startup to first submit {startup:.2f} s "
        f"+ first submit to the service's last completion {server:.2f} s (submits took "
        f"{res['last_submit_end'] - res['first_submit']:.2f} s) + tail to exit {tail:.2f} s "
        f"(detect, download, verify, lineage, contact sheet)"
    )
    log(
        f"naive script: makespan {naive['wall']:.2f} s (submits {naive_info['submit_s']} s, "
        f"{naive_info['polls']} polls)"
    )
    figure("e2e makespan / ideal", wall / ideal, "<= 1.25", wall / ideal <= 1.25)
    figure("e2e makespan / naive script", wall / naive["wall"], "<= 1.15", wall / naive["wall"] <= 1.15)
    figure("e2e makespan from first submit / ideal (info)", from_submit / ideal, "info", None)
    figure("e2e startup before first submit, s (info)", startup, "info", None, "{:.2f}")
    figure("e2e tail after the service's last completion, s (info)", tail, "info", None, "{:.2f}")
    polls = stats["polls"]["total"]
    videos = stats["downloads"]["ok"]
    figure("polls per finished video", polls / max(1, videos), "<= 3", polls / max(1, videos) <= 3)
    log(
        f"simulator stats: polls {stats['polls']}, downloads ok {videos}, "
        f"naive polls per video {naive_info['polls'] / max(1, naive_info['videos']):.2f}"
    )


def bench_e2e_realistic(work: Path, quick: bool) -> None:
    """The same session at a latency closer to the real service's (L = 10 s instead of 2 s):
    the pipeline's fixed seconds (start-up, tail) against a longer ideal."""
    if quick:
        subjects, prompts, seeds, n_seeds, C, L = 2, 2, "1-2", 2, 4, 2.0
    else:
        subjects, prompts, seeds, n_seeds, C, L = 10, 2, "1-10", 10, 20, 10.0
    N = subjects * prompts * n_seeds
    catalog = make_catalog(work / "catalog-e2e-real", subjects, prompts)
    ideal = math.ceil(N / C) * L
    log(f"\n== end to end, realistic latency: N={N}, C={C}, L={L:g} s; ideal {ideal:g} s")
    with simulator(work, latency=L, concurrency=C, render_scale=0.05) as sim:
        res = run_generate(work, catalog, sim, seeds, "e2e-real")
    assert res["videos"] == N, f"generate stored {res['videos']} of {N} videos"
    startup = res["first_submit"] - res["start"]
    tail = res["end"] - res["last_server_finish"]
    log(f"generate: makespan {res['wall']:.2f} s; startup {startup:.2f} s; tail after the last completion {tail:.2f} s")
    ratio = res["wall"] / ideal
    figure(f"e2e realistic (L={L:g} s) makespan / ideal", ratio, "<= 1.05", ratio <= 1.05)
    figure("e2e realistic startup before first submit, s (info)", startup, "info", None, "{:.2f}")
    figure("e2e realistic tail after the last completion, s (info)", tail, "info", None, "{:.2f}")


def bench_ingest(work: Path, quick: bool) -> None:
    """Collection throughput: N tasks that have all finished before collection starts, at the
    benchmark's small clips (96×54, where the naive decode costs least: the hardest ratio) and,
    for information, at 960×540 (N = 50), where decoding weighs as it does for real clips."""
    small = _ingest_rates(work, 20 if quick else 500, 0.05, "ingest")
    larger = _ingest_rates(work, 6 if quick else 50, 0.25 if quick else 0.5, "ingest-540p")
    figure("ingestion: videos recorded per s, all finished (info)", small[0], "info", None, "{:.1f}")
    ratio = small[0] / small[1]
    figure("ingestion rate / naive download+decode rate", ratio, ">= 0.5", ratio >= 0.5)
    figure("ingestion rate / naive, 960x540 clips, N=50 (info)", larger[0] / larger[1], "info", None)


def _ingest_rates(work: Path, n: int, scale: float, tag: str) -> tuple[float, float]:
    """Videos per second collected by ``generate`` and by the naive loop, on the same n files.

    A first ``generate --timeout 0`` submits them (the service takes L = 20 s each, so none is
    done when it stops); once the simulator has rendered every video, a second ``generate``
    on the same data folder and Dagster home polls, downloads, verifies, records and
    materializes them. Its rate (videos ÷ first collect run created → last collect run ended,
    from Dagster's run records) over the naive rate: one thread downloading each video with
    ``requests`` and decoding every frame with PyAV, on the same files.
    """
    import av
    import requests
    from dagster import DagsterInstance, RunsFilter

    L = 8.0 if n <= 20 else 12.0 if n <= 50 else 20.0  # long enough that none finishes before the first run ends
    subjects = max(1, n // 10)
    catalog = make_catalog(work / f"catalog-{tag}", subjects, 2, seed=11)
    seeds = f"1-{math.ceil(n / (2 * subjects))}"
    log(f"\n== ingestion: {n} tasks, all finished when collection starts; render_scale {scale}")
    home = Path(tempfile.mkdtemp(prefix=f"dagster-{tag}-", dir=work))
    data = work / f"data-{tag}"
    with simulator(work, latency=L, concurrency=10_000, render_scale=scale) as sim:
        cmd, env = generate_command(sim, home, catalog, data, seeds)
        first = run_child([*cmd, "--timeout", "0", "--no-contact-sheet"], env, work / f"{tag}-submit.log", 600)
        stats = sim.stats()
        assert stats["submits"]["accepted"] == n and stats["downloads"]["ok"] == 0, (
            f"the submit run should submit {n} and download none: {stats['submits']}, {stats['downloads']}"
            f"\n{first['output'][-2000:]}"
        )
        deadline = time.monotonic() + L + 300
        while sim.stats()["renders"]["done"] < n and time.monotonic() < deadline:
            time.sleep(0.5)
        collect = run_child(cmd, env, work / f"{tag}-collect.log", 900)
        if collect["rc"] != 0:
            raise RuntimeError(f"generate (collect) exited {collect['rc']}:\n{collect['output'][-3000:]}")
        with DagsterInstance.from_config(str(home)) as instance:
            records = instance.get_run_records(RunsFilter(job_name="vidu_collect_job"))
        begin = min(r.create_timestamp.timestamp() for r in records)
        end = max(r.end_time for r in records if r.end_time)
        from vidu_pipeline.ledger import Ledger

        ledger = Ledger(f"sqlite:///{data / 'ledger.sqlite'}")
        rows = [r for r in ledger.rows(states=["succeeded"]) if r.video_sha256]
        ledger.close()
        assert len(rows) == n, f"{len(rows)} of {n} videos stored"
        # The naive floor on the same files: plain download + full decode, one at a time.
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {API_KEY}"
        urls = [
            session.get(f"{sim.base_url}/v3/async/task-result", params={"task_id": r.task_id}, timeout=30).json()[
                "videos"
            ][0]["video_url"]
            for r in rows
        ]
        out = work / f"{tag}-naive"
        out.mkdir()
        t = time.perf_counter()
        for i, url in enumerate(urls):
            path = out / f"{i}.mp4"
            path.write_bytes(session.get(url, timeout=30).content)
            with av.open(str(path)) as container:
                for _ in container.decode(container.streams.video[0]):
                    pass
        naive_s = time.perf_counter() - t
    window = end - begin
    rate, naive_rate = n / window, n / naive_s
    log(
        f"collect: {n} videos in {window:.2f} s of collect runs ({len(records)} runs; the whole second generate "
        f"{collect['wall']:.2f} s) = {rate:.1f} videos/s; naive download + decode {naive_s:.2f} s = {naive_rate:.1f}/s"
    )
    return rate, naive_rate


class _SlowPollHandler(BaseHTTPRequestHandler):
    """Answers every task-result poll with PROCESSING after ``delay`` seconds (keep-alive)."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    delay = 0.02
    succeed_every = 0  # when > 0: task ids ending in a multiple of it answer SUCCEED instead

    def log_message(self, *a):
        pass

    def do_GET(self):
        from urllib.parse import parse_qs, urlsplit

        time.sleep(self.delay)
        task_id = parse_qs(urlsplit(self.path).query).get("task_id", [""])[0]
        done = self.succeed_every and int(task_id[-3:]) % self.succeed_every == 0
        body = json.dumps(
            {
                "task": {
                    "task_id": task_id,
                    "task_type": "VIDU_Q1_REFERENCE2VIDEO",
                    "status": "TASK_STATUS_SUCCEED" if done else "TASK_STATUS_PROCESSING",
                    "reason": "",
                    "eta": 30,
                    "progress_percent": 10,
                },
                "extra": {"seed": "1"},
                "videos": [],
                "images": [],
                "audios": [],
            }
        ).encode()
        self.server.polls += 1
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


_BENCH_SPEC = json.dumps(
    {
        "request_id": "x",
        "subject_id": "s",
        "prompt": "p",
        "seed": 1,
        "options": {
            "aspect_ratio": "16:9",
            "movement_amplitude": "auto",
            "bgm": False,
            "duration": 5,
            "resolution": "1080p",
        },
        "image_sha256s": [],
        "original_sha256s": [],
        "image_mimes": [],
    }
)


def prefill_ledger(path: Path, n: int, *, finished: int = 0):
    """A ledger with ``n`` submitted tasks, all due for a poll now; and before them ``finished``
    older requests that are done, as a long-lived dataset holds: 9 in 10 succeeded (video and
    lineage recorded), 1 in 10 failed for good."""
    from vidu_pipeline.ledger import Ledger, PlannedRequest

    ledger = Ledger(f"sqlite:///{path}")
    now = time.time()
    if finished:
        ledger.plan(PlannedRequest(f"done-{i:06d}", "s", 1, "f" * 64, _BENCH_SPEC) for i in range(finished))
        with ledger.engine.begin() as conn:
            conn.exec_driver_sql(
                "UPDATE requests SET state='succeeded', lineage_state='succeeded', attempts=1, "
                "task_id='task-' || request_id, created_at=?, updated_at=?, submitted_at=?, finished_at=?, "
                "video_path='videos/' || request_id || '.mp4', video_sha256='a' || substr(request_id, 6), "
                "video_bytes=1000, polls=2",
                (now - 86_400, now - 3_600, now - 86_000, now - 85_900),
            )
            conn.exec_driver_sql(  # 1 in 10 failed for good: its retry budget (3) is spent
                "UPDATE requests SET state='failed', lineage_state='failed', attempts=3, video_path=NULL, "
                "video_sha256=NULL, video_bytes=NULL, last_error='TASK_STATUS_FAILED' "
                "WHERE CAST(substr(request_id, 6) AS INTEGER) % 10 = 0"
            )
    ledger.plan(PlannedRequest(f"req-{i:05d}", "s", 1, "f" * 64, _BENCH_SPEC) for i in range(n))
    with ledger.engine.begin() as conn:
        conn.exec_driver_sql(
            "UPDATE requests SET state='submitted', attempts=1, task_id='task-' || request_id, "
            "submitted_at=?, next_poll_at=? WHERE state='planned'",
            (now - 5, now - 1),
        )
        conn.exec_driver_sql(
            "INSERT INTO attempts (request_id, attempt, run_id, owner, task_id, started_at, ended_at, outcome) "
            "SELECT request_id, 1, 'bench', 'bench', task_id, ?, ?, 'submitted' FROM requests",
            (now - 5, now - 5),
        )
    return ledger


def bench_tick(work: Path, quick: bool) -> None:
    from dagster import DagsterInstance, build_sensor_context

    from vidu_pipeline import tasks
    from vidu_pipeline.api.client import ViduClient
    from vidu_pipeline.defs.resources import PipelineResource, ViduResource, _ledger
    from vidu_pipeline.defs.sensors import evaluate_tick

    n = 100 if quick else 2000
    delay = 0.02
    log(f"\n== sensor tick: {n} pending tasks, {delay * 1000:.0f} ms per poll on a loopback server")
    _SlowPollHandler.delay = delay
    server = ThreadingHTTPServer(("127.0.0.1", 0), _SlowPollHandler)
    server.daemon_threads = True
    server.polls = 0
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        # 1) poll_due alone, on its own ledger
        ledger = prefill_ledger(work / "tick-a.sqlite", n)
        client = ViduClient(API_KEY, base)
        t = time.perf_counter()
        report = tasks.poll_due(ledger, client, limit=n, time_budget_s=40.0)
        poll_s = time.perf_counter() - t
        assert report.polled == n, report
        client.close()
        ledger.close()
        # 2) the sensor's whole tick (poll + run requests decisions), as the daemon would run it
        data = work / "tick-data"
        data.mkdir()
        prefill_ledger(data / "ledger.sqlite", n).close()
        pipeline = PipelineResource(data_dir=str(data))
        vidu = ViduResource(api_key=API_KEY, base_url=base)
        with DagsterInstance.ephemeral() as instance:
            ctx = build_sensor_context(instance=instance)
            t = time.perf_counter()
            evaluate_tick(ctx, pipeline, vidu)
            tick_s = time.perf_counter() - t
        _ledger.cache_clear()
        floor = n * delay / pipeline.poll_workers
    finally:
        server.shutdown()
        server.server_close()
    log(
        f"poll_due: {poll_s:.2f} s for {n} polls; evaluate_tick: {tick_s:.2f} s; "
        f"network floor {n} x {delay * 1000:.0f} ms / {pipeline.poll_workers} workers = {floor:.2f} s"
    )
    figure(f"sensor tick, {n} pending @20ms (evaluate_tick), s", tick_s, "<= 4", tick_s <= 4, "{:.2f}")
    figure(f"poll_due alone, {n} pending, s (info)", poll_s, "info", None, "{:.2f}")
    bench_tick_history(work, quick)


def bench_tick_history(work: Path, quick: bool) -> None:
    """The tick must not grow with the dataset: the same pending work on a ledger and a Dagster
    instance that also hold many finished requests (best of a few pairs, run alternately).
    The whole tick is mostly polling, so its own bookkeeping (the tick less its poll_due) is
    shown apart: that is where per-tick work that grows with the dataset would show."""
    n, finished, pairs = (100, 1_000, 1) if quick else (2_000, 20_000, 2)
    log(f"\n== sensor tick with history: {n} pending (1 in 10 finishing), alone and beside {finished:,} finished")
    _SlowPollHandler.delay, _SlowPollHandler.succeed_every = 0.02, 10
    server = ThreadingHTTPServer(("127.0.0.1", 0), _SlowPollHandler)
    server.daemon_threads = True
    server.polls = 0
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    alone, beside = [], []
    try:
        for k in range(pairs):
            alone.append(_history_tick(work / f"tick-alone-{k}", n, 0, base))
            beside.append(_history_tick(work / f"tick-beside-{k}", n, finished, base))
    finally:
        _SlowPollHandler.succeed_every = 0
        server.shutdown()
        server.server_close()
    for name, ticks in (("alone", alone), (f"beside {finished:,} finished", beside)):
        log(f"tick {name}: " + ", ".join(f"{t:.2f} s (bookkeeping {1000 * b:.0f} ms)" for t, b in ticks))
    whole = min(t for t, _ in beside) / min(t for t, _ in alone)
    own_alone, own_beside = min(b for _, b in alone), min(b for _, b in beside)
    figure(f"sensor tick beside {finished} finished, s (info)", min(t for t, _ in beside), "info", None, "{:.2f}")
    figure(f"sensor tick beside {finished} finished / alone", whole, "<= 1.15 (flat)", whole <= 1.15, "{:.3f}")
    figure("tick bookkeeping (tick less poll_due) alone, ms (info)", 1000 * own_alone, "info", None, "{:.0f}")
    figure(f"tick bookkeeping beside {finished} finished, ms (info)", 1000 * own_beside, "info", None, "{:.0f}")
    own = own_beside / own_alone
    figure(f"tick bookkeeping beside {finished} finished / alone", own, "<= 1.5 (flat)", own <= 1.5, "{:.2f}")


def _history_tick(data: Path, n: int, finished: int, base: str) -> tuple[float, float]:
    """One sensor tick over ``n`` due tasks on a fresh data folder whose ledger and Dagster
    instance (SQLite on disk, as ``dagster dev`` keeps it) also hold ``finished`` done requests.
    Returns the tick's time and its time less its ``poll_due``."""
    from dagster import DagsterInstance, build_sensor_context

    from vidu_pipeline import tasks
    from vidu_pipeline.defs.partitions import REQUESTS_PARTITIONS_NAME
    from vidu_pipeline.defs.resources import PipelineResource, ViduResource, _ledger
    from vidu_pipeline.defs.sensors import evaluate_tick, partition_order

    (data / "dagster").mkdir(parents=True)
    prefill_ledger(data / "ledger.sqlite", n, finished=finished).close()
    keys = [f"done-{i:06d}" for i in range(finished)] + [f"req-{i:05d}" for i in range(n)]
    pipeline = PipelineResource(data_dir=str(data))
    vidu = ViduResource(api_key=API_KEY, base_url=base)
    poll_due, polling = tasks.poll_due, []

    def timed_poll_due(*args, **kwargs):
        t = time.perf_counter()
        try:
            return poll_due(*args, **kwargs)
        finally:
            polling.append(time.perf_counter() - t)

    with DagsterInstance.local_temp(tempdir=str(data / "dagster")) as instance:
        for i in range(0, len(keys), 5_000):
            instance.add_dynamic_partitions(REQUESTS_PARTITIONS_NAME, keys[i : i + 5_000])
        partition_order(instance).positions(instance, [])  # the steady state: the sensor ticked before
        ctx = build_sensor_context(instance=instance)
        tasks.poll_due = timed_poll_due  # the sensor calls it as tasks.poll_due
        try:
            t = time.perf_counter()
            result = evaluate_tick(ctx, pipeline, vidu)
            tick_s = time.perf_counter() - t
        finally:
            tasks.poll_due = poll_due
    _ledger.cache_clear()
    assert result.run_requests, "the finished tasks should have asked for a collect run"
    return tick_s, tick_s - sum(polling)


def _download_and_decode_cpu(res: dict, sim: SimulatorProcess) -> float:
    """CPU seconds this process spends re-doing what generate does per video that is download
    or decode: one poll + download (with its hashing/fsync) and the full verification decode
    (which also hands the thumbnail its frame; the contact sheet reuses the thumbnails)."""
    from vidu_pipeline.api.client import ViduClient
    from vidu_pipeline.ledger import Ledger
    from vidu_pipeline.mp4 import FrameAt, probe_video

    ledger = Ledger(f"sqlite:///{res['data'] / 'ledger.sqlite'}")
    rows = [r for r in ledger.rows(states=["succeeded"]) if r.video_sha256]
    ledger.close()
    out = res["data"] / "redownload"
    out.mkdir(exist_ok=True)
    client = ViduClient(API_KEY, sim.base_url)
    t = time.process_time()
    for r in rows:
        d = client.download(r.task_id, out / f"{r.request_id}.mp4")
        probe_video(d.path, on_frame=FrameAt(1.0).offer)
    cpu = time.process_time() - t
    client.close()
    return cpu


def bench_overhead(work: Path, quick: bool) -> None:
    sizes = (4, 12) if quick else (50, 500)
    log(f"\n== orchestration overhead and memory: N = {sizes[0]} and {sizes[1]}, simulator latency ~0")
    per_video, rss, cpu_total, walls = {}, {}, {}, {}
    for n in sizes:
        subjects = max(1, n // 10)
        catalog = make_catalog(work / f"catalog-oh-{n}", subjects, 2, seed=n)
        seeds = f"1-{math.ceil(n / (2 * subjects))}"
        with simulator(work, latency=0.0, concurrency=1000, render_scale=0.05) as sim:
            res = run_generate(work, catalog, sim, seeds, f"oh{n}")
            dd = _download_and_decode_cpu(res, sim)
        videos = res["videos"]
        over = res["cpu"] - dd
        per_video[n], rss[n], cpu_total[n], walls[n] = over / videos, res["maxrss_mb"], res["cpu"], res["wall"]
        log(
            f"N={videos}: wall {res['wall']:.1f} s, child CPU {res['cpu']:.2f} s, of which download+decode "
            f"(re-measured) {dd:.2f} s -> overhead {over:.2f} s = {over / videos * 1000:.1f} ms/video; "
            f"peak RSS {res['maxrss_mb']:.0f} MB"
        )
    a, b = sizes
    marginal = (cpu_total[b] - cpu_total[a]) / (b - a)
    growth = per_video[b] / per_video[a]
    figure(f"orchestration CPU per video, N={a}, ms", per_video[a] * 1000, "flat in N", None, "{:.1f}")
    figure(f"orchestration CPU per video, N={b}, ms", per_video[b] * 1000, "flat in N", None, "{:.1f}")
    figure(f"orchestration CPU per video N={b} / N={a}", growth, "<= 1.2 (must not grow)", growth <= 1.2)
    figure("marginal child CPU per extra video (info), ms", marginal * 1000, "info", None, "{:.1f}")
    figure(f"peak RSS of generate, N={a}, MB", rss[a], "info", None, "{:.0f}")
    figure(f"peak RSS of generate, N={b}, MB", rss[b], "info", None, "{:.0f}")
    figure(f"peak RSS N={b} / N={a}", rss[b] / rss[a], "<= 1.5 (flat-ish)", rss[b] / rss[a] <= 1.5)


def _floor(paths: list[Path], workers: int) -> float:
    def one(p: Path) -> int:
        data = p.read_bytes()
        im = Image.open(io.BytesIO(data))
        im.load()
        return len(base64.b64encode(data))

    t = time.perf_counter()
    with cf.ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, paths))
    return time.perf_counter() - t


def bench_images(work: Path, quick: bool) -> None:
    from vidu_pipeline import catalog as catalog_mod
    from vidu_pipeline import images

    n = 30 if quick else 1000
    log(f"\n== image stage: {n} mixed images")
    root = make_mixed_images(work / "catalog-images", n)
    paths = sorted((root / "images").iterdir())
    _floor(paths, 2)  # warm the page cache for both sides
    floor_s = _floor(paths, 2)
    cache_dir = work / "image-cache"
    t = time.perf_counter()
    cat = catalog_mod.load_catalog(root)
    v = catalog_mod.validate_images(cat, images.ImageCache(cache_dir))
    first = time.perf_counter() - t
    assert len(v.accepted) == n, (len(v.accepted), v.rejections[:3])
    t = time.perf_counter()
    cat = catalog_mod.load_catalog(root)
    v2 = catalog_mod.validate_images(cat, images.ImageCache(cache_dir))
    second = time.perf_counter() - t
    assert v2.cache_hits == n
    floor_1 = _floor(paths, 1)
    log(
        f"validate+encode: {first:.2f} s ({n / first:.0f} images/s); raw floor (open+load+base64, 2 threads) "
        f"{floor_s:.2f} s ({n / floor_s:.0f}/s; 1 thread {floor_1:.2f} s); re-run {second:.3f} s"
    )
    figure("images/s validated / raw floor", floor_s / first, ">= 0.8", floor_s / first >= 0.8)
    figure("image re-run time / first run", second / first, "<= 0.05", second / first <= 0.05)


def bench_lineage(work: Path, quick: bool) -> None:
    import pandas as pd

    from vidu_pipeline.lineage import LineageStore

    sizes = (100, 1000) if quick else (1_000, 10_000, 100_000)
    log(f"\n== lineage table: append 100 rows at {', '.join(map(str, sizes))} existing rows")
    now = pd.Timestamp.now(tz="UTC")

    def rows(start: int, k: int) -> list[dict]:
        return [
            {
                "request_id": f"req-{i:07d}",
                "subject_id": f"s{i % 97}",
                "prompt": "a prompt " * 8,
                "aspect_ratio": "16:9",
                "movement_amplitude": "auto",
                "bgm": False,
                "duration": 5,
                "resolution": "1080p",
                "seed_requested": i,
                "seed_effective": i,
                "reference_sha256s": ["a" * 64, "b" * 64],
                "reference_original_sha256s": ["c" * 64],
                "task_id": f"task-{i}",
                "attempts": 1,
                "state": "succeeded",
                "submitted_at": now,
                "finished_at": now,
                "video_path": f"/v/{i}.mp4",
                "video_sha256": "d" * 64,
                "video_bytes": 12345,
                "width": 96,
                "height": 54,
                "fps": 24.0,
                "frames": 120,
                "duration_s": 5.0,
                "has_audio": False,
                "pipeline_version": "bench",
            }
            for i in range(start, start + k)
        ]

    appends, reads = {}, {}
    for size in sizes:
        store = LineageStore(work / f"lineage-{size}")
        for start in range(0, size, 10_000):  # existing history in 10k-row parts, then compacted
            store.append(rows(start, min(10_000, size - start)))
        store.compact()
        times = []
        for k in range(5):
            batch = rows(size + 100 * k, 100)
            t = time.perf_counter()
            store.append(batch)
            times.append(time.perf_counter() - t)
        appends[size] = statistics.median(times)
        t = time.perf_counter()
        df = store.read()
        reads[size] = time.perf_counter() - t
        assert len(df) == size + 500
        log(
            f"{size:>7} rows: append 100 rows median {appends[size] * 1000:.1f} ms; "
            f"read whole table into pandas {reads[size] * 1000:.0f} ms"
        )
    for size in sizes:
        figure(f"lineage append 100 rows at {size} rows, ms", appends[size] * 1000, "flat", None, "{:.1f}")
    ratio = appends[sizes[-1]] / appends[sizes[0]]
    figure(f"lineage append at {sizes[-1]} / at {sizes[0]}", ratio, "<= 1.5 (flat)", ratio <= 1.5)
    for size in sizes:
        figure(f"lineage read whole table at {size + 500} rows, s", reads[size], "info", None, "{:.3f}")


def bench_quality(work: Path, quick: bool) -> None:
    """CPU of the quality figures riding on the verification decode (``FrameSampler.offer`` on
    every decoded frame + ``measure`` against the references) over that decode's own CPU, on a
    simulator-rendered 5 s 1080p clip with two reference images (quick: best of 1, not 3; a
    smaller clip would not say anything: its decode is too cheap to compare with)."""
    from vidu_pipeline import quality
    from vidu_pipeline.simulator.render import RenderSpec, render_video

    rng = random.Random(7)
    refs = []
    for size in ((640, 480), (480, 640)):
        buf = io.BytesIO()
        picture(rng, *size).save(buf, format="JPEG", quality=85)
        refs.append(buf.getvalue())
    path = work / "quality-clip.mp4"
    spec = RenderSpec(images=tuple(refs), prompt="a slow pan", seed=1, movement_amplitude="large")
    render_video(spec, path)
    log("\n== quality figures on the verification decode (1080p)")
    ratios = quality.cost_ratio(path, refs, repeats=1 if quick else 3)
    log(f"probe CPU {ratios['probe_cpu_s']:.2f} s; standalone measure_video / probe {ratios['standalone']:.2f}")
    value = ratios["on_probe_frames"]
    figure("quality / verification decode CPU (1080p)", value, "<= 0.3", value <= 0.3, "{:.3f}")


BENCHES = {
    "e2e": bench_e2e,
    "e2e_realistic": bench_e2e_realistic,
    "ingest": bench_ingest,
    "tick": bench_tick,
    "overhead": bench_overhead,
    "images": bench_images,
    "lineage": bench_lineage,
    "quality": bench_quality,
}


def print_table() -> None:
    cols = ("figure", "value", "goal", "met")
    widths = [max(len(c), *(len(r[c]) for r in RESULTS)) for c in cols]
    line = "  ".join(c.ljust(w) for c, w in zip(cols, widths))
    print("\n" + line)
    print("  ".join("-" * w for w in widths))
    for r in RESULTS:
        print("  ".join(r[c].ljust(w) for c, w in zip(cols, widths)))
    sys.stdout.flush()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny N: checks that every figure is produced")
    p.add_argument("--only", default=",".join(BENCHES), help=f"comma-separated subset of {', '.join(BENCHES)}")
    p.add_argument("--keep", action="store_true", help="keep the work folder (its path is printed)")
    p.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    chosen = [b.strip() for b in args.only.split(",") if b.strip()]
    unknown = set(chosen) - set(BENCHES)
    if unknown:
        p.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")

    import logging
    import warnings

    logging.basicConfig(level=logging.ERROR)
    warnings.filterwarnings("ignore")
    work = Path(tempfile.mkdtemp(prefix="vidu-bench-"))
    log(
        f"work folder: {work}{' (kept)' if args.keep else ''}; python {sys.version.split()[0]}; "
        f"{os.cpu_count()} cores; {'quick' if args.quick else 'full'} run"
    )
    t0 = time.perf_counter()
    failed = []
    try:
        for name in chosen:
            try:
                BENCHES[name](work, args.quick)
            except Exception as exc:  # report the others anyway
                failed.append(name)
                log(f"BENCHMARK {name} FAILED: {type(exc).__name__}: {exc}")
    finally:
        if not args.keep:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
    print_table()
    log(f"\ntotal benchmark time {time.perf_counter() - t0:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(RESULTS, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
