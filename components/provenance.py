"""Where a run or a model version came from: the orchestrator's context, the git commit, the data hash.

The library takes these as plain tags; only the components read them from Airflow's environment,
git and dvc.lock.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

# Airflow exports these to every task's environment; they make a run traceable to its DAG run.
AIRFLOW_ENV_TAGS = {
    "AIRFLOW_CTX_DAG_ID": "airflow.dag_id",
    "AIRFLOW_CTX_DAG_RUN_ID": "airflow.run_id",
    "AIRFLOW_CTX_TASK_ID": "airflow.task_id",
    "AIRFLOW_CTX_TRY_NUMBER": "airflow.try_number",
    "AIRFLOW_CTX_LOGICAL_DATE": "airflow.logical_date",
}
UNKNOWN = "unknown"
# names one pipeline execution by hand: every step run with the same value nests under one parent
PIPELINE_RUN_ENV = "CXR_PIPELINE_RUN"
# DVC sets this in the environment of every stage command it runs
DVC_STAGE_ENV = "DVC_STAGE"


def airflow_tags(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """`airflow.*` tags from the AIRFLOW_CTX_* variables set in `environ` (default: this process's)."""
    environ = os.environ if environ is None else environ
    return {tag: environ[env] for env, tag in AIRFLOW_ENV_TAGS.items() if environ.get(env)}


def run_tags(step: str, profile: str, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The tags of a component's MLflow run: its step and profile, and the Airflow context when there is one."""
    return {"cxr.step": step, "cxr.profile": profile, **airflow_tags(environ)}


def pipeline_tags(profile: str, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The tags of a pipeline execution's parent run: the profile, the commit, and the Airflow DAG
    run when there is one (not its task or try: those belong to the steps' runs)."""
    execution = {k: v for k, v in airflow_tags(environ).items() if k not in ("airflow.task_id", "airflow.try_number")}
    return {"cxr.profile": profile, "cxr.git_commit": git_commit(), **execution}


def git_commit(cwd: str | Path = ".") -> str:
    """HEAD's commit in `cwd`, or 'unknown' outside a git checkout (or without git)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10, check=False
        )
        return out.stdout.strip() or UNKNOWN
    except (OSError, subprocess.SubprocessError):
        return UNKNOWN


def dvc_data_hash(lock_path: str | Path = "dvc.lock", stage: str = "prepare") -> str:
    """md5s DVC recorded in `lock_path` for `stage`'s outputs, comma-joined ('unknown' without them)."""
    import yaml

    path = Path(lock_path)
    if not path.exists():
        return UNKNOWN
    lock = yaml.safe_load(path.read_text()) or {}
    outs = lock.get("stages", {}).get(stage, {}).get("outs", [])
    return ",".join(o.get("md5", "") for o in outs if o.get("md5")) or UNKNOWN


def data_hash(md5s: str) -> str:
    """One short name for the prepared data: the first 16 hex digits of sha256 over `dvc_data_hash`'s
    md5s ('unknown' stays 'unknown'). The full md5s go to registration.json."""
    import hashlib

    return md5s if md5s == UNKNOWN else hashlib.sha256(md5s.encode()).hexdigest()[:16]


def version_provenance(root: str | Path = ".", md5s: str | None = None) -> dict[str, str]:
    """Tags naming the code and the prepared data a model version was made from, read in `root`;
    `md5s`: `dvc_data_hash` when the caller has read it already."""
    root = Path(root)
    md5s = dvc_data_hash(root / "dvc.lock") if md5s is None else md5s
    return {"git_commit": git_commit(root), "data_hash": data_hash(md5s)}


@dataclass(frozen=True)
class PipelineRun:
    """One pipeline execution: `key` finds its parent MLflow run (tag `cxr.pipeline_run`), `name`
    is that run's name, what the list of runs shows for the execution."""

    key: str
    name: str


def pipeline_run(environ: Mapping[str, str] | None = None) -> PipelineRun | None:
    """The pipeline execution this process is a step of, or None for a component run on its own.

    In order: CXR_PIPELINE_RUN (set by hand or by a script: its value is the key); the Airflow DAG
    run (AIRFLOW_CTX_DAG_ID and _DAG_RUN_ID: every task of one DAG run, retries included); the
    `dvc repro` (or `dvc exp run`) that runs this stage (DVC_STAGE set): that dvc process, by host,
    process id and start time, so the stages of one `dvc repro` share a parent and the next
    `dvc repro` gets its own.
    """
    environ = os.environ if environ is None else environ
    if environ.get(PIPELINE_RUN_ENV):
        key = _safe(environ[PIPELINE_RUN_ENV])
        return PipelineRun(key, f"pipeline {key}")
    if environ.get("AIRFLOW_CTX_DAG_RUN_ID"):
        run_id = _safe(environ["AIRFLOW_CTX_DAG_RUN_ID"])
        return PipelineRun(f"airflow:{_safe(environ.get('AIRFLOW_CTX_DAG_ID', ''))}:{run_id}", f"dag {run_id}")
    if environ.get(DVC_STAGE_ENV):
        found = _dvc_process()
        if found is not None:
            pid, started = found
            name = f"pipeline {datetime.fromtimestamp(started):%Y-%m-%d %H:%M:%S}"
            if environ.get("DVC_EXP_NAME"):
                name += f" (experiment {_safe(environ['DVC_EXP_NAME'])})"
            return PipelineRun(f"dvc:{_safe(socket.gethostname())}:{pid}:{started:.2f}", name)
    return None


def _dvc_process() -> tuple[int, float] | None:
    """(pid, start time) of the nearest `dvc` process above this one, or None."""
    import psutil

    try:
        for proc in psutil.Process().parents():
            argv = proc.cmdline()
            if any(Path(a).name in ("dvc", "dvc.exe") for a in argv[:2]) or argv[1:3] == ["-m", "dvc"]:
                return proc.pid, proc.create_time()
    except psutil.Error:  # a parent that exited or that we may not inspect: no execution to nest under
        return None
    return None


def _safe(text: str) -> str:
    """`text` with anything but letters, digits and `_.:+-@/` made `_`: a tag value a search can quote."""
    return re.sub(r"[^\w.:+\-@/]", "_", text.strip())[:200]
