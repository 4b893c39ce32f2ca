"""Serving the registered model: the pyfunc from the registry, `mlflow models serve` on loopback, and
`python -m components.predict` on awkward files.

The champion is the model the register stage of the session's tiny pipeline run (conftest's
`pipeline_run`) registered in the SQLite store that run logged to; these tests only read it.
"""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import requests
from PIL import Image

from pipeline.classes import CLASSES
from tests.conftest import (
    ROOT,
    VENV_BIN,
    PipelineRun,
    assert_no_identifier,
    dicom_twins,
    labels_of,
    run_env,
    tracking_env,
    write_dicom,
)
from tests.servers import free_port, stop, wait_http

pytestmark = pytest.mark.slow
CHAMPION = "models:/cxr-dwml@champion"


@dataclass
class Served:
    repo: Path
    tracking_uri: str
    model: object  # the pyfunc loaded from the registry
    registration: dict

    def test_images(self, n: int) -> list[Path]:
        manifest = pd.read_csv(self.repo / "data/prepared/manifest.csv")
        names = manifest.loc[manifest["split"] == "test", "image"].head(n)
        return [self.repo / "data/raw/images" / name for name in names]


@pytest.fixture(scope="module")
def served(pipeline_run: PipelineRun) -> Served:
    import mlflow

    repo = pipeline_run.repo
    with tracking_env(pipeline_run.tracking_uri, repo):
        model = mlflow.pyfunc.load_model(CHAMPION)
    registration = json.loads((repo / "reports/registration.json").read_text())
    assert registration["promote"] is True and "champion" in registration["aliases"]
    return Served(repo, pipeline_run.tracking_uri, model, registration)


def checkpoint_logits(repo: Path, paths: list[Path]) -> np.ndarray:
    """(N, C) logits straight from best.pt, preprocessed as the evaluate step does."""
    import torch

    from pipeline.data.dataset import eval_transform
    from pipeline.data.images import decode_image
    from pipeline.models import load_bundle

    net, bundle = load_bundle(repo / "artifacts/model/best.pt")
    crop = eval_transform(bundle.crop_size)
    x = torch.stack([crop(torch.from_numpy(decode_image(p, bundle.image_size))[None]) for p in paths])  # (N, 1, S, S)
    with torch.inference_mode():
        return net(x).double().numpy()  # (N, C)


def fitted_calibration(repo: Path):
    """The calibration the evaluate step fitted on validation (reports/calibration.json)."""
    from pipeline.evaluation.calibration import Calibration

    return Calibration.from_json(json.loads((repo / "reports/calibration.json").read_text()))


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


DRIFT = ["drift_image", "drift_embedding", "image_width", "image_height", "drift"]
OUTPUT = [*CLASSES, "labels", *DRIFT, "error"]
CSV_COLUMNS = ["file", *CLASSES, "labels", *DRIFT]


def test_registered_pyfunc_matches_the_checkpoint(served: Served) -> None:
    from mlflow.types.schema import AnyType

    from pipeline.evaluation.calibration import sigmoid

    paths = served.test_images(12)
    out = served.model.predict(pd.DataFrame({"image": [p.read_bytes() for p in paths]}))
    assert list(out.columns) == OUTPUT and len(out) == len(paths)
    assert out["error"].isna().all()
    probs = out[list(CLASSES)].to_numpy()
    # the served probabilities are the checkpoint's logits through the calibration fitted on validation
    cal = fitted_calibration(served.repo)
    z = checkpoint_logits(served.repo, paths)
    np.testing.assert_allclose(probs, cal.probabilities(z), rtol=0, atol=1e-6)
    metadata = served.model.metadata.metadata
    assert metadata["calibration"] == cal.method and metadata["calibrated"] is cal.calibrated
    assert metadata["drift_check"] is True

    # the evaluate step scored the same images from the uint8 cache (its predictions are uncalibrated)
    evaluated = pd.read_parquet(served.repo / "reports/predictions/test.parquet").set_index("image")
    np.testing.assert_allclose(sigmoid(z), evaluated.loc[[p.name for p in paths], list(CLASSES)], rtol=0, atol=1e-6)

    # the thresholds were chosen on the calibrated validation probabilities, the scale the model serves
    from pipeline.evaluation.calibration import logit
    from pipeline.metrics import select_thresholds

    val = pd.read_parquet(served.repo / "reports/predictions/val.parquet")
    chosen = select_thresholds(labels_of(served.repo, val["image"]), cal.probabilities(logit(val[list(CLASSES)])))
    saved = json.loads((served.repo / "reports/thresholds.json").read_text())
    assert saved["probabilities"] == "calibrated" and saved["calibration"] == cal.method
    np.testing.assert_allclose([saved["thresholds"][c] for c in CLASSES], chosen, rtol=1e-6)

    # labels are the validation thresholds carried inside the model
    thresholds = saved["thresholds"]
    expected = ["|".join(c for c in CLASSES if row[c] >= thresholds[c]) or "No Finding" for _, row in out.iterrows()]
    assert list(out["labels"]) == expected

    # uint8 arrays in the image column are the same images
    arrays = [np.asarray(Image.open(p)) for p in paths]
    from_arrays = served.model.predict(pd.DataFrame({"image": arrays}))
    np.testing.assert_allclose(from_arrays[list(CLASSES)], probs, rtol=0, atol=1e-6)

    schema = served.model.metadata.get_input_schema()
    # any value: the pyfunc decodes bytes, base64 text and {"b64": text} itself (predictor.signature)
    assert schema.input_names() == ["image"] and isinstance(schema.input_types()[0], AnyType)
    assert served.model.metadata.get_output_schema().input_names() == OUTPUT


