"""The Airflow DAG `cxr_dwml` through the real Airflow: parsing, the graph, the stage runner, and
`airflow dags test` (`make dag-test` runs that case alone).

`airflow dags test` runs on a copy of the session's tiny pipeline run (conftest's `pipeline_run`),
with Airflow's embedded SQLite: every task runs and DVC finds every stage up to date. Stages that
run under Airflow (with confs, retries, failures, MLflow and the registry) are the stack test's
(tests/test_stack.py), the one run through the real scheduler, API server and REST API.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import (
    ROOT,
    VENV_BIN,
    PipelineRun,
    copy_run,
    dvc_stage_graph,
    experiment_file,
    experiment_ref,
    run_env,
    stage_runner,
)
from tests.servers import wait_until

DAG_ID = "cxr_dwml"
STAGES = ("download", "prepare", "prototypes", "train", "evaluate", "register")


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
        "outlets": [a.uri for a in t.outlets],
        "command": t.python_callable() if type(t).__name__ == "_BashDecoratedOperator" else None,
        "env": getattr(t, "env", None), "append_env": getattr(t, "append_env", None),
        "setup": t.is_setup, "teardown": t.is_teardown, "trigger_rule": t.trigger_rule.value}}
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
    assert set(tasks) == {"workspace", *STAGES, "champion", "finish"}
    assert parsed["catchup"] is False and parsed["max_active_runs"] == 4, "runs have workspaces of their own"
    assert parsed["schedule"] == "0 3 * * 1", "the shipped settings retrain weekly"
    # the champion asset is announced by its own task, after register, only when the alias moved
    champion = tasks.pop("champion")
    assert champion["upstream"] == ["register"] and champion["outlets"] == ["cxr-dwml://model/champion"]
    # the run's workspace: made by a setup task, recorded and removed by a teardown that runs whatever happened
    assert tasks["workspace"]["setup"] and tasks["workspace"]["upstream"] == []
    assert tasks["finish"]["teardown"] and tasks["finish"]["upstream"] == ["champion", "workspace"]
    assert tasks["finish"]["trigger_rule"] == "all_done_setup_success"
    assert tasks["download"]["upstream"] == tasks["prototypes"]["upstream"] == ["workspace"]
    for task_id, info in tasks.items():
        assert info["type"] == "_BashDecoratedOperator", "TaskFlow's bash tasks"
        pool = {"train": "cxr_dwml_gpu", "register": "cxr_dwml_registry"}.get(task_id, "default_pool")
        assert info["pool"] == pool, "train waits for a GPU, register for the registry, the rest for nothing"
        assert info["retries"] == 2 and info["timeout_s"] and info["timeout_s"] > 0
        assert f"scripts/dvc_stage.py {'create' if task_id == 'workspace' else task_id}" in info["command"]
        assert 'export PATH="$CXR_VENV/bin:$PATH"' in info["command"]
        assert info["append_env"] is True and info["env"]["CXR_PROJECT_DIR"] == str(ROOT)
        assert info["env"]["CXR_RUN_ID"] == "{{ run_id }}"
        # the run's conf reaches the workspace task only: its params.yaml is composed once
        assert ("CXR_RUN_OVERRIDES" in info["env"]) == (task_id == "workspace")
    assert tasks["train"]["timeout_s"] == 2880 * 60
    assert tasks["evaluate"]["outlets"] == ["cxr-dwml://reports/metrics"]
    assert tasks["register"]["outlets"] == []
    assert {"profile", "source", "epochs", "overrides"} <= set(parsed["params"])


def test_dag_graph_matches_dvc_yaml(parsed: dict) -> None:
    """Upstream tasks of each task = the stages producing its dvc.yaml deps (outs -> deps), direct edges only."""
    reduced = dvc_stage_graph(reduced=True)
    # the stages' graph, less the setup task every first stage waits for
    tasks = parsed["tasks"]
    stage_tasks = {k: [u for u in v["upstream"] if u != "workspace"] for k, v in tasks.items() if k in reduced}
    assert stage_tasks == reduced
    assert reduced["prototypes"] == [], "prototypes may run beside prepare"


def test_settings_come_from_environment_and_are_checked(tmp_path: Path) -> None:
    overlay, stale = tmp_path / "site.yaml", tmp_path / "old.yaml"
    overlay.write_text("max_active_runs: 2\nkubernetes:\n  gpus: 2\ntimeouts_minutes:\n  train: 60\n")
    stale.write_text("pool: cxr_dwml_dvc\n")  # the setting this DAG had before runs got workspaces
    got = probe(
        """
