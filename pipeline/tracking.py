"""MLflow set-up: tracking URI, experiment, linked runs, parameters.

Default store: `sqlite:///<repo>/mlflow.db` with artifacts in `<repo>/mlartifacts`, browsed with
`mlflow ui --backend-store-uri sqlite:///mlflow.db`. `MLFLOW_TRACKING_URI` points elsewhere
(e.g. `http://mlflow:5000`, a tracking server with PostgreSQL and S3 behind it).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .io import read_json, write_json

RUN_FILE = "mlflow_run.json"


def default_tracking_uri(root: str | Path = ".") -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(root).resolve() / 'mlflow.db'}"


def setup(experiment: str, root: str | Path = ".") -> str:
    """Point MLflow at the configured store and select (or create) `experiment`; returns its id."""
    import mlflow

    uri = default_tracking_uri(root)
    mlflow.set_tracking_uri(uri)
    found = mlflow.get_experiment_by_name(experiment)
    if found is not None:
        exp_id = found.experiment_id
    else:
        # A local store keeps artifacts beside mlflow.db so `mlflow ui` run from the repo finds them.
        location = (Path(root).resolve() / "mlartifacts").as_uri() if uri.startswith("sqlite") else None
        exp_id = mlflow.create_experiment(experiment, artifact_location=location)
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}, for mlflow.log_params."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def log_params(params: Mapping[str, Any], prefix: str = "") -> None:
    import mlflow

    flat = {k: str(v)[:6000] for k, v in flatten(params, prefix).items()}
    items = list(flat.items())
    for i in range(0, len(items), 100):  # MLflow caps one batch at 100 params
        mlflow.log_params(dict(items[i : i + 100]))


def save_run_ref(out_dir: str | Path, run: Any) -> None:
    """Record which MLflow run produced an output folder, so later steps can link or resume it."""
    write_json(
        Path(out_dir) / RUN_FILE,
        {
            "run_id": run.info.run_id,
            "experiment_id": run.info.experiment_id,
            "tracking_uri": redacted_uri(),
        },
    )


def load_run_ref(out_dir: str | Path) -> dict[str, Any] | None:
    path = Path(out_dir) / RUN_FILE
    return read_json(path) if path.exists() else None


def redacted_uri() -> str:
    import mlflow

    uri = mlflow.get_tracking_uri()
    # user:password@host must never reach a tracked file
    if "@" in uri and "://" in uri:
        scheme, rest = uri.split("://", 1)
        uri = f"{scheme}://***@{rest.split('@', 1)[1]}"
    return uri
