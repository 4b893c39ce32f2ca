"""The model as MLflow logs it: a pyfunc built from code (no pickle), with its artifacts and pins.

`log_pyfunc` logs the network bundle, the validation thresholds and the optional calibration as
artifacts of `pyfunc_model.py`, the file MLflow runs to rebuild the model; the whole `pipeline`
package travels with it, so a version loads with the code it was logged with. `weights_digest`
identifies the network's weights whatever else the bundle holds.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd


def example_png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def log_pyfunc(
    bundle_path: Path, thresholds_path: Path, example: bytes, name: str = "model", calibration_path: Path | None = None
):
    """Log the pyfunc into the active run; returns MLflow's ModelInfo.

    With `calibration_path` (evaluate's calibration.json) the model serves calibrated
    probabilities; the thresholds file must say which probabilities its thresholds apply to, and
    that must match. The model's metadata records `calibration` (the method) and `calibrated`.
    """
    import mlflow

    from ..models import ModelBundle
    from ..serving import predictor as serving

    calibration = serving.read_calibration(None if calibration_path is None else str(calibration_path))
    _check_threshold_scale(thresholds_path, calibration, calibration_path)
    bundle = ModelBundle.load(bundle_path)
    predictor = serving.Predictor(bundle, _read_thresholds(thresholds_path), calibration=calibration)
    example_in = pd.DataFrame({"image": [example]})
    example_out = predictor.score([example])
    artifacts = {serving.BUNDLE: str(bundle_path), serving.THRESHOLDS: str(thresholds_path)}
    if calibration_path is not None:
        artifacts[serving.CALIBRATION] = str(calibration_path)
    method = calibration.method if calibration is not None else "none"
    code = Path(__file__).resolve().parents[1]  # the pipeline package travels with the model
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=str(Path(__file__).with_name("pyfunc_model.py")),  # models from code: no pickle
        artifacts=artifacts,
        code_paths=[str(code)],
        signature=serving.signature(example_in, example_out),
        input_example=example_in,
        pip_requirements=_requirements(),
        metadata={"calibration": method, "calibrated": method != "none", "drift_check": predictor.drift is not None},
    )


def _check_threshold_scale(thresholds_path: Path, calibration, calibration_path: Path | None) -> None:
    """The thresholds must be on the scale the model will serve: calibrated by this calibration, or raw."""
    data = json.loads(Path(thresholds_path).read_text())
    expected = calibration.method if calibration is not None else "none"
    stated = data.get("calibration", "none")  # a thresholds file from before calibration: raw scores
    if stated != expected:
        raise ValueError(
            f"{thresholds_path} holds thresholds for {stated!r}-calibrated probabilities, but the model would "
            f"serve {expected!r} ({calibration_path or 'no calibration file'}): pass the calibration.json "
            "written by the same evaluate run"
        )


def weights_digest(bundle_path: Path) -> str:
    """sha256 of the network's weights in a model bundle (`best.pt`): every tensor of its
    `model_state` by name, with its dtype and shape. The same weights give the same digest whatever
    else the file holds (the epoch, the settings fingerprint) and however torch laid the file out."""
    import torch

    from ..models import ModelBundle

    state = ModelBundle.load(bundle_path, mmap=True).model_state
    h = hashlib.sha256()
    for name in sorted(state):
        value = state[name]
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous().reshape(-1)
            h.update(f"{name}|{t.dtype}|{tuple(value.shape)}|".encode())
            h.update(t.view(torch.uint8).numpy().tobytes())
        else:  # a module's extra state
            h.update(f"{name}|{value!r}|".encode())
    return h.hexdigest()


def _read_thresholds(path: Path) -> dict[str, float]:
    return json.loads(Path(path).read_text())["thresholds"]


def _requirements() -> list[str]:
    from importlib.metadata import version

    from ..data.dicom import PACKAGES as DICOM  # DICOM requests decode where the model is served

    names = ["torch", "torchvision", "timm", "numpy", "pandas", "pillow", "pyarrow", "mlflow", *DICOM]
    pins = []
    for n in names:
        try:
            pins.append(f"{n}=={version(n).split('+')[0]}")
        except Exception:
            pins.append(n)
    return pins
