"""The served pyfunc's `predict` on its own, with a tiny untrained model: one result per input row.

A batch mixing good images with garbage bytes, a decompression-bomb PNG and bad base64 is scored
row by row; the bad rows carry a one-line `error` naming the row, and the good rows score exactly
as they do alone. The JSON MLflow's server makes of the answer is checked with MLflow's own
encoder (the REST path itself is exercised by the slow test in test_serving.py).
"""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.classes import CLASSES
from pipeline.serving.predictor import BUNDLE, ERROR_COLUMN, EXPLANATION_COLUMN, LABELS_COLUMN, THRESHOLDS, CxrDwmlModel
from tests.conftest import tiny_bundle

SIZE = 32


@pytest.fixture(scope="module")
def model_files(tmp_path_factory) -> Path:
    """A folder with best.pt (a tiny untrained metric-head model) and thresholds.json."""
    folder = tmp_path_factory.mktemp("model")
    tiny_bundle(folder / "best.pt", SIZE, **{"backbone.name": "convnext_atto"})
    (folder / "thresholds.json").write_text(json.dumps({"thresholds": dict.fromkeys(CLASSES, 0.5)}))
    return folder


@pytest.fixture(scope="module")
def pyfunc(model_files: Path) -> CxrDwmlModel:
    """The pyfunc loaded as MLflow loads it: from a bundle and a thresholds file."""
    from mlflow.pyfunc import PythonModelContext

    loaded = CxrDwmlModel()
    artifacts = {BUNDLE: str(model_files / "best.pt"), THRESHOLDS: str(model_files / "thresholds.json")}
    loaded.load_context(PythonModelContext(artifacts=artifacts, model_config={}))
    return loaded


