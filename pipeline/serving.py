"""The MLflow pyfunc: images in, 14 probabilities and thresholded labels out.

Preprocessing (8-bit grayscale, resize to the training cache size, centre crop), the network, the
label prototypes, the class names and the validation thresholds all travel inside the logged model:
    model = mlflow.pyfunc.load_model("models:/cxr-dwml@champion")
    model.predict(pd.DataFrame({"image": [png_bytes, ...]}))
The pyfunc's signature is one binary column `image`: pass a DataFrame whose `image` column holds
PNG/JPEG/DICOM bytes or uint8 arrays (H, W) / (H, W, 3|4) (base64 text in JSON for `mlflow models serve`;
DICOM needs pydicom where the model is served).
`Predictor` and `CxrDwmlModel.predict` themselves also take a plain list of those or a uint8 ndarray
(N, H, W) / (H, W); MLflow's schema check rejects those before they reach the pyfunc.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import numpy as np
import pandas as pd

BUNDLE, THRESHOLDS = "bundle", "thresholds"
LABELS_COLUMN = "labels"


def decode_input(value: Any, size: int) -> np.ndarray:
    """One `image` value -> (size, size) uint8, decoded as the prepare step decodes its files.

    `value`: PNG/JPEG/DICOM bytes, their base64 text, or a uint8 array (H, W) / (H, W, 3|4); see
    `pipeline.data.images.decode_image`.
    """
    from pipeline.data.images import decode_image

    if isinstance(value, str):
        value = base64.b64decode(value)
    if not isinstance(value, (bytes, bytearray, memoryview)):
        value = np.asarray(value)
    return decode_image(value, size)


def as_image_list(model_input: Any) -> list[Any]:
    if isinstance(model_input, pd.DataFrame):
        if "image" not in model_input.columns:
            raise ValueError(f"input DataFrame needs an 'image' column; got {list(model_input.columns)}")
        return list(model_input["image"])
    if isinstance(model_input, np.ndarray):
        return [model_input] if model_input.ndim == 2 else list(model_input)
    if isinstance(model_input, dict) and "image" in model_input:
        return list(np.atleast_1d(model_input["image"]))
    return list(model_input)


class Predictor:
    """The network and its preprocessing, usable with or without MLflow."""

    def __init__(self, bundle: dict, thresholds: dict[str, float], device: str = "cpu") -> None:
        """`device`: a torch device string, or "auto" for the first GPU when there is one."""
        from pipeline.data.dataset import eval_transform
        from pipeline.inference import resolve_device
        from pipeline.models import model_from_bundle

        self.classes = list(bundle["classes"])
        self.image_size = int(bundle.get("image_size", bundle.get("crop_size", 224)))
        self.crop = eval_transform(int(bundle.get("crop_size", self.image_size)))
        self.device = resolve_device(device)
        self.model = model_from_bundle(bundle, self.device)
        self.thresholds = np.array([thresholds.get(c, 0.5) for c in self.classes])

    def probabilities(self, images: list[Any], batch_size: int = 64) -> np.ndarray:
        import torch

        from pipeline.inference import probabilities

        out = []
        for i in range(0, len(images), batch_size):
            batch = [
                self.crop(torch.from_numpy(decode_input(v, self.image_size)).unsqueeze(0))
                for v in images[i : i + batch_size]
            ]
            out.append(probabilities(self.model, torch.stack(batch), self.device))  # (B, C)
        return np.concatenate(out).astype(np.float64) if out else np.zeros((0, len(self.classes)))

    def frame(self, probs: np.ndarray) -> pd.DataFrame:
        df = pd.DataFrame(probs, columns=self.classes)
        positive = probs >= self.thresholds
        df[LABELS_COLUMN] = ["|".join(c for c, p in zip(self.classes, row) if p) or "No Finding" for row in positive]
        return df


try:
    from mlflow.pyfunc import PythonModel
except ImportError:  # serving without MLflow installed still has Predictor
    PythonModel = object  # type: ignore[misc,assignment]


class CxrDwmlModel(PythonModel):
    """MLflow pyfunc wrapper around Predictor."""

    def load_context(self, context) -> None:
        from pipeline.io import load_checkpoint

        bundle = load_checkpoint(context.artifacts[BUNDLE])
        with open(context.artifacts[THRESHOLDS], encoding="utf-8") as f:
            thresholds = json.load(f)["thresholds"]
        self.predictor = Predictor(bundle, thresholds, "auto")

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        images = as_image_list(model_input)
        return self.predictor.frame(self.predictor.probabilities(images))
