"""The Kubeflow Pipelines v2 pipeline (kubeflow/cxr_dwml.py): its compiled graph against dvc.yaml's,
the image and resources of each step, and one whole run with kfp.local on the tiny demo.

The pipeline needs the KFP environment (.venv-kfp, `make kfp-venv`): kfp cannot share the main venv.
These tests run under the main venv and start .venv-kfp's Python; without it they skip (and fail
under CI=true, where `make test` builds it). The steps' adapter (components/kfp_step.py) imports no
KFP and is also tested here directly.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.conftest import (
    COMPOSE,
    ENV_EXAMPLE,
    ROOT,
    TINY_PARAMS,
    dvc_stage_graph,
    read_env_file,
    resolve_compose,
    run_env,
)
from tests.servers import unavailable

KFP_BIN = ROOT / ".venv-kfp" / "bin"
PIPELINE = ROOT / "kubeflow" / "cxr_dwml.py"
STEPS = ("download", "prepare", "prototypes", "train", "evaluate", "register")
PIPELINE_RUN = "kfp-local-test"


def flat(tree: dict, prefix: str = "") -> list[str]:
    """A nested params overlay as `key=value` strings, the pipeline's `overrides`."""
    out = []
    for key, value in tree.items():
        if isinstance(value, dict):
            out += flat(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}={json.dumps(value)}")
    return out


# TINY_PARAMS with one epoch and one gallery image: the run checks the wiring, not the model
OVERRIDES = [*flat(TINY_PARAMS), "train.epochs=1", "evaluate.explain.gallery_images=1"]


