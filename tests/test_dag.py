"""The Airflow DAG `cxr_dwml` through the real Airflow: parsing, the graph, the stage runner, and
`airflow dags test` (`make dag-test` runs that case alone).

`airflow dags test` runs on a copy of the session's tiny pipeline run (conftest's `pipeline_run`):
the stages its conf leaves alone are up to date, train and what follows it run again. The one run
through the real scheduler, API server and REST API is the stack test (tests/test_stack.py).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import ROOT, VENV_BIN, PipelineRun, copy_run, run_env
from tests.servers import wait_until

DAG_ID = "cxr_dwml"
STAGES = ("download", "prepare", "prototypes", "train", "evaluate", "register")
# the run conf of `airflow dags test`: a one-epoch training, overriding params.yaml's train.epochs
CONF = {"epochs": 1}


def airflow_env(home: Path, repo: Path, **extra: str) -> dict[str, str]:
    env = run_env(repo)
    env.pop("PYTHONPATH", None)  # Airflow runs from its install; the tasks cd into the project
    for name in [n for n in env if n.startswith(("AIRFLOW__", "AIRFLOW_CTX_", "CXR_"))]:
        del env[name]
    env.update(
        {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(repo / "dags"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
            "CXR_PROJECT_DIR": str(repo),
            "CXR_VENV": str(VENV_BIN.parent),
            "CXR_AIRFLOW_RETRIES": "0",
            # manual runs only: unpausing a scheduled DAG would start a run of its own beside the triggered ones
            "CXR_AIRFLOW_SCHEDULE": "none",
        }
    )
    env.update(extra)
    return env


def airflow(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "airflow"), *args], env=env, capture_output=True, text=True, timeout=timeout)


def probe(code: str, **env: str) -> Any:
    """Run `code` in a fresh interpreter with the DAG module importable; it prints one JSON value."""
    full = {k: v for k, v in os.environ.items() if not k.startswith(("CXR_", "AIRFLOW__"))}
    full.update(env)
    full.setdefault("AIRFLOW_HOME", str(Path(env.get("TMP_HOME", "/tmp")) / "airflow-probe"))
    prelude = f"import json, sys, time\nsys.path.insert(0, {str(ROOT / 'dags')!r})\n"
    out = subprocess.run([sys.executable, "-c", prelude + code], env=full, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


# --- parsing, settings, params, graph (fast: a subprocess each) --------------------------------


@pytest.fixture(scope="module")
def parsed(tmp_path_factory) -> dict:
    """What the dag-processor sees: DagBag import errors, parse time, modules loaded, the graph."""
    home = tmp_path_factory.mktemp("airflow-home")
    code = f"""
from airflow.dag_processing.dagbag import DagBag
heavy = ("torch", "mlflow", "pandas", "pipeline", "components", "timm", "transformers", "sklearn")
t0 = time.perf_counter()
bag = DagBag(dag_folder={str(ROOT / "dags")!r})
seconds = time.perf_counter() - t0
dag = bag.dags.get("{DAG_ID}")
tasks = {{}}
for t in (dag.tasks if dag else []):
    tasks[t.task_id] = {{
        "upstream": sorted(t.upstream_task_ids), "type": type(t).__name__, "pool": t.pool,
        "retries": t.retries, "timeout_s": t.execution_timeout.total_seconds() if t.execution_timeout else None,
        "outlets": [a.uri for a in t.outlets], "command": getattr(t, "bash_command", None),
        "env": getattr(t, "env", None), "append_env": getattr(t, "append_env", None)}}