@dataclass
class ModelServer:
    url: str
    log: Path  # what the server printed


@pytest.fixture(scope="module")
def model_server(served: Served, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModelServer]:
    """`mlflow models serve` of the champion on a free loopback port, shared by this module's tests."""
    port, log = free_port(), tmp_path_factory.mktemp("serve") / "serve.log"
    cmd = [
        str(VENV_BIN / "mlflow"),
        "models",
        "serve",
        "-m",
        CHAMPION,
        "--env-manager",
        "local",
        "--host",
        "127.0.0.1",
        "-p",
        str(port),
    ]
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            cmd, cwd=served.repo, env=run_env(served.repo), stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", timeout=240, process=proc, log=log)
        yield ModelServer(f"http://127.0.0.1:{port}", log)
    finally:
        stop(proc)


def test_models_serve_answers_a_posted_png(served: Served, model_server: ModelServer) -> None:
    gray = Image.open(served.test_images(1)[0])
    rgba = Image.merge("RGBA", [gray, gray, gray, Image.new("L", gray.size, 255)])
    bodies = [png_bytes(gray), png_bytes(rgba)]
    expected = served.model.predict(pd.DataFrame({"image": bodies}))

    payload = {
        "dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(b).decode("ascii")] for b in bodies]}
    }
    r = requests.post(f"{model_server.url}/invocations", json=payload, timeout=60)
    assert r.status_code == 200, r.text
    # "not an image" (base64) beside a good image: that row gets an error, the other its scores
    rows = [payload["dataframe_split"]["data"][0], ["bm90IGFuIGltYWdl"]]
    mixed = requests.post(
        f"{model_server.url}/invocations", timeout=60, json={"dataframe_split": {"columns": ["image"], "data": rows}}
    )
    predictions = pd.DataFrame(r.json()["predictions"])
    assert list(predictions.columns) == OUTPUT and len(predictions) == 2
    np.testing.assert_allclose(predictions[list(CLASSES)], expected[list(CLASSES)], rtol=0, atol=1e-6)
    np.testing.assert_allclose(predictions.loc[0, list(CLASSES)], predictions.loc[1, list(CLASSES)], atol=1e-6)
    assert predictions.loc[0, "labels"] == expected.loc[0, "labels"] and predictions["error"].isna().all()
    assert mixed.status_code == 200 and "Traceback" not in mixed.text, mixed.text
    good, bad = mixed.json()["predictions"]
    assert good["error"] is None and good["labels"] == expected.loc[0, "labels"]
    np.testing.assert_allclose([good[c] for c in CLASSES], expected.loc[0, list(CLASSES)].to_numpy(float), atol=1e-6)
    assert bad["error"].startswith("row 1: unreadable: ") and bad["labels"] is None and bad[CLASSES[0]] is None


