"""Model files (`best.pt`, `last.pt`): the typed, versioned bundle round-trips, and no loader ever
runs what a file holds. A crafted torch file whose unpickling would create a marker file is given
to every reader (the library's, the evaluate and predict commands, the served pyfunc): each
refuses it in one line naming the file, and the marker never appears. Training resume (`last.pt`)
is checked in test_training.py.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.classes import CLASSES
from pipeline.models import BundleError, ModelBundle, load_bundle
from tests.conftest import ROOT, crafted_checkpoint, run_env, settings, tiny_bundle

UNSAFE = "nothing in it was run"


def one_line_error(result: subprocess.CompletedProcess, step: str) -> str:
    """The single `cxr-dwml <step>: error:` line of a failed command (no traceback)."""
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith(f"cxr-dwml {step}: error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return lines[0]


def png(path: Path, size: int = 32) -> Path:
    pixels = np.random.default_rng(0).integers(0, 256, (size, size), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buf, format="PNG")
    path.write_bytes(buf.getvalue())
    return path


# ----------------------------------------------------------------------------- the bundle itself


def test_a_bundle_round_trips_with_its_drift_reference_as_arrays(tmp_path: Path) -> None:
    tiny_bundle(tmp_path / "best.pt")
    bundle = ModelBundle.load(tmp_path / "best.pt")
    reference = {"image": {"mean": np.arange(3.0), "precision": np.eye(3)}, "alarm_rate": np.float64(0.01)}
    bundle.replace(drift_reference=reference).save(tmp_path / "again.pt")
    again = ModelBundle.load(tmp_path / "again.pt")
    assert (again.classes, again.image_size, again.crop_size) == (tuple(CLASSES), 32, 32)
    assert again.model_config == bundle.model_config and again.text_vectors.dtype == np.float32
    np.testing.assert_array_equal(again.text_vectors, bundle.text_vectors)
    assert again.model_state.keys() == bundle.model_state.keys()
    assert isinstance(again.drift_reference["image"]["precision"], np.ndarray)
    np.testing.assert_array_equal(again.drift_reference["image"]["precision"], np.eye(3))
    assert again.drift_reference["alarm_rate"] == 0.01


def _saved(path: Path, **changes) -> Path:
    """best.pt as this version writes it, with top-level keys of the file changed (None: removed)."""
    tiny_bundle(path)
    data = ModelBundle.load(path).to_file()
    for key, value in changes.items():
        if value is None:
            data.pop(key)
        else:
            data[key] = value
    torch.save(data, path)
    return path


def test_a_version_2_bundle_loads_as_the_network_it_was(tmp_path: Path) -> None:
    """Bundles written before `train.model.projector` existed: the metric head had its MLP
    projection and the linear head none; they load so, with the same weights and outputs."""
    path = tmp_path / "best.pt"
    tiny_bundle(path)
    bundle = ModelBundle.load(path)
    assert bundle.model_config.head == "metric" and bundle.model_config.projector == "mlp"
    data = bundle.to_file()
    data["format_version"] = 2
    data["model_config"] = {k: v for k, v in data["model_config"].items() if k != "projector"}
    torch.save(data, tmp_path / "v2.pt")
    old = ModelBundle.load(tmp_path / "v2.pt")
    assert old.model_config == bundle.model_config
    x = torch.rand(2, 1, old.crop_size, old.crop_size)
    with torch.no_grad():
        assert torch.equal(load_bundle(tmp_path / "v2.pt")[0](x), load_bundle(path)[0](x))
    data["model_config"]["head"] = "linear"
    torch.save(data, tmp_path / "v2_linear.pt")
    with pytest.raises(ValueError, match="its weights do not fit this version.s model"):  # refused, not guessed
        load_bundle(tmp_path / "v2_linear.pt")
    assert ModelBundle.load(tmp_path / "v2_linear.pt").model_config.projector == "identity"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"format_version": 4},
            r"best\.pt is a model bundle of format version 4; this version of cxr-dwml reads versions 2 and 3",
        ),
        ({"format": None, "format_version": None}, r"best\.pt is not a versioned model bundle"),
        ({"image_size": None}, r"best\.pt: model bundle without 'image_size'"),
        ({"crop_size": 0}, r"best\.pt: model bundle with a malformed field \(crop_size must be a positive integer"),
        ({"model_config": {"head": "metric"}}, r"best\.pt: model_config: missing key 'backbone'"),
    ],
    ids=["newer-version", "unversioned", "no-input-size", "bad-crop", "old-settings"],
)
def test_a_bundle_of_another_version_or_without_its_input_size_is_refused_in_one_line(
    tmp_path: Path, changes: dict, message: str
) -> None:
    """Evaluation (load_bundle) and serving (the pyfunc) refuse it alike: no 224-px fallback."""
    from mlflow.pyfunc import PythonModelContext

    from pipeline.serving.predictor import BUNDLE, THRESHOLDS, CxrDwmlModel

    path = _saved(tmp_path / "best.pt", **changes)
    (tmp_path / "thresholds.json").write_text(json.dumps({"thresholds": dict.fromkeys(CLASSES, 0.5)}))
    context = PythonModelContext({BUNDLE: str(path), THRESHOLDS: str(tmp_path / "thresholds.json")}, {})
    for load in (lambda: load_bundle(path), lambda: CxrDwmlModel().load_context(context)):
        with pytest.raises(BundleError, match=message) as caught:
            load()
        assert "\n" not in str(caught.value) and "retrain it with this version" in str(caught.value)


def test_a_bundle_written_by_an_older_version_is_refused_without_unpickling(tmp_path: Path) -> None:
    """The untyped dict earlier versions wrote: numpy arrays, which the weights-only loader refuses."""
    tiny_bundle(tmp_path / "new.pt")
    new = ModelBundle.load(tmp_path / "new.pt")
    old = {
        "model_state": new.model_state,
        "model_config": new.model_config.model_dump(),
        "text_vectors": new.text_vectors,  # a numpy array
        "classes": list(CLASSES),
        "crop_size": 32,
    }
    torch.save(old, tmp_path / "best.pt")
    with pytest.raises(RuntimeError) as caught:
        ModelBundle.load(tmp_path / "best.pt")
    line = str(caught.value)
    assert "\n" not in line and f"checkpoint {tmp_path / 'best.pt'} was not loaded" in line
    assert "numpy" in line and "older version of cxr-dwml" in line and UNSAFE in line and "rerun the train step" in line


# ----------------------------------------------------------------------------- crafted files


def test_no_library_reader_runs_a_crafted_bundle(tmp_path: Path) -> None:
    """load_checkpoint, the bundle, evaluate's and the train step's loaders, the served pyfunc and
    the registry's weights digest: each refuses the file in one line; nothing runs."""
    from mlflow.pyfunc import PythonModelContext

    from pipeline.io import load_checkpoint
    from pipeline.registry.packaging import weights_digest
    from pipeline.serving import drift
    from pipeline.serving.predictor import BUNDLE, THRESHOLDS, CxrDwmlModel

    marker = tmp_path / "marker"
    path = crafted_checkpoint(tmp_path / "best.pt", marker)
    (tmp_path / "thresholds.json").write_text(json.dumps({"thresholds": dict.fromkeys(CLASSES, 0.5)}))
    context = PythonModelContext(
        artifacts={BUNDLE: str(path), THRESHOLDS: str(tmp_path / "thresholds.json")}, model_config={}
    )
    readers = {
        "load_checkpoint": lambda: load_checkpoint(path),
        "load_checkpoint mmap": lambda: load_checkpoint(path, mmap=True),
        "ModelBundle.load": lambda: ModelBundle.load(path),
        "load_bundle": lambda: load_bundle(path),
        "attach_reference": lambda: drift.attach_reference(path, tmp_path, settings("train.drift"), 0, "cpu", 8),
        "weights_digest": lambda: weights_digest(path),
        "pyfunc load_context": lambda: CxrDwmlModel().load_context(context),
    }
    for name, read in readers.items():
        with pytest.raises(RuntimeError) as caught:
            read()
        line = str(caught.value)
        assert "\n" not in line and str(path) in line and UNSAFE in line, (name, line)
        assert "posix.system" in line, (name, line)
        assert not marker.exists(), name