print(json.dumps({{
    "errors": {{k: str(v) for k, v in bag.import_errors.items()}}, "seconds": seconds,
    "file_seconds": {{s.file: s.duration.total_seconds() for s in bag.dagbag_stats}},
    "warnings": {{k: list(v) for k, v in bag.captured_warnings.items()}},
    "heavy": sorted(m for m in sys.modules if m.split(".")[0] in heavy),
    "tasks": tasks, "schedule": str(dag.schedule) if dag else None,
    "catchup": dag.catchup if dag else None, "max_active_runs": dag.max_active_runs if dag else None,
    "params": sorted(dag.params) if dag else None,
}}))
"""
    return probe(code, AIRFLOW_HOME=str(home))


def test_dag_imports_fast_without_errors_or_heavy_modules(parsed: dict) -> None:
    assert parsed["errors"] == {}
    assert parsed["tasks"], "DagBag found no DAG cxr_dwml"
    assert parsed["warnings"] == {}
    # the dag-processor's own per-file timing (Airflow itself is already imported there)
    (seconds,) = [v for k, v in parsed["file_seconds"].items() if k.endswith("cxr_dwml.py")]
    assert seconds < 2.0, parsed["file_seconds"]
    assert parsed["heavy"] == [], f"imported at parse time: {parsed['heavy']}"


def test_dag_structure_and_defaults(parsed: dict) -> None:
    tasks = parsed["tasks"]
    assert set(tasks) == {*STAGES, "champion"}
    assert parsed["catchup"] is False and parsed["max_active_runs"] == 1
    assert parsed["schedule"] == "0 3 * * 1", "the shipped settings retrain weekly"
    # the champion asset is announced by its own task, after register, only when the alias moved
    champion = tasks.pop("champion")
    assert champion["upstream"] == ["register"] and champion["outlets"] == ["cxr-dwml://model/champion"]
    for task_id, info in tasks.items():
        assert info["type"] == "BashOperator"
        assert info["pool"] == "cxr_dwml_dvc", "DVC tasks must share the one-slot pool"
        assert info["retries"] == 2 and info["timeout_s"] and info["timeout_s"] > 0
        assert f"scripts/dvc_stage.py {task_id}" in info["command"]
        assert 'export PATH="$CXR_VENV/bin:$PATH"' in info["command"]
        assert info["append_env"] is True and info["env"]["CXR_PROJECT_DIR"] == str(ROOT)
    assert tasks["train"]["timeout_s"] == 2880 * 60
    assert tasks["evaluate"]["outlets"] == [(ROOT / "reports" / "metrics.json").as_uri()]
    assert tasks["register"]["outlets"] == []
    assert {"profile", "source", "epochs", "overrides"} <= set(parsed["params"])


def test_dag_graph_matches_dvc_yaml(parsed: dict) -> None:
    """Upstream tasks of each task = the stages producing its dvc.yaml deps (outs -> deps)."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]

    def paths(entries: list) -> list[str]:
        return [next(iter(e)) if isinstance(e, dict) else e for e in entries or []]

    producer = {
        out: name for name, st in stages.items() for key in ("outs", "metrics", "plots") for out in paths(st.get(key))
    }
    expected = {}
    for name, st in stages.items():
        ups = set()
        for dep in paths(st.get("deps")):
            for out, stage in producer.items():
                # a dep is produced by a stage when one path contains the other (a folder or a file in it)
                if stage != name and (dep == out or dep.startswith(out + "/") or out.startswith(dep + "/")):
                    ups.add(stage)
        expected[name] = ups

    def ancestors(name: str) -> set[str]:
        return set().union(*({u} | ancestors(u) for u in expected[name])) if expected[name] else set()

    # direct edges only: evaluate reads data/prepared too, but already waits for it through train
    reduced = {
        name: sorted(u for u in ups if not any(u in ancestors(o) for o in ups - {u})) for name, ups in expected.items()
    }
    assert {k: v["upstream"] for k, v in parsed["tasks"].items()} == reduced
    expected = reduced
    assert expected["prototypes"] == [], "prototypes may run beside prepare"


