"""The cxr-dwml pipeline as one Airflow 3 DAG:
workspace -> download -> prepare | prototypes -> train -> evaluate -> register -> champion -> finish.

Orchestration only. Each DAG run works in a workspace of its own, never in the project checkout:
the setup task `workspace` makes a git worktree of the project at its current commit, sharing the
project's DVC cache, and composes the run's params.yaml there once (profile and overrides from the
run's conf). Each stage task runs `dvc repro --single-item <stage>` in that workspace with
`scripts/dvc_stage.py`, in the project's own venv (`$CXR_PROJECT_DIR/.venv/bin` first on PATH),
never in Airflow's process, so nothing heavy (torch, mlflow, pandas, pipeline.*) is imported when
the DAG is parsed. The teardown task `finish` saves a run whose stages all succeeded as the DVC
experiment `dag-<run id>` (`dvc exp show` lists it beside local experiments) and removes the
workspace; a failed run's workspace stays for a cleared task to resume in. Runs therefore do not
wait for each other: `train` takes a slot of the GPU pool, and `register` the one slot of the
registry pool, so that concurrent runs' gates each compare with the champion of the moment
(dags/cxr_dwml_pools.json: `airflow pools import dags/cxr_dwml_pools.json`).

    airflow dags test cxr_dwml                                   # one local run, no scheduler
    airflow dags trigger cxr_dwml --conf '{"epochs": 2, "source": "s3://bucket/nih"}'

A run's conf (the DAG params below, validated against their JSON schema) overrides params.yaml
for that run only; DVC skips stages whose inputs did not change since the last saved run and
records in the experiment what ran.
Scheduling, retries and timeouts come from dags/cxr_dwml.yaml or CXR_AIRFLOW_* variables; see
docs/airflow.md. With `kubernetes.tasks` set, the listed tasks run as pods of the training image.

The trigger form shows, in each field, what a run without conf uses (params.yaml's value); only
fields changed from it, and `overrides`, are sent. Unpausing the DAG starts its most recent past
scheduled slot at once (a full retrain with params.yaml as committed), then one per schedule; the
form's "Unpause cxr_dwml on trigger" box, ticked by default on a paused DAG, does the same. A paused
DAG runs nothing, a triggered run included: to run once without the schedule, set
CXR_AIRFLOW_SCHEDULE=none before unpausing, or run `airflow dags test cxr_dwml --conf '{...}'`.
After `register`, the task `champion` updates the asset cxr_dwml_champion only when this run moved
the champion alias.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml
from airflow.sdk import Asset, Param, dag, task

DAG_ID = "cxr_dwml"
HERE = Path(__file__).resolve().parent
SETTINGS_FILE = HERE / "cxr_dwml.yaml"

# Stage task -> upstream stage tasks: the step graph of dvc.yaml (tests/test_dag.py keeps the two equal).
# prototypes needs no data, so it may run beside prepare.
STAGES: dict[str, tuple[str, ...]] = {
    "download": (),
    "prepare": ("download",),
    "prototypes": (),
    "train": ("prepare", "prototypes"),
    "evaluate": ("train",),
    "register": ("evaluate",),
}

# the tasks around the stages: `workspace` sets the run up, `finish` records it and cleans up
WORKSPACE, FINISH = "workspace", "finish"
TASKS = (WORKSPACE, *STAGES, FINISH)

# A run's string values are literals: a `${...}` (OmegaConf interpolation, e.g. `${oc.env:SECRET}`)
# would be resolved on the worker while params.yaml is composed. scripts/dvc_stage.py refuses one
# too; the schema refuses it at trigger time already, naming the key.
LITERAL = r"^(?!.*\$\{)"

# DAG param -> dotted params.yaml key it overrides for one run.
PARAM_KEYS = {
    "profile": "profile",
    "source": "download.source",
    "epochs": "train.epochs",
    "batch_size": "train.batch_size",
    "head": "train.model.head",
    "loss": "train.loss.name",
    "min_auc": "register.min_auc",
}


@dataclasses.dataclass
class KubernetesSettings:
    """Where tasks run as pods (the `kubernetes` section of dags/cxr_dwml.yaml, which holds every default)."""

    tasks: list[str]
    image: str
    namespace: str
    gpus: int
    cpu: str
    memory: str
    workspace_claim: str
    workspace_path: str
    venv: str
    secret: str | None
    service_account: str | None
    node_selector: dict[str, str]
    startup_timeout_seconds: int


@dataclasses.dataclass
class DagSettings:
    """Scheduling and execution settings of the DAG: dags/cxr_dwml.yaml holds every default, a file
    named by CXR_AIRFLOW_SETTINGS and the CXR_AIRFLOW_* variables override them."""

    schedule: str | None
    start_date: Any
    catchup: bool
    max_active_runs: int
    retries: int
    retry_delay_minutes: float
    gpu_pool: str | None
    registry_pool: str | None
    project_dir: str | None
    venv: str | None
    workspaces_dir: str | None
    keep_failed_workspaces: bool
    timeouts_minutes: dict[str, float]
    kubernetes: KubernetesSettings

    @property
    def project(self) -> Path:
        return Path(self.project_dir).expanduser() if self.project_dir else HERE.parent

    def start(self) -> datetime:
        try:
            when = datetime.fromisoformat(str(self.start_date))  # YAML may hand over a date
        except ValueError:
            raise ValueError(
                f"{SETTINGS_FILE.name}: start_date {self.start_date!r} is not an ISO date "
                f"(e.g. 2025-01-01); fix it or CXR_AIRFLOW_START_DATE"
            ) from None
        return when if when.tzinfo else when.replace(tzinfo=UTC)

    def timeout(self, task_id: str) -> timedelta | None:
        minutes = self.timeouts_minutes.get(task_id)
        return timedelta(minutes=float(minutes)) if minutes else None

    def validate(self) -> None:
        for key in ("max_active_runs", "retries", "retry_delay_minutes"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"setting '{key}' ({_ENV[key]}) must be a number >= 0, got {value!r}")
        self.start()

    def pool(self, task_id: str) -> str:
        """train waits for a GPU, register for the registry (one gate at a time); the rest run freely."""
        chosen = {"train": self.gpu_pool, "register": self.registry_pool}.get(task_id)
        return chosen or "default_pool"

    def on_kubernetes(self, task_id: str) -> bool:
        return task_id in self.kubernetes.tasks or "all" in self.kubernetes.tasks


_ENV = {  # settings key -> environment variable that overrides it
    "schedule": "CXR_AIRFLOW_SCHEDULE",
    "start_date": "CXR_AIRFLOW_START_DATE",
    "catchup": "CXR_AIRFLOW_CATCHUP",
    "max_active_runs": "CXR_AIRFLOW_MAX_ACTIVE_RUNS",
    "retries": "CXR_AIRFLOW_RETRIES",
    "retry_delay_minutes": "CXR_AIRFLOW_RETRY_DELAY_MINUTES",
    "gpu_pool": "CXR_AIRFLOW_GPU_POOL",
    "registry_pool": "CXR_AIRFLOW_REGISTRY_POOL",
    "project_dir": "CXR_PROJECT_DIR",
    "venv": "CXR_VENV",
    "workspaces_dir": "CXR_WORKSPACES_DIR",
    "keep_failed_workspaces": "CXR_KEEP_FAILED_WORKSPACES",
}
_K8S_ENV = {
    "tasks": "CXR_AIRFLOW_K8S_TASKS",
    "image": "CXR_TRAINER_IMAGE",
    "namespace": "CXR_K8S_NAMESPACE",
    "gpus": "CXR_K8S_GPUS",
    "cpu": "CXR_K8S_CPU",
    "memory": "CXR_K8S_MEMORY",
    "workspace_claim": "CXR_K8S_WORKSPACE_CLAIM",
    "workspace_path": "CXR_K8S_WORKSPACE_PATH",
    "secret": "CXR_K8S_SECRET",
    "service_account": "CXR_K8S_SERVICE_ACCOUNT",
}


def _as_bool(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


# how a variable's text becomes the setting; anything else is kept as text ("@weekly", "32Gi")
_PARSE = {
    "catchup": _as_bool,
    "keep_failed_workspaces": _as_bool,
    "max_active_runs": int,
    "retries": int,
    "retry_delay_minutes": float,
    "gpus": int,
    "tasks": lambda v: [t.strip() for t in v.split(",") if t.strip()],
}


def _from_env(raw: dict[str, Any], names: Mapping[str, str], env: Mapping[str, str]) -> None:
    for key, var in names.items():
        if var not in env:
            continue
        value = env[var].strip()
        if key not in ("tasks", "catchup", "keep_failed_workspaces") and value.lower() in ("", "null", "none"):
            raw[key] = None  # clears an optional setting: no schedule, default_pool, no Secret
            continue
        try:
            raw[key] = _PARSE.get(key, str)(value)
        except ValueError as e:
            raise ValueError(f"{var}={value!r}: {e}") from None


def _read_settings(path: Path) -> dict[str, Any]:
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"cannot read the DAG settings {path} ({e}); fix the file or CXR_AIRFLOW_SETTINGS") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: the DAG settings must be a mapping of setting: value")
    return loaded


def load_settings(env: Mapping[str, str] | None = None) -> DagSettings:
    """Settings from dags/cxr_dwml.yaml (every default), a file named by CXR_AIRFLOW_SETTINGS laid
    over it, then the environment."""
    env = os.environ if env is None else env
    raw = _read_settings(SETTINGS_FILE)
    k8s = dict(raw.pop("kubernetes", None) or {})
    raw["timeouts_minutes"] = dict(raw.get("timeouts_minutes") or {})
    path = SETTINGS_FILE
    if env.get("CXR_AIRFLOW_SETTINGS"):
        path = Path(env["CXR_AIRFLOW_SETTINGS"])
        over = _read_settings(path)
        k8s.update(over.pop("kubernetes", None) or {})
        raw["timeouts_minutes"].update(over.pop("timeouts_minutes", None) or {})
        raw.update(over)
    _from_env(raw, _ENV, env)
    _from_env(k8s, _K8S_ENV, env)
    for task_id in TASKS:
        var = f"CXR_AIRFLOW_TIMEOUT_{task_id.upper()}"
        if env.get(var):
            raw["timeouts_minutes"][task_id] = float(env[var])
    known = {f.name for f in dataclasses.fields(DagSettings)}
    unknown = sorted(set(raw) - known) + sorted(
        f"kubernetes.{k}" for k in set(k8s) - {f.name for f in dataclasses.fields(KubernetesSettings)}
    )
    if unknown:
        raise ValueError(f"{path}: unknown setting(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
    missing = sorted(known - set(raw) - {"kubernetes"}) + sorted(
        f"kubernetes.{f.name}" for f in dataclasses.fields(KubernetesSettings) if f.name not in k8s
    )
    if missing:
        raise ValueError(f"{SETTINGS_FILE}: setting(s) {', '.join(missing)} missing; the shipped file holds every one")
    settings = DagSettings(**raw, kubernetes=KubernetesSettings(**k8s))
    settings.validate()
    bad = sorted(set(settings.kubernetes.tasks) - {*TASKS, "all"})
    if bad:
        raise ValueError(
            f"kubernetes.tasks (CXR_AIRFLOW_K8S_TASKS) names unknown task(s) {bad}; "
            f"use task ids of {', '.join(TASKS)} or 'all'"
        )
    return settings


def composed_defaults(project: Path) -> dict[str, Any]:
    """What a run without conf uses for each DAG param: the project's params.yaml, composed from conf/
    with its profile (read as YAML only; nothing is composed at parse time)."""
    try:
        values = yaml.safe_load((project / "params.yaml").read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        values = {}
    out: dict[str, Any] = {}
    for name, key in PARAM_KEYS.items():
        node: Any = values
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        out[name] = node
    return out


def _typed(kind: str) -> list[str]:
    """A param's JSON type: optional, so the form does not mark it required; emptied, it is not sent."""
    return ["null", kind]