def kfp(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """kubeflow/cxr_dwml.py run by the KFP environment's Python."""
    python = KFP_BIN / "python"
    if not os.access(python, os.X_OK):
        unavailable(f"the KFP environment {KFP_BIN.parent} (make kfp-venv)")
    return subprocess.run(
        [str(python), str(PIPELINE), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def kfp_env(tmp: Path, **extra: str) -> dict[str, str]:
    """The steps' environment: the project's conf/, MLflow in SQLite under `tmp`, one pipeline run key."""
    # MLflow's usage telemetry off: tests reach no network (and its sender delays every step's exit)
    env = run_env(tmp, CXR_PROJECT_DIR=str(ROOT), CXR_PIPELINE_RUN=PIPELINE_RUN, **extra)
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    env["PATH"] = f"{KFP_BIN}{os.pathsep}{env['PATH']}"
    return env


# --- the compiled pipeline ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def ir(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The IR YAML `make kfp-compile` writes, compiled with the default image."""
    out = tmp_path_factory.mktemp("kfp-compile") / "cxr_dwml.yaml"
    done = kfp("compile", "--out", str(out), cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    pipeline_spec, platform_spec = yaml.safe_load_all(out.read_text())  # KFP writes the two as two documents
    return {**pipeline_spec, **platform_spec}


def test_the_task_graph_is_dvc_yaml_stage_graph(ir: dict) -> None:
    """Each task's upstream tasks = the stages producing its dvc.yaml deps, edge for edge."""
    tasks = ir["root"]["dag"]["tasks"]
    assert {name: sorted(task.get("dependentTasks", [])) for name, task in tasks.items()} == dvc_stage_graph()
    assert set(tasks) == set(STEPS)


def test_every_step_runs_in_the_training_image(ir: dict) -> None:
    compose = resolve_compose(yaml.safe_load(COMPOSE.read_text()), read_env_file(ENV_EXAMPLE))
    trainer = compose["services"]["trainer"]["image"]
    dag_pods = yaml.safe_load((ROOT / "dags" / "cxr_dwml.yaml").read_text())["kubernetes"]["image"]
    images = {name: ex["container"]["image"] for name, ex in ir["deploymentSpec"]["executors"].items()}
    assert set(images) == {f"exec-{step}" for step in STEPS}
    assert set(images.values()) == {trainer} == {dag_pods}


def test_train_asks_for_a_gpu_and_retries_and_every_step_is_cached(ir: dict) -> None:
    executors = ir["deploymentSpec"]["executors"]
    gpu = executors["exec-train"]["container"]["resources"]["accelerator"]
    assert gpu["resourceType"] == "nvidia.com/gpu" and int(gpu["resourceCount"]) == 1
    assert [n for n, ex in executors.items() if "accelerator" in ex["container"].get("resources", {})] == ["exec-train"]
    tasks = ir["root"]["dag"]["tasks"]
    assert tasks["train"]["retryPolicy"]["maxRetryCount"] >= 1
    assert all(task["cachingOptions"]["enableCache"] for task in tasks.values())
    # the same commands as DVC's stages: each step's body hands its artifact folders to components.<step>
    for step in STEPS:
        body = executors[f"exec-{step}"]["container"]["command"][-1]
        assert "from components.kfp_step import" in body, body
        assert f'run_step("{step}"' in body or step == "register", body
    # the MLflow and S3 settings come from one Secret, in every step; the GPU taint is tolerated by train only
    platform = ir["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for step in STEPS:
        keys = {k["envVar"] for k in platform[f"exec-{step}"]["secretAsEnv"][0]["keyToEnv"]}
        assert {"MLFLOW_TRACKING_URI", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= keys
        assert ("tolerations" in platform[f"exec-{step}"]) == (step == "train")
    params = ir["root"]["inputDefinitions"]["parameters"]
    assert params["profile"]["parameterType"] == "STRING" and params["overrides"]["parameterType"] == "LIST"


def test_the_image_carries_the_kfp_runtime_and_no_step_installs_anything(ir: dict) -> None:
    """The steps import kfp's executor from the training image: nothing is installed when a pod starts."""
    for name, executor in ir["deploymentSpec"]["executors"].items():
        assert not any("pip install" in part for part in executor["container"]["command"]), name
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    pattern = re.search(r"grep -E '([^']+)' requirements-kfp.lock", dockerfile).group(1)
    lock = (ROOT / "requirements-kfp.lock").read_text().splitlines()
    assert sorted(line.split("==")[0] for line in lock if re.match(pattern, line)) == [
        "docstring_parser",
        "kfp",
        "kfp-pipeline-spec",
        "kfp-server-api",
    ]


# --- the steps' adapter, in the main venv --------------------------------------------------------


def test_overrides_are_composed_and_refused_as_for_dvc() -> None:
    from components.kfp_step import compose_params
    from pipeline.config import ConfigError

    text = yaml.safe_load(compose_params(ROOT, "", ["train.epochs=3", "download.source=synthetic"]))
    assert text["train"]["epochs"] == 3 and text["profile"] == "demo"
    assert yaml.safe_load(compose_params(ROOT, "paper", []))["profile"] == "paper"
    for bad, named in (
        (["train.epochz=2"], "epochz"),
        (["hydra.searchpath=[/etc]"], "hydra.searchpath"),
        (["download.source=${oc.env:HOME}"], "interpolation"),
        (["profile=paper"], "profile"),
        (["train.epochs"], "key=value"),
        ("train.epochs=2", "list of key=value"),
    ):
        with pytest.raises(ConfigError, match=named):
            compose_params(ROOT, "", bad)
    with pytest.raises(ConfigError, match="not a profile name"):
        compose_params(ROOT, "../../etc/passwd", [])


def test_a_step_without_a_tracking_server_stops_with_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    from components.kfp_step import run_step

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("CXR_PROJECT_DIR", str(ROOT))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stopped:
        run_step("download", "", [], {"out": str(tmp_path / "raw")})
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "MLFLOW_TRACKING_URI is not set" in err and "Traceback" not in err
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")  # would land in the removed scratch folder
    with pytest.raises(SystemExit):
        run_step("download", "", [], {"out": str(tmp_path / "raw")})
    assert "not an absolute sqlite:////path" in capsys.readouterr().err
    assert not (tmp_path / "raw").exists() and list(tmp_path.iterdir()) == []


# --- one whole run with kfp.local -----------------------------------------------------------------


@dataclass(frozen=True)
class LocalRun:
    tmp: Path
    outputs: dict  # the pipeline's outputs: {name: {"path", "metadata"}}
    log: str

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.tmp / 'mlflow.db'}"

    def task_folder(self, task: str) -> Path:
        """The task's folder of the first run (run folders are named by their start time)."""
        return min((self.tmp / "kfp-outputs").glob(f"cxr-dwml-*/{task}"))


@pytest.fixture(scope="module")
def local_run(tmp_path_factory: pytest.TempPathFactory) -> LocalRun:
    tmp = tmp_path_factory.mktemp("kfp-local")
    args = ["local", "--root", str(tmp / "kfp-outputs"), "--outputs", str(tmp / "outputs.json")]
    done = kfp(*args, *[a for o in OVERRIDES for a in ("--set", o)], cwd=tmp, env=kfp_env(tmp), timeout=600)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-6000:]
    return LocalRun(tmp, json.loads((tmp / "outputs.json").read_text()), log)


@pytest.mark.slow
def test_the_local_run_registers_a_model_and_reports_its_metrics(local_run: LocalRun) -> None:
    from mlflow import MlflowClient

    for step in STEPS:
        assert f"Task '{step}' finished with status" in _plain(local_run.log)
    # the metrics artifact holds evaluate's own numbers
    reports = local_run.task_folder("evaluate") / "reports"
    metrics = json.loads((reports / "metrics.json").read_text())
    logged = local_run.outputs["metrics"]["metadata"]
    assert logged["test_mean_auc"] == pytest.approx(metrics["mean_auc"])
    assert logged["val_mean_auc"] == pytest.approx(metrics["val_mean_auc"])
    measured = {f"test_auc_{c}": auc for c, auc in metrics["per_class_auc"].items() if auc is not None}
    assert {k: v for k, v in logged.items() if k.startswith("test_auc_")} == pytest.approx(measured)
    # the ROC curve's area is the pooled AUC over every (test image, finding) pair
    roc = local_run.outputs["roc"]["metadata"]["confidenceMetrics"]
    assert 20 <= len(roc) <= 201
    fpr, tpr = [p["falsePositiveRate"] for p in roc], [p["recall"] for p in roc]
    assert fpr == sorted(fpr) and fpr[-1] == tpr[-1] == 1.0
    assert sum((b - a) * (c + d) / 2 for a, b, c, d in zip(fpr, fpr[1:], tpr, tpr[1:])) == pytest.approx(
        _pooled_auc(reports, local_run.task_folder("prepare") / "prepared"), abs=0.01
    )
    # the registered version: the one the register step reports, with both aliases at a min_auc of 0
    record = json.loads(Path(local_run.outputs["registration"]["path"]).read_text())
    decision = local_run.outputs["registration"]["metadata"]
    assert decision["champion_moved"] is True and decision["version"] == record["version"]
    client = MlflowClient(tracking_uri=local_run.tracking_uri)
    version = client.get_model_version(record["model_name"], record["version"])
    assert version.run_id == record["run_id"]
    assert set(client.get_registered_model(record["model_name"]).aliases) == {"challenger", "champion"}
    assert client.get_run(version.run_id).data.metrics["test_mean_auc"] == pytest.approx(metrics["mean_auc"])
    # the SQLite store keeps its artifacts beside mlflow.db, as the project's own store does
    experiment = client.get_experiment_by_name("cxr-dwml")
    assert experiment.artifact_location == (local_run.tmp / "mlartifacts").as_uri()
    assert list((local_run.tmp / "mlartifacts").rglob("model_card.md"))
    card = Path(local_run.outputs["model_card"]["path"]).read_text()
    assert card.startswith(f"# Model card: {record['model_name']} v{record['version']}\n"), card[:200]
    assert "<html" in (local_run.task_folder("register") / "model_card_html").read_text().lower()
    # the steps' runs hang under one parent run for the pipeline run
    runs = client.search_runs([client.get_run(version.run_id).info.experiment_id])
    # evaluate and register add to train's run, as under DVC
    steps = {r.data.tags["cxr.step"]: r for r in runs if r.data.tags.get("cxr.step") in STEPS}
    assert set(steps) == {"download", "prepare", "prototypes", "train"}
    parents = {r.data.tags.get("mlflow.parentRunId") for r in steps.values()}
    assert len(parents) == 1 and None not in parents
    assert client.get_run(parents.pop()).data.tags["cxr.pipeline_run"] == PIPELINE_RUN


@pytest.mark.slow
def test_a_second_run_is_served_from_the_cache(local_run: LocalRun) -> None:
    args = ["local", "--root", str(local_run.tmp / "kfp-outputs")]
    done = kfp(*args, *[a for o in OVERRIDES for a in ("--set", o)], cwd=local_run.tmp, env=kfp_env(local_run.tmp))
    log = _plain(done.stdout + done.stderr)
    assert done.returncode == 0, log[-3000:]
    assert "Executing task" not in log, log[-3000:]
    from mlflow import MlflowClient

    assert len(MlflowClient(tracking_uri=local_run.tracking_uri).search_model_versions("name='cxr-dwml'")) == 1


@pytest.mark.slow
def test_a_bad_override_fails_the_run_naming_the_key(tmp_path: Path) -> None:
    args = ["local", "--root", str(tmp_path / "kfp-outputs"), "--set", "train.epochz=2"]
    done = kfp(*args, cwd=tmp_path, env=kfp_env(tmp_path))
    log = _plain(done.stdout + done.stderr)
    assert done.returncode != 0
    # the first step to run stops (kfp.local runs download or prototypes first)
    assert re.search(r"cxr-dwml (download|prototypes): error: .*'train\.epochz'", log), log[-3000:]
    assert "Executing task 'train'" not in log and not (tmp_path / "mlflow.db").exists()


def _plain(text: str) -> str:
    """kfp.local's log without its colour codes."""
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def _pooled_auc(reports: Path, prepared: Path) -> float:
    import pandas as pd
    from sklearn.metrics import roc_auc_score

    from pipeline.classes import CLASSES

    scores = pd.read_parquet(reports / "predictions" / "test.parquet")
    labels = pd.read_csv(prepared / "manifest.csv").set_index("image").loc[scores["image"], list(CLASSES)]
    return roc_auc_score(labels.to_numpy().ravel(), scores[list(CLASSES)].to_numpy().ravel())