import cxr_dwml as m
s = m.load_settings({"CXR_AIRFLOW_SCHEDULE": "0 3 * * 0", "CXR_AIRFLOW_RETRIES": "4",
    "CXR_AIRFLOW_RETRY_DELAY_MINUTES": "1.5", "CXR_AIRFLOW_TIMEOUT_TRAIN": "90", "CXR_AIRFLOW_CATCHUP": "true",
    "CXR_AIRFLOW_START_DATE": "2024-06-01", "CXR_AIRFLOW_GPU_POOL": "", "CXR_AIRFLOW_K8S_TASKS": "train, evaluate"})
dag = m.build_dag(s)
errors = []
weekly = m.build_dag(m.load_settings({"CXR_AIRFLOW_SCHEDULE": "@weekly"}))
for env in ({"CXR_AIRFLOW_K8S_TASKS": "trian"}, {"CXR_AIRFLOW_START_DATE": "next tuesday"},
            {"CXR_AIRFLOW_RETRIES": "many"}, {"CXR_AIRFLOW_RETRIES": "null"},
            {"CXR_AIRFLOW_SETTINGS": json.loads(__import__("os").environ["ARGS"])[1]}):
    try:
        m.build_dag(m.load_settings(env))
    except ValueError as e:
        errors.append(str(e))
# a settings file overlays the shipped one: only its keys change
laid = m.load_settings({"CXR_AIRFLOW_SETTINGS": json.loads(__import__("os").environ["ARGS"])[0]})
print(json.dumps({"schedule": s.schedule, "retries": s.retries,
    "delay": dag.default_args["retry_delay"].total_seconds(),
    "train_timeout": dag.get_task("train").execution_timeout.total_seconds(), "catchup": dag.catchup,
    "start": dag.start_date.isoformat(), "pool": dag.get_task("train").pool,
    "kinds": {t.task_id: type(t).__name__ for t in dag.tasks}, "errors": errors,
    "weekly": str(weekly.schedule), "laid": [laid.max_active_runs, laid.kubernetes.gpus, laid.kubernetes.cpu,
    laid.timeouts_minutes["train"], laid.timeouts_minutes["prepare"], laid.retries]}))
