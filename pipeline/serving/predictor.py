"""The MLflow pyfunc: images in, 14 probabilities, thresholded labels, drift and error columns out.

Preprocessing (8-bit grayscale, resize to the training cache size, centre crop), the network, the
label prototypes, the class names, the calibration and the validation thresholds (on the calibrated
probabilities) and the drift reference all travel inside the logged model:
    model = mlflow.pyfunc.load_model("models:/cxr-dwml@champion")
    model.predict(pd.DataFrame({"image": [png_bytes, ...]}))
The pyfunc's signature is one column `image` (`signature`): pass a DataFrame whose `image` column
holds PNG/JPEG/DICOM bytes or uint8 arrays (H, W) / (H, W, 3|4); in JSON for `mlflow models serve`,
base64 text of the bytes, alone or as {"b64": "<text>"}, in any of MLflow's request formats
(DICOM needs pydicom where the model is served). A null row is a row error, not a failed batch.
`Predictor` and `CxrDwmlModel.predict` themselves also take a plain list of those or a uint8 ndarray
(N, H, W) / (H, W); MLflow's schema check rejects those before they reach the pyfunc.

Where the model looked, on request: `model.predict(df, params={"explain": True, "explain_top_k": 3})`
adds a column `explanation`, per row a JSON list over its `explain_top_k` most probable findings
(none for 0) of {"class", "probability", "gradcam", "prototype"}: Grad-CAM and the prototype-distance map
(`pipeline.evaluation.explain`) as base64 PNG overlays on the network's input (prototype null for a linear
head; the whole cell null for a row with an error). Without the flag the output is unchanged.

Each row is scored on its own. The output has one row per input row, in order: the 14 class
probabilities (calibrated when the model was registered with a calibration: its metadata says
`calibrated`), `labels` ("A|B", or "No Finding"), and, for a model whose bundle holds a drift
reference (`pipeline.serving.drift`), `drift_image` and `drift_embedding` (the image's distances from the
training data), `image_width` and `image_height` (its size as sent) and `drift` (a one-line warning
naming each distance over its threshold and a size or aspect ratio outside the training images',
null for an image like the training images); then `error`, null for a scored row. A row that
cannot be decoded (not an image, truncated, a decompression bomb, DICOM without pydicom) does not
fail the batch: its probabilities and labels are null and `error` says, in one line, which row
(0-based, in the order sent) and why, e.g. "row 2: too_large: Image size (900000000 pixels)
exceeds limit of 178956970 pixels, ...". No traceback reaches the answer.
"""

from __future__ import annotations

import base64
import json
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from pipeline.models import ModelBundle

BUNDLE, THRESHOLDS, CALIBRATION = "bundle", "thresholds", "calibration"
LABELS_COLUMN = "labels"
ERROR_COLUMN = "error"
EXPLANATION_COLUMN = "explanation"
# The pyfunc's params (names and defaults, in its signature): explanations are off unless asked for.
PARAMS = {"explain": False, "explain_top_k": 3}
DRIFT_COLUMNS = ("drift_image", "drift_embedding")
SIZE_COLUMNS = ("image_width", "image_height")  # as sent, before the resize: the drift check's size rule
DRIFT_WARNING_COLUMN = "drift"
MAX_ERROR_CHARS = 300


class MissingImage(ValueError):
    """A row without an image: null in a JSON request, None or NaN in a DataFrame."""


def decode_input(value: Any, size: int | None = None) -> np.ndarray:
    """One `image` value -> (H, W) uint8 at its own size, or (size, size), decoded as the prepare step
    decodes its files.

    `value`: PNG/JPEG/DICOM bytes; their base64 text, alone or as {"b64": text} (the convention of
    TF Serving's JSON for binary values); or a uint8 array (H, W) / (H, W, 3|4); see
    `pipeline.data.images.decode_image`.

    Raises:
        MissingImage: for None or NaN.
        ValueError, OSError, ImportError: as `decode_image`, or for text that is not base64.
    """
    from pipeline.data.images import decode_image

    if value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value)):
        raise MissingImage("null instead of an image")
    if isinstance(value, dict):
        if set(value) != {"b64"} or not isinstance(value["b64"], str):
            raise ValueError(f'an object in `image` must be {{"b64": "<base64 text>"}}, got keys {sorted(value)}')
        value = value["b64"]
    if isinstance(value, str):
        try:
            value = base64.b64decode(value)
        except ValueError as e:
            raise ValueError(f"neither image bytes nor valid base64 text of them ({e})") from None
    if not isinstance(value, (bytes, bytearray, memoryview)):
        value = np.asarray(value)
    return decode_image(value, size)


