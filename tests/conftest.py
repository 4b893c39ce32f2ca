"""Shared fixtures: a throwaway copy of the repository configured for a tiny, fast demo run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent

# Small enough for a CPU test run, large enough that every split holds every common class.
TINY_PARAMS = {
    "download": {"synthetic": {"num_images": 360, "num_patients": 150, "image_size": 64, "seed": 7}},
    "prepare": {"image_size": 32, "workers": 1},
    "train": {
        "epochs": 2,
        "batch_size": 32,
        "eval_batch_size": 128,
        "log_every": 2,
        "model": {"embed_dim": 32, "hidden_dim": 64},
        "augment": {"crop_size": 32},
    },
    # ~17 validation patients: a class needs one positive and one negative patient to be in a mean
    "evaluate": {"bootstrap_resamples": 100, "min_positive_patients": 1},
    "register": {"min_auc": 0.0, "bootstrap_resamples": 100},
}


def deep_update(base: dict, overlay: dict) -> dict:
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            deep_update(base[key], value)
        else:
            base[key] = value
    return base


def copy_repo(dest: Path, params_overlay: dict | None = None) -> Path:
    """The tracked files of this repository in `dest`, as a fresh git repo with `dvc init` done."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.split()
    for rel in files:
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    (dest / "dvc.lock").unlink(missing_ok=True)
    # the overlay goes into conf/ (what every composition starts from), then params.yaml is composed
    conf_path = dest / "conf" / "config.yaml"
    conf = yaml.safe_load(conf_path.read_text())
    deep_update(conf, params_overlay if params_overlay is not None else TINY_PARAMS)
    conf_path.write_text(yaml.safe_dump(conf, sort_keys=False))
    from components.params import compose

    (dest / "params.yaml").write_text(compose(dest)[0])
    git = ["git", "-c", "user.email=test@example.invalid", "-c", "user.name=test"]
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run([*git, "add", "-A"], cwd=dest, check=True)
    subprocess.run([*git, "commit", "-qm", "snapshot"], cwd=dest, check=True)
    return dest


def settings(section: str, changes: dict | None = None, /, **fields):
    """The committed params.yaml's `section` (dotted, e.g. "train.loss") with dotted `changes`."""
    from pipeline.config import load_params

    node = load_params(ROOT / "params.yaml")
    for part in section.split("."):
        node = getattr(node, part)
    return node.replace(changes, at=section, **fields) if changes or fields else node


def run_env(repo: Path, **extra: str) -> dict[str, str]:
    """Environment for subprocesses: the venv first on PATH, MLflow inside the copy, offline hub."""
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{repo / 'mlflow.db'}"
    env["HF_HUB_OFFLINE"] = "1"
    env["PYTHONPATH"] = str(repo)
    env.pop("CXR_DEBUG", None)
    env.update(extra)
    return env


@pytest.fixture
def demo_repo(tmp_path: Path) -> Path:
    return copy_repo(tmp_path / "repo")


def tiny_bundle(path: Path, size: int = 32, **model_changes):
    """Save an untrained test-sized metric-head model as best.pt holds it (`size` px images); returns
    the network, in eval mode. `model_changes`: dotted `train.model` settings, e.g. backbone.name."""
    import numpy as np
    import torch

    from pipeline.classes import CLASSES
    from pipeline.models import build_model

    torch.manual_seed(0)
    cfg = settings("train.model", {"embed_dim": 16, "hidden_dim": 32, **model_changes})
    text_vectors = np.random.default_rng(0).normal(size=(len(CLASSES), 16)).astype(np.float32)
    net = build_model(cfg, text_vectors).eval()
    bundle = {
        "classes": list(CLASSES),
        "model_config": cfg.model_dump(),
        "model_state": net.state_dict(),
        "text_vectors": text_vectors,
        "image_size": size,
        "crop_size": size,
    }
    torch.save(bundle, path)
    return net
