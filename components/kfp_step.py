"""The steps as a Kubeflow Pipelines task runs them: KFP's artifact folders mapped onto the same
component commands `dvc repro` and the Airflow DAG run (kubeflow/cxr_dwml.py calls these).

A KFP task has no project checkout to work in, only the image and the folders KFP hands it for its
input and output artifacts. So each step here:
- composes the run's params.yaml from the project's conf/ (CXR_PROJECT_DIR, the image's project
  folder) with the run's profile and `--set`-style overrides, by the composition DVC and the DAG use
  (`components.params.compose`): a wrong key or value fails the step with one line naming it;
- runs the component's own `main` (what `python -m components.<step>` runs) in a scratch folder
  that sees only that params.yaml and conf/, with the artifact folders as its paths;
- writes nothing into the project folder, and refuses to run without MLFLOW_TRACKING_URI: a task's
  container is discarded afterwards, so a store inside it would be lost with every run and model.

This module imports no KFP: the training image runs it, and what KFP's artifact types need
(metrics, a ROC curve) it returns as plain values.
"""

from __future__ import annotations

import importlib
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from components.common import run_main
from components.params import PARAMS, PROFILE_KEY, compose, override_strings, parse_sets
from pipeline.config import ConfigError
from pipeline.io import read_json
from pipeline.tracking import STORE_ROOT_ENV

STEPS = ("download", "prepare", "prototypes", "train", "evaluate", "register")
PROJECT_ENV = "CXR_PROJECT_DIR"
# points on the ROC curve a KFP ClassificationMetrics artifact holds (the UI draws them all)
ROC_POINTS = 200


class StepError(RuntimeError):
    """The task cannot run as given; the message says what to set."""


def project_dir() -> Path:
    """The project whose conf/ the params are composed from: CXR_PROJECT_DIR (the training image
    sets it), else the working directory."""
    root = Path(os.environ.get(PROJECT_ENV) or Path.cwd()).resolve()
    if not (root / "conf").is_dir():
        raise StepError(f"{root}/conf not found: set {PROJECT_ENV} to the project folder (the image's /opt/cxr-dwml)")
    return root


def compose_params(root: Path, profile: str, overrides: Sequence[str]) -> str:
    """params.yaml's text for this run: conf/ with `profile` ('' = conf's own) and `key=value` overrides."""
    if isinstance(overrides, str) or not all(isinstance(item, str) for item in overrides):
        raise ConfigError(f'overrides {overrides!r}: give a list of key=value strings, e.g. ["train.epochs=2"]')
    values = parse_sets(overrides)
    if PROFILE_KEY in values:
        raise ConfigError("override 'profile': choose the profile with the pipeline parameter `profile`")
    if profile:
        values = {PROFILE_KEY: profile, **values}
    text, _ = compose(root, override_strings(values))
    return text


def run_step(step: str, profile: str, overrides: Sequence[str], paths: dict[str, str]) -> None:
    """Run component `step` on the run's params with `paths` ({option: folder}, e.g. {"out": ...}).

    Raises:
        SystemExit: with the component's exit status when it fails (its one-line error printed).
    """
    if step not in STEPS:
        raise ValueError(f"step {step!r} is not one of {', '.join(STEPS)}")
    module = importlib.import_module(f"components.{step}")

    def main(argv: list[str] | None) -> int:
        root = project_dir()
        text = compose_params(root, profile, overrides)  # before anything else: a bad override fails first
        _check_tracking_store()
        with tempfile.TemporaryDirectory(prefix=f"cxr-{step}-") as scratch:
            work = Path(scratch)
            (work / "conf").symlink_to(root / "conf", target_is_directory=True)
            (work / PARAMS).write_text(text, encoding="utf-8")
            args = ["--params", str(work / PARAMS), "--no-progress"]
            for option, value in paths.items():
                args += [f"--{option}", os.path.abspath(value)]  # the step runs in the scratch folder
            if step == "prepare":  # the resumable cache build, published into the output as links or copies
                args += ["--work", str(work / "prepared-work")]
            cwd = Path.cwd()
            os.chdir(work)  # the component checks its profile against ./conf, as in the project
            try:
                return module.main(args) or 0
            finally:
                os.chdir(cwd)

    code = run_main(step, main, [])
    if code:
        raise SystemExit(code)


