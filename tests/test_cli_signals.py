"""SIGTERM (Docker, Kubernetes, systemd, ``timeout``) stops ``generate`` the way Ctrl-C does,
on the real process tree: the step in flight records its task ids, the exit code is 143, a
re-run finishes the set without paying twice, and no helper process (Dagster's ``tail -F``)
outlives it — also when ``generate`` was started with SIGINT ignored (``cmd &`` in a script).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.test_cli import SimProcess, cli, cli_env, generate_args, start_generate, work  # noqa: F401  (fixture)
from vidu_pipeline.ledger import Ledger

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]  # CLI subprocesses


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that mention ``text`` (e.g. a test's own folder)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{proc.name}: {cmdline}")
    return found


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (children first-hand from /proc)."""
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(proc.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def ignore_sigint():
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.parametrize("sigint_ignored", [False, True], ids=["plain", "started-with-SIGINT-ignored"])
def test_sigterm_stops_like_ctrl_c_and_nothing_is_lost(work, tmp_path, sigint_ignored):  # noqa: F811
    # Slow calls keep submits in flight when the signal lands; slow tasks keep them running.
    sim = SimProcess(tmp_path / "slow-sim", "--slow", "1", "--slow-seconds", "1.0", latency=4.0)
    try:
        env = cli_env(work, sim)
        proc = start_generate(work, env, stdin=subprocess.DEVNULL, preexec_fn=ignore_sigint if sigint_ignored else None)
        deadline = time.monotonic() + 90
        while sim.stats()["submits"]["accepted"] < 1 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        helpers = descendants(proc.pid)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=90)
        assert proc.returncode == 143, out + err
        assert "run the same command again to resume" in err
        assert "Traceback" not in err

        # Every task the service accepted has its id in the ledger; nothing was left in limbo.
        accepted = sim.stats()["submits"]["accepted"]
        rows = Ledger(f"sqlite:///{work / 'data' / 'ledger.sqlite'}").rows()
        assert sum(1 for r in rows if r.task_id) == accepted >= 1
        assert not [r.request_id for r in rows if r.state in ("submitting", "unknown")]

        # No helper process of it survives (Dagster's compute-log ``tail -F`` among them).
        time.sleep(1.5)
        assert not [
            p
            for p in helpers
            if Path(f"/proc/{p}").exists() and "simulator" not in Path(f"/proc/{p}/cmdline").read_text(errors="replace")
        ]
        assert not [c for c in processes_mentioning(str(work)) if "tail" in c]

        again = cli(work, sim, *generate_args(work), env=env)
        assert again.returncode == 0, again.stdout + again.stderr
        stats = sim.stats()
        assert stats["submits"]["accepted"] == 10
        assert set(stats["submits"]["accepted_by_fingerprint"].values()) == {1}
    finally:
        sim.stop()


def test_sigterm_during_the_wait_for_tasks(work, tmp_path):  # noqa: F811
    """The common case: every task submitted, generate polling; SIGTERM ends it at once."""
    sim = SimProcess(tmp_path / "slow-sim", latency=30.0)
    try:
        env = cli_env(work, sim)
        proc = start_generate(work, env, stdin=subprocess.DEVNULL, preexec_fn=ignore_sigint)
        deadline = time.monotonic() + 90
        while sim.stats()["submits"]["accepted"] < 10 and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)  # into the polling loop
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 143, out + err
        rows = Ledger(f"sqlite:///{work / 'data' / 'ledger.sqlite'}").rows()
        assert len(rows) == 10 and all(r.state == "submitted" and r.task_id for r in rows)
    finally:
        sim.stop()
