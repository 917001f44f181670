"""The product as a Dagster user meets it: ``dagster dev -w workspace.yaml`` (webserver and
daemon as subprocesses on a temporary DAGSTER_HOME), the plan job launched through the
webserver's GraphQL API, then nothing but the daemon: the task sensor submits, polls and
collects; the automation sensor re-materializes ``lineage`` and runs the checks. Asserted
through GraphQL, i.e. what the UI shows."""

from __future__ import annotations

import contextlib
import csv
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

from vidu_pipeline.api import runtime

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "catalog"
SUBJECTS = ("cat", "coffee")  # 2 subjects × 1 prompt × 1 seed
WAIT_S = int(os.environ.get("VIDU_DAEMON_TEST_WAIT_S", "480"))  # bounded; the run takes ~2 min

pytestmark = [pytest.mark.slow, pytest.mark.timeout(WAIT_S + 120)]


def small_catalog(dest: Path) -> None:
    """The sample catalog cut to one prompt for each of SUBJECTS and one seed."""
    shutil.copytree(SAMPLE, dest)
    for name, keep_all in (("images.csv", True), ("prompts.csv", False)):
        with open(dest / name, newline="") as f:
            rows = list(csv.DictReader(f))
        kept, seen = [], set()
        for row in rows:
            if row["subject_id"] in SUBJECTS and (keep_all or row["subject_id"] not in seen):
                kept.append(row)
                seen.add(row["subject_id"])
        with open(dest / name, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(kept)
    sweep = yaml.safe_load((dest / "sweep.yaml").read_text())
    sweep["seeds"] = [1]
    (dest / "sweep.yaml").write_text(yaml.safe_dump(sweep))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class UI:
    """The webserver's GraphQL endpoint, as the UI uses it."""

    def __init__(self, port: int):
        self.url = f"http://127.0.0.1:{port}/graphql"

    def query(self, text: str, **variables) -> dict:
        resp = requests.post(self.url, json={"query": text, "variables": variables}, timeout=30)
        resp.raise_for_status()
        body = resp.json()
        assert not body.get("errors"), body["errors"]
        return body["data"]

    def location_name(self) -> str | None:
        data = self.query("""{ workspaceOrError { ... on Workspace { locationEntries {
            name loadStatus locationOrLoadError { __typename } } } } }""")
        for entry in data["workspaceOrError"]["locationEntries"]:
            if entry["loadStatus"] == "LOADED" and entry["locationOrLoadError"]["__typename"] == "RepositoryLocation":
                return entry["name"]
        return None

    def launch(self, location: str, job: str) -> str:
        data = self.query(
            """mutation($params: ExecutionParams!) { launchRun(executionParams: $params) {
                __typename ... on LaunchRunSuccess { run { runId } }
                ... on PythonError { message } ... on RunConfigValidationInvalid { errors { message } } } }""",
            params={
                "selector": {"repositoryLocationName": location, "repositoryName": "__repository__", "jobName": job},
                "runConfigData": {},
                "executionMetadata": {"tags": [{"key": "launched_by", "value": "test_daemon"}]},
            },
        )["launchRun"]
        assert data["__typename"] == "LaunchRunSuccess", data
        return data["run"]["runId"]

    def run_status(self, run_id: str) -> str:
        return self.query("""query($id: ID!) { runOrError(runId: $id) { ... on Run { status } } }""", id=run_id)[
            "runOrError"
        ]["status"]

    def partitions(self, asset: str) -> dict:
        data = self.query(
            """query($key: AssetKeyInput!) { assetNodeOrError(assetKey: $key) { ... on AssetNode {
            assetPartitionStatuses { ... on DefaultPartitionStatuses {
                materializedPartitions failedPartitions unmaterializedPartitions materializingPartitions } } } } }""",
            key={"path": [asset]},
        )
        return data["assetNodeOrError"]["assetPartitionStatuses"]

    def latest_checks(self, asset: str) -> dict[str, bool | None]:
        """Each check's result for the asset's latest materialization, as the asset page shows it."""
        data = self.query(
            """query($key: AssetKeyInput!) { assetNodeOrError(assetKey: $key) { ... on AssetNode {
            assetChecksOrError { ... on AssetChecks { checks { name
                executionForLatestMaterialization { status evaluation { success } } } } } } } }""",
            key={"path": [asset]},
        )
        checks = data["assetNodeOrError"]["assetChecksOrError"]["checks"]
        return {c["name"]: _passed(c["executionForLatestMaterialization"]) for c in checks}

    def latest_check_execution(self, asset: str, check: str) -> bool | None:
        data = self.query(
            """query($key: AssetKeyInput!, $check: String!) {
            assetCheckExecutions(assetKey: $key, checkName: $check, limit: 1) {
                status evaluation { success } } }""",
            key={"path": [asset]},
            check=check,
        )
        executions = data["assetCheckExecutions"]
        return _passed(executions[0]) if executions else None

    def materializations(self, asset: str, partitions: list[str] | None = None, limit: int = 50) -> list[dict]:
        data = self.query(
            """query($key: AssetKeyInput!, $partitions: [String!], $limit: Int) {
            assetOrError(assetKey: $key) { ... on Asset {
                assetMaterializations(partitions: $partitions, limit: $limit) { partition runId timestamp
                    metadataEntries { label __typename
                        ... on MarkdownMetadataEntry { mdStr } ... on IntMetadataEntry { intValue }
                        ... on PathMetadataEntry { path } ... on TextMetadataEntry { text } } } } } }""",
            key={"path": [asset]},
            partitions=partitions,
            limit=limit,
        )
        return data["assetOrError"]["assetMaterializations"]

    def all_runs(self) -> list[dict]:
        data = self.query("""{ runsOrError { ... on Runs { results { runId jobName status } } } }""")
        return data["runsOrError"]["results"]

    def observations(self, asset: str, limit: int = 1) -> list[dict]:
        data = self.query(
            """query($key: AssetKeyInput!, $limit: Int) { assetOrError(assetKey: $key) { ... on Asset {
                assetObservations(limit: $limit) { timestamp metadataEntries { label __typename
                    ... on MarkdownMetadataEntry { mdStr }
                    ... on TableMetadataEntry { table { records schema { columns { name } } } } } } } } }""",
            key={"path": [asset]},
            limit=limit,
        )
        return data["assetOrError"]["assetObservations"]

    def runs_tagged(self, key: str, value: str) -> list[dict]:
        data = self.query(
            """query($filter: RunsFilter) { runsOrError(filter: $filter) { ... on Runs {
            results { runId jobName status tags { key value } } } } }""",
            filter={"tags": [{"key": key, "value": value}]},
        )
        return data["runsOrError"]["results"]


def _passed(execution: dict | None) -> bool | None:
    if not execution or execution["status"] not in ("SUCCEEDED", "FAILED"):
        return None
    return bool(execution["evaluation"] and execution["evaluation"]["success"])


def entries(materialization: dict) -> dict[str, dict]:
    return {e["label"]: e for e in materialization["metadataEntries"]}


@pytest.fixture
def dagster_dev(tmp_path):
    """``dagster dev`` on a temporary home and data dir, the embedded simulator small and quick."""
    home, data = tmp_path / "dagster_home", tmp_path / "data"
    home.mkdir()
    small_catalog(data / "catalog")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIDU_", "DAGSTER_"))}
    env.update(
        DAGSTER_HOME=str(home),
        VIDU_DATA_DIR=str(data),
        VIDU_SIMULATOR_RENDER_SCALE="0.1",
        VIDU_SIMULATOR_LATENCY="1",
        PYTHONUNBUFFERED="1",
    )
    bin_dir = Path(sys.executable).parent
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    # One process migrates the fresh instance's storage before webserver and daemon race to.
    subprocess.run(
        [sys.executable, "-c", "import dagster; dagster.DagsterInstance.get().dispose()"],
        env=env,
        check=True,
        timeout=120,
        cwd=ROOT,
    )
    port = free_port()
    with open(tmp_path / "dagster_dev.log", "wb") as log:
        proc = subprocess.Popen(
            [str(bin_dir / "dagster"), "dev", "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            yield UI(port), proc, data, tmp_path / "dagster_dev.log"
        finally:
            stop_group(proc)
            runtime.stop_local_simulator(data / "state" / "simulator")
    gone_by = time.monotonic() + 20  # the simulator and log tails exit on their own signals
    while leftovers(tmp_path) and time.monotonic() < gone_by:
        time.sleep(0.5)
    left = leftovers(tmp_path)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"processes outlived dagster dev: {left}"


def stop_group(proc: subprocess.Popen) -> None:
    """Ctrl-C for the whole process group (webserver, daemon, code servers, runs), as a user
    stops ``dagster dev``; then SIGTERM, then SIGKILL whatever is left (compute-log ``tail``
    children ignore SIGTERM)."""
    for sig, grace in ((signal.SIGINT, 20), (signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue
        with contextlib.suppress(ProcessLookupError):  # the leader is gone; its group may not be
            os.killpg(proc.pid, signal.SIGKILL)
        return


def leftovers(tmp_path: Path) -> dict[int, str]:
    """Processes whose command line names this test's folder (runs, log tails, the simulator)."""
    found = {}
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(tmp_path) in text and int(cmdline.parent.name) != os.getpid():
            found[int(cmdline.parent.name)] = text[:200]
    return found


def wait_for(what: str, probe, deadline: float, proc: subprocess.Popen, log: Path, every: float = 3.0):
    last = None
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"dagster dev exited ({proc.returncode}):\n{log.read_text()[-3000:]}"
        try:
            last = probe()
        except requests.RequestException as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}; last seen: {last!r}\n{log.read_text()[-3000:]}")


def test_the_daemon_generates_and_checks_a_sweep_launched_from_the_ui(dagster_dev):
    ui, proc, data, log = dagster_dev
    deadline = time.monotonic() + WAIT_S
    location = wait_for("the code location to load", ui.location_name, deadline, proc, log)

    plan_run = ui.launch(location, "vidu_plan_job")
    status = wait_for(
        "the plan run",
        lambda: ui.run_status(plan_run) in ("SUCCESS", "FAILURE", "CANCELED") and ui.run_status(plan_run),
        deadline,
        proc,
        log,
    )
    assert status == "SUCCESS"
    keys = ui.partitions("videos")["unmaterializedPartitions"]
    assert len(keys) == len(SUBJECTS), keys

    # From here on nothing but the daemon: the task sensor auto-submits, polls, collects.
    def all_videos_in():
        statuses = ui.partitions("videos")
        assert not statuses["failedPartitions"], statuses
        return sorted(statuses["materializedPartitions"]) == sorted(keys)

    wait_for("every videos partition", all_videos_in, deadline, proc, log, every=5)

    # ...and the automation sensor re-materializes lineage after the batch, with its checks.
    def lineage_current():
        latest = ui.materializations("lineage", limit=1)
        if not latest or entries(latest[0])["dagster/row_count"]["intValue"] != len(keys):
            return False
        checks = ui.latest_checks("lineage")
        return checks if all(v is not None for v in checks.values()) else False

    checks = wait_for("lineage with a row per video, and its checks", lineage_current, deadline, proc, log, every=5)
    assert checks == {"lineage_complete": True, "videos_match_requests": True, "no_unknown_tasks": True}
    verified = wait_for(
        "the videos check", lambda: ui.latest_check_execution("videos", "videos_verified"), deadline, proc, log, every=5
    )
    assert verified is True

    lineage_runs = ui.runs_tagged("dagster/sensor_name", "vidu_automation_sensor")
    assert any(r["status"] == "SUCCESS" for r in lineage_runs), lineage_runs

    # The task sensor's runs are the named jobs, so the Jobs and timeline pages show them.
    task_runs = ui.runs_tagged("dagster/sensor_name", "vidu_task_sensor")
    assert {r["jobName"] for r in task_runs} >= {"vidu_submit_job", "vidu_collect_job"}, task_runs
    assert {r["jobName"] for r in task_runs} <= {"vidu_submit_job", "vidu_collect_job", "vidu_lineage_job"}
    assert all(r["jobName"] != "__ephemeral_asset_job__" for r in ui.all_runs())

    # The progress view the task sensor records on video_tasks: counts and the tasks table.
    [progress] = ui.observations("video_tasks", limit=1)
    view = entries(progress)
    assert view["states"]["__typename"] == "MarkdownMetadataEntry" and "**succeeded**" in view["states"]["mdStr"]
    assert view["in_flight"]["__typename"] == "TableMetadataEntry"
    columns = [c["name"] for c in view["in_flight"]["table"]["schema"]["columns"]]
    assert columns == ["request_id", "state", "eta_s", "progress_pct", "age_s"]

    # What a videos partition page shows: the frame inline, the path relative to the data dir.
    [video] = ui.materializations("videos", partitions=[keys[0]], limit=1)
    meta = entries(video)
    assert meta["thumbnail"]["__typename"] == "MarkdownMetadataEntry"
    assert meta["thumbnail"]["mdStr"].startswith(f"![{keys[0]}](data:image/jpeg;base64,")
    assert meta["path"]["path"] == f"videos/{keys[0]}.mp4"
    assert (data / meta["path"]["path"]).is_file()
    assert "data:image/jpeg;base64," in meta["references"]["mdStr"]
