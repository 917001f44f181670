"""Fault and crash drill for ``vidu-pipeline generate`` against a misbehaving simulator.

    python drills/run_drill.py [--requests 60 --kills 20 --sigterm-every 3 --race-requests 20
                                --races 2 --seed 7 --keep DIR]

Runs a sweep against a standalone simulator subprocess that injects 5xx, 429, dropped
connections (also after a task was accepted), failing tasks, truncated downloads and short URL
TTLs all at once; races two pollers on one ledger (two ``generate``s at once, and ``generate``
beside the sensor evaluated in another process) while many tasks fail and polls are slow;
kills ``generate`` with SIGKILL or SIGTERM at seeded random moments (and once in the middle of
a slow submit), restarting it each time; then checks that nothing was lost and nothing was paid
twice — also against the service's own books, task by task. Prints every invariant and the
counts; exits 1 if any invariant fails.

The helpers here are also what ``tests/test_drills.py`` and ``tests/test_security.py`` use.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from vidu_pipeline import testing

REPO = Path(__file__).resolve().parents[1]
DRILL_KEY = "sk-vidu-drill-5e1d0c"
TERMINAL = ("succeeded", "failed", "unknown")
NOT_BILLABLE = ("rejected", "refused")  # attempt outcomes for which the service created no task

# The fault mix of the drill (simulator CLI flags).
FAULT_FLAGS = {
    "--server-errors": 0.20,
    "--rate-limit": 0.10,
    "--retry-after": 1,
    "--drop": 0.05,
    "--drop-after-accept": 0.5,
    "--server-errors-after-accept": 0.5,
    "--fail-tasks": 0.05,
    "--truncate": 0.05,
}

# --- the catalog ---------------------------------------------------------------------------------

ACTIONS = [
    "turns slowly",
    "waves at the camera",
    "walks to the left",
    "looks up at the sky",
    "spins around",
    "jumps once",
    "nods twice",
    "sits down",
    "stands up",
    "smiles",
]
PLACES = [
    "in a sunny park",
    "on a quiet beach",
    "in a busy kitchen",
    "under a night sky",
    "in a snowy forest",
    "at a train station",
    "on a rooftop",
    "in a library",
]


def make_catalog(
    root: Path, *, subjects: int = 5, prompts: int = 5, seeds: int = 2, rng_seed: int = 0, size: int = 160
) -> int:
    """Write a catalog of ``subjects × prompts × seeds`` requests with generated images
    (``size`` px, ≥ 128); returns the number of requests."""
    from PIL import Image, ImageDraw

    rng = random.Random(rng_seed)
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    image_rows, prompt_rows = [], []
    ratios = ["16:9", "9:16", "1:1"]
    for s in range(subjects):
        subject = f"subject{s}"
        for v in range(2):
            img = Image.new("RGB", (size, size + 16 * v), tuple(rng.randrange(256) for _ in range(3)))
            draw = ImageDraw.Draw(img)
            for _ in range(6):
                x0, y0 = rng.randrange(size // 2), rng.randrange(size // 2)
                draw.rectangle(
                    [x0, y0, x0 + rng.randrange(10, size // 2), y0 + rng.randrange(10, size // 2)],
                    fill=tuple(rng.randrange(256) for _ in range(3)),
                )
            name = f"images/{subject}-{v}.png"
            img.save(root / name)
            image_rows.append(f"{subject},{name},view{v}")
        for p in range(prompts):
            text = f"The {subject} {ACTIONS[(s + p) % len(ACTIONS)]} {PLACES[(s * 3 + p) % len(PLACES)]} (take {p})"
            prompt_rows.append(f'{subject},"{text}",{ratios[(s + p) % 3]},auto,{"true" if p % 4 == 0 else "false"}')
    (root / "images.csv").write_text("subject_id,image,view\n" + "\n".join(image_rows) + "\n")
    (root / "prompts.csv").write_text(
        "subject_id,prompt,aspect_ratio,movement_amplitude,bgm\n" + "\n".join(prompt_rows) + "\n"
    )
    (root / "sweep.yaml").write_text(f"seeds: [{', '.join(str(100 + i) for i in range(seeds))}]\n")
    return subjects * prompts * seeds


def shape_for(requests_wanted: int) -> tuple[int, int, int]:
    """(subjects, prompts, seeds) giving at least ``requests_wanted`` requests."""
    subjects, seeds = 5, 2
    prompts = max(1, -(-requests_wanted // (subjects * seeds)))
    return subjects, prompts, seeds


# --- the simulator as a separate process (it must survive kills of generate) ---------------------


class SimulatorProcess(testing.SimulatorProcess):
    """The drill's simulator process: the drill's key and a 3 s URL TTL unless told otherwise."""

    def __init__(self, state_dir: Path, *, api_key: str = DRILL_KEY, url_ttl: int | None = 3, **kw: Any):
        super().__init__(state_dir, api_key=api_key, url_ttl=url_ttl, **kw)


# --- driving generate ----------------------------------------------------------------------------


def generate_cmd(catalog: Path, data_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "vidu_pipeline.cli",
        "generate",
        "--catalog",
        str(catalog),
        "--data-dir",
        str(data_dir),
        "--no-contact-sheet",
        *extra,
    ]


def run_generate(
    catalog: Path, data_dir: Path, env: dict[str, str], *extra: str, timeout: float = 600
) -> subprocess.CompletedProcess:
    return subprocess.run(
        generate_cmd(catalog, data_dir, "--timeout", str(timeout), *extra),
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout + 120,
        cwd=data_dir.parent,
    )


# Runs ``python -m vidu_pipeline.cli`` with the ledger's debug log (where it notes every stale
# poll answer it ignored) in the file given first: that is how the drill sees a race land.
_WITH_LEDGER_LOG = (
    "import logging, runpy, sys\n"
    "handler = logging.FileHandler(sys.argv.pop(1))\n"
    "handler.setFormatter(logging.Formatter('%(asctime)s %(process)d %(message)s'))\n"
    "ledger_log = logging.getLogger('vidu_pipeline.ledger')\n"
    "ledger_log.setLevel(logging.DEBUG)\n"
    "ledger_log.addHandler(handler)\n"
    "ledger_log.propagate = False\n"
    "runpy.run_module('vidu_pipeline.cli', run_name='__main__', alter_sys=True)\n"
)
STALE_MARK = "stale answer ignored"

# The task sensor evaluated in a loop in its own process by the CLI's driver, as ``dagster
# dev``'s daemon would (its run requests are not executed: what races is its polling).
# Args: ledger log, data dir, seconds.
_SENSOR_LOOP = (
    "import sys, time\n"
    "from dagster import DagsterInstance\n"
    "from vidu_pipeline.cli.driver import Driver\n"
    "from vidu_pipeline.defs.resources import PipelineResource\n"
    "data_dir, seconds = sys.argv[1], float(sys.argv[2])\n"
    "driver = Driver(DagsterInstance.get(), PipelineResource(data_dir=data_dir, poll_time_budget_s=10))\n"
    "ticks, end = 0, time.monotonic() + seconds\n"
    "while time.monotonic() < end:\n"
    "    driver.evaluate()\n"
    "    ticks += 1\n"
    "    time.sleep(0.3)\n"
    "driver.close(interrupted=False)\n"
    "print(f'sensor ticks: {ticks}', flush=True)\n"
)


def _logged(cmd: list[str], ledger_log: Path | None) -> list[str]:
    """``cmd`` (a ``python -m vidu_pipeline.cli …`` command) with the ledger's debug log kept."""
    if ledger_log is None:
        return cmd
    return [sys.executable, "-c", _WITH_LEDGER_LOG, str(ledger_log), *cmd[3:]]