def test_models_serve_answers_every_documented_request_format(served: Served, model_server: ModelServer) -> None:
    """The bodies docs/registry.md shows: base64 text or {"b64": text} per image, a null row beside it."""
    film = served.test_images(1)[0].read_bytes()
    text = base64.b64encode(film).decode("ascii")
    expected = served.model.predict(pd.DataFrame({"image": [film]})).loc[0, list(CLASSES)].to_numpy(float)
    bodies = {
        "dataframe_split": {"dataframe_split": {"columns": ["image"], "data": [[text], [None]]}},
        "dataframe_records": {"dataframe_records": [{"image": {"b64": text}}, {"image": None}]},
        "instances": {"instances": [text, None]},
        "instances_records": {"instances": [{"image": {"b64": text}}, {"image": None}]},
        "inputs": {"inputs": {"image": [text, None]}},
        "inputs_b64": {"inputs": {"image": [{"b64": text}, None]}},
    }
    for name, body in bodies.items():
        r = requests.post(f"{model_server.url}/invocations", json=body, timeout=60)
        assert r.status_code == 200, (name, r.text[:2000])
        scored, null = r.json()["predictions"]
        assert scored["error"] is None, (name, scored["error"])
        np.testing.assert_allclose([scored[c] for c in CLASSES], expected, rtol=0, atol=1e-6, err_msg=name)
        assert null["error"] == "row 1: missing: null instead of an image" and null["labels"] is None, name

    explain = {**bodies["inputs"], "params": {"explain": True, "explain_top_k": 0}}
    r = requests.post(f"{model_server.url}/invocations", json=explain, timeout=60)
    assert r.status_code == 200, r.text[:2000]
    assert [row["explanation"] for row in r.json()["predictions"]] == ["[]", None]


def _awkward_files(served: Served, folder: Path) -> dict[str, Path]:
    """RGBA, RGB, 16-bit, 1024 px and JPEG versions of test images, plus broken files."""
    sources = [Image.open(p).convert("L") for p in served.test_images(4)]
    files = {
        name: folder / name
        for name in (
            "rgba.png",
            "rgb.png",
            "gray16.png",
            "big.png",
            "nested/photo.jpg",
            "corrupt.png",
            "truncated.png",
            "scan.dcm",
        )
    }
    files["nested/photo.jpg"].parent.mkdir(parents=True)
    a, b, c, d = sources
    Image.merge("RGBA", [a, a, a, Image.new("L", a.size, 255)]).save(files["rgba.png"])
    Image.merge("RGB", [b, b, b]).save(files["rgb.png"])
    sixteen = (np.asarray(c, dtype=np.uint16) * 16 + 300).astype(np.uint16)  # 12-bit range, offset
    Image.fromarray(sixteen).save(files["gray16.png"])
    d.resize((1024, 1024), Image.Resampling.BICUBIC).save(files["big.png"])
    a.save(files["nested/photo.jpg"], quality=90)
    files["corrupt.png"].write_bytes(b"this is not an image")
    files["truncated.png"].write_bytes(png_bytes(b)[:200])
    files["scan.dcm"].write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)
    return files


def test_predict_cli_scores_awkward_pngs_and_skips_broken_files(served: Served, tmp_path: Path) -> None:
    files = _awkward_files(served, tmp_path / "scans")
    assert Image.open(files["gray16.png"]).mode.startswith("I")  # really a 16-bit PNG
    out = tmp_path / "predictions.csv"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "components.predict",
            "--model",
            CHAMPION,
            str(tmp_path / "scans"),
            str(tmp_path / "missing.png"),
            "--out",
            str(out),
        ],
        cwd=served.repo,
        env=run_env(served.repo),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    scored = pd.read_csv(out)
    assert list(scored.columns) == CSV_COLUMNS
    good = ["rgba.png", "rgb.png", "gray16.png", "big.png", "nested/photo.jpg"]
    assert sorted(scored["file"]) == sorted(str(files[n]) for n in good)
    # each file scores as the registered model scores its bytes (the model's own decoding)
    expected = served.model.predict(pd.DataFrame({"image": [files[n].read_bytes() for n in good]}))
    got = scored.set_index("file").loc[[str(files[n]) for n in good]]
    # float32 noise between batch compositions, magnified by the calibration's temperature: 1e-5
    np.testing.assert_allclose(got[list(CLASSES)], expected[list(CLASSES)], rtol=0, atol=1e-5)
    assert list(got["labels"]) == list(expected["labels"])

    skipped = pd.read_csv(tmp_path / "predictions.skipped.csv").set_index("file")
    assert set(skipped.index) == {
        str(files["corrupt.png"]),
        str(files["truncated.png"]),
        str(files["scan.dcm"]),
        str(tmp_path / "missing.png"),
    }
    assert skipped.loc[str(files["corrupt.png"]), "reason"] == "unreadable"
    assert skipped.loc[str(files["truncated.png"]), "reason"] in {"truncated", "corrupt"}
    assert skipped.loc[str(tmp_path / "missing.png"), "reason"] == "missing"
    try:
        import pydicom  # noqa: F401
    except ImportError:
        assert "pip install pydicom" in skipped.loc[str(files["scan.dcm"]), "detail"]
    for name in ("corrupt.png", "truncated.png", "scan.dcm"):
        assert f"skipped {files[name]}" in result.stdout
    assert "5 image(s) scored" in result.stdout


