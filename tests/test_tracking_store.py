"""An unusable MLflow tracking store: every step that logs fails in seconds, in one line naming the store.

Real stores only: a loopback port nobody listens on, and a real MLflow SQLite store made read-only
(chmod for a normal user; `chattr +i` for root, whom file modes do not stop).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, run_env
from tests.servers import free_port

PARAMS = str(ROOT / "params.yaml")


def component(args: list[str], uri: str, cwd: Path, timeout: float = 90, **env: str) -> tuple[int, str, float]:
    """Run `python -m components.<...>` against the store `uri`; returns (exit status, stderr, seconds)."""
    start = time.monotonic()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", *args],
            cwd=cwd,
            env=run_env(ROOT, MLFLOW_TRACKING_URI=uri, **env),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{' '.join(args)} against {uri} still ran after {timeout:.0f} s")
    return proc.returncode, proc.stderr, time.monotonic() - start


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ": error: " in line]


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[None]:
    """`path` (a file) cannot be opened for writing, for this user and its subprocesses."""
    if os.geteuid() != 0:
        mode = path.stat().st_mode
        path.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
        try:
            yield
        finally:
            path.chmod(mode)
        return
    done = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"running as root and chattr +i is refused here ({done.stderr.strip()}): no read-only file")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


@pytest.fixture
def sqlite_store(tmp_path: Path) -> str:
    """A real MLflow SQLite store (tables and the pipeline's experiment created by MLflow)."""
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    (tmp_path / "store").mkdir()
    subprocess.run(
        [sys.executable, "-c", "from pipeline import tracking; tracking.setup('cxr-dwml')"],
        cwd=tmp_path,
        env=run_env(ROOT, MLFLOW_TRACKING_URI=uri),
        check=True,
        capture_output=True,
        timeout=120,
    )
    return uri


def test_a_dead_tracking_server_fails_each_step_in_seconds_in_one_line(tmp_path: Path) -> None:
    port = free_port()  # no listener: connections to it are refused at once
    uri = f"http://alice:s3cr%40t@127.0.0.1:{port}"
    shown = f"http://***@127.0.0.1:{port}"
    for args in (
        ["components.download", "--out", str(tmp_path / "raw"), "--no-progress"],  # a step run (mlflow_run)
        ["components.promote", "--list"],
        ["components.promote", "--version", "1"],
    ):
        code, stderr, seconds = component(args, uri, cwd=ROOT)
        assert code == 2, (args, stderr[-3000:])
        assert seconds < 15, (args, seconds)
        (line,) = error_lines(stderr)
        assert shown in line and "not reachable" in line and "MLFLOW_TRACKING_URI" in line, line
        assert "s3cr" not in stderr and "Traceback" not in stderr, stderr[-3000:]
    assert not (tmp_path / "raw").exists()  # nothing was downloaded before the check
    # the traceback, for whoever debugs the check itself
    code, stderr, _ = component(["components.promote", "--list"], uri, cwd=ROOT, CXR_DEBUG="1")
    assert code != 0 and "Traceback" in stderr and "TrackingStoreError" in stderr


def test_a_read_only_sqlite_store_fails_each_step_in_seconds_in_one_line(tmp_path: Path, sqlite_store: str) -> None:
    db = Path(sqlite_store.removeprefix("sqlite:///"))
    with read_only(db):
        for args in (
            ["components.download", "--params", PARAMS, "--out", str(tmp_path / "raw"), "--no-progress"],
            ["components.promote", "--params", PARAMS, "--version", "1"],
        ):
            code, stderr, seconds = component(args, sqlite_store, cwd=tmp_path)
            assert code == 2, (args, stderr[-3000:])
            assert seconds < 15, (args, seconds)
            (line,) = error_lines(stderr)
            assert sqlite_store in line and "cannot be opened for writing" in line and "chmod u+w" in line, line
            assert "Traceback" not in stderr, stderr[-3000:]
        # reading needs no write access: the listing still works
        code, stderr, _ = component(["components.promote", "--params", PARAMS, "--list"], sqlite_store, cwd=tmp_path)
        assert "cannot be opened for writing" not in stderr and "cxr-dwml not found" in stderr, stderr[-3000:]
    assert not (tmp_path / "raw").exists()


def test_mlflow_and_database_errors_are_reported_in_one_line(
    tmp_path: Path, sqlite_store: str, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An error MLflow raises mid-step (the store turned read-only after the check): one line, exit 2."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    from components.common import run_main
    from pipeline import tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", sqlite_store)
    monkeypatch.delenv("CXR_DEBUG", raising=False)
    db = Path(sqlite_store.removeprefix("sqlite:///"))

    def step(argv):  # creating an experiment writes to the store
        tracking.setup("another-experiment")

    with read_only(db), _use_tracking_uri(sqlite_store):
        capsys.readouterr()
        assert run_main("evaluate", step, []) == 2
        stderr = capsys.readouterr().err
        (line,) = error_lines(stderr)
        assert line.startswith(f"cxr-dwml evaluate: error: MLflow tracking store {sqlite_store}: "), line
        assert "readonly database" in line and "[SQL:" not in line, line
        assert "Traceback" not in stderr
        monkeypatch.setenv("CXR_DEBUG", "1")
        with pytest.raises(MlflowException, match="readonly database"):
            run_main("evaluate", step, [])


def test_promote_lists_each_versions_aliases_from_a_database_store(sqlite_store: str, tmp_path: Path) -> None:
    """A database store hands version numbers over as ints, a tracking server as strings."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=sqlite_store)
    client.create_registered_model("cxr-dwml")
    run = client.create_run(client.get_experiment_by_name("cxr-dwml").experiment_id)
    for _ in range(3):
        client.create_model_version("cxr-dwml", (tmp_path / "model").as_uri(), run.info.run_id)
    client.set_registered_model_alias("cxr-dwml", "champion", "2")
    client.set_registered_model_alias("cxr-dwml", "challenger", "3")
    client.set_registered_model_alias("cxr-dwml", "stable", "2")
    done = subprocess.run(
        [sys.executable, "-m", "components.promote", "--params", PARAMS, "--list"],
        cwd=tmp_path,
        env=run_env(ROOT, MLFLOW_TRACKING_URI=sqlite_store),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    listed = dict(re.findall(r"^v\s*(\d+)\s+aliases=(\S+)", done.stdout, flags=re.MULTILINE))
    assert listed == {"1": "-", "2": "champion,stable", "3": "challenger"}, done.stdout


def test_a_step_stopped_by_sigterm_ends_its_runs_as_killed(sqlite_store: str, tmp_path: Path) -> None:
    """What Airflow sends a task's process group when the task times out or is marked failed."""
    from mlflow import MlflowClient

    params = yaml.safe_load(Path(PARAMS).read_text())
    with socket.socket() as server:  # a mirror that takes the connection and never answers
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        server.settimeout(120)
        params["download"].update(source=f"http://127.0.0.1:{server.getsockname()[1]}/nih", timeout_s=600.0)
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
        step = subprocess.Popen(
            [sys.executable, "-m", "components.download", "--params", "params.yaml", "--out", "raw", "--no-progress"],
            cwd=tmp_path,
            env=run_env(ROOT, MLFLOW_TRACKING_URI=sqlite_store, CXR_PIPELINE_RUN="stopped-by-sigterm"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            conn, _ = server.accept()  # the step is fetching: its run and the parent are RUNNING
        except TimeoutError:
            step.kill()
            pytest.fail(f"the step never asked the mirror: {step.communicate()[1][-3000:]}")
        with conn:
            os.killpg(step.pid, signal.SIGTERM)
            _, stderr = step.communicate(timeout=120)
    assert step.returncode == 143, stderr[-3000:]
    assert "stopped by SIGTERM" in stderr and "Traceback" not in stderr, stderr[-3000:]
    client = MlflowClient(tracking_uri=sqlite_store)
    runs = client.search_runs([client.get_experiment_by_name("cxr-dwml").experiment_id])
    states = {r.data.tags.get("cxr.step"): (r.info.status, r.info.end_time is not None) for r in runs}
    assert states == {"download": ("KILLED", True), "pipeline": ("KILLED", True)}, states
