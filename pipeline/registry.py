"""Model registration and the gated promotion (aliases `challenger` and `champion`, never stages).

Every new version gets `challenger`. `champion` moves to it only if (a) its test mean AUC clears an
absolute floor and (b) a paired bootstrap on both models' test predictions says it beats the
current champion by at least `margin` (p-value of "not better by margin" <= max_p_value). A failed
gate is a decision, not an error: it is recorded in tags and in registration.json.
"""

from __future__ import annotations

import io
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .classes import CLASSES
from .metrics import paired_bootstrap_delta

CHALLENGER, CHAMPION = "challenger", "champion"
PREDICTIONS_ARTIFACT = "evaluation/predictions/test.parquet"


@dataclass
class RegisterConfig:
    """`register` in params.yaml."""

    model_name: str = "cxr-dwml"
    min_auc: float = 0.55
    margin: float = 0.0
    max_p_value: float = 0.05
    bootstrap_resamples: int = 1000
    seed: int = 0

    def validate(self) -> None:
        if not self.model_name.strip():
            raise ValueError("model_name is empty")
        if not 0 < self.max_p_value <= 1:
            raise ValueError("max_p_value must be in (0, 1]")


def git_commit(cwd: str | Path = ".") -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def dvc_data_hash(lock_path: str | Path = "dvc.lock", stage: str = "prepare") -> str:
    """md5 of the prepared data recorded by DVC for `stage`'s outputs ('unknown' outside DVC)."""
    import yaml

    path = Path(lock_path)
    if not path.exists():
        return "unknown"
    lock = yaml.safe_load(path.read_text()) or {}
    outs = lock.get("stages", {}).get(stage, {}).get("outs", [])
    return ",".join(o.get("md5", "") for o in outs if o.get("md5")) or "unknown"


def example_png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def log_pyfunc(bundle_path: Path, thresholds_path: Path, example: bytes, name: str = "model"):
    """Log the pyfunc into the active run; returns MLflow's ModelInfo."""
    import mlflow
    from mlflow.models import infer_signature

    from . import serving

    predictor = serving.Predictor(_torch_load(bundle_path), _read_thresholds(thresholds_path))
    example_in = pd.DataFrame({"image": [example]})
    example_out = predictor.frame(predictor.probabilities([example]))
    code = Path(__file__).resolve().parent  # the pipeline package travels with the model
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=serving.CxrDwmlModel(),
        artifacts={serving.BUNDLE: str(bundle_path), serving.THRESHOLDS: str(thresholds_path)},
        code_paths=[str(code)],
        signature=infer_signature(example_in, example_out),
        input_example=example_in,
        pip_requirements=_requirements(),
    )


def register(model_uri: str, cfg: RegisterConfig, tags: dict[str, str]):
    """A new version of `cfg.model_name` with `tags`, aliased `challenger`."""
    import mlflow
    from mlflow import MlflowClient

    version = mlflow.register_model(model_uri, cfg.model_name, tags=tags)
    MlflowClient().set_registered_model_alias(cfg.model_name, CHALLENGER, version.version)
    return version


def champion(client, name: str):
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except Exception:  # MlflowException RESOURCE_DOES_NOT_EXIST: no champion yet
        return None


def decide(cfg: RegisterConfig, y: np.ndarray, ours: pd.DataFrame, mean_auc: float | None,
           champ_predictions: pd.DataFrame | None, champ_version: str | None) -> dict[str, Any]:
    """The promotion decision and its numbers (pure: no MLflow calls)."""
    decision: dict[str, Any] = {"floor": cfg.min_auc, "margin": cfg.margin, "max_p_value": cfg.max_p_value,
                                "mean_auc": mean_auc, "champion_version": champ_version}
    if mean_auc is None or not mean_auc >= cfg.min_auc:
        return {**decision, "promote": False, "reason": f"mean AUC {mean_auc} is below the floor {cfg.min_auc}"}
    if champ_version is None:
        return {**decision, "promote": True, "reason": "no champion yet and the floor is met"}
    if champ_predictions is None:  # never replace a champion without comparing against it
        return {**decision, "promote": False,
                "reason": f"champion v{champ_version} has no {PREDICTIONS_ARTIFACT} in its run to compare "
                          f"against; promote manually if intended (python -m components.promote)"}
    merged = ours.merge(champ_predictions, on="image", suffixes=("", "_champion"))
    if len(merged) != len(ours):
        return {**decision, "promote": False,
                "reason": f"champion v{champ_version} was evaluated on another test set "
                          f"({len(merged)} of {len(ours)} images shared); promote manually if intended"}
    champ_scores = merged[[f"{c}_champion" for c in CLASSES]].to_numpy()
    our_scores = merged[list(CLASSES)].to_numpy()
    y_aligned = y[ours.set_index("image").index.get_indexer(merged["image"])]
    test = paired_bootstrap_delta(y_aligned, champ_scores, our_scores, cfg.bootstrap_resamples, seed=cfg.seed,
                                  margin=cfg.margin)
    numbers = {"delta": test["delta"], "delta_ci": [test["low"], test["high"]], "p_value": test["p_value"],
               "champion_mean_auc": test["mean_auc_a"]}
    better = test["delta"] > cfg.margin and test["p_value"] <= cfg.max_p_value
    reason = (f"beats champion v{champ_version} by {test['delta']:+.4f} (p={test['p_value']:.3f})" if better else
              f"does not beat champion v{champ_version} by > {cfg.margin} with p <= {cfg.max_p_value} "
              f"(delta {test['delta']:+.4f}, p={test['p_value']:.3f})")
    return {**decision, **numbers, "promote": bool(better), "reason": reason}


def champion_predictions(client, version) -> pd.DataFrame | None:
    """The champion's test predictions, logged by its evaluate step into its training run."""
    import tempfile

    import mlflow

    if not version.run_id:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(run_id=version.run_id, artifact_path=PREDICTIONS_ARTIFACT,
                                                       dst_path=tmp)
        except Exception:  # MlflowException or OSError: the run has no such artifact
            return None
        return pd.read_parquet(path)


def apply_decision(client, name: str, version: str, decision: dict[str, Any]) -> None:
    if decision["promote"]:
        client.set_registered_model_alias(name, CHAMPION, version)
    client.set_model_version_tag(name, version, "gate.promoted", str(decision["promote"]).lower())
    client.set_model_version_tag(name, version, "gate.reason", decision["reason"][:5000])
    for key in ("delta", "delta_ci", "p_value", "champion_version", "champion_mean_auc", "floor", "margin",
                "max_p_value"):
        if decision.get(key) is not None:
            value = decision[key]
            client.set_model_version_tag(name, version, f"gate.{key}",
                                         json.dumps(value) if isinstance(value, list) else str(value))


def set_alias(name: str, alias: str, version: str) -> None:
    """Manual promotion or rollback: point `alias` at `version`."""
    from mlflow import MlflowClient

    client = MlflowClient()
    client.get_model_version(name, version)  # raises a clear MLflow error for a missing version
    client.set_registered_model_alias(name, alias, version)


def _torch_load(path: Path) -> dict:
    import torch

    return torch.load(path, map_location="cpu", weights_only=False)


def _read_thresholds(path: Path) -> dict[str, float]:
    return json.loads(Path(path).read_text())["thresholds"]


def _requirements() -> list[str]:
    from importlib.metadata import version

    names = ["torch", "torchvision", "timm", "numpy", "pandas", "pillow", "pyarrow", "mlflow"]
    pins = []
    for n in names:
        try:
            pins.append(f"{n}=={version(n).split('+')[0]}")
        except Exception:
            pins.append(n)
    return pins