""",
        TMP_HOME=str(tmp_path),
        ARGS=json.dumps([str(overlay), str(stale)]),
    )
    assert got["schedule"] == "0 3 * * 0" and got["retries"] == 4 and got["delay"] == 90
    assert got["train_timeout"] == 90 * 60 and got["catchup"] is True
    assert got["start"] == "2024-06-01T00:00:00+00:00" and got["pool"] == "default_pool"
    assert got["kinds"]["train"] == got["kinds"]["evaluate"] == "KubernetesPodOperator"
    assert got["kinds"]["prepare"] == "_BashDecoratedOperator"
    assert "trian" in got["errors"][0] and "CXR_AIRFLOW_START_DATE" in got["errors"][1]
    assert "CXR_AIRFLOW_RETRIES='many'" in got["errors"][2] and "CXR_AIRFLOW_RETRIES" in got["errors"][3]
    assert got["weekly"] == "@weekly"
    assert got["laid"] == [2, 2, "8", 60, 360, 2], "the file's keys, the shipped values for the rest"
    assert f"{stale}: unknown setting(s) pool" in got["errors"][4] and "gpu_pool" in got["errors"][4]


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
rendered = dag.get_template_env().from_string(dag.get_task("workspace").env["CXR_RUN_OVERRIDES"]).render(params=good)
# a field left as the form shows it is not sent: the chosen profile keeps its own value
paper = check({"profile": "paper", "overrides": None})
kept = dag.get_template_env().from_string(dag.get_task("workspace").env["CXR_RUN_OVERRIDES"]).render(params=paper)
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
    # "all": the workspace and finish tasks run as pods too, on the claim the stages' pods mount
    assert set(pods) == {"workspace", *STAGES, "finish"} and got["round_trip"] == "registry.example/cxr-dwml:1.0"
    assert "scripts/dvc_stage.py create" in pods["workspace"]["spec"]["containers"][0]["args"][0]
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


GIT = ["git", "-c", "user.email=test@example.invalid", "-c", "user.name=test"]


def scratch_project(root: Path, cmd: str, git: bool = True) -> Path:
    """A DVC project in git, with the project's conf/ and one stage `step` tracking params `train`."""
    root.mkdir()
    shutil.copytree(ROOT / "conf", root / "conf")
    (root / "dvc.yaml").write_text(
        yaml.safe_dump(
            {
                "stages": {
                    "step": {
                        "cmd": cmd,
                        "params": ["profile", "train"],
                        "outs": ["out.txt"],
                        "metrics": [{"score.json": {"cache": False}}],
                    }
                }
            }
        )
    )
    if git:
        subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    for args in (["init", "-q", *([] if git else ["--no-scm"])], ["config", "hydra.enabled", "true"]):
        done = subprocess.run(["dvc", *args], cwd=root, env=run_env(root), capture_output=True)
        assert done.returncode == 0, done.stderr
    made = subprocess.run(
        [sys.executable, "-m", "components.params", "--params", str(root / "params.yaml")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert made.returncode == 0, made.stderr
    if git:
        subprocess.run([*GIT, "add", "-A"], cwd=root, check=True)
        subprocess.run([*GIT, "commit", "-qm", "project"], cwd=root, check=True)
    return root


# the stage of the scratch project: writes what it sees of params.yaml into out.txt and score.json
RECORD = (
    "python -c \"import json, yaml; p = yaml.safe_load(open('params.yaml')); t = p['train']; "
    "open('out.txt', 'w').write(str((p['profile'], t['epochs'], t['seed'], t['optim']['lr_head']))); "
    "json.dump({'epochs': t['epochs']}, open('score.json', 'w'))\""
)


def dvc_stage(root: Path, command: str, *args: str, run_id: str = "manual__r1", **env: str) -> subprocess.Popen:
    """This checkout's stage runner on the scratch project `root`; it imports this checkout's code
    (PYTHONPATH), whichever checkout the venv was installed from."""
    return subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "dvc_stage.py"), command, *args, "--project", str(root)],
        env=run_env(root, **{"PYTHONPATH": str(ROOT), "CXR_RUN_ID": run_id, **env}),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def stage_ok(root: Path, command: str, *args: str, **env: str) -> str:
    proc = dvc_stage(root, command, *args, **env)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out
    return out


def untouched(root: Path, workspaces: int = 0) -> None:
    """The project checkout as committed: no changed, new or stray file, and `workspaces` worktrees
    beside its own.
    Ignored files are listed too; the shared DVC cache and DVC's scratch folder may change."""
    status = subprocess.run(["git", "status", "--porcelain", "--ignored"], cwd=root, capture_output=True, text=True)
    shown = [line for line in status.stdout.splitlines() if line not in ("!! .dvc/cache/", "!! .dvc/tmp/")]
    assert shown == [], shown
    worktrees = subprocess.run(["git", "worktree", "list"], cwd=root, capture_output=True, text=True).stdout
    assert len(worktrees.splitlines()) == 1 + workspaces, worktrees


def experiments(root: Path) -> dict[str, dict]:
    """`dvc exp show --json` in the project: experiment name -> its params.yaml and metrics."""
    shown = subprocess.run(
        ["dvc", "exp", "show", "--json"], cwd=root, env=run_env(root), capture_output=True, text=True
    )
    assert shown.returncode == 0, shown.stderr
    out = {}
    for baseline in json.loads(shown.stdout):
        for exp in baseline.get("experiments") or []:
            for revision in exp.get("revs") or []:
                data = revision.get("data") or {}
                out[revision.get("name")] = {
                    "params": data["params"]["params.yaml"]["data"],
                    "metrics": data["metrics"]["score.json"]["data"],
                }
    return out