def row_error(index: int, exc: BaseException) -> str:
    """One line saying why input row `index` could not be scored: `row <i>: <reason>: <detail>`.

    The reasons are those of `pipeline.data.images.classify_error` (unreadable, too_large,
    truncated, corrupt), plus unsupported for DICOM without pydicom and missing for a null row.
    """
    from pipeline.data.images import classify_error

    if isinstance(exc, ImportError):
        reason, detail = "unsupported", str(exc)
    elif isinstance(exc, MissingImage):
        reason, detail = "missing", str(exc)
    else:
        reason, detail = classify_error(exc)
        if reason == "unreadable":
            detail = "not a PNG, JPEG or DICOM image (nor base64 text of one)"
        elif reason in ("too_large", "truncated") or type(exc) is ValueError:
            detail = str(exc) or type(exc).__name__
    detail = " ".join(detail.split())
    if len(detail) > MAX_ERROR_CHARS:
        detail = detail[: MAX_ERROR_CHARS - 3] + "..."
    return f"row {index}: {reason}: {detail}"


def as_image_list(model_input: Any) -> list[Any]:
    """The `image` values of a DataFrame, a {"image": ...} dict, an (N, H, W) / (H, W) array or a list."""
    if isinstance(model_input, pd.DataFrame):
        if "image" not in model_input.columns:
            raise ValueError(f"input DataFrame needs an 'image' column; got {list(model_input.columns)}")
        images = list(model_input["image"])
        # MLflow's server makes {"image": [text, ...]} (`inputs`, or `instances` of plain strings) ONE
        # row holding the list; a list of strings is never one image, so it is the rows that were sent
        if len(images) == 1 and isinstance(images[0], list) and all(isinstance(v, str) for v in images[0]):
            return images[0]
        return images
    if isinstance(model_input, np.ndarray):
        return [model_input] if model_input.ndim == 2 else list(model_input)
    if isinstance(model_input, dict) and "image" in model_input:
        return list(np.atleast_1d(model_input["image"]))
    return list(model_input)