def test_settings_come_from_environment_and_are_checked(tmp_path: Path) -> None:
    got = probe(
        """
import cxr_dwml as m
s = m.load_settings({"CXR_AIRFLOW_SCHEDULE": "0 3 * * 0", "CXR_AIRFLOW_RETRIES": "4",
    "CXR_AIRFLOW_RETRY_DELAY_MINUTES": "1.5", "CXR_AIRFLOW_TIMEOUT_TRAIN": "90", "CXR_AIRFLOW_CATCHUP": "true",
    "CXR_AIRFLOW_START_DATE": "2024-06-01", "CXR_AIRFLOW_POOL": "", "CXR_AIRFLOW_K8S_TASKS": "train, evaluate"})
dag = m.build_dag(s)
errors = []
weekly = m.build_dag(m.load_settings({"CXR_AIRFLOW_SCHEDULE": "@weekly"}))
for env in ({"CXR_AIRFLOW_K8S_TASKS": "trian"}, {"CXR_AIRFLOW_START_DATE": "next tuesday"},
            {"CXR_AIRFLOW_RETRIES": "many"}, {"CXR_AIRFLOW_RETRIES": "null"}):
    try:
        m.build_dag(m.load_settings(env))
    except ValueError as e:
        errors.append(str(e))
print(json.dumps({"schedule": s.schedule, "retries": s.retries,
    "delay": dag.default_args["retry_delay"].total_seconds(),
    "train_timeout": dag.get_task("train").execution_timeout.total_seconds(), "catchup": dag.catchup,
    "start": dag.start_date.isoformat(), "pool": dag.get_task("prepare").pool,
    "kinds": {t.task_id: type(t).__name__ for t in dag.tasks}, "errors": errors,
    "weekly": str(weekly.schedule)}))
""",
        TMP_HOME=str(tmp_path),
    )
    assert got["schedule"] == "0 3 * * 0" and got["retries"] == 4 and got["delay"] == 90
    assert got["train_timeout"] == 90 * 60 and got["catchup"] is True
    assert got["start"] == "2024-06-01T00:00:00+00:00" and got["pool"] == "default_pool"
    assert got["kinds"]["train"] == got["kinds"]["evaluate"] == "KubernetesPodOperator"
    assert got["kinds"]["prepare"] == "BashOperator"
    assert "trian" in got["errors"][0] and "CXR_AIRFLOW_START_DATE" in got["errors"][1]
    assert "CXR_AIRFLOW_RETRIES='many'" in got["errors"][2] and "CXR_AIRFLOW_RETRIES" in got["errors"][3]
    assert got["weekly"] == "@weekly"


def test_run_conf_is_validated_and_becomes_dotted_overrides(tmp_path: Path) -> None:
    got = probe(
        """
import cxr_dwml as m
import copy
dag = m.cxr_dwml
def check(conf):
    params = copy.deepcopy(dag.params)
    try:
        params.update(conf)
        return params.validate()
    except Exception as e:
        return type(e).__name__
bad = [check(c) for c in ({"epochs": 0}, {"profile": "huge"}, {"epochs": "2"}, {"batch_size": -1},
                          {"overrides": {"bad key": 1}}, {"source": ""}, {"min_auc": 2})]
good = check({"epochs": 3, "profile": "paper", "source": "s3://b/nih", "overrides": {"train.optim.lr_head": 0.01}})
rendered = dag.get_template_env().from_string(dag.get_task("train").env["CXR_RUN_OVERRIDES"]).render(params=good)
# a field left as the form shows it is not sent: the chosen profile keeps its own value
paper = check({"profile": "paper", "overrides": None})
kept = dag.get_template_env().from_string(dag.get_task("train").env["CXR_RUN_OVERRIDES"]).render(params=paper)
empty = m.run_overrides(dag.params.dump(), m.composed_defaults(m.load_settings().project))
form = {name: {"default": p.value, "schema": p.schema, "description": p.description}
        for name, p in dag.params.items()}
print(json.dumps({"bad": bad, "rendered": json.loads(rendered), "kept": json.loads(kept),
                  "empty": json.loads(empty), "form": form}))
""",
        TMP_HOME=str(tmp_path),
    )
    assert all(b == "ParamValidationError" for b in got["bad"]), got["bad"]
    assert got["rendered"] == {
        "profile": "paper",
        "download.source": "s3://b/nih",
        "train.epochs": 3,
        "train.optim.lr_head": 0.01,
    }
    assert got["kept"] == {"profile": "paper"}
    assert got["empty"] == {}, "no conf must leave params.yaml untouched"
    # the form shows the values a run without conf uses, with a sentence each, and no literal null
    committed = yaml.safe_load((ROOT / "params.yaml").read_text())
    form = got["form"]
    assert form["epochs"]["default"] == committed["train"]["epochs"] == 16
    assert form["profile"]["default"] == committed["profile"] and form["head"]["default"] == "metric"
    assert form["loss"]["default"] == "dwml" and form["min_auc"]["default"] == committed["register"]["min_auc"]
    for name, field in form.items():
        assert field["description"].endswith((".", "sent.")) and len(field["description"].split()) >= 8, name
        assert None not in field["schema"].get("enum", []), name
    assert form["overrides"]["default"] is None and "null" in form["overrides"]["schema"]["type"]


