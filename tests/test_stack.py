"""The deployment stack of docker/compose.yaml, run as local processes on loopback, end to end.

The services start with the settings docker/compose.yaml and .env.example give them, read from
those files; only what a container network provides is replaced: host names and ports become
loopback ones, and the databases are throwaway ones on the machine's PostgreSQL.

- PostgreSQL (127.0.0.1:5432, user postgres): a throwaway database each for MLflow and Airflow;
- moto's S3 server stands in for MinIO, with the buckets docker/minio-init.sh creates; the demo
  data sits in the data-source bucket in NIH layout, as a deployment keeps ChestX-ray14;
- `mlflow server` with compose's command line (proxied artifacts to `s3://mlflow-artifacts`) and
  a PostgreSQL backend store;
- Airflow 3 as compose runs it: `airflow db migrate`, airflow-init's pools, then api-server,
  scheduler (LocalExecutor), dag-processor and triggerer as separate processes.

On the tiny demo, in one shared stack, two DAG runs side by side, each in a workspace of its own:

- the scheduler creates a run from the DAG's shipped weekly schedule once the DAG (paused at
  creation, as compose sets it) is unpaused; the MLflow server is killed between its tasks and
  comes back (`train` fails its first try, the retry completes the run);
- once the server is back, a second run is triggered through the REST API (which first refuses a
  conf its schema rejects), with a conf of its own and three faults. It names a data folder that
  does not exist yet: `download` fails with the component's message in the task log, and once the
  folder holds the data, clearing the task lets the run go on. Its running train task is marked
  failed through the REST API (as the UI does), which ends its MLflow runs KILLED and leaves no
  lock; cleared, it resumes in the run's workspace. The S3 server is down during its `evaluate`'s
  `dvc push` (the task fails naming the remote, the retry pushes).

Each run is saved as its own DVC experiment, both register, the gates take turns, and the project
checkout stays as it was. A person promotes the version the gates left out through MLflow's REST
API and `mlflow models serve` of `models:/cxr-dwml@champion` answers a PNG.
Each run's files are read from its DVC experiment (`dag-<run id>`).

This is the suite's one run through the real scheduler. Its tests are steps on one stack, each
building on those before it, so the file runs whole: `make stack-test` runs it alone;
under CI=true `make test` includes it. Without PostgreSQL it skips (it fails under CI=true).
"""

from __future__ import annotations

import base64
import contextlib
import importlib.util
import io
import json
import logging
import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import requests
import yaml

from pipeline.classes import CLASSES
from pipeline.serving.predictor import read_calibration
from tests.conftest import (
    COMPOSE,
    ENV_EXAMPLE,
    VENV_BIN,
    copy_repo,
    experiment_file,
    experiment_ref,
    read_env_file,
    resolve_compose,
    service_environment,
    stage_runner,
)
from tests.servers import free_port, postgres_databases, stop, unavailable, wait_http, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.stack]

DAG_ID = "cxr_dwml"
MODEL = "cxr-dwml"
# how long a run may go without any task changing state or try before the test gives up on it: a
# task of the tiny demo takes 30-90 s on a busy 2-core machine
STALL_S = 420
# 15 s between a failed try and the next (the shipped 5 minutes is for real outages): long enough for
# a restarted MLflow server to answer again
RETRY_DELAY_MINUTES = "0.25"
# Settings of .env that are not given as .env.example has them: a valid Fernet key (the example's is
# a placeholder) and one MLflow worker process (the example's four are for a server, not a 2-core test).
ENV_OVERRIDES = {"MLFLOW_WORKERS": "1"}
# Compose's host names, as the stack's containers reach one another.
MINIO, MLFLOW, AIRFLOW_API = "http://minio:9000", "http://mlflow:5000", "http://airflow-apiserver:8080"


# --- the compose file, resolved for loopback ------------------------------------------------------


def compose_settings() -> dict:
    """docker/compose.yaml interpolated with .env.example (plus ENV_OVERRIDES and a Fernet key)."""
    from cryptography.fernet import Fernet

    env = {**read_env_file(ENV_EXAMPLE), **ENV_OVERRIDES, "AIRFLOW_FERNET_KEY": Fernet.generate_key().decode()}
    return resolve_compose(yaml.safe_load(COMPOSE.read_text()), env)


def bucket_of(url: str) -> str:
    assert url.startswith("s3://"), url
    return url.removeprefix("s3://").split("/", 1)[0]


def on_loopback(env: dict[str, str], hosts: dict[str, str], databases: dict[str, str]) -> dict[str, str]:
    """`env` with compose's service URLs replaced by loopback ones and database URLs by throwaway ones."""
    out = {}
    for key, value in env.items():
        if key in databases:
            assert value.startswith("postgresql+psycopg2://"), f"{key}={value}: compose uses PostgreSQL"
            value = databases[key]
        for old, new in hosts.items():
            value = value.replace(old, new)
        out[key] = value
    leftover = {
        k: v
        for k, v in out.items()
        if k != "MLFLOW_SERVER_ALLOWED_HOSTS" and any(h in v for h in ("minio:", "mlflow:", "@postgres:", "apiserver"))
    }
    assert not leftover, f"compose settings still name container hosts: {leftover}"
    return out


# --- S3, MLflow, Airflow's REST API ----------------------------------------------------------------