class Predictor:
    """The network and its preprocessing, usable with or without MLflow."""

    def __init__(
        self, bundle: ModelBundle, thresholds: dict[str, float], device: str = "cpu", calibration=None
    ) -> None:
        """`device`: a torch device string, or "auto" for the first GPU when there is one;
        `calibration`: a `pipeline.evaluation.calibration.Calibration` the probabilities go through (None: raw
        sigmoid scores). `thresholds` must be on the scale of those probabilities. The input size
        comes from the bundle (`image_size`, `crop_size`), never from a default."""
        from pipeline.data.dataset import eval_transform
        from pipeline.inference import resolve_device
        from pipeline.models import model_from_bundle
        from pipeline.serving import drift

        self.classes = list(bundle.classes)
        self.image_size = bundle.image_size
        self.crop_size = bundle.crop_size
        self.crop = eval_transform(self.crop_size)
        self._explainer = None  # built on the first request for explanations
        self.device = resolve_device(device)
        self.model = model_from_bundle(bundle, self.device)
        self.thresholds = np.array([thresholds.get(c, 0.5) for c in self.classes])
        if calibration is not None and list(calibration.classes) != self.classes:
            raise ValueError(f"the calibration's classes {list(calibration.classes)} differ from the model's")
        self.calibration = calibration
        self.drift = drift.from_bundle(bundle)

    def _tensor(self, value: Any):
        """One input value -> (1, crop, crop) uint8 tensor, as evaluation preprocesses."""
        return self._decoded(value)[0]

    def _decoded(self, value: Any):
        """One input value -> its (1, crop, crop) uint8 tensor and its own (width, height)."""
        import torch

        from pipeline.data.images import decode_image

        pixels = decode_input(value)  # (H, W) at its own size, which the drift check's size rule reads
        square = decode_image(pixels, self.image_size)  # the same pixels as decoding straight to the size
        return self.crop(torch.from_numpy(square).unsqueeze(0)), (pixels.shape[1], pixels.shape[0])

    def _batch(self, batch: list) -> tuple[np.ndarray, dict[str, np.ndarray] | None]:
        """Probabilities (B, C), calibrated when the model has a calibration, and the drift
        distances (per kind, (B,)) of decoded images, from one forward pass."""
        import torch

        from pipeline.evaluation.calibration import sigmoid
        from pipeline.serving import drift

        x = torch.stack(batch)  # (B, 1, crop, crop) uint8
        z, pooled, stats = drift.features(self.model, x, self.device)  # (B, C), (B, F), (B, S)
        probs = sigmoid(z) if self.calibration is None else self.calibration.probabilities(z)
        return probs, None if self.drift is None else self.drift.distances(stats, pooled)

    def probabilities(self, images: list[Any], batch_size: int = 64) -> np.ndarray:
        """(N, C) probabilities; the first image that cannot be decoded raises."""
        out = [
            self._batch([self._tensor(v) for v in images[i : i + batch_size]])[0]
            for i in range(0, len(images), batch_size)
        ]
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)))

    def score(self, images: list[Any], batch_size: int = 64) -> pd.DataFrame:
        """Each image scored on its own: see `frame`; a row that cannot be decoded gets `error`."""
        probs = np.full((len(images), len(self.classes)), np.nan)
        distances = {k: np.full(len(images), np.nan) for k in ("image", "embedding")}
        sizes = np.full((len(images), 2), np.nan)  # (N, 2) width, height as sent
        errors: list[str | None] = [None] * len(images)
        for start in range(0, len(images), batch_size):
            rows, batch = [], []
            for i in range(start, min(start + batch_size, len(images))):
                try:
                    tensor, sizes[i] = self._decoded(images[i])
                    batch.append(tensor)
                    rows.append(i)
                except Exception as e:  # one bad row must not cost the others their scores
                    errors[i] = row_error(i, e)
            if batch:
                probs[rows], found = self._batch(batch)
                for kind, d in (found or {}).items():
                    distances[kind][rows] = d
        if self.drift is None:
            return self.frame(probs, errors)
        return self.frame(probs, errors, distances, sizes)

    def explanations(self, images: list[Any], scored: pd.DataFrame, top_k: int) -> list[str | None]:
        """Per row of `score`'s output, the JSON text of its `top_k` findings' maps (see the module doc):
        null for a row with an error, "[]" for every scored row when `top_k` is 0."""
        import torch

        from pipeline.evaluation.explain import explainer, overlay_base64

        if top_k == 0:  # no maps asked for: no explainer to build, no backward pass
            return [None if e is not None else "[]" for e in scored[ERROR_COLUMN]]
        if self._explainer is None:
            self._explainer = explainer(self.model, self.crop_size)
        out: list[str | None] = []
        for value, (_, row) in zip(images, scored.iterrows()):
            if row[ERROR_COLUMN] is not None:
                out.append(None)
                continue
            probs = row[self.classes].to_numpy(dtype=np.float64)
            top = np.argsort(-probs, kind="stable")[:top_k]
            image = self._tensor(value)  # (1, crop, crop) uint8, what the network saw
            maps = self._explainer.maps(image[None], torch.as_tensor(top)[None])
            grey = image[0].numpy()
            findings = []
            for k, c in enumerate(top):
                proto = maps["prototype"]
                findings.append(
                    {
                        "class": self.classes[c],
                        "probability": float(probs[c]),
                        "gradcam": overlay_base64(grey, maps["gradcam"][0, k].cpu().numpy()),
                        "prototype": None if proto is None else overlay_base64(grey, proto[0, k].cpu().numpy()),
                    }
                )
            out.append(json.dumps(findings))
        return out

    def frame(
        self,
        probs: np.ndarray,
        errors: list[str | None] | None = None,
        distances: dict[str, np.ndarray] | None = None,
        sizes: np.ndarray | None = None,
    ) -> pd.DataFrame:
        """The pyfunc's output: the class probabilities, `labels`, the drift columns (with
        `distances`, per kind (N,), and `sizes`, (N, 2) width and height) and `error`, one row per image.

        Rows with an error have null (None) probabilities, labels and drift values, so a JSON answer
        holds `null` there, never NaN; those columns are then of object dtype.
        """
        errors = [None] * len(probs) if errors is None else list(errors)
        df = pd.DataFrame(probs, columns=self.classes)
        positive = probs >= self.thresholds
        labels = ["|".join(c for c, p in zip(self.classes, row) if p) or "No Finding" for row in positive]
        df[LABELS_COLUMN] = pd.Series(labels, dtype=object)
        if distances is not None:
            for column, kind in zip(DRIFT_COLUMNS, ("image", "embedding")):
                df[column] = distances[kind]
            if sizes is not None:
                for column, values in zip(SIZE_COLUMNS, np.asarray(sizes).T):
                    df[column] = np.nan_to_num(values).astype(np.int64)  # NaN only in error rows, nulled below
            warnings = self.drift.image_warnings(distances, sizes)
            df[DRIFT_WARNING_COLUMN] = pd.Series(warnings, dtype=object)
        bad = [i for i, e in enumerate(errors) if e is not None]
        if bad:
            df = df.astype(object)
            df.loc[bad, [c for c in df.columns if c != LABELS_COLUMN]] = None
            df.loc[bad, LABELS_COLUMN] = None
        df[ERROR_COLUMN] = pd.Series(errors, dtype=object)
        return df