def test_loss_choices_are_the_library_losses(tmp_path: Path) -> None:
    """The DAG lists the loss names literally (it must not import torch); they must be the library's."""
    import typing

    from pipeline.losses import LossName

    got = probe(
        """
import cxr_dwml as m
print(json.dumps(m.cxr_dwml.params.get_param("loss").schema["enum"]))
""",
        TMP_HOME=str(tmp_path),
    )
    assert got == list(typing.get_args(LossName))


def test_kubernetes_pod_spec_for_train_requests_a_gpu(tmp_path: Path) -> None:
    pytest.importorskip(
        "airflow.providers.cncf.kubernetes",
        reason="apache-airflow-providers-cncf-kubernetes is not installed: the Kubernetes switch cannot be rendered",
    )
    got = probe(
        """
import cxr_dwml as m
from kubernetes.client import ApiClient
api = ApiClient()
dag = m.build_dag(m.load_settings())
pods = {t.task_id: api.sanitize_for_serialization(t.build_pod_request_obj(dry_run=True)) for t in dag.tasks
        if type(t).__name__ == "KubernetesPodOperator"}
class Response:  # ApiClient.deserialize reads .data: a round trip through the typed V1Pod model
    data = json.dumps(pods["train"])
pod = api.deserialize(Response(), "V1Pod")
print(json.dumps({"pods": pods, "round_trip": pod.spec.containers[0].image}))
""",
        TMP_HOME=str(tmp_path),
        CXR_AIRFLOW_K8S_TASKS="all",
        CXR_TRAINER_IMAGE="registry.example/cxr-dwml:1.0",
        CXR_K8S_GPUS="2",
        CXR_K8S_NAMESPACE="ml",
    )
    pods = got["pods"]
    assert set(pods) == set(STAGES) and got["round_trip"] == "registry.example/cxr-dwml:1.0"
    # register's decision comes back through the XCom sidecar, for the champion task
    assert len(pods["register"]["spec"]["containers"]) == 2 and len(pods["evaluate"]["spec"]["containers"]) == 1
    train = pods["train"]
    assert train["kind"] == "Pod" and train["metadata"]["namespace"] == "ml"
    (container,) = train["spec"]["containers"]
    assert container["image"] == "registry.example/cxr-dwml:1.0"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert container["command"] == ["bash", "-c"] and "scripts/dvc_stage.py train" in container["args"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["CXR_PROJECT_DIR"] == "/workspace/cxr-dwml" and env["CXR_VENV"] == "/opt/cxr-dwml/.venv"
    assert {"AIRFLOW_CTX_DAG_ID", "AIRFLOW_CTX_DAG_RUN_ID", "AIRFLOW_CTX_TRY_NUMBER"} <= set(env)
    assert container["envFrom"][0]["secretRef"]["name"] == "cxr-dwml-env"
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/workspace/cxr-dwml", "/dev/shm"} <= mounts
    claim = [v for v in train["spec"]["volumes"] if "persistentVolumeClaim" in v]
    assert claim[0]["persistentVolumeClaim"]["claimName"] == "cxr-dwml-workspace"
    evaluate = pods["evaluate"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in (evaluate["resources"].get("limits") or {})


def scratch_project(root: Path, cmd: str) -> Path:
    """A DVC project (no Git) with the project's conf/ and one stage `step` tracking params `train`."""
    root.mkdir()
    shutil.copytree(ROOT / "conf", root / "conf")
    (root / "dvc.yaml").write_text(
        yaml.safe_dump({"stages": {"step": {"cmd": cmd, "params": ["profile", "train"], "outs": ["out.txt"]}}})
    )
    for args in (["init", "--no-scm", "-q"], ["config", "hydra.enabled", "true"]):
        done = subprocess.run(["dvc", *args], cwd=root, env=run_env(root), capture_output=True)
        assert done.returncode == 0, done.stderr
    made = subprocess.run(
        [sys.executable, "-m", "components.params", "--params", str(root / "params.yaml")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert made.returncode == 0, made.stderr
    return root


def dvc_stage(root: Path, *args: str, **env: str) -> subprocess.Popen:
    """This checkout's stage runner on the scratch project `root`; it imports this checkout's code
    (PYTHONPATH), whichever checkout the venv was installed from."""
    return subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "dvc_stage.py"), *args, "--project", str(root)],
        env=run_env(root, **{"PYTHONPATH": str(ROOT), **env}),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def test_stage_overrides_hold_for_one_run_and_dvc_records_what_ran(tmp_path: Path) -> None:
    # the command sees the composed values, as the components do: the paper profile with overrides
    cmd = (
        "python -c \"import yaml; p = yaml.safe_load(open('params.yaml')); t = p['train']; "
        "open('out.txt', 'w').write(str((p['profile'], t['epochs'], t['seed'], t['optim']['lr_head'])))\""
    )
    root = scratch_project(tmp_path / "p", cmd)
    committed = (root / "params.yaml").read_bytes()
    overrides = '{"train.epochs": 2, "profile": "paper"}'
    first = dvc_stage(root, "step", "--set", "train.seed=5", CXR_RUN_OVERRIDES=overrides)
    out, _ = first.communicate(timeout=120)
    assert first.returncode == 0, out
    assert (root / "out.txt").read_text() == str(("paper", 2, 5, 0.001))
    assert (root / "params.yaml").read_bytes() == committed
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]["step"]["params"]["params.yaml"]
    assert lock["profile"] == "paper" and lock["train"]["epochs"] == 2 and lock["train"]["seed"] == 5
    assert lock["train"]["optim"]["lr_head"] == 0.001, "dvc.lock records the profile's values, as they ran"
    again = dvc_stage(root, "step", "--set", "train.seed=5", CXR_RUN_OVERRIDES=overrides)
    out, _ = again.communicate(timeout=120)
    assert again.returncode == 0 and "didn't change, skipping" in out, out

    bad = dvc_stage(root, "step", CXR_RUN_OVERRIDES="[1]")
    out, _ = bad.communicate(timeout=60)
    assert bad.returncode == 2 and "CXR_RUN_OVERRIDES must be a JSON object" in out
    for wrong, named in (
        ('{"train.epoch": 2}', "train.epoch"),
        ('{"train.epochs": 0}', "train.epochs"),
        ('{"profile": "huge"}', "profile/huge"),
    ):
        proc = dvc_stage(root, "step", CXR_RUN_OVERRIDES=wrong)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 2 and named in out, out
        assert (root / "params.yaml").read_bytes() == committed


def test_stage_killed_mid_run_puts_params_back(tmp_path: Path) -> None:
    # the command leaves a mark as it starts: the kill below must land while the stage runs
    root = scratch_project(tmp_path / "p", "touch started && sleep 60 && touch out.txt")
    committed = (root / "params.yaml").read_bytes()
    proc = dvc_stage(root, "step", CXR_RUN_OVERRIDES='{"train.epochs": 3}')
    wait_until("the stage command to start", (root / "started").exists, timeout=120, every=0.1, process=proc)
    assert b"epochs: 3\n" in (root / "params.yaml").read_bytes()
    os.killpg(proc.pid, signal.SIGTERM)  # what Airflow sends the task's process group on a timeout
    out, _ = proc.communicate(timeout=90)
    assert proc.returncode != 0
    assert (root / "params.yaml").read_bytes() == committed, out

    # a call killed with SIGKILL leaves its backup: the next call restores it before anything else
    backup = root / ".dvc" / "tmp" / "cxr-stage" / "backup"
    backup.mkdir(parents=True)
    (backup / "params.yaml").write_bytes(committed)
    (root / "params.yaml").write_text("profile: paper\ntrain:\n  epochs: 99\n")
    (root / "dvc.yaml").write_text((root / "dvc.yaml").read_text().replace("sleep 60 && ", ""))
    nxt = dvc_stage(root, "step")
    out, _ = nxt.communicate(timeout=120)
    assert nxt.returncode == 0 and "left patched by an interrupted run" in out, out
    assert (root / "params.yaml").read_bytes() == committed and not backup.exists()


def test_run_conf_values_are_literals(tmp_path: Path) -> None:
    """A `${...}` in a run's conf could read the worker's environment into params.yaml, dvc.lock and
    MLflow: the schema refuses it when the run is triggered, and the task refuses it again."""
    got = probe(
        """
import cxr_dwml as m
import copy
def check(conf):
    params = copy.deepcopy(m.cxr_dwml.params)
    try:
        params.update(conf)
        params.validate()
        return "accepted"
    except Exception as e:
        return type(e).__name__
confs = ({"source": "${oc.env:HOME}"}, {"overrides": {"mlflow.experiment": "x-${oc.env:HOME}"}},
         {"source": "/data/$x{y}"})
print(json.dumps([check(c) for c in confs]))
""",
        TMP_HOME=str(tmp_path),
    )
    assert got == ["ParamValidationError", "ParamValidationError", "accepted"]

    secret = "hunter2-not-for-dvc-lock"
    root = scratch_project(tmp_path / "p", "touch out.txt")
    committed = (root / "params.yaml").read_bytes()
    for overrides, args, named in (
        ('{"mlflow.experiment": "${oc.env:CXR_TEST_SECRET}"}', [], "'mlflow.experiment' holds an interpolation"),
        ("{}", ["--set", "train.seed=${oc.env:CXR_TEST_SECRET}"], "'train.seed' holds an interpolation"),
        ('{"hydra.searchpath": "file:///tmp"}', [], "'hydra.searchpath' is not a params.yaml key"),
        ('{"profile": "../../../tmp/profile/x"}', [], "is not a profile name"),
    ):
        # PYTHONPATH: the script composes with this checkout's components, whatever the venv points at
        proc = dvc_stage(root, "step", *args, CXR_RUN_OVERRIDES=overrides, CXR_TEST_SECRET=secret, PYTHONPATH=str(ROOT))
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 2 and named in out and secret not in out, out
        assert (root / "params.yaml").read_bytes() == committed
        assert not (root / "dvc.lock").exists() and not (root / "out.txt").exists()


# --- the slow part: the real pipeline under Airflow --------------------------------------------


@pytest.fixture(scope="module")
def dags_test_run(pipeline_run: PipelineRun, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """`airflow dags test cxr_dwml` with CONF on a copy of the session's pipeline run, in a throwaway
    AIRFLOW_HOME (SQLite)."""
    base = tmp_path_factory.mktemp("dag-run")
    repo = copy_run(pipeline_run, base / "repo").repo
    params_before = (repo / "params.yaml").read_bytes()
    env = airflow_env(base / "home", repo)
    migrate = airflow(env, "db", "migrate")
    assert migrate.returncode == 0, migrate.stderr[-3000:]
    t0 = time.perf_counter()
    test = airflow(env, "dags", "test", DAG_ID, "--conf", json.dumps(CONF), timeout=480)
    return {"repo": repo, "result": test, "seconds": time.perf_counter() - t0, "params_before": params_before}


def lock_params(repo: Path, stage: str) -> dict:
    return yaml.safe_load((repo / "dvc.lock").read_text())["stages"][stage]["params"]["params.yaml"]


@pytest.mark.slow
def test_dags_test_runs_the_pipeline_and_registers_a_model(dags_test_run: dict) -> None:
    from mlflow import MlflowClient

    result, repo = dags_test_run["result"], dags_test_run["repo"]
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-6000:]
    print(f"airflow dags test: {dags_test_run['seconds']:.0f} s")
    # every task ran its stage through the stage runner; DVC skipped those the conf leaves alone
    for stage in STAGES[:3]:
        assert f"Stage '{stage}' didn't change, skipping" in log, stage
    for stage in STAGES[3:]:
        assert f"Running stage '{stage}'" in log, stage
    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("cxr-dwml").experiment_id
    # the MLflow runs name the Airflow run that made them: one parent run for the DAG run
    runs = client.search_runs([experiment], f"tags.`airflow.dag_id` = '{DAG_ID}'")
    (parent,) = [r for r in runs if r.data.tags.get("cxr.step") == "pipeline"]
    steps = [r for r in runs if r is not parent]
    # one run per step that ran (train; evaluate and register add to it), nested under the parent
    assert [r.data.tags.get("airflow.task_id") for r in steps] == ["train"]
    (train,) = steps
    tags = train.data.tags
    assert tags["airflow.try_number"] == "1" and tags["airflow.run_id"].startswith("manual__")
    assert tags["mlflow.parentRunId"] == parent.info.run_id
    (run_id,) = {r.data.tags["airflow.run_id"] for r in runs}
    assert parent.info.run_name == f"dag {run_id}" and parent.info.status == "FINISHED"
    assert parent.data.tags["cxr.pipeline_run"] == f"airflow:{DAG_ID}:{run_id}"
    # another model: v2, judged by the gate against the session run's v1
    registration = json.loads((repo / "reports" / "registration.json").read_text())
    assert str(registration["version"]) == "2" and str(registration["champion_version"]) == "1"
    # the champion asset fired exactly when the gate moved the alias
    if registration["promote"]:
        assert "new champion: cxr-dwml v2 (was 1)" in log, log[-4000:]
    else:
        assert "the champion did not move: " + registration["reason"] in log, log[-4000:]
    assert client.get_model_version("cxr-dwml", "2").run_id == train.info.run_id
    # the conf ran (dvc.lock says so) and held for this run only (params.yaml is as committed)
    assert lock_params(repo, "train")["train"]["epochs"] == 1
    assert (repo / "params.yaml").read_bytes() == dags_test_run["params_before"]
    assert (repo / "reports" / "train" / "history.csv").read_text().count("\n") == 2  # header + 1 epoch
    assert not (repo / ".dvc" / "tmp" / "cxr-stage" / "backup").exists()


def test_register_stage_reports_whether_the_champion_moved(tmp_path: Path, capsys) -> None:
    """The register task's last line (its XCom) says whether this call moved the champion alias:
    not when DVC skipped the stage, not when the gate kept the champion or the weights were known."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("dvc_stage", ROOT / "scripts" / "dvc_stage.py")
    stage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stage)
    record = {"model_name": "cxr-dwml", "version": "3", "registered": True, "promote": True}
    moved = json.dumps({**record, "champion_version": "2", "val_mean_auc": 0.81, "reason": "better"}).encode()
    change = stage.champion_change(b"{}", moved)
    assert change["champion_moved"] is True and change["previous_champion"] == "2" and change["version"] == "3"
    assert stage.champion_change(None, json.dumps({**record, "champion_version": None}).encode())["champion_moved"]
    assert not stage.champion_change(moved, moved)["champion_moved"]  # skipped by DVC: the same record
    kept = json.dumps({**record, "promote": False, "champion_version": "2", "reason": "no better"}).encode()
    assert stage.champion_change(moved, kept) == {
        "champion_moved": False,
        "model_name": "cxr-dwml",
        "version": "3",
        "previous_champion": "2",
        "val_mean_auc": None,
        "reason": "no better",
    }
    known = json.dumps({**record, "registered": False, "reason": "already holds these weights"}).encode()
    assert not stage.champion_change(kept, known)["champion_moved"]
    with pytest.raises(stage.StageError, match="reports/registration.json is missing"):
        stage.champion_change(moved, None)

    xcom = tmp_path / "airflow" / "xcom" / "return.json"
    stage.announce_champion(change, xcom)  # no XCom folder: a local task, the line only
    assert not xcom.exists()
    xcom.parent.mkdir(parents=True)
    stage.announce_champion(change, xcom)  # in a pod: the sidecar's file too
    assert json.loads(xcom.read_text()) == change
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"[dvc_stage] champion: {json.dumps(change, sort_keys=True)}"] * 2
