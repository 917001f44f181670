"""The simulator as a separate process, for tests, drills and benchmarks.

One launcher for everything that needs a simulator outside its own process (it must outlive
a killed ``generate``, and have its own counters): a free loopback port, the key passed in
the environment (never on argv), the address read from the announce file it writes, fault
flags changeable while it runs, and a clean stop.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import requests

DEFAULT_TEST_KEY = "vidu-test-key-0123456789"


class SimulatorProcess:
    """``python -m vidu_pipeline.simulator`` in a subprocess; use as a context manager."""

    def __init__(
        self,
        state_dir: Path,
        *,
        api_key: str = DEFAULT_TEST_KEY,
        latency: float = 0.7,
        render_scale: float = 0.1,
        url_ttl: int | None = None,
        concurrency: int = 5,
        fault_seed: int = 0,
        faults: dict[str, float] | None = None,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.state_dir = Path(state_dir)
        self.api_key = api_key
        self.render_scale = render_scale
        self.announce = self.state_dir / "announce.json"
        self.log_path = self.state_dir.parent / f"{self.state_dir.name}.log"
        self.args = [
            "--host", "127.0.0.1", "--port", "0",
            "--state-dir", str(self.state_dir), "--announce", str(self.announce),
            "--latency", str(latency), "--render-scale", str(render_scale),
            "--concurrency", str(concurrency), "--fault-seed", str(fault_seed),
            *(["--url-ttl", str(url_ttl)] if url_ttl is not None else []),
            *[str(x) for kv in (faults or {}).items() for x in kv],
            *extra_args,
        ]  # fmt: skip
        self.proc: subprocess.Popen | None = None
        self.base_url = ""

    def start(self, timeout_s: float = 60.0) -> SimulatorProcess:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.announce.unlink(missing_ok=True)
        env = {k: v for k, v in os.environ.items() if k != "VIDU_API_KEY"}
        env["VIDU_SIMULATOR_API_KEY"] = self.api_key
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "vidu_pipeline.simulator", *self.args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"simulator exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                self.base_url = json.loads(self.announce.read_text())["base_url"]
                return self
            except (OSError, ValueError, KeyError):
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"simulator did not start within {timeout_s:.0f} s: {self.log_tail()}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=15)

    def __enter__(self) -> SimulatorProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    # --- the simulator's admin endpoints -----------------------------------------------------

    def _admin(self, method: str, path: str, **kw: Any) -> Any:
        resp = requests.request(
            method, self.base_url + path, headers={"Authorization": f"Bearer {self.api_key}"}, timeout=30, **kw
        )
        resp.raise_for_status()
        return resp.json()

    def stats(self) -> dict[str, Any]:
        return self._admin("GET", "/_simulator/stats")

    def faults(self) -> dict[str, Any]:
        return self._admin("GET", "/_simulator/faults")

    def set_faults(self, **changes: Any) -> dict[str, Any]:
        """Change some fault fields (``FaultConfig`` names), keeping the others."""
        return self._admin("POST", "/_simulator/faults", json={**self.faults(), **changes})

    def env(self, dagster_home: Path, base: dict[str, str] | None = None) -> dict[str, str]:
        """The environment of a ``vidu-pipeline`` child pointed at this simulator."""
        source = os.environ if base is None else base
        env = {k: v for k, v in source.items() if not k.startswith(("VIDU_", "DAGSTER_"))}
        env.update(
            {
                "VIDU_API_KEY": self.api_key,
                "VIDU_API_BASE_URL": self.base_url,
                "VIDU_SIMULATOR_RENDER_SCALE": str(self.render_scale),
                "DAGSTER_HOME": str(dagster_home),
                "PYTHONUNBUFFERED": "1",
            }
        )
        return env