def test_a_run_works_in_its_own_workspace_and_is_saved_as_a_dvc_experiment(tmp_path: Path) -> None:
    # the stage also writes an uncached plot into a folder git ignores, as prototypes does
    root = scratch_project(tmp_path / "p", RECORD + " && mkdir -p plots && echo plot > plots/p.txt")
    stages = yaml.safe_load((root / "dvc.yaml").read_text())
    stages["stages"]["step"]["plots"] = [{"plots/p.txt": {"cache": False}}]
    (root / "dvc.yaml").write_text(yaml.safe_dump(stages))
    (root / ".gitignore").write_text("/plots/\n")
    subprocess.run([*GIT, "add", "dvc.yaml", ".gitignore"], cwd=root, check=True)
    subprocess.run([*GIT, "commit", "-qm", "a plot git ignores"], cwd=root, check=True)
    committed = (root / "params.yaml").read_bytes()
    ws = root / ".dvc" / "tmp" / "runs" / "manual__r1"
    out = stage_ok(root, "create", "--set", "train.seed=5", CXR_RUN_OVERRIDES='{"train.epochs": 2, "profile": "paper"}')
    assert f"workspace of DAG run 'manual__r1': {ws}" in out and "starting from nothing" in out, out
    out = stage_ok(root, "step")
    assert (ws / "out.txt").read_text() == str(("paper", 2, 5, 0.001)), out
    lock = yaml.safe_load((ws / "dvc.lock").read_text())["stages"]["step"]["params"]["params.yaml"]
    assert lock["profile"] == "paper" and lock["train"]["epochs"] == 2 and lock["train"]["seed"] == 5
    assert lock["train"]["optim"]["lr_head"] == 0.001, "dvc.lock records the profile's values, as they ran"
    assert "didn't change, skipping" in stage_ok(root, "step"), "a retried stage finds its outputs"
    assert (root / "params.yaml").read_bytes() == committed and not (root / "out.txt").exists()
    # saved with no git identity configured (as in an image), and shared through a git remote
    shared = tmp_path / "shared.git"
    subprocess.run(["git", "init", "-q", "--bare", str(shared)], check=True)
    no_identity = {"HOME": str(tmp_path), "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1"}
    out = stage_ok(root, "finish", CXR_EXPERIMENTS_REMOTE=str(shared), **no_identity)
    assert "saved as the DVC experiment dag-manual__r1" in out and f"pushed dag-manual__r1 to {shared}" in out, out
    remote_refs = subprocess.run(["git", "ls-remote", str(shared)], capture_output=True, text=True).stdout
    assert remote_refs.rstrip().endswith("/dag-manual__r1") and "refs/exps/" in remote_refs, remote_refs
    assert not ws.exists()
    untouched(root)
    saved = experiments(root)["dag-manual__r1"]
    assert saved["params"]["train"]["epochs"] == 2 and saved["metrics"] == {"epochs": 2}
    assert experiment_file(root, "dag-manual__r1", "plots/p.txt") == "plot\n", "uncached outputs git ignores too"

    # the next run starts from the last one's outputs: with the same values, nothing reruns
    other = "scheduled__2026-01-05T03:00:00+00:00"
    out = stage_ok(
        root,
        "create",
        "--set",
        "train.seed=5",
        run_id=other,
        CXR_RUN_OVERRIDES='{"train.epochs": 2, "profile": "paper"}',
    )
    assert "starting from the DVC experiment dag-manual__r1" in out, out
    (ws2,) = (root / ".dvc" / "tmp" / "runs").iterdir()
    assert ws2.name.startswith("scheduled__2026-01-05T03-00-00-00-00-"), "a run id becomes a safe folder name"
    assert "didn't change, skipping" in stage_ok(root, "step", run_id=other)
    # and with other values, DVC reruns the stage; both runs are experiments of their own
    stage_ok(root, "finish", run_id=other)
    stage_ok(root, "create", run_id="manual__r3")
    assert "Running stage 'step'" in stage_ok(root, "step", run_id="manual__r3")
    stage_ok(root, "finish", run_id="manual__r3")
    shown = experiments(root)
    assert shown["dag-manual__r3"]["params"]["train"]["epochs"] == yaml.safe_load(committed)["train"]["epochs"]
    assert shown["dag-manual__r1"]["params"]["train"]["epochs"] == 2 and len(shown) == 3
    untouched(root)
    assert (root / "params.yaml").read_bytes() == committed