def test_predict_cli_exit_status_when_nothing_can_be_scored(served: Served, tmp_path: Path) -> None:
    from components import predict

    (tmp_path / "broken.png").write_bytes(b"")
    out = tmp_path / "none.csv"
    with tracking_env(served.tracking_uri, served.repo):
        code = predict.main(["--model", CHAMPION, str(tmp_path / "broken.png"), "--out", str(out), "--no-progress"])
    assert code == 1
    assert pd.read_csv(out).empty
    assert pd.read_csv(tmp_path / "none.skipped.csv")["reason"].tolist() == ["unreadable"]


def test_predict_cli_explain_writes_the_heatmaps_of_the_top_findings(served: Served, tmp_path: Path) -> None:
    from components import predict

    paths = served.test_images(2)
    out, heat = tmp_path / "scored.csv", tmp_path / "heat"
    argv = ["--model", CHAMPION, *map(str, paths), "--out", str(out), "--no-progress"]
    with tracking_env(served.tracking_uri, served.repo):
        assert predict.main([*argv, "--explain", "--explain-top", "2", "--explain-out", str(heat)]) == 0
    scored = pd.read_csv(out)
    # the CSV is the same as without --explain
    assert list(scored.columns) == CSV_COLUMNS
    expected = set()
    for _, row in scored.iterrows():
        top = row[list(CLASSES)].astype(float).sort_values(ascending=False, kind="stable").index[:2]
        expected |= {f"{Path(row['file']).stem}_{c}_{m}.png" for c in top for m in ("gradcam", "prototype")}
    assert {p.name for p in heat.iterdir()} == expected
    for path in heat.iterdir():
        with Image.open(path) as image:
            assert image.format == "PNG" and image.mode == "RGB" and min(image.size) >= 224


