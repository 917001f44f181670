"""Where the ledger lives (issue 13, item 1): ``VIDU_LEDGER_URL`` / ``--ledger-url``, honoured
by the commands and the resource; a URL that cannot work is one clear line that never shows
the password. The CLI runs in a subprocess, as a user meets it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest
from postgres_db import fresh_database
from support import run_cli

from vidu_pipeline.api.errors import ConfigurationError
from vidu_pipeline.defs.resources import PipelineResource
from vidu_pipeline.ledger import Ledger, PlannedRequest
from vidu_pipeline.ledger.url import check_ledger_url

SECRET = "s3cret-Pa55"


def cli(work: Path, *args: str, ledger_env: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIDU_", "DAGSTER_"))}
    env["DAGSTER_HOME"] = str(work / "dagster_home")
    if ledger_env is not None:
        env["VIDU_LEDGER_URL"] = ledger_env
    return run_cli(*args, cwd=work, env=env, timeout=120)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    ("url", "says"),
    [
        (f"postgres://vidu:{SECRET}@db.example/vidu", "use postgresql+psycopg://"),
        (f"mysql://vidu:{SECRET}@db.example/vidu", "unknown scheme 'mysql'"),
        (f"postgresql+pg8000://vidu:{SECRET}@db.example/vidu", "pip install 'vidu-pipeline[postgres]'"),
        (f"postgresql+nosuchdriver://vidu:{SECRET}@db.example/vidu", "unknown driver"),
        (f"postgresql+psycopg://vidu:{SECRET}@db.example", "no database named"),
        ("not a url at all", "is not a SQLAlchemy URL"),
    ],
)
def test_a_ledger_url_that_cannot_work_is_one_line_without_the_password(url, says):
    with pytest.raises(ConfigurationError) as caught:
        check_ledger_url(url)
    message = str(caught.value)
    assert says in message and "\n" not in message
    assert SECRET not in message


@pytest.mark.slow
def test_the_commands_refuse_a_bad_ledger_url_in_one_line_from_the_flag_or_the_environment(tmp_path):
    bad = f"postgres://vidu:{SECRET}@db.example/vidu"
    for done in (
        cli(tmp_path, "status", "--data-dir", str(tmp_path / "data"), "--ledger-url", bad),
        cli(tmp_path, "status", "--data-dir", str(tmp_path / "data"), ledger_env=bad),
        cli(tmp_path, "generate", "--data-dir", str(tmp_path / "data"), ledger_env=bad),
        cli(tmp_path, "reproduce", "--data-dir", str(tmp_path / "data"), "some-request", ledger_env=bad),
    ):
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "use postgresql+psycopg://" in lines[0], done.stderr
        assert SECRET not in done.stderr + done.stdout
        assert "vidu:***@db.example" in lines[0]


@pytest.mark.slow
def test_a_server_that_cannot_be_reached_is_one_line_without_the_password(tmp_path):
    url = f"postgresql+psycopg://vidu:{SECRET}@127.0.0.1:{free_port()}/vidu"
    done = cli(tmp_path, "status", "--data-dir", str(tmp_path / "data"), "--ledger-url", url)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot reach the ledger at"), done.stderr
    assert SECRET not in done.stderr + done.stdout


def plan_two(url: str) -> None:
    ledger = Ledger(url)
    try:
        ledger.plan([PlannedRequest(f"r{i}", "s", i, "f" * 64, "{}") for i in range(2)])
    finally:
        ledger.close()


@pytest.mark.slow
def test_status_reads_the_ledger_the_url_names_and_the_flag_wins_over_the_environment(tmp_path):
    elsewhere = f"sqlite:///{tmp_path / 'shared' / 'ledger.sqlite'}"
    (tmp_path / "shared").mkdir()
    plan_two(elsewhere)
    data = str(tmp_path / "data")
    from_env = cli(tmp_path, "status", "--data-dir", data, "--json", ledger_env=elsewhere)
    assert from_env.returncode == 0, from_env.stderr
    assert json.loads(from_env.stdout)["counts"]["planned"] == 2
    assert not (tmp_path / "data" / "ledger.sqlite").exists()
    other = f"sqlite:///{tmp_path / 'other.sqlite'}"
    Ledger(other).close()  # an empty ledger
    from_flag = cli(tmp_path, "status", "--data-dir", data, "--json", "--ledger-url", other, ledger_env=elsewhere)
    assert from_flag.returncode == 0, from_flag.stderr
    assert json.loads(from_flag.stdout)["counts"]["planned"] == 0


def test_the_resource_takes_the_url_from_the_environment_unless_given(tmp_path, monkeypatch):
    """``dagster dev`` builds the resource without a URL: it must still find the shared ledger."""
    monkeypatch.delenv("VIDU_LEDGER_URL", raising=False)
    assert PipelineResource(data_dir=str(tmp_path)).ledger_location == f"sqlite:///{tmp_path / 'ledger.sqlite'}"
    shared = f"sqlite:///{tmp_path / 'shared.sqlite'}"
    monkeypatch.setenv("VIDU_LEDGER_URL", shared)
    assert PipelineResource(data_dir=str(tmp_path)).ledger_location == shared
    given = f"sqlite:///{tmp_path / 'given.sqlite'}"
    assert PipelineResource(data_dir=str(tmp_path), ledger_url=given).ledger_location == given
    assert "given.sqlite" not in repr(PipelineResource(data_dir=str(tmp_path), ledger_url=given))


@pytest.mark.postgres
@pytest.mark.slow
def test_status_on_postgres_before_and_after_planning(tmp_path):
    with fresh_database() as url:
        data = str(tmp_path / "data")
        empty = cli(tmp_path, "status", "--data-dir", data, ledger_env=url)
        assert empty.returncode == 0, empty.stderr
        assert "nothing generated yet" in empty.stdout
        plan_two(url)
        planned = cli(tmp_path, "status", "--data-dir", data, "--json", ledger_env=url)
        assert planned.returncode == 0, planned.stderr
        assert json.loads(planned.stdout)["counts"]["planned"] == 2
        assert not (tmp_path / "data" / "ledger.sqlite").exists()