def test_run_ids_become_safe_folder_and_experiment_names() -> None:
    """A run id may hold anything a trigger gives it: its name is a single folder inside the runs
    folder and a valid git ref, and ids that differ stay apart."""
    slug = stage_runner().slug
    names = {r: slug(r) for r in ("manual__r1", "a.b", "a..b", "a/b", "x.lock", "../../etc", "@{-1}", "a b")}
    assert names["manual__r1"] == "manual__r1" and names["a.b"] == "a.b", "a safe id is kept as it is"
    assert len(set(names.values())) == len(names), names
    for name in names.values():
        assert re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]*", name) and ".." not in name, name
        ref = subprocess.run(["git", "check-ref-format", f"refs/exps/ab/cdef/dag-{name}"], capture_output=True)
        assert ref.returncode == 0, name


def test_a_workspace_that_cannot_be_made_ends_in_one_clear_line(tmp_path: Path) -> None:
    plain = scratch_project(tmp_path / "plain", "touch out.txt", git=False)
    proc = dvc_stage(plain, "create")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2 and out.count("\n") == 1, out
    assert f"dvc_stage: error: {plain} is not a git checkout with a commit" in out, out

    root = scratch_project(tmp_path / "p", "touch out.txt")
    (tmp_path / "a-file").write_text("")
    proc = dvc_stage(root, "create", CXR_WORKSPACES_DIR=str(tmp_path / "a-file" / "runs"))
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "cannot create the runs folder" in out and "CXR_WORKSPACES_DIR" in out, out
    proc = dvc_stage(root, "step", run_id="never-created")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "the workspace of DAG run 'never-created'" in out and "clear that task" in out
    for bad_id in ("..", "/", "../-"):
        proc = dvc_stage(root, "create", run_id=bad_id)
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 2 and "has no letters or digits" in out, out
    untouched(root)


def test_a_failed_stage_keeps_its_workspace_and_a_cleared_task_reruns_there(tmp_path: Path) -> None:
    gate = tmp_path / "gate"  # the stage fails until this file exists
    root = scratch_project(
        tmp_path / "p", f"test -f {gate} && python -c \"open('out.txt', 'w'); open('score.json', 'w').write('{{}}')\""
    )
    ws = root / ".dvc" / "tmp" / "runs" / "manual__r1"
    stage_ok(root, "create", CXR_RUN_OVERRIDES='{"train.epochs": 3}')
    proc = dvc_stage(root, "step")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    out = stage_ok(root, "finish")
    assert "did not finish (not done: step): its workspace" in out and "is kept" in out, out
    assert ws.is_dir() and b"epochs: 3\n" in (ws / "params.yaml").read_bytes()

    # a cleared task: Airflow reruns the run's workspace task (its setup) first, then the stage
    gate.write_text("")
    assert "reusing the workspace of DAG run 'manual__r1'" in stage_ok(
        root, "create", CXR_RUN_OVERRIDES='{"train.epochs": 3}'
    )
    assert "Running stage 'step'" in stage_ok(root, "step")
    assert "saved as the DVC experiment dag-manual__r1" in stage_ok(root, "finish")
    untouched(root)

    # CXR_KEEP_FAILED_WORKSPACES=false: a failed run's workspace goes too
    gate.unlink()
    stage_ok(root, "create", run_id="manual__r2")
    dvc_stage(root, "step", run_id="manual__r2").communicate(timeout=120)
    out = stage_ok(root, "finish", run_id="manual__r2", CXR_KEEP_FAILED_WORKSPACES="false")
    assert "workspace removed" in out, out
    untouched(root)