class S3Server:
    """moto's S3 server on a fixed loopback port that can go down and come back with its objects
    (moto keeps them in this process, so a new server on the same port serves the same buckets)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._server = None

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def client(self, env: dict[str, str]):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=env["AWS_DEFAULT_REGION"],
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        )

    def keys(self, env: dict[str, str], bucket: str, prefix: str = "") -> list[str]:
        pages = self.client(env).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return [obj["Key"] for page in pages for obj in page.get("Contents", [])]


@dataclass
class Service:
    """A long-running command of the stack, started in a session of its own, logging to a file."""

    name: str
    cmd: list[str]
    env: dict[str, str]
    log: Path
    cwd: Path
    proc: subprocess.Popen | None = None
    starts: int = 0

    def start(self) -> Service:
        self.starts += 1
        with open(self.log, "ab") as out:
            out.write(f"\n--- start {self.starts}: {' '.join(self.cmd)}\n".encode())
            out.flush()
            self.proc = subprocess.Popen(
                self.cmd, env=self.env, cwd=self.cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        return self

    def kill(self) -> None:
        """SIGKILL to the whole process group: a crash, not a shutdown."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            stop(self.proc)

    def tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:]

    def wait_http(self, url: str, timeout: float = 240) -> None:
        wait_http(url, timeout, process=self.proc, log=self.log)


def mlflow_command(compose: dict, port: int) -> list[str]:
    """The mlflow service's command line with its host and port made loopback ones."""
    cmd = list(compose["services"]["mlflow"]["command"])
    assert cmd[:2] == ["mlflow", "server"] and "--artifacts-destination" in cmd, cmd
    for flag, value in (("--host", "127.0.0.1"), ("--port", str(port))):
        cmd[cmd.index(flag) + 1] = value
    return [str(VENV_BIN / "mlflow"), *cmd[1:]]