def start_generate(
    catalog: Path, data_dir: Path, env: dict[str, str], log_path: Path, *, ledger_log: Path | None = None
) -> subprocess.Popen:
    log = open(log_path, "ab")
    try:
        cmd = _logged(generate_cmd(catalog, data_dir, "--timeout", "600"), ledger_log)
        return subprocess.Popen(
            cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=data_dir.parent
        )
    finally:
        log.close()


def start_sensor(
    data_dir: Path, env: dict[str, str], log_path: Path, *, seconds: float, ledger_log: Path
) -> subprocess.Popen:
    """The polling sensor evaluated in a loop in another process, beside ``generate``."""
    code = (
        _WITH_LEDGER_LOG.replace("runpy.run_module('vidu_pipeline.cli', run_name='__main__', alter_sys=True)\n", "")
        + _SENSOR_LOOP
    )
    log = open(log_path, "ab")
    try:
        return subprocess.Popen(
            [sys.executable, "-c", code, str(ledger_log), str(data_dir), str(seconds)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=data_dir.parent,
        )
    finally:
        log.close()


def kill9(proc: subprocess.Popen) -> bool:
    """SIGKILL the process if it still runs; True when it was killed (not already finished)."""
    if proc.poll() is not None:
        return False
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    return True


def terminate(proc: subprocess.Popen, *, grace: float = 90.0) -> bool:
    """SIGTERM the process if it still runs, as a service manager stops it, and wait for it to
    end (SIGKILL after ``grace`` seconds). True when the signal landed on a running process."""
    if proc.poll() is not None:
        return False
    os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        kill9(proc)
    return True


def stop(proc: subprocess.Popen, sig: int) -> bool:
    return terminate(proc) if sig == signal.SIGTERM else kill9(proc)


def stale_answers(*logs: Path) -> int:
    """Poll answers the ledger ignored because another poller had moved the request on."""
    return sum(p.read_text(errors="replace").count(STALE_MARK) for p in logs if p.exists())


def ledger_states(data_dir: Path) -> dict[str, str]:
    """request_id → state, read with plain sqlite3 (works while generate runs)."""
    path = Path(data_dir) / "ledger.sqlite"
    if not path.exists():
        return {}
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        return dict(con.execute("SELECT request_id, state FROM requests"))
    except sqlite3.OperationalError:
        return {}
    finally:
        con.close()


def check_readable(data_dir: Path) -> str:
    """Open the ledger and the lineage table after a kill; raise if either is unreadable."""
    import pandas as pd

    from vidu_pipeline.lineage import LineageStore

    path = Path(data_dir) / "ledger.sqlite"
    counts = "no ledger yet"
    if path.exists():
        con = sqlite3.connect(str(path), timeout=30)
        try:
            ok = con.execute("PRAGMA integrity_check").fetchone()[0]
            if ok != "ok":
                raise AssertionError(f"ledger integrity_check: {ok}")
            counts = dict(con.execute("SELECT state, count(*) FROM requests GROUP BY state").fetchall())
            con.execute("SELECT count(*) FROM attempts").fetchone()
        finally:
            con.close()
    root = Path(data_dir) / "lineage"
    rows = 0
    if root.exists() and list(root.glob("part-*.parquet")):
        rows = len(LineageStore(root).read())
        pd.read_parquet(root)
    return f"ledger {counts}; lineage {rows} row(s)"


def leaked_pool_slots(dagster_home: Path, *, free: bool = True) -> list[str]:
    """Dagster pool slots (``vidu_api``) still claimed after every generate process is dead:
    a killed run never releases them, and the next runs' steps wait for a slot forever. Frees
    them (so the drill can go on checking the rest) and returns what was held."""
    index = Path(dagster_home) / "history" / "runs" / "index.db"
    if not index.exists():
        return []
    con = sqlite3.connect(str(index), timeout=30)
    try:
        held = con.execute(
            "SELECT concurrency_key, run_id, step_key FROM concurrency_slots WHERE run_id IS NOT NULL"
        ).fetchall()
    except sqlite3.OperationalError:
        held = []
    finally:
        con.close()
    if held and free:
        from dagster import DagsterInstance
        from dagster._core.instance.ref import InstanceRef

        with DagsterInstance.from_ref(InstanceRef.from_dir(str(dagster_home))) as instance:
            for run_id in {r[1] for r in held}:
                instance.event_log_storage.free_concurrency_slots_for_run(run_id)
    return [f"{key} slot held by dead run {run_id[:8]} ({step})" for key, run_id, step in held]


def kill_at_random(
    catalog: Path,
    data_dir: Path,
    env: dict[str, str],
    rng: random.Random,
    log_path: Path,
    *,
    low: float = 2.0,
    high: float = 25.0,
    sig: int = signal.SIGKILL,
) -> tuple[bool, float]:
    """Start generate, send it ``sig`` (SIGKILL, or SIGTERM and wait for it to end) after a
    seeded random delay. (landed on a running generate?, delay)."""
    delay = rng.uniform(low, high)
    proc = start_generate(catalog, data_dir, env, log_path)
    try:
        proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        pass
    return stop(proc, sig), delay


@dataclasses.dataclass
class RaceResult:
    pollers: str
    exits: list[int | None]
    stale_answers: int
    sigterms: int


def race_pollers(
    catalog: Path,
    data_dir: Path,
    env: dict[str, str],
    sim: SimulatorProcess,
    work: Path,
    *,
    with_sensor: bool,
    fail_tasks: float = 0.4,
    slow: float = 0.4,
    slow_s: float = 1.5,
    sigterm_after: float | None = None,
    timeout: float = 300,
) -> RaceResult:
    """Two pollers on one ledger while tasks fail often and polls are slow: two ``generate``s
    at once, or one beside the sensor evaluated in another process. A slow poll answer about
    a failed task then arrives after the other poller has recorded it and resubmitted. With
    ``sigterm_after``, the first generate gets SIGTERM that many seconds in."""
    previous = sim.faults()
    sim.set_faults(fail_tasks=fail_tasks, slow=slow, slow_s=slow_s)
    tag = "sensor" if with_sensor else "two"
    logs = [work / f"race-{tag}-{i}.ledger.log" for i in range(2)]
    procs: list[subprocess.Popen] = []
    sigterms = 0
    try:
        procs.append(start_generate(catalog, data_dir, env, work / "generate.log", ledger_log=logs[0]))
        if with_sensor:
            procs.append(start_sensor(data_dir, env, work / "sensor.log", seconds=timeout, ledger_log=logs[1]))
        else:
            procs.append(start_generate(catalog, data_dir, env, work / "generate.log", ledger_log=logs[1]))
        generates = procs if not with_sensor else procs[:1]
        deadline = time.monotonic() + timeout
        if sigterm_after is not None:
            try:
                generates[0].wait(timeout=sigterm_after)
            except subprocess.TimeoutExpired:
                sigterms += terminate(generates[0])
        for proc in generates:
            try:
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                sigterms += terminate(proc)
    finally:
        for proc in procs:
            terminate(proc, grace=30)
        sim.set_faults(**previous)
    return RaceResult(
        "generate + sensor" if with_sensor else "two generates",
        [p.returncode for p in procs],
        stale_answers(*logs),
        sigterms,
    )


def kill_mid_submit(
    catalog: Path,
    data_dir: Path,
    env: dict[str, str],
    sim: SimulatorProcess,
    log_path: Path,
    *,
    slow_s: float = 4.0,
    timeout: float = 120,
) -> list[str]:
    """With every submit delayed by ``slow_s``, SIGKILL generate while a request is
    ``submitting``. Returns the ids that were ``submitting`` at the kill."""
    previous = sim.faults()
    sim.set_faults(slow=1.0, slow_s=slow_s)
    proc = start_generate(catalog, data_dir, env, log_path)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            inflight = [r for r, s in ledger_states(data_dir).items() if s == "submitting"]
            if inflight:
                time.sleep(0.3)  # let the POSTs reach the simulator
                inflight = [r for r, s in ledger_states(data_dir).items() if s == "submitting"]
                if kill9(proc):
                    return inflight
            time.sleep(0.05)
        raise RuntimeError("no request was ever seen in the submitting state")
    finally:
        kill9(proc)
        sim.set_faults(**previous)


def attempts_by_request(data_dir: Path) -> dict[str, list[tuple[int, str | None]]]:
    con = sqlite3.connect(str(Path(data_dir) / "ledger.sqlite"), timeout=30)
    try:
        out: dict[str, list] = collections.defaultdict(list)
        for rid, n, outcome in con.execute("SELECT request_id, attempt, outcome FROM attempts ORDER BY attempt"):
            out[rid].append((n, outcome))
        return dict(out)
    finally:
        con.close()


def finish(
    catalog: Path, data_dir: Path, env: dict[str, str], *, max_runs: int = 3, timeout: float = 600
) -> list[subprocess.CompletedProcess]:
    """Run generate until every request is terminal (a run may end 1: failed/unknown ones)."""
    runs = []
    for _ in range(max_runs):
        try:
            runs.append(run_generate(catalog, data_dir, env, timeout=timeout))
        except subprocess.TimeoutExpired as exc:  # reported by the invariants, not a traceback
            runs.append(subprocess.CompletedProcess(exc.cmd, -1, "", f"generate still running after {exc.timeout} s"))
            break
        states = ledger_states(data_dir)
        if runs[-1].returncode in (0, 1) and states and all(s in TERMINAL for s in states.values()):
            break
    return runs


# --- the invariants --------------------------------------------------------------------------------


@dataclasses.dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclasses.dataclass
class Report:
    checks: list[Check]
    counts: dict[str, Any]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def failures(self) -> list[str]:
        return [f"{c.name}: {c.detail}" for c in self.checks if not c.ok]

    def text(self) -> str:
        lines = [f"  [{'ok' if c.ok else 'FAIL'}] {c.name}: {c.detail}" for c in self.checks]
        return "\n".join(lines)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


FAILED_STATUS = "TASK_STATUS_FAILED"
SUCCEED_STATUS = "TASK_STATUS_SUCCEED"


def paid_once_checks(
    rows: dict, attempts: dict, service_tasks: list[dict], *, retry_budget: int = 3
) -> tuple[list[Check], dict[str, int]]:
    """What the service's own books say against the ledger, per request:

    * paid tasks beyond need: the tasks accepted for a request's fingerprint, in submit order,
      are explained only by failed tasks resubmitted within the budget, then one more; any
      other accepted task was paid for nothing (e.g. a stale poll answer made the request
      look failed while its task ran, and it was sent again);
    * succeeded but not downloaded: a task the service finished whose id the ledger knows,
      but whose request does not hold that task's stored video.
    """
    by_fp: dict[str, list[str]] = collections.defaultdict(list)
    for rid, r in rows.items():
        by_fp[r.fingerprint].append(rid)
    tasks_by_fp: dict[str, list[dict]] = collections.defaultdict(list)
    for task in service_tasks:
        tasks_by_fp[task["fingerprint"]].append(task)

    paid_problems, paid_extra = [], 0
    for fp, tasks in tasks_by_fp.items():
        rids = by_fp.get(fp, [])
        if not rids:
            continue  # counted by "no hidden duplicate payment"
        explained = 0
        for task in sorted(tasks, key=lambda t: t["submit_t"])[: retry_budget * len(rids)]:
            explained += 1
            if task["status"] != FAILED_STATUS:
                break
        extra = len(tasks) - explained
        if extra:
            paid_extra += extra
            statuses = ", ".join(
                t["status"].removeprefix("TASK_STATUS_") for t in sorted(tasks, key=lambda t: t["submit_t"])
            )
            paid_problems.append(f"{rids[0]}: {len(tasks)} tasks paid ({statuses}), {extra} beyond need")

    holder = {}  # task id → the request that knows it
    for rid, atts in attempts.items():
        for a in atts:
            if a.task_id:
                holder[a.task_id] = rid
    for rid, r in rows.items():
        if r.task_id:
            holder[r.task_id] = rid
    lost_problems = []
    for task in service_tasks:
        rid = holder.get(task["task_id"])
        if task["status"] != SUCCEED_STATUS or rid is None:
            continue
        r = rows[rid]
        if not (r.state == "succeeded" and r.task_id == task["task_id"] and r.video_sha256):
            lost_problems.append(
                f"{rid}: task {task['task_id'][:8]} SUCCEEDED at the service but the request "
                f"is {r.state} with task {(r.task_id or '-')[:8]} and "
                f"{'a' if r.video_sha256 else 'no'} video"
            )
    checks = [
        Check(
            "no task paid beyond need",
            not paid_problems,
            f"{len(service_tasks)} tasks at the service; each request's are its failed-and-resubmitted "
            f"ones within budget, then one"
            if not paid_problems
            else f"{len(paid_problems)} problem(s): " + "; ".join(paid_problems[:5]),
        ),
        Check(
            "no succeeded task left undownloaded",
            not lost_problems,
            "every task the service finished and the ledger knows has its video stored"
            if not lost_problems
            else f"{len(lost_problems)} problem(s): " + "; ".join(lost_problems[:5]),
        ),
    ]
    return checks, {"paid_extra": paid_extra, "succeeded_not_downloaded": len(lost_problems)}


def check_invariants(
    data_dir: Path,
    sim: SimulatorProcess,
    env: dict[str, str],
    *,
    retry_budget: int = 3,
    expected_requests: int | None = None,
) -> Report:
    """Everything the promise says, checked from the ledger, the files, the lineage table,
    ``vidu-pipeline status`` and the simulator's own books."""
    from vidu_pipeline.ledger import Ledger
    from vidu_pipeline.lineage import LineageStore
    from vidu_pipeline.mp4 import VideoInvalid, probe_video

    data_dir = Path(data_dir)
    checks: list[Check] = []

    def check(name: str, problems: list[str], ok_detail: str) -> None:
        checks.append(
            Check(
                name,
                not problems,
                ok_detail if not problems else f"{len(problems)} problem(s): " + "; ".join(problems[:5]),
            )
        )

    ledger = Ledger(f"sqlite:///{data_dir / 'ledger.sqlite'}")
    try:
        rows = {r.request_id: r for r in ledger.rows()}
        attempts = {rid: ledger.attempts_for(rid) for rid in rows}
    finally:
        ledger.close()
    stats = sim.stats()
    by_state = collections.Counter(r.state for r in rows.values())

    # 1. every request ended
    problems = []
    if expected_requests is not None and len(rows) != expected_requests:
        problems.append(f"{len(rows)} requests in the ledger, {expected_requests} expected")
    for r in rows.values():
        if r.state not in TERMINAL:
            problems.append(f"{r.request_id} is {r.state}")
        elif r.state == "succeeded" and not r.video_sha256:
            problems.append(f"{r.request_id} succeeded without a stored video ({r.last_error})")
        elif r.state == "failed" and r.task_id and r.attempts < retry_budget:
            problems.append(f"{r.request_id} failed after {r.attempts} of {retry_budget} attempts")
    check(
        "every request terminal",
        problems,
        f"{len(rows)} requests: " + ", ".join(f"{k} {v}" for k, v in sorted(by_state.items())),
    )

    # 2. unknown ones are listed by `vidu-pipeline status`
    status = subprocess.run(
        [sys.executable, "-m", "vidu_pipeline.cli", "status", "--data-dir", str(data_dir), "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    problems = []
    try:
        listed = {u["request_id"] for u in json.loads(status.stdout)["unknown"]}
    except (ValueError, KeyError) as exc:
        listed = set()
        problems.append(f"status --json unreadable ({exc}): {status.stderr[-300:]}")
    unknown = {rid for rid, r in rows.items() if r.state == "unknown"}
    if listed != unknown:
        problems.append(f"status lists {sorted(listed ^ unknown)[:5]} differently from the ledger")
    check("unknown requests listed by status", problems, f"{len(unknown)} unknown, all listed")

    # 3. no hidden duplicate payment: accepted ≤ billable attempts, per fingerprint
    by_fp: dict[str, list[str]] = collections.defaultdict(list)
    for rid, r in rows.items():
        by_fp[r.fingerprint].append(rid)
    accepted = stats["submits"]["accepted_by_fingerprint"]
    problems, duplicates, exact = [], 0, 0
    for fp, n in accepted.items():
        rids = by_fp.get(fp)
        if not rids:
            problems.append(f"{n} task(s) accepted for fingerprint {fp[:12]} unknown to the ledger")
            duplicates += n
            continue
        billable = sum(1 for rid in rids for a in attempts[rid] if a.outcome not in NOT_BILLABLE)
        if n > billable:
            problems.append(f"{rids[0]}: {n} accepted > {billable} billable attempt(s)")
            duplicates += n - billable
    for rid, atts in attempts.items():
        if atts and all(a.outcome == "submitted" for a in atts):
            exact += 1
            got = accepted.get(rows[rid].fingerprint, 0)
            if got != len(atts):
                problems.append(f"{rid}: {len(atts)} attempt(s) all 'submitted' but {got} accepted")
    check(
        "no hidden duplicate payment",
        problems,
        f"{sum(accepted.values())} tasks accepted for {len(accepted)} fingerprints; accepted ≤ billable "
        f"attempts everywhere; accepted == attempts for the {exact} requests whose attempts all ended 'submitted'",
    )

    # 3b. per request at the service: nothing paid beyond need, nothing finished left behind
    paid_checks, paid_counts = paid_once_checks(rows, attempts, stats["tasks"]["list"], retry_budget=retry_budget)
    checks.extend(paid_checks)

    # 4. one verified video per success, byte-identical to what the service rendered
    videos_dir = data_dir / "videos"
    files = sorted(p for p in videos_dir.glob("*.mp4") if not p.name.startswith(".")) if videos_dir.exists() else []
    problems = []
    succeeded = {rid: r for rid, r in rows.items() if r.state == "succeeded"}
    for p in files:
        if p.stem not in succeeded:
            problems.append(f"stray video {p.name} (request {rows[p.stem].state if p.stem in rows else 'unknown'})")
    verified = 0
    for rid, r in succeeded.items():
        if not r.video_sha256:
            continue
        path = Path(r.video_path or "")
        if path != videos_dir / f"{rid}.mp4" or not path.exists():
            problems.append(f"{rid}: video file {path} missing")
            continue
        try:
            probe = probe_video(path)
        except VideoInvalid as exc:
            problems.append(f"{rid}: stored video does not decode: {exc.reason}")
            continue
        if probe.sha256 != r.video_sha256 or probe.size_bytes != r.video_bytes:
            problems.append(f"{rid}: file sha256/size differ from the ledger")
            continue
        original = sim.state_dir / "videos" / f"{r.task_id}.mp4"
        if original.exists() and _sha256(original) != r.video_sha256:
            problems.append(f"{rid}: stored video differs from the simulator's rendering (truncated?)")
            continue
        verified += 1
    check(
        "one verified video per success",
        problems,
        f"{verified} videos decode end to end and equal the service's bytes; {len(files)} files, no strays",
    )

    # 5. the lineage table: one current row per ended request, matching the ledger
    problems = []
    lineage = LineageStore(data_dir / "lineage")
    table = lineage.read()
    history = lineage.read_all()
    current = {rec["request_id"]: rec for rec in table.to_dict("records")}
    for rid, r in rows.items():
        rec = current.get(rid)
        if r.state not in TERMINAL:
            continue
        if rec is None:
            problems.append(f"{rid}: no lineage row")
        elif rec["state"] != r.state:
            problems.append(f"{rid}: lineage says {rec['state']}, ledger {r.state}")
        elif r.state == "succeeded" and rec["video_sha256"] != r.video_sha256:
            problems.append(f"{rid}: lineage sha256 differs from the ledger")
    for rid, group in history[history["state"] == "succeeded"].groupby("request_id"):
        if group["video_sha256"].nunique() != 1:
            problems.append(f"{rid}: lineage history holds {group['video_sha256'].nunique()} different videos")
    if set(current) - set(rows):
        problems.append(f"lineage rows for requests not in the ledger: {sorted(set(current) - set(rows))[:3]}")
    check(
        "exactly one lineage row per ended request",
        problems,
        f"{len(table)} current rows ({len(history)} appended in all), one per request, sha256 = ledger",
    )

    # 6. truncated downloads were injected and none was recorded
    truncated = stats["downloads"].get("truncated", 0)
    checks.append(
        Check(
            "no truncated file recorded as success",
            not any("truncated" in c.detail for c in checks if not c.ok),
            f"{truncated} truncated download(s) injected; every stored file is complete",
        )
    )

    faults = {k: v for k, v in stats["faults"].items()}
    counts = {
        "requests": len(rows),
        "states": dict(sorted(by_state.items())),
        "attempts": sum(len(a) for a in attempts.values()),
        "billable_attempts": sum(1 for a in attempts.values() for x in a if x.outcome not in NOT_BILLABLE),
        "accepted_tasks": sum(accepted.values()),
        "injected_faults": faults,
        "downloads": stats["downloads"],
        "duplicates": duplicates,
        **paid_counts,
        "lost": sum(
            1 for r in rows.values() if r.state not in TERMINAL or (r.state == "succeeded" and not r.video_sha256)
        ),
    }
    return Report(checks, counts)


def terminal_snapshot(data_dir: Path) -> dict[str, int]:
    """request_id → attempts, for requests that can no longer be submitted automatically."""
    from vidu_pipeline.ledger import Ledger

    ledger = Ledger(f"sqlite:///{Path(data_dir) / 'ledger.sqlite'}")
    try:
        return {r.request_id: r.attempts for r in ledger.rows(states=["succeeded", "unknown"])}
    finally:
        ledger.close()


# --- the long drill --------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=60, help="at least this many requests (default 60)")
    parser.add_argument("--kills", type=int, default=20, help="random kills of generate (default 20)")
    parser.add_argument(
        "--sigterm-every",
        type=int,
        default=3,
        help="every Nth random kill is a SIGTERM instead of a SIGKILL (default 3; 0: none)",
    )
    parser.add_argument(
        "--race-requests", type=int, default=20, help="requests of each two-poller race round (default 20; 0: no race)"
    )
    parser.add_argument(
        "--races",
        type=int,
        default=2,
        help="race rounds, alternating two generates / generate beside a sensor (default 2)",
    )
    parser.add_argument("--seed", type=int, default=7, help="seeds the kill times and the faults")
    parser.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it")
    args = parser.parse_args(argv)

    work = args.keep or Path(tempfile.mkdtemp(prefix="vidu-drill-"))
    work.mkdir(parents=True, exist_ok=True)
    catalog, data_dir, home = work / "catalog", work / "data", work / "dagster_home"
    subjects, prompts, seeds = shape_for(args.requests)
    n = make_catalog(catalog, subjects=subjects, prompts=prompts, seeds=seeds, rng_seed=args.seed)
    race_catalogs = []
    for i in range(args.races if args.race_requests else 0):
        shape = shape_for(args.race_requests)
        race_catalog = work / f"race-catalog-{i}"
        n += make_catalog(
            race_catalog, subjects=shape[0], prompts=shape[1], seeds=shape[2], rng_seed=1000 + 17 * i + args.seed
        )
        race_catalogs.append(race_catalog)
    rng = random.Random(args.seed)
    print(
        f"drill in {work}: {n} requests ({subjects} subjects × {prompts} prompts × {seeds} seeds, and "
        f"{len(race_catalogs)} race round(s) of {args.race_requests}), {args.kills} kills "
        f"(every {args.sigterm_every or 'no'} Nth a SIGTERM), seed {args.seed}"
    )
    print(
        "faults: "
        + " ".join(f"{k} {v}" for k, v in FAULT_FLAGS.items())
        + " --url-ttl 3 --latency 0.7 --render-scale 0.1 --concurrency 5"
    )
    started = time.monotonic()
    sim = SimulatorProcess(work / "sim", fault_seed=args.seed, faults=FAULT_FLAGS)
    readable_problems: list[str] = []
    races: list[RaceResult] = []
    kills = {"SIGKILL": 0, "SIGTERM": 0}
    try:
        sim.start()
        env = sim.env(home)
        log = work / "generate.log"
        inflight = kill_mid_submit(catalog, data_dir, env, sim, log)
        kills["SIGKILL"] += 1
        print(f"kill 1 (mid-submit): {len(inflight)} request(s) were submitting: {', '.join(inflight[:5])}")

        # Two pollers on one ledger, with 40 % of tasks failing and slow polls.
        for i, race_catalog in enumerate(race_catalogs):
            result = race_pollers(
                race_catalog,
                data_dir,
                env,
                sim,
                work,
                with_sensor=bool(i % 2),
                sigterm_after=rng.uniform(10.0, 25.0) if i % 2 else None,
            )
            races.append(result)
            kills["SIGTERM"] += result.sigterms
            print(
                f"race {i + 1} ({result.pollers}): {result.stale_answers} stale poll answer(s) ignored; "
                f"exits {result.exits}; {check_readable(data_dir)}"
            )

        tries = landed = 0
        while landed < args.kills and tries < 3 * args.kills:
            # Short windows, so kills land while work remains (a run that already finished
            # is not counted): startup, planning, submits, polls, downloads, lineage.
            tries += 1
            sig = signal.SIGTERM if args.sigterm_every and tries % args.sigterm_every == 0 else signal.SIGKILL
            killed, delay = kill_at_random(catalog, data_dir, env, rng, log, low=1.5, high=9.0, sig=sig)
            landed += killed
            kills[sig.name] += killed
            try:
                state = check_readable(data_dir)
            except Exception as exc:  # reported as a failed invariant
                state = f"UNREADABLE: {exc}"
                readable_problems.append(f"after kill {tries + 1}: {exc}")
            print(
                f"kill {tries + 1}: {sig.name} after {delay:.1f} s "
                f"({'landed' if killed else 'had already finished'}); {state}"
            )
        runs = [run for c in [catalog, *race_catalogs] for run in finish(c, data_dir, env)]
        print(f"final run(s): exit {[r.returncode for r in runs]}")
        # Killed runs held pool slots; every restarted generate reaps them. None may remain.
        leaks = leaked_pool_slots(home, free=False)
        before = terminal_snapshot(data_dir)
        accepted_before = sim.stats()["submits"]["accepted"]
        again = run_generate(catalog, data_dir, env)
        after = terminal_snapshot(data_dir)
        accepted_after = sim.stats()["submits"]["accepted"]
        report = check_invariants(data_dir, sim, env, expected_requests=n)
        resubmitted = [rid for rid, a in before.items() if after.get(rid) != a]
        report.checks.append(
            Check(
                "a re-run submits nothing for ended requests",
                not resubmitted and accepted_after == accepted_before,
                f"re-run exit {again.returncode}; {len(before)} succeeded/unknown requests "
                f"untouched; tasks accepted {accepted_before} → {accepted_after}",
            )
        )
        stale_unknown = [
            rid for rid in inflight if ledger_states(data_dir).get(rid) not in ("unknown", "succeeded", "failed")
        ]
        report.checks.append(
            Check(
                "killed mid-submit → unknown, not resubmitted",
                bool(inflight)
                and not stale_unknown
                and all(
                    len(attempts_by_request(data_dir).get(r, [])) == 1
                    for r in inflight
                    if ledger_states(data_dir).get(r) == "unknown"
                ),
                f"{len(inflight)} in-flight request(s) ended unknown with one attempt each "
                "(recovered by `submitting` → `unknown`)",
            )
        )
        report.checks.append(
            Check(
                "no Dagster pool slot left held by a killed run",
                not leaks,
                f"{len(leaks)} still held after the final run: {'; '.join(leaks[:3])}"
                if leaks
                else "none held: restarted runs reaped every killed run's slots",
            )
        )
        report.checks.append(
            Check(
                "ledger and lineage readable after every kill",
                not readable_problems,
                "; ".join(readable_problems) or f"checked after each of {tries} restarts",
            )
        )
    finally:
        sim.stop()
    report.counts["kills"] = kills  # kills that landed on a running generate (1 SIGKILL mid-submit)
    report.counts["races"] = [dataclasses.asdict(r) for r in races]
    report.counts["stale_answers"] = sum(r.stale_answers for r in races)
    print("\ninvariants")
    print(report.text())
    print("\ncounts")
    for key, value in report.counts.items():
        print(f"  {key}: {json.dumps(value)}")
    print(f"\n{'PASS' if report.ok else 'FAIL'} in {time.monotonic() - started:.0f} s")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