def _choices(values: list[Any], default: Any) -> dict[str, Any]:
    """An enum without a literal null choice, unless there is no default to show."""
    return {"enum": values if default is not None else [None, *values]}


def dag_params(project: Path, data_source: str | None = None) -> dict[str, Param]:
    """The trigger form: run conf accepted by the DAG, validated by Airflow against these JSON schemas
    at trigger time. Each field shows the value a run without conf uses (params.yaml's, or
    CXR_DATA_SOURCE for the source); `run_overrides` sends only what differs from params.yaml."""
    d = composed_defaults(project)
    if data_source:
        d["source"] = data_source
    profiles = sorted(p.stem for p in (project / "conf" / "profile").glob("*.yaml"))
    return {
        "profile": Param(
            d["profile"],
            description="The settings profile: conf/profile/<name>.yaml laid over conf/config.yaml "
            "(demo: the embedded synthetic data on a CPU; paper: NIH ChestX-ray14 at the paper's "
            "settings; scale: the full-size rehearsal). The fields below show params.yaml's values: "
            "those left as shown are not sent, so the profile chosen here keeps its own.",
            **(_choices(profiles, d["profile"]) if profiles else {"type": _typed("string")}),
        ),
        "source": Param(
            d["source"],
            type=_typed("string"),
            minLength=1,
            pattern=LITERAL,
            description="Where the download step reads the images and labels (download.source): "
            "synthetic, nih, s3://bucket/prefix, an https:// mirror or a folder.",
        ),
        "epochs": Param(
            d["epochs"],
            type=_typed("integer"),
            minimum=1,
            description="Training epochs (train.epochs); a retried train task resumes from its last finished epoch.",
        ),
        "batch_size": Param(
            d["batch_size"],
            type=_typed("integer"),
            minimum=1,
            maximum=4096,
            description="Images per optimisation step on each process (train.batch_size).",
        ),
        "head": Param(
            d["head"],
            description="The classifier head (train.model.head): metric, the method's label prototypes, "
            "or linear, the BCE baseline.",
            **_choices(["metric", "linear"], d["head"]),
        ),
        "loss": Param(
            d["loss"],
            description="The training loss (train.loss.name): dwml is the method's dual-weighted "
            "metric loss; the others are baselines.",
            **_choices(["dwml", "bce", "weighted_bce", "focal", "asl"], d["loss"]),
        ),
        "min_auc": Param(
            d["min_auc"],
            type=_typed("number"),
            minimum=0,
            maximum=1,
            description="The validation mean AUC a new version must reach to become the champion (register.min_auc).",
        ),
        "overrides": Param(
            None,
            type=["null", "object"],
            description="Any other params.yaml keys for this run, dotted, as a JSON object, e.g. "
            '{"train.optim.lr_head": 0.001}; a key here is always sent.',
            propertyNames={"pattern": r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$"},
            additionalProperties={"type": ["string", "number", "boolean", "null"], "pattern": LITERAL},
        ),
    }


def run_overrides(params: Mapping[str, Any], baseline: Mapping[str, Any]) -> str:
    """The run's params.yaml overrides as a JSON object of dotted keys (a Jinja filter of the DAG):
    each form field whose value differs from `baseline` (params.yaml's, `composed_defaults`), then
    `overrides` as given."""
    out = {
        key: params.get(name)
        for name, key in PARAM_KEYS.items()
        if params.get(name) is not None and params.get(name) != baseline.get(name)
    }
    out.update(params.get("overrides") or {})
    return json.dumps(out, sort_keys=True)


TASK_DOCS = {
    WORKSPACE: "Setup: the run's workspace, a git worktree of the project at its current commit sharing the "
    "project's DVC cache, starting from the last saved run's outputs, with the run's params.yaml composed "
    "once (profile and overrides from the conf). Cleared with any task of the run; a second call reuses it.",
    FINISH: "Teardown (runs whatever the stages did): a run whose stages all succeeded is saved as the DVC "
    "experiment `dag-<run id>` and its workspace removed; a failed run's workspace is kept for a cleared task "
    "to resume in (keep_failed_workspaces). Its state does not decide the run's.",
}


def stage_command(task_id: str) -> str:
    """The task's call of scripts/dvc_stage.py: `create` for the workspace task, else the task id."""
    command = "create" if task_id == WORKSPACE else task_id
    # exec: SIGTERM (a timeout, a task marked failed) reaches dvc_stage.py, which stops the stage in order
    return (
        f'set -eu; cd "$CXR_PROJECT_DIR"; export PATH="$CXR_VENV/bin:$PATH"; exec python scripts/dvc_stage.py {command}'
    )


def task_env(project: Path, venv: str | Path, settings: DagSettings, task_id: str) -> dict[str, str]:
    env = {
        "CXR_PROJECT_DIR": str(project),
        "CXR_VENV": str(venv),
        "CXR_RUN_ID": "{{ run_id }}",
        "CXR_KEEP_FAILED_WORKSPACES": str(settings.keep_failed_workspaces).lower(),
        "PYTHONUNBUFFERED": "1",
    }
    if settings.workspaces_dir:
        env["CXR_WORKSPACES_DIR"] = settings.workspaces_dir
    if task_id == WORKSPACE:  # the run's params are composed once, when its workspace is made
        env["CXR_RUN_OVERRIDES"] = "{{ params | cxr_overrides }}"
    return env


def local_task(task_id: str, settings: DagSettings, **kwargs: Any):
    """The step as a local process (TaskFlow's bash task): the command's last line is its XCom."""
    project = settings.project

    # Airflow's environment plus ours; Airflow adds AIRFLOW_CTX_DAG_ID, _DAG_RUN_ID, _TRY_NUMBER, ...
    # which pipeline/tracking/ turns into MLflow run tags
    @task.bash(
        task_id=task_id,
        env=task_env(project, settings.venv or project / ".venv", settings, task_id),
        append_env=True,
        skip_on_exit_code=None,  # exit 99 must fail the task like any other error, not skip it
        **kwargs,
    )
    def step() -> str:
        return stage_command(task_id)

    return step().operator


def pod_task(task_id: str, settings: DagSettings, **kwargs: Any):
    """The step as a pod of the training image; imported only when a task is sent to Kubernetes.
    The pod mounts the claim holding the project checkout; the run's workspace is a folder of it."""
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
    from kubernetes.client import models as k8s

    cfg = settings.kubernetes
    env = task_env(Path(cfg.workspace_path), cfg.venv, settings, task_id)
    # a pod does not inherit the task's AIRFLOW_CTX_* variables: pass them for the MLflow tags
    env.update(
        {
            "AIRFLOW_CTX_DAG_ID": "{{ dag.dag_id }}",
            "AIRFLOW_CTX_DAG_RUN_ID": "{{ run_id }}",
            "AIRFLOW_CTX_TASK_ID": "{{ task.task_id }}",
            "AIRFLOW_CTX_TRY_NUMBER": "{{ ti.try_number }}",
        }
    )
    gpu = task_id == "train" and cfg.gpus > 0
    resources = k8s.V1ResourceRequirements(
        requests={"cpu": cfg.cpu, "memory": cfg.memory} if task_id == "train" else {"cpu": "1", "memory": "4Gi"},
        limits={"memory": cfg.memory, **({"nvidia.com/gpu": str(cfg.gpus)} if gpu else {})},
    )
    return KubernetesPodOperator(
        task_id=task_id,
        name=f"cxr-dwml-{task_id}",
        namespace=cfg.namespace,
        image=cfg.image,
        cmds=["bash", "-c"],
        arguments=[stage_command(task_id)],
        env_vars=env,
        env_from=[k8s.V1EnvFromSource(secret_ref=k8s.V1SecretEnvSource(name=cfg.secret))] if cfg.secret else None,
        container_resources=resources,
        volumes=[
            k8s.V1Volume(
                name="workspace",
                persistent_volume_claim=k8s.V1PersistentVolumeClaimVolumeSource(claim_name=cfg.workspace_claim),
            ),
            # the DataLoader workers share batches through /dev/shm, which is 64 MiB in a pod by default
            k8s.V1Volume(name="dshm", empty_dir=k8s.V1EmptyDirVolumeSource(medium="Memory")),
        ],
        volume_mounts=[
            k8s.V1VolumeMount(name="workspace", mount_path=cfg.workspace_path),
            k8s.V1VolumeMount(name="dshm", mount_path="/dev/shm"),
        ],
        node_selector=cfg.node_selector or None,
        tolerations=[k8s.V1Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")] if gpu else None,
        service_account_name=cfg.service_account,
        startup_timeout_seconds=cfg.startup_timeout_seconds,
        get_logs=True,
        # register's decision (scripts/dvc_stage.py writes it to /airflow/xcom/return.json) for the champion task
        do_xcom_push=task_id == "register",
        on_finish_action="delete_succeeded_pod",
        **kwargs,
    )


def build_dag(settings: DagSettings):
    """The DAG for `settings` (a function, so tests can build variants without touching the env)."""
    project = settings.project
    metrics = Asset(name="cxr_dwml_metrics", uri="cxr-dwml://reports/metrics")
    champion = Asset(name="cxr_dwml_champion", uri="cxr-dwml://model/champion")
    outlets = {"evaluate": [metrics]}

    @dag(
        dag_id=DAG_ID,
        schedule=settings.schedule,
        start_date=settings.start(),
        catchup=settings.catchup,
        max_active_runs=settings.max_active_runs,
        params=dag_params(project, os.environ.get("CXR_DATA_SOURCE") or None),
        user_defined_filters={"cxr_overrides": functools.partial(run_overrides, baseline=composed_defaults(project))},
        default_args={
            "retries": settings.retries,
            "retry_delay": timedelta(minutes=settings.retry_delay_minutes),
        },
        tags=["cxr-dwml", "ml", "dvc"],
        doc_md=__doc__,
    )
    def cxr_dwml():
        tasks = {}
        for task_id in TASKS:
            # a pod reaches the run's workspace on the claim; the workspace and finish tasks run where
            # the stages run when every task goes to Kubernetes
            make = pod_task if settings.on_kubernetes(task_id) else local_task
            tasks[task_id] = make(
                task_id,
                settings,
                execution_timeout=settings.timeout(task_id),
                outlets=outlets.get(task_id, []),
                pool=settings.pool(task_id),
                doc_md=TASK_DOCS.get(task_id, f"`dvc repro --single-item {task_id}` in the run's workspace"),
            )
        for task_id, upstream in STAGES.items():
            for up in upstream or (WORKSPACE,):
                tasks[up] >> tasks[task_id]
        tasks["register"] >> announce_champion(champion) >> tasks[FINISH]
        tasks[FINISH].as_teardown(setups=tasks[WORKSPACE])

    return cxr_dwml()


def parse_champion_xcom(xcom: Any) -> dict[str, Any]:
    """The register task's decision: its XCom, the `[dvc_stage] champion: {...}` line a local task
    ends with (or the object a pod's XCom file holds)."""
    if isinstance(xcom, dict):
        return xcom
    prefix = "[dvc_stage] champion: "
    if not isinstance(xcom, str) or not xcom.startswith(prefix):
        raise ValueError(
            f"the register task's XCom is {xcom!r}, not its '{prefix}{{...}}' line: was register run by "
            "scripts/dvc_stage.py? Clear the register task to run it again"
        )
    return json.loads(xcom[len(prefix) :])


def announce_champion(champion: Asset):
    """The `champion` task: the asset event for a champion that moved, skipped otherwise."""

    @task(
        task_id="champion",
        outlets=[champion],
        doc_md="Updates the asset `cxr_dwml_champion` when, and only when, this run's register step "
        "moved the champion alias; the event's extra holds the model, version, previous champion and "
        "validation mean AUC. Skipped (no event) when the gate kept the champion or register was "
        "skipped as unchanged.",
    )
    def champion_task(*, ti=None, outlet_events=None) -> dict[str, Any]:
        from airflow.sdk.exceptions import AirflowSkipException

        change = parse_champion_xcom(ti.xcom_pull(task_ids="register"))
        if not change.get("champion_moved"):
            raise AirflowSkipException(f"the champion did not move: {change.get('reason')}")
        outlet_events[champion].extra = change
        print(f"new champion: {change['model_name']} v{change['version']} (was {change['previous_champion']})")
        return change

    return champion_task()


cxr_dwml = build_dag(load_settings())