def test_evaluate_refuses_a_crafted_bundle_in_one_line(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    crafted_checkpoint(tmp_path / "model" / "best.pt", marker)
    result = subprocess.run(
        [sys.executable, "-m", "components.evaluate", "--params", str(ROOT / "params.yaml"), "--no-mlflow"]
        + ["--model", str(tmp_path / "model"), "--prepared", str(tmp_path / "prepared"), "--out", str(tmp_path / "r")],
        cwd=tmp_path,
        env=run_env(ROOT),
        capture_output=True,
        text=True,
        timeout=600,
    )
    line = one_line_error(result, "evaluate")
    assert f"{tmp_path / 'model' / 'best.pt'} was not loaded" in line and UNSAFE in line, line
    assert not marker.exists() and not (tmp_path / "r").exists()


def test_predict_refuses_a_logged_model_whose_bundle_was_replaced(tmp_path: Path) -> None:
    """A model folder as MLflow logs it, its best.pt swapped for a crafted one: `predict` stops in
    one line naming the file, writes no predictions, and runs nothing."""
    import mlflow

    from pipeline.registry.packaging import log_pyfunc

    tiny_bundle(tmp_path / "files" / "best.pt")
    (tmp_path / "files" / "thresholds.json").write_text(json.dumps({"thresholds": dict.fromkeys(CLASSES, 0.5)}))
    image = png(tmp_path / "film.png")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    try:
        experiment = mlflow.create_experiment("crafted", artifact_location=(tmp_path / "mlruns").as_uri())
        with mlflow.start_run(experiment_id=experiment):
            info = log_pyfunc(
                tmp_path / "files" / "best.pt", tmp_path / "files" / "thresholds.json", image.read_bytes()
            )
        folder = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp_path / "model")))
    finally:
        mlflow.set_tracking_uri(None)
    (bundle,) = folder.rglob("best.pt")
    marker = tmp_path / "marker"
    crafted_checkpoint(bundle, marker)
    out = tmp_path / "predictions.csv"
    result = subprocess.run(
        [sys.executable, "-m", "components.predict", "--model", str(folder), str(image), "--out", str(out)],
        cwd=tmp_path,
        env=run_env(tmp_path, PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=600,
    )
    line = one_line_error(result, "predict")
    assert "best.pt was not loaded" in line and UNSAFE in line and "posix.system" in line, line
    assert not marker.exists() and not out.exists()
