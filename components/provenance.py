"""Where a run or a model version came from: the orchestrator's context, the git commit, the data hash.

The library takes these as plain tags; only the components read them from Airflow's environment,
git and dvc.lock.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping
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


def airflow_tags(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """`airflow.*` tags from the AIRFLOW_CTX_* variables set in `environ` (default: this process's)."""
    environ = os.environ if environ is None else environ
    return {tag: environ[env] for env, tag in AIRFLOW_ENV_TAGS.items() if environ.get(env)}


def run_tags(step: str, profile: str, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The tags of a component's MLflow run: its step and profile, and the Airflow context when there is one."""
    return {"cxr.step": step, "cxr.profile": profile, **airflow_tags(environ)}


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


def version_provenance(root: str | Path = ".") -> dict[str, str]:
    """Tags naming the code and the prepared data a model version was made from, read in `root`."""
    root = Path(root)
    return {"git_commit": git_commit(root), "dvc_data_hash": dvc_data_hash(root / "dvc.lock")}
