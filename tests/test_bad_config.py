"""Bad configuration and input through the real CLI in a subprocess: each case exits non-zero
with a specific message naming the flag, file or field and the rule it breaks — never a
traceback, never a submit.

Together with the bad-input corpus of tests/test_catalog.py (IMAGE_ROWS, PROMPTS, the sweep
and table cases: dozens of rows, each with its own rule) this makes well over 30 cases.
Catalog URLs other than http(s) are covered in tests/test_images.py / tests/test_catalog.py
(rule ``url_scheme``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]  # CLI subprocesses

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "catalog"


def cli(tmp_path: Path, *args: str, env: dict | None = None, python: bool = False) -> subprocess.CompletedProcess:
    """``vidu-pipeline ARGS`` (or, with ``python``, ``python ARGS``) in a fresh process."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("VIDU_", "DAGSTER_"))}
    base["DAGSTER_HOME"] = str(tmp_path / "dagster_home")
    cmd = [sys.executable, *args] if python else [sys.executable, "-m", "vidu_pipeline.cli", *args]
    return subprocess.run(cmd, env={**base, **(env or {})}, capture_output=True, text=True, timeout=90, cwd=tmp_path)


def assert_refused(result: subprocess.CompletedProcess, *needles: str, code: int = 2) -> None:
    out = result.stdout + result.stderr
    assert result.returncode == code, out
    assert "Traceback" not in out, out
    for needle in needles:
        assert needle in out, f"{needle!r} not in: {out}"


def catalog(root: Path, *, images: str | None = None, prompts: str | None = None, sweep: str | None = None) -> Path:
    """A copy of the sample catalog with some files replaced."""
    import shutil

    shutil.copytree(SAMPLE, root)
    for name, text in (("images.csv", images), ("prompts.csv", prompts), ("sweep.yaml", sweep)):
        if text is not None:
            (root / name).write_text(text)
    return root


# --- flags (argparse refuses them before anything runs) -----------------------------------------

FLAG_CASES = [
    (["--max-tasks", "-1"], ["argument --max-tasks", "-1 is negative", "a cap must be 0 or more"]),
    (["--max-tasks-per-day", "-5"], ["argument --max-tasks-per-day", "-5 is negative"]),
    (["--max-tasks", "ten"], ["argument --max-tasks", "'ten' is not an integer"]),
    (["--seeds", "1-x"], ["--seeds", "'1-x' is not an integer or a range a-b"]),
    (["--seeds", ","], ["--seeds", "no seed given"]),
    (["--seeds", "one"], ["--seeds", "'one' is not an integer"]),
    # Capped before a range is expanded: a billion seeds fails at once, not after filling memory.
    (["--seeds", "1-1000000000"], ["--seeds", "more than 10,000 seeds", "'1-1000000000'"]),
    (["--seeds", "1-9000,9001-12000"], ["--seeds", "more than 10,000 seeds", "'9001-12000'"]),
    (["--seeds", "2147483648"], ["--seeds", "seed 2147483648 is outside 0..2147483647"]),
    (["--seeds=-5"], ["--seeds", "seed -5 is outside 0..2147483647"]),
    (["--seeds", "5-3"], ["--seeds", "range '5-3' ends before it starts"]),
    (["--seeds", "1-3,7,2"], ["--seeds", "seed 2 is given more than once"]),
    (["--price-per-task", "cheap"], ["argument --price-per-task", "invalid float value"]),
]


@pytest.mark.parametrize("flags,needles", FLAG_CASES, ids=[" ".join(c[0]) for c in FLAG_CASES])
def test_bad_flags_are_refused_by_name(tmp_path, flags, needles):
    result = cli(tmp_path, "generate", "--catalog", str(SAMPLE), "--data-dir", str(tmp_path / "d"), *flags)
    assert_refused(result, *needles)
    assert not (tmp_path / "d").exists(), "nothing may be written for a refused command line"


@pytest.mark.parametrize("value", ["0", "-1"])
def test_retry_budget_below_one_is_refused_by_name(tmp_path, value):
    result = cli(
        tmp_path,
        "generate",
        "--catalog",
        str(SAMPLE),
        "--data-dir",
        str(tmp_path / "d"),
        "--dry-run",
        "--retry-budget",
        value,
    )
    assert_refused(result, "--retry-budget")


# --- folders ---------------------------------------------------------------------------------------


def test_catalog_folder_that_does_not_exist(tmp_path):
    missing = tmp_path / "no-such-catalog"
    result = cli(tmp_path, "generate", "--catalog", str(missing), "--data-dir", str(tmp_path / "d"))
    assert_refused(result, f"catalog folder {missing} does not exist")


def test_catalog_path_that_is_a_file(tmp_path):
    afile = tmp_path / "catalog.csv"
    afile.write_text("subject_id,image\n")
    result = cli(tmp_path, "generate", "--catalog", str(afile), "--data-dir", str(tmp_path / "d"))
    assert_refused(result, f"catalog folder {afile} does not exist")