def _check_tracking_store() -> None:
    """MLFLOW_TRACKING_URI must name a store that outlives the task; a SQLite store (kfp.local, a
    shared volume) keeps its artifacts beside the database, as the project's own store does, not in
    the step's scratch folder."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise StepError(
            "MLFLOW_TRACKING_URI is not set: a KFP task's container is discarded after the step, so the "
            "tracking store must be a server (or a shared database); put it in the pipeline's Secret"
        )
    if uri.startswith("sqlite:"):
        database = Path(uri.removeprefix("sqlite:///"))
        if not uri.startswith("sqlite:///") or not database.is_absolute():
            raise StepError(
                f"MLFLOW_TRACKING_URI {uri} is not an absolute sqlite:////path: the step runs in a scratch "
                "folder that is removed afterwards"
            )
        os.environ.setdefault(STORE_ROOT_ENV, str(database.parent))


def register(profile: str, overrides: Sequence[str], prepared: str, model: str, reports: str) -> Path:
    """The register step on a private copy of evaluate's reports (an input artifact is read-only:
    register writes the model card and its decision beside them); returns that folder."""
    out = Path(tempfile.mkdtemp(prefix="cxr-register-reports-"))
    shutil.copytree(reports, out, dirs_exist_ok=True)
    run_step(
        "register",
        profile,
        overrides,
        {"model": model, "reports": str(out), "prepared": prepared, "out": str(out / "registration.json")},
    )
    return out


def registration_metadata(registration: str | Path) -> dict:
    """What the register step decided, from its registration.json, as the artifact's metadata:
    whether it moved the champion alias, to which version, from which (the DAG's champion event)."""
    from components.register import champion_change

    return {k: v for k, v in champion_change(read_json(Path(registration))).items() if v is not None}


def headline_metrics(reports: str | Path) -> dict[str, float]:
    """evaluate's metrics.json as KFP metric values: the mean AUCs with their interval, mean AP, F1,
    and each class's test AUC (a class without one is left out)."""
    metrics = read_json(Path(reports) / "metrics.json")
    low, high = metrics["mean_auc_ci"]
    values = {
        "test_mean_auc": metrics["mean_auc"],
        "test_mean_auc_ci_low": low,
        "test_mean_auc_ci_high": high,
        "val_mean_auc": metrics["val_mean_auc"],
        "test_mean_ap": metrics["mean_average_precision"],
        "test_mean_f1": metrics["mean_f1"],
    }
    values.update({f"test_auc_{c}": auc for c, auc in metrics["per_class_auc"].items()})
    return {k: float(v) for k, v in values.items() if v is not None}


def pooled_roc(
    reports: str | Path, prepared: str | Path, points: int = ROC_POINTS
) -> tuple[list[float], list[float], list[float]]:
    """(fpr, tpr, thresholds) of the ROC curve over every (test image, finding) pair: the raw scores
    of evaluate's predictions/test.parquet against the prepared manifest's labels. The one curve a
    KFP ClassificationMetrics artifact holds for a multi-label model (the per-class curves are
    evaluate's plots), thinned to about `points`."""
    import numpy as np
    import pandas as pd
    from sklearn.metrics import roc_curve

    from pipeline.classes import CLASSES
    from pipeline.data.layout import MANIFEST

    scores = pd.read_parquet(Path(reports) / "predictions" / "test.parquet")
    labels = pd.read_csv(Path(prepared) / MANIFEST, usecols=["image", *CLASSES]).set_index("image")
    y = labels.loc[scores["image"], list(CLASSES)].to_numpy().ravel()  # (N * C,)
    fpr, tpr, thresholds = roc_curve(y, scores[list(CLASSES)].to_numpy().ravel())
    keep = np.unique(np.linspace(0, len(fpr) - 1, min(points, len(fpr))).round().astype(int))
    # the first threshold is +inf (no pair called positive), which JSON cannot hold
    thresholds = np.minimum(thresholds, 1.0)
    return fpr[keep].tolist(), tpr[keep].tolist(), thresholds[keep].tolist()