def png(seed: int, size: int = 48) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def bomb_png(side: int = 30_000) -> bytes:
    """A few hundred bytes declaring a side x side 1-bit image: far past Pillow's pixel limit."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # width, height, 1 bit, gray
    pixels = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def test_bad_rows_get_an_error_and_the_good_rows_are_scored(pyfunc: CxrDwmlModel) -> None:
    good = [png(1), png(2), png(3)]
    batch = [good[0], b"this is not an image", bomb_png(), good[1], "not base64!", png(4)[:120], good[2]]
    out = pyfunc.predict(None, pd.DataFrame({"image": batch}))

    assert list(out.columns) == [*CLASSES, LABELS_COLUMN, ERROR_COLUMN] and len(out) == len(batch)
    errors = out[ERROR_COLUMN].tolist()
    assert [e is None for e in errors] == [True, False, False, True, False, False, True]
    assert errors[1].startswith("row 1: unreadable: not a PNG, JPEG or DICOM image")
    assert errors[2].startswith("row 2: too_large: Image size (900000000 pixels) exceeds limit")
    assert errors[4].startswith("row 4: corrupt: neither image bytes nor valid base64 text")
    assert errors[5].startswith(("row 5: truncated:", "row 5: corrupt:"))
    for e in filter(None, errors):
        assert "\n" not in e and "Traceback" not in e and len(e) <= 320, e

    bad = out[ERROR_COLUMN].notna()
    assert out.loc[bad, [*CLASSES, LABELS_COLUMN]].isna().all().all()
    # the good rows score as they do on their own, in the order sent
    alone = pyfunc.predict(None, pd.DataFrame({"image": good}))
    np.testing.assert_allclose(out.loc[~bad, list(CLASSES)].to_numpy(float), alone[list(CLASSES)], atol=1e-6)
    assert out.loc[~bad, LABELS_COLUMN].tolist() == alone[LABELS_COLUMN].tolist()
    assert alone[list(CLASSES)].dtypes.eq(np.float64).all() and alone[ERROR_COLUMN].isna().all()


def test_a_batch_of_only_bad_rows_answers_instead_of_failing(pyfunc: CxrDwmlModel) -> None:
    out = pyfunc.predict(None, pd.DataFrame({"image": [b"", bomb_png()]}))
    assert [e.split(":")[0] for e in out[ERROR_COLUMN]] == ["row 0", "row 1"]


def test_the_answer_mlflow_serves_is_strict_json_with_an_error_per_bad_row(pyfunc: CxrDwmlModel) -> None:
    from mlflow.pyfunc.scoring_server import predictions_to_json

    good = base64.b64encode(png(5)).decode("ascii")
    out = pyfunc.predict(None, pd.DataFrame({"image": [good, base64.b64encode(b"garbage").decode("ascii")]}))
    body = io.StringIO()
    predictions_to_json(out, body)

    def no_nan(name: str):
        raise AssertionError(f"{name} in the JSON answer")

    rows = json.loads(body.getvalue(), parse_constant=no_nan)["predictions"]
    assert rows[0][ERROR_COLUMN] is None and isinstance(rows[0][CLASSES[0]], float) and rows[0][LABELS_COLUMN]
    assert rows[1][ERROR_COLUMN].startswith("row 1: unreadable: ")
    assert rows[1][CLASSES[0]] is None and rows[1][LABELS_COLUMN] is None


def test_an_array_of_the_wrong_shape_is_a_row_error(pyfunc: CxrDwmlModel, tmp_path: Path) -> None:
    arrays = [np.zeros((40, 40), np.uint8), np.zeros((40, 40, 2), np.uint8)]
    out = pyfunc.predict(None, arrays)
    assert out[ERROR_COLUMN][0] is None
    assert out[ERROR_COLUMN][1] == "row 1: corrupt: an image array must be (H, W) or (H, W, 3|4), got shape (40, 40, 2)"


def _decoded_png(text: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(text)))
    image.load()
    return image


def test_explanations_come_only_when_asked_as_base64_pngs_of_the_top_findings(pyfunc: CxrDwmlModel) -> None:
    batch = [png(11), b"not an image", png(12)]
    plain = pyfunc.predict(None, pd.DataFrame({"image": batch}))
    assert EXPLANATION_COLUMN not in plain.columns
    out = pyfunc.predict(None, pd.DataFrame({"image": batch}), params={"explain": True, "explain_top_k": 2})
    assert list(out.columns) == [*CLASSES, LABELS_COLUMN, ERROR_COLUMN, EXPLANATION_COLUMN]
    pd.testing.assert_frame_equal(out.drop(columns=EXPLANATION_COLUMN), plain)  # the scores are unchanged
    assert out[EXPLANATION_COLUMN][1] is None  # the row with an error
    for i in (0, 2):
        findings = json.loads(out[EXPLANATION_COLUMN][i])
        probs = out.loc[i, list(CLASSES)].to_numpy(float)
        top = [CLASSES[c] for c in np.argsort(-probs, kind="stable")[:2]]
        assert [f["class"] for f in findings] == top
        assert [f["probability"] for f in findings] == pytest.approx(sorted(probs, reverse=True)[:2])
        for f in findings:
            for method in ("gradcam", "prototype"):  # the fixture's model has the metric head
                image = _decoded_png(f[method])
                assert image.format == "PNG" and image.mode == "RGB" and image.size == (224, 224)
    # 0 asks for no maps: an empty list per scored row, the scores unchanged
    none = pyfunc.predict(None, pd.DataFrame({"image": batch}), params={"explain": True, "explain_top_k": 0})
    assert none[EXPLANATION_COLUMN].tolist() == ["[]", None, "[]"]
    pd.testing.assert_frame_equal(none.drop(columns=EXPLANATION_COLUMN), plain)


def _logged_model(model_files: Path, folder: Path, experiment: str):
    """The pyfunc logged as the register step logs it, into a new experiment of the active store
    whose artifacts stay under `folder` (not ./mlruns of the checkout: an earlier test may have left
    another store's experiment active), loaded back."""
    import mlflow

    from pipeline.registry.packaging import log_pyfunc

    experiment_id = mlflow.create_experiment(experiment, artifact_location=(folder / "mlruns").as_uri())
    with mlflow.start_run(experiment_id=experiment_id):
        info = log_pyfunc(model_files / "best.pt", model_files / "thresholds.json", png(21, SIZE))
    return mlflow.pyfunc.load_model(info.model_uri)


def test_the_logged_model_takes_the_explain_param_through_mlflow(model_files: Path, tmp_path: Path) -> None:
    """MLflow drops params a signature does not declare: the logged signature must carry `explain`."""
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        model = _logged_model(model_files, tmp_path, "explain-param")
        assert {p.name: p.default for p in model.metadata.get_params_schema().params} == {
            "explain": False,
            "explain_top_k": 3,
        }
        frame = pd.DataFrame({"image": [png(22)]})
        assert EXPLANATION_COLUMN not in model.predict(frame).columns
        out = model.predict(frame, params={"explain": True, "explain_top_k": 1})
        (finding,) = json.loads(out[EXPLANATION_COLUMN][0])
        assert _decoded_png(finding["gradcam"]).size == (224, 224)
    finally:
        mlflow.set_tracking_uri(None)


@pytest.fixture(scope="module")
def scoring_app(model_files: Path, tmp_path_factory: pytest.TempPathFactory):
    """MLflow's own scoring server app (what `mlflow models serve` runs) around the pyfunc logged as
    the register step logs it."""
    import mlflow
    from fastapi.testclient import TestClient
    from mlflow.pyfunc import scoring_server

    folder = tmp_path_factory.mktemp("scoring")
    mlflow.set_tracking_uri(f"sqlite:///{folder / 'mlflow.db'}")
    try:
        model = _logged_model(model_files, folder, "scoring")
    finally:
        mlflow.set_tracking_uri(None)
    with TestClient(scoring_server.init(model)) as client:
        yield client


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# each of MLflow's JSON request formats, from the values of the rows to send
REQUESTS = {
    "dataframe_split": lambda rows: {"dataframe_split": {"columns": ["image"], "data": [[r] for r in rows]}},
    "dataframe_records": lambda rows: {"dataframe_records": [{"image": r} for r in rows]},
    "instances": lambda rows: {"instances": rows},
    "instances_records": lambda rows: {"instances": [{"image": r} for r in rows]},
    "inputs": lambda rows: {"inputs": {"image": rows}},
    "inputs_list": lambda rows: {"inputs": rows},
}


# MLflow reads a bare list of objects as records whose keys are column names: there an object is
# {"image": ...}, and {"b64": ...} goes inside it (see the last test)
BARE_LISTS = {"instances", "inputs_list"}


@pytest.mark.parametrize("count", [1, 3])
@pytest.mark.parametrize(
    ("request_format", "wrap"),
    [(f, w) for f in sorted(REQUESTS) for w in ("text", "b64_object") if not (w == "b64_object" and f in BARE_LISTS)],
)
def test_every_request_format_scores_base64_pngs(
    pyfunc: CxrDwmlModel, scoring_app, request_format: str, wrap: str, count: int
) -> None:
    images = [png(30 + i) for i in range(count)]
    rows = [_b64(b) if wrap == "text" else {"b64": _b64(b)} for b in images]
    r = scoring_app.post("/invocations", json=REQUESTS[request_format](rows))
    assert r.status_code == 200, r.text[:2000]
    answer = pd.DataFrame(r.json()["predictions"])
    expected = pyfunc.predict(None, pd.DataFrame({"image": images}))
    assert answer[ERROR_COLUMN].isna().all(), answer[ERROR_COLUMN].tolist()
    np.testing.assert_allclose(answer[list(CLASSES)].to_numpy(float), expected[list(CLASSES)], atol=1e-6)
    assert answer[LABELS_COLUMN].tolist() == expected[LABELS_COLUMN].tolist()


@pytest.mark.parametrize("request_format", sorted(REQUESTS))
def test_a_null_row_is_that_rows_error_in_every_request_format(
    pyfunc: CxrDwmlModel, scoring_app, request_format: str
) -> None:
    good = png(40)
    last = _b64(good) if request_format in BARE_LISTS else {"b64": _b64(good)}
    r = scoring_app.post("/invocations", json=REQUESTS[request_format]([_b64(good), None, last]))
    assert r.status_code == 200, r.text[:2000]
    first, null, last = r.json()["predictions"]
    assert null[ERROR_COLUMN] == "row 1: missing: null instead of an image"
    assert null[LABELS_COLUMN] is None and null[CLASSES[0]] is None
    expected = pyfunc.predict(None, pd.DataFrame({"image": [good]}))
    for row in (first, last):
        assert row[ERROR_COLUMN] is None
        np.testing.assert_allclose([row[c] for c in CLASSES], expected.loc[0, list(CLASSES)].to_numpy(float), atol=1e-6)


def test_explain_top_k_zero_answers_without_maps_and_a_negative_one_is_a_clear_400(scoring_app) -> None:
    body = REQUESTS["dataframe_split"]([_b64(png(50)), "bm90IGFuIGltYWdl"])
    r = scoring_app.post("/invocations", json={**body, "params": {"explain": True, "explain_top_k": 0}})
    assert r.status_code == 200, r.text[:2000]
    assert [row[EXPLANATION_COLUMN] for row in r.json()["predictions"]] == ["[]", None]

    r = scoring_app.post("/invocations", json={**body, "params": {"explain": True, "explain_top_k": -1}})
    assert r.status_code == 400
    answer = r.json()
    assert answer["error_code"] == "INVALID_PARAMETER_VALUE" and "stack_trace" not in answer
    assert answer["message"].endswith("params explain_top_k must be 0 (no maps) or more, got -1")
    assert "Traceback" not in r.text


def test_a_bare_b64_object_is_mlflows_400_naming_the_image_column(scoring_app) -> None:
    r = scoring_app.post("/invocations", json={"instances": [{"b64": _b64(png(60))}]})
    assert r.status_code == 400 and "['image']" in r.json()["message"] and "stack_trace" not in r.json()