def test_unwritable_data_folder(tmp_path):
    # chmod does not stop root: a folder below a regular file can be made by nobody.
    blocker = tmp_path / "somefile"
    blocker.write_text("not a folder")
    data_dir = blocker / "sub"
    result = cli(tmp_path, "generate", "--catalog", str(SAMPLE), "--data-dir", str(data_dir))
    assert_refused(result, f"data folder {data_dir} is not writable", "Not a directory")


# --- the catalog's files ---------------------------------------------------------------------------

CATALOG_CASES = {
    "unknown aspect ratio in sweep defaults": (
        {"sweep": "seeds: [1]\ndefaults:\n  aspect_ratio: '4:3'\n"},
        ["sweep.yaml", "defaults.aspect_ratio", "'4:3' is not one of 16:9, 9:16, 1:1"],
    ),
    "unknown option in sweep defaults": (
        {"sweep": "seeds: [1]\ndefaults:\n  fps: 60\n"},
        ["sweep.yaml", "defaults.fps is not an option"],
    ),
    "duration other than 5 in sweep defaults": (
        {"sweep": "seeds: [1]\ndefaults:\n  duration: 8\n"},
        ["sweep.yaml", "defaults.duration", "'8' is not accepted, only 5"],
    ),
    "empty seed list": ({"sweep": "seeds: []\n"}, ["sweep.yaml", "seeds must be a non-empty list of integers"]),
    "seed that is not an integer": ({"sweep": "seeds: [1, two]\n"}, ["sweep.yaml", "seeds[1] must be an integer"]),
    "sweep that is not YAML": ({"sweep": "seeds: [1, 2\n"}, ["sweep.yaml", "not valid YAML"]),
    "sweep with an unknown field": ({"sweep": "seeds: [1]\nseed: 3\n"}, ["sweep.yaml", "unknown field(s) seed"]),
    "images.csv without the image column": (
        {"images": "subject_id,view\ncat,face\n"},
        ["images.csv", "required column(s) image missing"],
    ),
    "prompts.csv without the prompt column": (
        {"prompts": "subject_id,text\ncat,hello\n"},
        ["prompts.csv", "required column(s) prompt missing"],
    ),
    "empty catalog": (
        {"images": "subject_id,image,view\n", "prompts": "subject_id,prompt\n"},
        ["yields no request", "images.csv", "prompts.csv", "every request needs a subject with a valid image"],
    ),
    "catalog whose every image is rejected": (
        {"images": "subject_id,image,view\ncat,images/nope.png,x\n"},
        ["yields no request", "0 valid image row(s) in images.csv", "input(s) rejected", "rejections.csv"],
    ),
}


BATCH = """
import contextlib, io, json, sys
from vidu_pipeline.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code
        except BaseException as exc:  # reported as a traceback, which the test refuses
            code, err = 99, io.StringIO("Traceback: " + repr(exc))
    results.append({"code": code, "out": out.getvalue(), "err": err.getvalue()})
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def catalog_results(tmp_path_factory):
    """Every catalog case through ``vidu-pipeline generate``'s entry point, in ONE subprocess
    (Dagster's import costs seconds; each case then runs the real catalog runs)."""
    import json

    work = tmp_path_factory.mktemp("cases")
    argvs, dirs = [], []
    for i, case in enumerate(CATALOG_CASES):
        root = catalog(work / f"catalog{i}", **CATALOG_CASES[case][0])
        dirs.append(work / f"d{i}")
        argvs.append(["generate", "--catalog", str(root), "--data-dir", str(dirs[-1])])
    proc = cli(work, "-c", BATCH, json.dumps(argvs), python=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    return {
        case: (d, subprocess.CompletedProcess([], r["code"], r["out"], r["err"]))
        for case, d, r in zip(CATALOG_CASES, dirs, results)
    }


@pytest.mark.parametrize("case", list(CATALOG_CASES))
def test_bad_catalog_is_refused_with_file_field_and_rule(catalog_results, case):
    data_dir, result = catalog_results[case]
    assert_refused(result, *CATALOG_CASES[case][1])
    # Refused before anything could be paid: no embedded simulator was started, no task exists.
    assert not (data_dir / "state" / "simulator" / "simulator.json").exists()


def test_empty_catalog_folder(tmp_path):
    root = tmp_path / "catalog"
    root.mkdir()
    result = cli(tmp_path, "generate", "--catalog", str(root), "--data-dir", str(tmp_path / "d"))
    assert_refused(result, "neither images.csv nor images.parquet exists")


def test_api_base_url_that_is_not_http(tmp_path):
    result = cli(
        tmp_path,
        "generate",
        "--catalog",
        str(SAMPLE),
        "--data-dir",
        str(tmp_path / "d"),
        env={"VIDU_API_KEY": "sk-test", "VIDU_API_BASE_URL": "ftp://example.com"},
    )
    assert_refused(result, "VIDU_API_BASE_URL", "http")


def test_status_without_a_ledger_says_so(tmp_path):
    result = cli(tmp_path, "status", "--data-dir", str(tmp_path / "nothing-here"))
    assert result.returncode == 0
    assert "no ledger" in result.stdout and "nothing generated yet" in result.stdout
