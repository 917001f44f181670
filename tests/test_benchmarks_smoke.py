"""The benchmark runs end to end at tiny N and prints every figure (no timing assertions)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # starts processes (CLI, simulator, drills)

REPO = Path(__file__).resolve().parents[1]

FIGURES = (
    "e2e makespan / ideal",
    "e2e makespan / naive script",
    "e2e makespan from first submit / ideal",
    "e2e realistic (L=",
    "ingestion rate / naive download+decode rate",
    "polls per finished video",
    "sensor tick",
    "orchestration CPU per video",
    "orchestration CPU per video N=",
    "peak RSS of generate",
    "peak RSS N=",
    "images/s validated / raw floor",
    "image re-run time / first run",
    "lineage append 100 rows at",
    "lineage read whole table",
    "quality / verification decode CPU",
)


def test_quick_benchmark_prints_every_figure(tmp_path):
    out_json = tmp_path / "figures.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "run.py"), "--quick", "--json", str(out_json)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "FAILED" not in proc.stdout, proc.stdout[-4000:]
    table = proc.stdout[proc.stdout.rindex("figure") :]  # the final table
    for name in FIGURES:
        assert name in table, f"{name!r} missing from the final table:\n{table}"
    figures = json.loads(out_json.read_text())
    assert {"figure", "value", "goal", "met"} <= set(figures[0])
    assert all(f["met"] in ("yes", "NO", "n/a") for f in figures)
    assert len(figures) >= len(FIGURES)