def signature(example_in: pd.DataFrame, example_out: pd.DataFrame):
    """The pyfunc's MLflow signature: the input column `image` of any type, the output columns of
    `example_out`, and PARAMS.

    `image` is not declared binary: for a binary column MLflow's server base64-decodes
    `dataframe_split`/`dataframe_records` values itself and answers the whole request with a 400 when
    one of them is null, and in `instances`/`inputs` it passes the base64 text on as bytes (and
    {"b64": ...} as the bytes of its repr). Declared as any value, each row reaches `decode_input` as
    it was sent, and a row that is not an image is that row's error.
    """
    from mlflow.models import ModelSignature, infer_signature
    from mlflow.types.schema import AnyType, ColSpec, Schema

    inferred = infer_signature(example_in, example_out, params=PARAMS)
    return ModelSignature(Schema([ColSpec(AnyType(), "image")]), inferred.outputs, inferred.params)


def invalid_param(message: str) -> Exception:
    """The exception for a bad request param: MLflow's INVALID_PARAMETER_VALUE, so its server answers
    400 with `message` and no stack trace (a ValueError becomes a 400 carrying a traceback)."""
    try:
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
    except ImportError:
        return ValueError(message)
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def read_calibration(path: str | None):
    """The `pipeline.evaluation.calibration.Calibration` saved at `path` (evaluate's calibration.json), or None."""
    if path is None:
        return None
    from pipeline.evaluation.calibration import Calibration

    with open(path, encoding="utf-8") as f:
        return Calibration.from_json(json.load(f), source=str(path))


try:
    from mlflow.pyfunc import PythonModel
except ImportError:  # serving without MLflow installed still has Predictor
    PythonModel = object  # type: ignore[misc,assignment]


class CxrDwmlModel(PythonModel):
    """MLflow pyfunc wrapper around Predictor."""

    def load_context(self, context) -> None:
        """Read the model's artifacts; the bundle through `ModelBundle.load`, which runs nothing in it."""
        from pipeline.models import ModelBundle

        bundle = ModelBundle.load(context.artifacts[BUNDLE])
        with open(context.artifacts[THRESHOLDS], encoding="utf-8") as f:
            thresholds = json.load(f)["thresholds"]
        self.predictor = Predictor(bundle, thresholds, "auto", read_calibration(context.artifacts.get(CALIBRATION)))

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """One output row per input row; an undecodable row gets `error` instead of failing the batch.

        MLflow passes the DataFrame its signature describes (one `image` column); called directly,
        `model_input` may also be a list or an array of images (`as_image_list`). The DataFrame
        type hint tells MLflow to validate the input against the logged signature, not to infer a
        schema from the hint. `params` {"explain": true, "explain_top_k": k} adds the `explanation`
        column (an empty list per scored row for k = 0).
        """
        images = as_image_list(model_input)
        scored = self.predictor.score(images)
        params = {**PARAMS, **(params or {})}
        if params["explain"]:
            top_k = int(params["explain_top_k"])
            if top_k < 0:
                raise invalid_param(f"params explain_top_k must be 0 (no maps) or more, got {top_k}")
            scored[EXPLANATION_COLUMN] = pd.Series(self.predictor.explanations(images, scored, top_k), dtype=object)
        return scored
