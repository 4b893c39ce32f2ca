"""What the train and ablate components share: their checked inputs and the MLflow metric logger."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.classes import CLASSES
from pipeline.data.layout import CACHE_DIR, CACHE_INDEX, CLASS_COUNTS, MANIFEST
from pipeline.io import file_digest

PROTOTYPES = "prototypes.npy"  # in the prototypes step's output folder


def load_prototypes(folder: Path) -> np.ndarray:
    """The (C, E) label vectors the prototypes step wrote into `folder`."""
    path = folder / PROTOTYPES
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run the prototypes step first (dvc repro prototypes)")
    vectors = np.load(path)
    if vectors.ndim != 2 or vectors.shape[0] != len(CLASSES):
        raise ValueError(f"{path} has shape {vectors.shape}; expected ({len(CLASSES)}, E): rerun the prototypes step")
    return vectors


def input_digests(prepared: Path, protos: Path) -> dict[str, str]:
    """Digest of each input file a training run reads, by path: part of its resume fingerprint."""
    names = [prepared / MANIFEST, prepared / CLASS_COUNTS, prepared / CACHE_DIR / CACHE_INDEX, protos / PROTOTYPES]
    return {str(p): file_digest(p) for p in names if p.exists()}


def mlflow_logger():
    """A `log(metrics, step)` for the training loop that logs into the active MLflow run."""
    import mlflow

    def log(metrics: dict, step: int) -> None:
        mlflow.log_metrics({k.replace("/", "_"): float(v) for k, v in metrics.items()}, step=step)

    return log