def test_predict_cli_explain_top_zero_writes_the_scores_and_no_heatmaps(
    served: Served, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from components import predict

    out, heat = tmp_path / "scored.csv", tmp_path / "heat"
    argv = ["--model", CHAMPION, *map(str, served.test_images(2)), "--out", str(out), "--no-progress", "--explain"]
    with tracking_env(served.tracking_uri, served.repo):
        assert predict.main([*argv, "--explain-top", "0", "--explain-out", str(heat)]) == 0
    scored = pd.read_csv(out)
    assert len(scored) == 2 and list(scored.columns) == CSV_COLUMNS
    assert not heat.exists()
    assert "[predict] 0 heatmap(s)" in capsys.readouterr().out

    with pytest.raises(SystemExit) as stopped:
        predict.main([*argv, "--explain-top", "-1"])
    assert stopped.value.code == 2
    assert "--explain-top: must be a whole number, 0 or more; got '-1'" in capsys.readouterr().err


def test_predict_reports_an_unknown_model_clearly(
    served: Served, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from components import predict
    from components.common import run_main

    (tmp_path / "a.png").write_bytes(png_bytes(Image.new("L", (8, 8))))
    with tracking_env(served.tracking_uri, served.repo), pytest.MonkeyPatch.context() as mp:
        mp.delenv("CXR_DEBUG", raising=False)
        code = run_main(
            "predict",
            predict.main,
            ["--model", "models:/no-such-model@champion", str(tmp_path / "a.png"), "--out", str(tmp_path / "p.csv")],
        )
    assert code == 2 and "cannot load model 'models:/no-such-model@champion'" in capsys.readouterr().err
    assert not (tmp_path / "p.csv").exists()


def _predict(served: Served, inputs: list[Path], out: Path, capsys: pytest.CaptureFixture) -> tuple[int, str]:
    """`components.predict` in this process (the CLI's own process is the awkward-PNG and DICOM
    tests'): its exit status and what it printed."""
    from components import predict

    with tracking_env(served.tracking_uri, served.repo):
        code = predict.main(["--model", CHAMPION, *map(str, inputs), "--out", str(out), "--no-progress"])
    return code, capsys.readouterr().out


def test_predict_warns_of_drift_on_inverted_and_noise_images(
    served: Served, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    films = served.test_images(3)
    odd = tmp_path / "odd"
    odd.mkdir()
    rng = np.random.default_rng(0)
    for p in films:
        pixels = np.asarray(Image.open(p).convert("L"))
        Image.fromarray(255 - pixels).save(odd / f"inverted_{p.name}")
        Image.fromarray(rng.integers(0, 256, pixels.shape, dtype=np.uint8)).save(odd / f"noise_{p.name}")
    code, stdout = _predict(served, [odd], tmp_path / "odd.csv", capsys)
    assert code == 0, stdout[-3000:]
    scored = pd.read_csv(tmp_path / "odd.csv").set_index("file")
    assert scored["drift"].notna().all()
    for file, row in scored.iterrows():
        # each image is named with its distance and the threshold it is over
        line = f"[predict] drift: {file}: unlike the training images: "
        assert line in stdout and (f"distance {row['drift_image']:.1f} > " in stdout)
    assert "[predict] drift: batch unlike the training images: 6 of 6 images over" in stdout


def test_predict_does_not_warn_of_drift_on_test_films(
    served: Served, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    films = served.test_images(40)
    code, stdout = _predict(served, films, tmp_path / "films.csv", capsys)
    assert code == 0, stdout[-3000:]
    assert "batch unlike the training images" not in stdout, stdout
    scored = pd.read_csv(tmp_path / "films.csv")
    # the reference of the tiny test model has ~40 validation images of ~17 patients: one film in
    # a few dozen may sit past a per-image threshold, a batch of them may not
    assert scored["drift"].notna().sum() <= 2, scored.loc[scored["drift"].notna(), ["file", "drift"]]


def test_predict_warns_of_drift_on_odd_sizes(served: Served, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A 1-pixel grey PNG, noise at 1024 px and a 10000 x 10 strip: the resize to the network's input
    hides them from the distances, the size rule does not."""
    manifest = pd.read_csv(served.repo / "data/prepared/manifest.csv")
    side = int(manifest.loc[manifest["split"] == "train", "width"].max())
    assert side < 1024 // 4  # the synthetic films are small: 1024 px is past the 4x margin
    odd = tmp_path / "odd"
    odd.mkdir()
    rng = np.random.default_rng(0)
    Image.new("L", (1, 1), 128).save(odd / "grey_1px.png")
    Image.fromarray(rng.integers(0, 256, (1024, 1024), dtype=np.uint8)).save(odd / "noise_1024.png")
    Image.fromarray(rng.integers(0, 256, (10, 10000), dtype=np.uint8)).save(odd / "strip_10000x10.png")
    code, stdout = _predict(served, [odd], tmp_path / "odd.csv", capsys)
    assert code == 0, stdout[-3000:]
    scored = pd.read_csv(tmp_path / "odd.csv").set_index("file")
    assert scored.loc[str(odd / "strip_10000x10.png"), ["image_width", "image_height"]].tolist() == [10000, 10]
    for name, size in (("grey_1px", "1 x 1"), ("noise_1024", "1024 x 1024"), ("strip_10000x10", "10000 x 10")):
        assert f"size {size} px outside " in scored.loc[str(odd / f"{name}.png"), "drift"]
        assert f"[predict] drift: {odd / name}.png: unlike the training images: " in stdout
    assert "aspect ratio 1000.00 > " in scored.loc[str(odd / "strip_10000x10.png"), "drift"]
    assert "[predict] drift: batch unlike the training images: 3 of 3 images outside the training images' sizes" in (
        stdout
    )


# ----------------------------------------------------------------------------- DICOM


def _dicom_films(served: Served, folder: Path) -> tuple[list[Path], list[Path]]:
    """Test films as DICOM twins (12-bit windowed, 16-bit MONOCHROME1 RLE, 8-bit JPEG 2000 lossless,
    12-bit VOI LUT) and their PNGs, plus a knee film, which is refused."""
    from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless

    kinds = [
        ("12-bit window", ExplicitVRLittleEndian),
        ("16-bit MONOCHROME1 rescale window", RLELossless),
        ("8-bit window", JPEG2000Lossless),
        ("12-bit VOI LUT", ExplicitVRLittleEndian),
    ]
    pngs = served.test_images(len(kinds) + 1)
    dicoms = []
    for i, (png, (kind, syntax)) in enumerate(zip(pngs, kinds)):
        stored, header = dicom_twins(np.asarray(Image.open(png).convert("L")))[kind]
        dicoms.append(write_dicom(folder / f"film_{i}.dcm", stored, syntax, instance=i, **header))
    stored, header = dicom_twins(np.asarray(Image.open(pngs[-1]).convert("L")))["12-bit window"]
    dicoms.append(write_dicom(folder / "knee.dcm", stored, instance=99, **{**header, "BodyPartExamined": "KNEE"}))
    return dicoms, pngs[: len(kinds)]


KNEE = "Body Part Examined is KNEE, not the chest (CHEST, LUNG, THORAX): send a chest X-ray"


def test_models_serve_scores_a_posted_dicom_as_its_png(
    served: Served, model_server: ModelServer, tmp_path: Path
) -> None:
    import mlflow

    dicoms, pngs = _dicom_films(served, tmp_path / "dicom")
    expected = served.model.predict(pd.DataFrame({"image": [p.read_bytes() for p in pngs]}))
    # the logged model names the DICOM packages, pinned as the lock pins them, for environments MLflow builds
    with tracking_env(served.tracking_uri, served.repo):
        requirements = Path(mlflow.pyfunc.get_model_dependencies(CHAMPION)).read_text().split()
    lock = set((ROOT / "requirements.lock").read_text().split())
    assert {r for r in requirements if r.startswith(("pydicom==", "pylibjpeg", "python-gdcm"))} == {
        pin for pin in lock if pin.startswith(("pydicom==", "pylibjpeg", "python-gdcm"))
    }

    rows = [[base64.b64encode(p.read_bytes()).decode("ascii")] for p in dicoms]
    r = requests.post(
        f"{model_server.url}/invocations", json={"dataframe_split": {"columns": ["image"], "data": rows}}, timeout=60
    )
    assert r.status_code == 200, r.text
    predictions = pd.DataFrame(r.json()["predictions"])
    scored, knee = predictions.iloc[: len(pngs)], predictions.iloc[len(pngs)]
    assert scored["error"].isna().all(), scored["error"]
    np.testing.assert_allclose(scored[list(CLASSES)], expected[list(CLASSES)], rtol=0, atol=1e-6)
    assert list(scored["labels"]) == list(expected["labels"])
    assert knee["error"] == f"row {len(pngs)}: refused: {KNEE}" and pd.isna(knee["labels"])
    # nothing the server wrote while it scored them holds a patient or study value
    assert_no_identifier(model_server.log.parent, model_server.log.read_text(), inputs=tmp_path / "dicom")


def test_predict_scores_dicoms_as_their_pngs_and_writes_no_identifier(served: Served, tmp_path: Path) -> None:
    dicoms, pngs = _dicom_films(served, tmp_path / "scans")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "components.predict", "--model", CHAMPION, str(tmp_path / "scans")]
    cmd += [
        "--out",
        str(out / "predictions.csv"),
        "--explain",
        "--explain-top",
        "2",
        "--explain-out",
        str(out / "heat"),
    ]
    result = subprocess.run(cmd, cwd=served.repo, env=run_env(served.repo), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    scored = pd.read_csv(out / "predictions.csv").set_index("file")
    expected = served.model.predict(pd.DataFrame({"image": [p.read_bytes() for p in pngs]}))
    got = scored.loc[[str(p) for p in dicoms[:-1]]]
    # float32 noise between batch compositions, magnified by the calibration's temperature: 1e-5
    np.testing.assert_allclose(got[list(CLASSES)], expected[list(CLASSES)], rtol=0, atol=1e-5)
    skipped = pd.read_csv(out / "predictions.skipped.csv")
    assert skipped.to_dict("records") == [{"file": str(dicoms[-1]), "reason": "refused", "detail": KNEE}]
    assert f"[predict] skipped {dicoms[-1]}: refused ({KNEE})" in result.stdout
    assert len(list((out / "heat").glob("film_*_gradcam.png"))) == 2 * len(pngs)
    assert_no_identifier(out, result.stdout + result.stderr, inputs=tmp_path / "scans")