def test_a_stage_killed_midway_stops_its_command_and_leaves_nothing_locked(tmp_path: Path) -> None:
    # the command marks its start, and its end by SIGTERM: the runner alone is signalled (as a pod's
    # main process is) and must pass the signal on to the stage's process group
    cmd = "trap 'touch terminated; exit 143' TERM; touch started; sleep 120 & wait $!; touch out.txt score.json"
    root = scratch_project(tmp_path / "p", f'bash -c "{cmd}"')
    ws = root / ".dvc" / "tmp" / "runs" / "manual__r1"
    stage_ok(root, "create")
    proc = dvc_stage(root, "step")
    wait_until("the stage command to start", (ws / "started").exists, timeout=120, every=0.1, process=proc)
    os.kill(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=90)
    assert proc.returncode != 0
    wait_until("the stage command to end", (ws / "terminated").exists, timeout=60, every=0.1)
    untouched(root, workspaces=1)
    # no lock is left: the same stage runs again in the workspace at once
    stages = yaml.safe_load((ws / "dvc.yaml").read_text())
    stages["stages"]["step"]["cmd"] = stages["stages"]["step"]["cmd"].replace("sleep 120 & wait $!; ", "")
    (ws / "dvc.yaml").write_text(yaml.safe_dump(stages))
    again = dvc_stage(root, "step")
    out, _ = again.communicate(timeout=120)
    assert again.returncode == 0 and "Running stage 'step'" in out, out
    assert "is busy" not in out and "RWLock" not in out, "DVC let go of its locks when it was stopped"

    # a command that ignores SIGTERM (stuck on its way out) gets SIGKILL after the grace period
    stages["stages"]["step"]["cmd"] = "bash -c \"trap '' TERM; touch stuck; sleep 120\""
    (ws / "dvc.yaml").write_text(yaml.safe_dump(stages))
    stuck = dvc_stage(root, "step", CXR_STOP_GRACE_SECONDS="2")
    wait_until("the stuck command to start", (ws / "stuck").exists, timeout=120, every=0.1, process=stuck)
    os.kill(stuck.pid, signal.SIGTERM)
    out, _ = stuck.communicate(timeout=60)
    assert stuck.returncode != 0 and "failed to reproduce 'step'" in out, out
    locks = json.loads((ws / ".dvc" / "tmp" / "rwlock").read_text() or "{}")
    assert not any(locks.values()), f"DVC locks left held: {locks}"
    untouched(root, workspaces=1)


def test_a_lock_file_left_unreadable_by_a_killed_dvc_is_reset_under_dvcs_guard(tmp_path: Path) -> None:
    """DVC truncates .dvc/tmp/rwlock, then writes it: killed in between, it leaves the file empty and
    every later DVC command in the workspace failing. The runner resets such a file after a stop,
    holding DVC's own guard, and leaves alone one that reads or that a live DVC holds the guard of."""
    from dvc.lock import make_lock

    runner = stage_runner()
    folder = tmp_path / ".dvc" / "tmp"
    folder.mkdir(parents=True)
    lock = folder / "rwlock"
    runner.mend_rwlock(tmp_path)  # no lock file: nothing to do, nothing written
    assert not lock.exists()
    held = '{"write": {"/ws/out.txt": {"pid": 1, "cmd": "dvc repro"}}}'
    lock.write_text(held)
    runner.mend_rwlock(tmp_path)
    assert lock.read_text() == held
    for cut in ("", '{"write": {"/ws/out.t'):
        lock.write_text(cut)
        with make_lock(str(folder / "rwlock.lock"), tmp_dir=str(folder)):  # a DVC process editing it now
            runner.mend_rwlock(tmp_path)
        assert lock.read_text() == cut
        runner.mend_rwlock(tmp_path)
        assert json.loads(lock.read_text()) == {}


def test_run_conf_values_are_literals(tmp_path: Path) -> None:
    """A `${...}` in a run's conf could read the worker's environment into params.yaml, dvc.lock and
    MLflow: the schema refuses it when the run is triggered, and the workspace task refuses it again."""
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
    for overrides, args, named in (
        ('{"mlflow.experiment": "${oc.env:CXR_TEST_SECRET}"}', [], "'mlflow.experiment' holds an interpolation"),
        ("{}", ["--set", "train.seed=${oc.env:CXR_TEST_SECRET}"], "'train.seed' holds an interpolation"),
        ('{"hydra.searchpath": "file:///tmp"}', [], "'hydra.searchpath' is not a params.yaml key"),
        ('{"profile": "../../../tmp/profile/x"}', [], "is not a profile name"),
        ('{"train.epochs": 0}', [], "train.epochs"),
        ("[1]", [], "CXR_RUN_OVERRIDES must be a JSON object"),
    ):
        proc = dvc_stage(root, "create", *args, CXR_RUN_OVERRIDES=overrides, CXR_TEST_SECRET=secret)
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 2 and named in out and secret not in out, out
        assert not (root / ".dvc" / "tmp" / "runs" / "manual__r1").exists(), "nothing is left of a refused run"
        untouched(root)