class Api:
    """Airflow's REST API v2 on the API server (every request an admin's: simple auth manager)."""

    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}/api/v2"

    def call(self, method: str, path: str, body: dict | None = None) -> tuple[int, Any]:
        """(HTTP status, parsed answer); status 0 with the error text when nothing answered."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(
            self.base + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(errors="replace")
        except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
            return 0, str(e)

    def run_state(self, run_id: str) -> str:
        code, body = self.call("GET", f"/dags/{DAG_ID}/dagRuns/{run_id}")
        return body["state"] if code == 200 else f"http {code}"


def task_log(path: Path) -> str:
    """The messages of a task log file (JSON lines under the scheduler, plain text elsewhere)."""
    lines = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            lines.append(str(json.loads(line).get("event", "")))
        except (json.JSONDecodeError, AttributeError):
            lines.append(line)
    return "\n".join(lines)


# --- the stack ---------------------------------------------------------------------------------


@dataclass
class Stack:
    repo: Path
    home: Path  # AIRFLOW_HOME
    compose: dict
    env: dict[str, str]  # the Airflow services' environment (their tasks inherit it)
    s3: S3Server
    mlflow: Service
    mlflow_url: str
    api: Api
    services: list[Service]
    results: dict = field(default_factory=dict)  # what one step hands the next

    def client(self):
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.mlflow_url)

    def versions(self) -> list[str]:
        return sorted(str(v.version) for v in self.client().search_model_versions(f"name='{MODEL}'"))

    def aliases(self) -> dict[str, str]:
        return {a: str(v) for a, v in self.client().get_registered_model(MODEL).aliases.items()}

    def experiment(self, run_id: str) -> str:
        """The DVC experiment a DAG run is saved as."""
        return stage_runner().Workspace.of(self.repo, run_id).experiment

    def saved(self, run_id: str, path: str) -> str:
        """A file of a DAG run's experiment that git holds (dvc.lock, metrics, registration.json)."""
        return experiment_file(self.repo, self.experiment(run_id), path)

    def cached(self, run_id: str, path: str) -> bytes:
        """An output of a DAG run's experiment that the DVC cache holds, as `dvc.api` reads it."""
        import dvc.api

        ref = experiment_ref(self.repo, self.experiment(run_id))
        return dvc.api.read(path, repo=str(self.repo), rev=ref, mode="rb")

    def log(self, run_id: str, task: str, attempt: int) -> str:
        path = self.home / f"logs/dag_id={DAG_ID}/run_id={run_id}/task_id={task}/attempt={attempt}.log"
        return task_log(path) if path.exists() else ""

    def tries(self, run_id: str) -> dict[str, dict]:
        code, body = self.api.call("GET", f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances")
        assert code == 200, body
        return {t["task_id"]: t for t in body["task_instances"]}

    def drive(self, run_id: str, step: Callable[[dict[str, dict]], None] | None = None) -> str:
        """Wait for the run to end, calling `step(task instances)` every second meanwhile (without a
        step, checking every 2 s: each check costs the API server two queries); give up once no
        task has changed state or try for STALL_S seconds."""
        tries: dict[str, dict] = {}

        def ended() -> str | None:
            tries.update(self.tries(run_id))
            state = self.api.run_state(run_id)
            if state in ("success", "failed"):
                return state
            if step is not None:
                step(tries)
            return None

        def progress() -> list[tuple]:
            return sorted((t, i["state"], i["try_number"]) for t, i in tries.items())

        every = 1.0 if step is not None else 2.0
        return wait_until(f"run {run_id} to end", ended, STALL_S, every=every, progress=progress)


def publish_demo_data(repo: Path, s3: S3Server, env: dict[str, str], url: str) -> None:
    """The tiny demo's synthetic images in NIH layout under the data-source URL of the stack."""
    raw = repo.parent / "nih"
    made = subprocess.run(
        [str(VENV_BIN / "python"), "-m", "components.download", "--out", str(raw), "--source", "synthetic"]
        + ["--no-mlflow", "--no-progress"],
        cwd=repo,
        env={**os.environ, "PYTHONPATH": str(repo)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert made.returncode == 0, made.stderr[-3000:]
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    client = s3.client(env)
    for path in [*raw.glob("*.csv"), *raw.glob("*.txt"), *(raw / "images").glob("*.png")]:
        client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(raw)}")


def airflow_cli(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    done = subprocess.run([str(VENV_BIN / "airflow"), *args], env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"airflow {' '.join(args)}:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done


def base_environment(repo: Path) -> dict[str, str]:
    """This machine's environment without any setting the stack gives, the venv first on PATH."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "CXR_", "AWS_", "MLFLOW_", "PYTHONPATH"))
    }
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["HF_HUB_OFFLINE"] = "1"  # the demo's text encoder is a local package; nothing reaches a hub
    return env


def airflow_has_fab() -> bool:
    import importlib.util

    return importlib.util.find_spec("airflow.providers.fab") is not None


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    base = tmp_path_factory.mktemp("stack")
    if importlib.util.find_spec("asyncpg") is None:  # Airflow 3's async engine needs it for PostgreSQL
        unavailable("the PostgreSQL driver asyncpg (pip install -e '.[postgres]')")
    with postgres_databases("mlflow", "airflow") as databases:
        compose = compose_settings()
        services = compose["services"]
        repo = copy_repo(base / "repo")
        home = base / "airflow-home"
        home.mkdir()
        s3 = S3Server()
        s3.start()
        started: list[Service] = []
        stack = None
        try:
            mlflow_port, api_port = free_port(), free_port()
            mlflow_url, api_url = f"http://127.0.0.1:{mlflow_port}", f"http://127.0.0.1:{api_port}"
            hosts = {MINIO: s3.endpoint, MLFLOW: mlflow_url, AIRFLOW_API: api_url, "/opt/cxr-dwml": str(repo)}
            sql = {
                "MLFLOW_BACKEND_STORE_URI": databases["mlflow"],
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": databases["airflow"],
            }

            airflow_env = on_loopback(service_environment(services["airflow-scheduler"]), hosts, sql)
            mlflow_env = {**base_environment(repo), **on_loopback(service_environment(services["mlflow"]), hosts, sql)}
            # MLflow's background job runner is for GenAI jobs this project never starts
            mlflow_env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
            mlflow_cmd = mlflow_command(compose, mlflow_port)
            mlflow = Service("mlflow server", mlflow_cmd, mlflow_env, base / "mlflow.log", base)
            started.append(mlflow.start())

            env = {**base_environment(repo), **airflow_env}
            assert env["AIRFLOW__CORE__EXECUTOR"] == "LocalExecutor", "compose's executor"
            env.update(
                {
                    "AIRFLOW_HOME": str(home),
                    "AIRFLOW__CORE__DAGS_FOLDER": str(repo / "dags"),  # the image's /opt/airflow/dags
                    "AIRFLOW__API__HOST": "127.0.0.1",
                    "AIRFLOW__API__PORT": str(api_port),
                    "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
                    "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
                    "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_PORT": str(free_port()),
                    "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
                    "CXR_VENV": str(VENV_BIN.parent),  # the image's /opt/cxr-dwml/.venv
                    "CXR_AIRFLOW_RETRY_DELAY_MINUTES": RETRY_DELAY_MINUTES,
                }
            )
            if not airflow_has_fab():
                # the image's FAB auth manager is not installed here: Airflow's own simple one, every user an admin
                env["AIRFLOW__CORE__AUTH_MANAGER"] = (
                    "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"
                )
                env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS"] = "True"

            # airflow-init: migrate the database (while the buckets fill), then its command (the DVC pool)
            migrate_cmd = [str(VENV_BIN / "airflow"), "db", "migrate"]
            migrate = Service("airflow db migrate", migrate_cmd, env, base / "migrate.log", base).start()
            # the buckets minio-init creates: its list plus the bucket of each configured s3:// URL
            init = service_environment(services["minio-init"])
            urls = [init[k] for k in ("MLFLOW_ARTIFACTS_DESTINATION", "CXR_DVC_REMOTE_URL", "CXR_DATA_SOURCE")]
            for bucket in {*init["MINIO_BUCKETS"].split(), *map(bucket_of, urls)}:
                s3.client(airflow_env).create_bucket(Bucket=bucket)
            publish_demo_data(repo, s3, airflow_env, airflow_env["CXR_DATA_SOURCE"])
            assert migrate.proc.wait(timeout=420) == 0, migrate.tail()
            # airflow-init's command names the image's project folder: here, the copy
            airflow_cli(env, *(a.replace("/opt/cxr-dwml", str(repo)) for a in services["airflow-init"]["command"]))
            for name in ("airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer"):
                (sub,) = services[name]["command"]
                started.append(Service(name, [str(VENV_BIN / "airflow"), sub], env, base / f"{name}.log", base).start())

            mlflow.wait_http(f"{mlflow_url}/health")
            api = Api(api_port)
            started[1].wait_http(f"{api_url}/api/v2/version")

            def healthy() -> bool:
                code, body = api.call("GET", "/monitor/health")
                parts = ("metadatabase", "scheduler", "triggerer", "dag_processor")
                return code == 200 and all((body.get(p) or {}).get("status") == "healthy" for p in parts)

            wait_until("every Airflow service to report healthy", healthy, 240)
            wait_until("the DAG to be parsed", lambda: api.call("GET", f"/dags/{DAG_ID}")[0] == 200, 240)
            stack = Stack(repo, home, compose, env, s3, mlflow, mlflow_url, api, started)
            yield stack
        finally:
            faults = stack.results.get("faults") if stack is not None else None
            if faults is not None:  # a step failed before the last one closed it
                with contextlib.suppress(BaseException):
                    faults.close()
            for service in reversed(started):
                service.stop()
            s3.stop()


# --- the steps, in order, on the one stack ---------------------------------------------------------


def test_the_scheduler_runs_the_pipeline_from_the_shipped_schedule(stack: Stack) -> None:
    """Unpausing the DAG makes the scheduler create a run from the weekly schedule; the MLflow server
    dies once `prepare` and `prototypes` are done and comes back after `train`'s first try failed on
    it: the retry finishes the run. Once the server is back, a second run is triggered through the
    REST API (the REST API first refuses a conf the DAG's params reject): it runs beside this one,
    with the faults of `Faults` (the last step's)."""
    t0 = time.monotonic()
    api = stack.api
    stack.results["checkout"] = checkout_state(stack.repo)
    code, dag = api.call("GET", f"/dags/{DAG_ID}")
    assert code == 200 and dag["is_paused"] is True, "compose starts DAGs paused (AIRFLOW_DAGS_PAUSED_AT_CREATION)"
    assert dag["timetable_summary"] == "0 3 * * 1", dag.get("timetable_summary")
    # an invalid conf is refused at trigger time by the params' JSON schema
    code, body = api.call("POST", f"/dags/{DAG_ID}/dagRuns", {"logical_date": None, "conf": {"epochs": 0}})
    assert code == 400 and "epochs" in str(body), (code, body)
    code, body = api.call("PATCH", f"/dags/{DAG_ID}", {"is_paused": False})
    assert code == 200, body

    def scheduled_runs():
        code, body = api.call("GET", f"/dags/{DAG_ID}/dagRuns")
        return code == 200 and body["dag_runs"]

    (run,) = wait_until("the scheduler to create a run", scheduled_runs, 180)
    assert run["run_type"] == "scheduled", run
    run_id = run["dag_run_id"]
    outage: dict[str, float] = {}

    def trigger_the_second_run() -> None:
        mirror = stack.repo.parent / "mirror"  # its data source, missing until Faults puts the data there
        # four epochs: Faults stops train once the first is done, while three are still to come
        conf = {"epochs": 4, "source": str(mirror), "overrides": {"train.seed": 11}}
        code, body = api.call("POST", f"/dags/{DAG_ID}/dagRuns", {"logical_date": None, "conf": conf})
        assert code == 200, body
        stack.results.update(triggered=body["dag_run_id"], triggered_conf=conf)
        stack.results["faults"] = Faults(stack, body["dag_run_id"], mirror)

    def mlflow_outage(tries: dict[str, dict]) -> None:
        train = tries["train"]
        if "down" not in outage and tries["prepare"]["state"] == tries["prototypes"]["state"] == "success":
            stack.mlflow.kill()
            outage["down"] = time.monotonic()
        elif "down" in outage and "up" not in outage and train["state"] in ("up_for_retry", "failed"):
            stack.mlflow.start()
            stack.mlflow.wait_http(f"{stack.mlflow_url}/health")
            outage["up"] = time.monotonic()
            trigger_the_second_run()

    state = stack.drive(run_id, mlflow_outage)
    tries = stack.tries(run_id)
    print(
        f"scheduled run: {state} after {time.monotonic() - t0:.0f} s; MLflow down for "
        f"{outage.get('up', 0) - outage.get('down', 0):.0f} s"
    )
    assert state == "success", {t: (i["state"], i["try_number"]) for t, i in tries.items()}
    assert set(outage) == {"down", "up"}, "the MLflow server was never killed between tasks"
    assert tries["train"]["try_number"] >= 2, tries["train"]
    assert "tracking server is not reachable" in stack.log(run_id, "train", 1)
    assert "triggered" in stack.results, "the second run was never triggered"
    stack.results.update(run1=run_id, train_tries=tries["train"]["try_number"])


def test_first_run_lands_in_the_buckets_and_the_registry(stack: Stack) -> None:
    run_id = stack.results["run1"]
    repo, env, client = stack.repo, stack.env, stack.client()
    # registry: v1, the champion, with no champion before it (the second run registers much later,
    # after its stopped train resumed)
    registration = json.loads(stack.saved(run_id, "reports/registration.json"))
    assert registration["version"] == "1" and registration["promote"] is True, registration
    assert registration["champion_version"] is None, registration
    assert stack.versions()[0] == "1"

    # MLflow runs carry the DAG run; artifacts went through the server into the bucket
    experiment = client.get_experiment_by_name(MODEL)
    runs = client.search_runs([experiment.experiment_id], f"tags.`airflow.run_id` = '{run_id}'")
    # one parent run for the DAG run (its retried train task included), the step runs nested under it
    (parent,) = [r for r in runs if r.data.tags.get("cxr.step") == "pipeline"]
    steps = [r for r in runs if r is not parent]
    assert parent.info.run_name == f"dag {run_id}" and parent.info.status == "FINISHED"
    assert parent.data.tags["cxr.pipeline_run"] == f"airflow:{DAG_ID}:{run_id}"
    assert all(r.data.tags.get("mlflow.parentRunId") == parent.info.run_id for r in steps)
    assert {r.data.tags["airflow.task_id"] for r in steps} >= {"download", "prepare", "prototypes", "train"}
    (trained,) = [r for r in steps if r.info.run_id == registration["run_id"]]
    assert trained.data.tags["airflow.task_id"] == "train"
    assert trained.data.tags["airflow.try_number"] == str(stack.results["train_tries"])
    assert client.get_model_version(MODEL, "1").run_id == trained.info.run_id
    assert trained.info.artifact_uri.startswith("mlflow-artifacts:/"), "artifacts must go through the server"
    # the finish task saved the run as its DVC experiment: its commit names the DAG run and the parent
    name = stack.experiment(run_id)
    assert parent.data.tags["cxr.dvc_experiment"] == name
    saved = f"saved as the DVC experiment {name} (MLflow parent run {parent.info.run_id})"
    assert saved in stack.log(run_id, "finish", 1), stack.log(run_id, "finish", 1)[-3000:]
    commit = subprocess.run(
        ["git", "log", "-1", "--format=%B", experiment_ref(repo, name)], cwd=repo, capture_output=True, text=True
    )
    assert f"DAG run {run_id} of {DAG_ID}; MLflow parent run {parent.info.run_id}" in commit.stdout, commit
    # register moved the champion: the champion task says so and updates the asset with the decision
    assert "new champion: cxr-dwml v1 (was None)" in stack.log(run_id, "champion", 1)
    code, body = stack.api.call("GET", "/assets/events")
    assert code == 200, body
    events = [e for e in body["asset_events"] if e.get("source_run_id") == run_id]
    assert [(e["uri"], e["extra"].get("version")) for e in events if "champion" in e["uri"]] == [
        ("cxr-dwml://model/champion", "1")
    ], events
    bucket = bucket_of(service_environment(stack.compose["services"]["minio-init"])["MLFLOW_ARTIFACTS_DESTINATION"])
    keys = stack.s3.keys(env, bucket)
    model_id = registration["model_uri"].removeprefix("models:/")
    assert f"{experiment.experiment_id}/models/{model_id}/artifacts/MLmodel" in keys, keys[:20]
    assert any(trained.info.run_id in k and "predictions" in k for k in keys), "evaluate's predictions"
    assert not (repo / "mlartifacts").exists() and not (repo / "mlflow.db").exists()

    # data came from the stack's data-source bucket; every DVC-cached output is in the S3 remote
    lock = yaml.safe_load(stack.saved(run_id, "dvc.lock"))["stages"]
    assert lock["download"]["params"]["params.yaml"]["download"]["source"] == env["CXR_DATA_SOURCE"]
    remote = env["CXR_DVC_REMOTE_URL"]
    pushed = set(stack.s3.keys(env, bucket_of(remote), remote.removeprefix(f"s3://{bucket_of(remote)}/")))
    # the outputs dvc.yaml marks `cache: false` (metrics and plots kept in git, never pushed)
    uncached = set(stage_runner().uncached_outputs(repo / "dvc.yaml"))
    cached = [o for st in lock.values() for o in st.get("outs", []) if o.get("md5") and o["path"] not in uncached]
    assert len(cached) >= 8, cached
    prefix = remote.removeprefix(f"s3://{bucket_of(remote)}/")
    missing = [o["path"] for o in cached if f"{prefix}/files/md5/{o['md5'][:2]}/{o['md5'][2:]}" not in pushed]
    assert not missing, f"not in the DVC remote {remote}: {missing}"


def link_nih_layout(raw: Path, mirror: Path) -> None:
    """`mirror` as a data folder in NIH layout: hard links of the label files, lists and images in `raw`."""
    (mirror / "images").mkdir(parents=True)
    for src in [*raw.glob("*.csv"), *raw.glob("*.txt"), *(raw / "images").glob("*.png")]:
        os.link(src, mirror / src.relative_to(raw))


def checkout_state(repo: Path) -> tuple[str, str, list[str]]:
    """What a person sees of the project checkout: git's status (ignored files included, the shared
    DVC cache and DVC's scratch folder aside: the runs' workspaces are worktrees there, and a
    workspace left behind shows in the worktrees), its commit, and the worktrees git knows."""
    status = subprocess.run(["git", "status", "--porcelain", "--ignored"], cwd=repo, capture_output=True, text=True)
    dvc_own = ("!! .dvc/cache/", "!! .dvc/tmp/")
    shown = "\n".join(line for line in status.stdout.splitlines() if line not in dvc_own)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout
    trees = subprocess.run(["git", "worktree", "list", "--porcelain"], cwd=repo, capture_output=True, text=True)
    return shown, head, [line for line in trees.stdout.splitlines() if line.startswith("worktree ")]


class Faults:
    """The faults of the second run, injected from a thread of their own (a check every second,
    twice a second while `evaluate` runs) while the test drives the scheduled run and then this
    one; each is a step that waits for its moment, acts, and records what it saw in `events`:

    1. the data source: `download` fails on the missing folder; the folder gets the data and the
       task is cleared;
    2. the stop: once train has finished an epoch, its task is marked failed through the REST API
       (as a person does in the UI); its MLflow run and the DAG run's parent end KILLED, the run
       fails and keeps its workspace, and DVC lets go of its locks; then train is cleared, with
       what follows it;
    3. S3: the server stops once `evaluate`'s command is done (its `dvc push` comes next) and comes
       back once the try has failed.
    """

    def __init__(self, stack: Stack, run_id: str, mirror: Path) -> None:
        self.stack, self.run_id, self.mirror = stack, run_id, mirror
        self.workspace = stage_runner().Workspace.of(stack.repo, run_id).path
        self.events: dict[str, Any] = {}
        self.error: BaseException | None = None
        self._evaluating = False
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="faults", daemon=True)
        self._thread.start()

    @property
    def over(self) -> bool:
        """True once every fault is over; raises what a step raised."""
        if self.error is not None:
            raise self.error
        return {"cleared", "resumed", "up"} <= set(self.events)

    def close(self) -> None:
        self._done.set()
        self._thread.join(timeout=60)
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        # every second; twice a second while evaluate runs, not to miss the moment of its push
        while not self._done.wait(0.5 if self._evaluating else 1.0):
            try:
                tries = self.stack.tries(self.run_id)
                if not tries:
                    continue  # the scheduler has not made the run's task instances yet
                self.fix_the_source(tries)
                self.stop_train(tries)
                self.s3_outage(tries)
                if self.over:
                    return
            except BaseException as e:  # noqa: BLE001 - handed to the test by `over` and close()
                self.error = e
                return

    def _within(self, what: str, since: float, seconds: float) -> None:
        assert time.monotonic() - since < seconds, f"{what} took more than {seconds:.0f} s"

    def fix_the_source(self, tries: dict[str, dict]) -> None:
        events, download = self.events, tries["download"]
        if "cleared" in events or download["state"] not in ("up_for_retry", "failed"):
            return
        events["failed_log"] = self.stack.log(self.run_id, "download", download["try_number"])
        if "error:" not in events["failed_log"]:
            return  # the task runner is still writing the failed try's log
        link_nih_layout(self.stack.repo.parent / "nih", self.mirror)  # the demo data the stack published
        clear = {"dry_run": False, "dag_run_id": self.run_id, "task_ids": ["download"], "only_failed": False}
        code, body = self.stack.api.call("POST", f"/dags/{DAG_ID}/clearTaskInstances", clear)
        assert code == 200, body
        events["cleared"] = download["try_number"]

    def _training(self):
        """The train task's MLflow run once it has finished an epoch (its last.pt exists), while it runs."""
        client = self.stack.client()
        experiment = client.get_experiment_by_name(MODEL)
        query = f"tags.`airflow.run_id` = '{self.run_id}' and tags.`airflow.task_id` = 'train'"
        for run in client.search_runs([experiment.experiment_id], query) if experiment else []:
            if run.info.status == "RUNNING" and "epoch_val_mean_auc" in run.data.metrics:
                return run
        return None

    def stop_train(self, tries: dict[str, dict]) -> None:
        events, api, client = self.events, self.stack.api, self.stack.client()
        if "resumed" in events:
            return
        if "stopped" not in events:
            assert tries["train"]["state"] != "success", "train ended before it could be stopped"
            run = self._training() if tries["train"]["state"] == "running" else None
            if run is None:
                return
            code, body = api.call(
                "PATCH", f"/dags/{DAG_ID}/dagRuns/{self.run_id}/taskInstances/train", {"new_state": "failed"}
            )
            assert code == 200, body
            events.update(
                stopped=time.monotonic(),
                stopped_try=int(run.data.tags["airflow.try_number"]),
                train_run=run.info.run_id,
                parent=run.data.tags["mlflow.parentRunId"],
            )
        elif "killed" not in events:
            states = {
                "train": client.get_run(events["train_run"]).info.status,
                "parent": client.get_run(events["parent"]).info.status,
            }
            if "RUNNING" in states.values():
                self._within("the stopped task's MLflow runs to end", events["stopped"], STALL_S)
                return
            events.update(killed=states, killed_after=time.monotonic() - events["stopped"])
        elif "failed" not in events:
            state = api.run_state(self.run_id)
            assert state != "success", "the run succeeded with its train task stopped"
            if state != "failed":
                self._within("the run to fail after its train task was stopped", events["stopped"], STALL_S)
                return
            events.update(failed=time.monotonic(), workspace_kept=self.workspace.is_dir())
        else:
            # Airflow ends the task at once; the stopped stage then ends in order (its command, then
            # DVC, which lets go of its locks), within the runner's grace periods (2 x 30 s)
            locks = self.workspace / ".dvc" / "tmp" / "rwlock"
            held = json.loads(locks.read_text() or "{}") if locks.exists() else {}
            if any(held.values()):
                self._within("the stopped stage's DVC to let go of its locks", events["failed"], 150)
                return
            events["unlocked_after"] = time.monotonic() - events["failed"]
            # clearing train (and what follows it) reruns it in the same workspace, from its last.pt
            clear = {
                "dry_run": False,
                "dag_run_id": self.run_id,
                "task_ids": ["train"],
                "only_failed": False,
                "include_downstream": True,
                "reset_dag_runs": True,
            }
            code, body = api.call("POST", f"/dags/{DAG_ID}/clearTaskInstances", clear)
            assert code == 200, body
            events["resumed"] = True

    def s3_outage(self, tries: dict[str, dict]) -> None:
        events, evaluate = self.events, tries["evaluate"]
        self._evaluating = evaluate["state"] == "running"
        if "resumed" not in events or evaluate["try_number"] < 1:
            return
        # DVC writes dvc.lock when the stage's command is done: the push comes next
        if "down" not in events:
            if "Updating lock file" in self.stack.log(self.run_id, "evaluate", evaluate["try_number"]):
                self.stack.s3.stop()
                events.update(down=time.monotonic(), evaluate_try=evaluate["try_number"])
        elif "up" not in events and evaluate["state"] in ("up_for_retry", "failed"):
            self.stack.s3.start()
            events["up"] = time.monotonic()


def test_a_triggered_run_beside_the_scheduled_one_through_a_missing_source_a_stopped_train_and_an_s3_outage(
    stack: Stack,
) -> None:
    """The run triggered in the first step ran beside the scheduled one, in a workspace of its own,
    through the faults of `Faults`:

    - it named a data folder that did not exist yet: `download` failed with the component's message
      in its task log; once the folder held the data, clearing the task let the run go on, and DVC
      skipped prototypes;
    - its running train task was marked failed through the REST API: the task's MLflow run and the
      DAG run's parent ended KILLED, the run failed and kept its workspace with no lock held;
      clearing train resumed it there from its last finished epoch;
    - S3 was down while `evaluate` pushed: the try failed naming the remote, the retry pushed.

    Both runs succeeded, each DVC experiment holds its own params and metrics, every version is
    registered once, the gates took turns (each compared with the champion the one before left) and
    the project checkout is as it was."""
    t0 = time.monotonic()
    triggered, faults = stack.results["triggered"], stack.results["faults"]
    runs = {"scheduled": stack.results["run1"], "triggered": triggered}
    client = stack.client()
    try:

        def moving() -> tuple:
            return sorted((t, i["state"], i["try_number"]) for t, i in stack.tries(triggered).items())

        wait_until("the second run's faults to be over", lambda: faults.over, STALL_S, every=2, progress=moving)
    finally:
        faults.close()
    state = stack.drive(triggered)
    events, tries = faults.events, stack.tries(triggered)
    print(
        f"the second run: {state} {time.monotonic() - t0:.0f} s after the first ended; its stopped task's MLflow "
        f"runs ended {events['killed_after']:.0f} s after the PATCH, its DVC let go of the locks "
        f"{events['unlocked_after']:.0f} s after the run failed"
    )
    assert state == "success", {t: (i["state"], i["try_number"]) for t, i in tries.items()}

    # the data source: download failed naming the missing folder, and the cleared task ran as the next try
    message = f"cxr-dwml download: error: download.source '{faults.mirror}' is neither"
    assert message in events["failed_log"], events["failed_log"][-3000:]
    assert tries["download"]["try_number"] == events["cleared"] + 1
    experiment = client.get_experiment_by_name(MODEL).experiment_id
    (download,) = client.search_runs(
        [experiment], f"tags.`airflow.run_id` = '{triggered}' and tags.`airflow.task_id` = 'download'"
    )
    assert download.data.tags["airflow.try_number"] == str(tries["download"]["try_number"])
    # prototypes' inputs are those of the scheduled run: DVC skips it (up to date, or restored from its run cache)
    prototypes = stack.log(triggered, "prototypes", 1)
    assert "Stage 'prototypes'" in prototypes and "skipping" in prototypes, prototypes[-3000:]
    assert "Running stage 'prototypes'" not in prototypes

    # the stop: MLflow runs KILLED, the failed run kept its workspace; the try after the stop resumed
    # there, and the workspace was removed once the run succeeded
    assert events["killed"] == {"train": "KILLED", "parent": "KILLED"}, events["killed"]
    assert events["workspace_kept"], "a failed run keeps its workspace"
    log = stack.log(triggered, "train", events["stopped_try"] + 1)
    assert f"workspace {faults.workspace}" in log and "[train] resumed" in log, log[-3000:]
    assert not faults.workspace.exists()

    # S3 down during evaluate's push: that try failed naming the remote, the retry pushed
    assert tries["evaluate"]["try_number"] == events["evaluate_try"] + 1
    failed = stack.log(triggered, "evaluate", events["evaluate_try"])
    remote = stack.env["CXR_DVC_REMOTE_URL"]
    assert f"to the DVC remote cxr-remote ({remote} at {stack.s3.endpoint}) failed" in failed, failed[-3000:]
    lock = yaml.safe_load(stack.saved(triggered, "dvc.lock"))["stages"]
    assert lock["download"]["params"]["params.yaml"]["download"]["source"] == str(faults.mirror)

    # they ran at the same time: each run started before the other ended
    spans = {}
    for key, run in runs.items():
        code, body = stack.api.call("GET", f"/dags/{DAG_ID}/dagRuns/{run}")
        spans[key] = (body["start_date"], body["end_date"])
    for key, (start, _) in spans.items():
        assert all(start < end for other, (_, end) in spans.items() if other != key), spans

    # each experiment holds its own params and metrics: the checkout's, and the trigger's conf
    checkout = yaml.safe_load((stack.repo / "params.yaml").read_text())["train"]
    conf = stack.results["triggered_conf"]
    expected = {
        "scheduled": (checkout["epochs"], checkout["seed"]),
        "triggered": (conf["epochs"], conf["overrides"]["train.seed"]),
    }
    for key, run in runs.items():
        train = yaml.safe_load(stack.saved(run, "dvc.lock"))["stages"]["train"]["params"]["params.yaml"]["train"]
        assert (train["epochs"], train["seed"]) == expected[key], key
        assert stack.saved(run, "reports/train/history.csv").count("\n") == 1 + expected[key][0], key
        assert "mean_auc" in json.loads(stack.saved(run, "reports/metrics.json"))

    # both registered once; the gates took turns: each compared with the champion the one before left
    assert stack.versions() == ["1", "2"]
    registrations = {key: json.loads(stack.saved(run, "reports/registration.json")) for key, run in runs.items()}
    champion = None
    for registration in sorted(registrations.values(), key=lambda r: int(r["version"])):
        assert registration["champion_version"] == champion, (champion, registrations)
        champion = registration["version"] if registration["promote"] else champion
    assert {"delta", "p_value"} <= set(registrations["triggered"]), registrations["triggered"]
    assert stack.aliases()["champion"] == champion
    print(f"gates: {[r['reason'] for r in registrations.values()]}")

    # the MLflow parent of each run names its experiment; the checkout is untouched, no workspace is left
    for run in runs.values():
        (parent,) = client.search_runs(
            [experiment], f"tags.`airflow.run_id` = '{run}' and tags.`cxr.step` = 'pipeline'"
        )
        assert parent.data.tags["cxr.dvc_experiment"] == stack.experiment(run)
    assert checkout_state(stack.repo) == stack.results["checkout"]
    stack.results["versions"] = {registrations[key]["version"]: run for key, run in runs.items()}


def test_promotion_through_the_rest_api_then_the_champion_serves_a_png(stack: Stack, tmp_path: Path) -> None:
    """Set `champion` to the version the gates left out as the MLflow UI does (REST), then `mlflow
    models serve` the alias from the server, with no S3 credentials: it answers with that version's
    probabilities for a test image."""
    assert stack.versions() == ["1", "2"], "needs both runs"
    (version,) = set(stack.results["versions"]) - {stack.aliases()["champion"]}
    run = stack.results["versions"][version]
    api = f"{stack.mlflow_url}/api/2.0/mlflow/registered-models/alias"
    r = requests.post(api, json={"name": MODEL, "alias": "champion", "version": version}, timeout=30)
    assert r.status_code == 200, r.text
    r = requests.get(api, params={"name": MODEL, "alias": "champion"}, timeout=30)
    assert r.status_code == 200 and r.json()["model_version"]["version"] == version, r.text

    # evaluate's predictions of the version's run are its scores
    scored = pd.read_parquet(io.BytesIO(stack.cached(run, "reports/predictions/test.parquet"))).set_index("image")
    image = scored.index[0]
    png = (stack.repo.parent / "nih" / "images" / image).read_bytes()

    port = free_port()
    env = {**base_environment(stack.repo), "MLFLOW_TRACKING_URI": stack.mlflow_url}  # no AWS_* here
    serve = Service(
        "mlflow models serve",
        [str(VENV_BIN / "mlflow"), "models", "serve", "-m", f"models:/{MODEL}@champion"]
        + ["--env-manager", "local", "--host", "127.0.0.1", "-p", str(port)],
        env,
        tmp_path / "serve.log",
        tmp_path,
    ).start()
    try:
        serve.wait_http(f"http://127.0.0.1:{port}/ping")
        payload = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(png).decode("ascii")]]}}
        r = requests.post(f"http://127.0.0.1:{port}/invocations", json=payload, timeout=60)
    finally:
        serve.stop()
    assert r.status_code == 200, r.text
    (row,) = r.json()["predictions"]
    assert row["error"] is None
    probs = np.array([row[c] for c in CLASSES], dtype=float)
    assert probs.shape == (14,) and ((probs >= 0) & (probs <= 1)).all()
    # evaluate stores raw probabilities; the registered model serves them through its calibration
    raw = np.clip(scored.loc[image, list(CLASSES)].to_numpy(float), 1e-12, 1 - 1e-12)
    (tmp_path / "calibration.json").write_bytes(stack.cached(run, "reports/calibration.json"))
    calibration = read_calibration(str(tmp_path / "calibration.json"))
    expected = calibration.probabilities(np.log(raw / (1 - raw))[None])[0]
    np.testing.assert_allclose(probs, expected, rtol=0, atol=1e-4)
    assert stack.versions() == ["1", "2"], "serving must not register anything"