# --- the slow part: the DAG under `airflow dags test` on Airflow's embedded SQLite --------------


@pytest.fixture(scope="module")
def dags_test_run(pipeline_run: PipelineRun, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """`airflow dags test cxr_dwml` without a conf on a copy of the session's pipeline run, in a
    throwaway AIRFLOW_HOME (SQLite)."""
    base = tmp_path_factory.mktemp("dag-run")
    repo = copy_run(pipeline_run, base / "repo").repo
    # the checkout holds the session run's outputs; a DAG run must leave every file of it as it is
    before = {p: (repo / p).read_bytes() for p in ("params.yaml", "dvc.lock", "reports/registration.json")}
    env = airflow_env(base / "home", repo)
    migrate = airflow(env, "db", "migrate")
    assert migrate.returncode == 0, migrate.stderr[-3000:]
    t0 = time.perf_counter()
    test = airflow(env, "dags", "test", DAG_ID, timeout=480)
    return {"repo": repo, "result": test, "seconds": time.perf_counter() - t0, "before": before}


@pytest.mark.slow
def test_dags_test_runs_every_task_on_sqlite_and_saves_the_run(dags_test_run: dict) -> None:
    """Airflow's embedded defaults (SQLite, no scheduler): every task of the DAG runs its step
    through the stage runner in a workspace of the run's own. The run's params are the checkout's,
    so DVC finds every stage up to date; the champion task is skipped, the run is saved as a DVC
    experiment and the checkout is as it was. Stages that run under Airflow, their MLflow runs and
    the registry are the stack test's (tests/test_stack.py): two runs through the real scheduler."""
    from mlflow import MlflowClient

    result, repo = dags_test_run["result"], dags_test_run["repo"]
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-6000:]
    print(f"airflow dags test: {dags_test_run['seconds']:.0f} s")
    run_id = re.search(r"DAG run '(manual__[^']+)' saved as the DVC experiment", log)
    assert run_id, log[-4000:]
    name = stage_runner().Workspace.of(repo, run_id.group(1)).experiment
    for stage in STAGES:
        assert f"Stage '{stage}' didn't change, skipping" in log, stage
    assert "Running stage" not in log, log[-4000:]
    # the champion task read register's decision (its XCom) and was skipped: register did not run
    assert "the champion did not move: the register stage was skipped" in log, log[-4000:]
    assert "new champion" not in log
    # nothing ran, so no MLflow run names this DAG run; the experiment's commit says so
    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("cxr-dwml").experiment_id
    assert not client.search_runs([experiment], f"tags.`airflow.dag_id` = '{DAG_ID}'")
    assert f"saved as the DVC experiment {name} (MLflow parent run unknown)" in log, log[-4000:]
    message = subprocess.run(
        ["git", "log", "-1", "--format=%B", experiment_ref(repo, name)], cwd=repo, text=True, capture_output=True
    ).stdout
    assert f"DAG run {run_id.group(1)} of {DAG_ID}; MLflow parent run unknown" in message
    assert experiment_file(repo, name, "dvc.lock") == dags_test_run["before"]["dvc.lock"].decode()
    assert [v.version for v in client.search_model_versions("name='cxr-dwml'")] in (["1"], [1])
    # the project checkout is as it was: the run worked in a workspace of its own, now removed
    assert {p: (repo / p).read_bytes() for p in dags_test_run["before"]} == dags_test_run["before"]
    worktrees = subprocess.run(["git", "worktree", "list"], cwd=repo, capture_output=True, text=True).stdout
    assert len(worktrees.splitlines()) == 1, worktrees


def test_register_stage_reports_whether_the_champion_moved(tmp_path: Path, capsys) -> None:
    """The register task's last line (its XCom) says whether this call moved the champion alias:
    not when DVC skipped the stage, not when the gate kept the champion or the weights were known."""

    stage = stage_runner()
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
