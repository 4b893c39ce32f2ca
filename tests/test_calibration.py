"""Calibration: ECE against a hand computation, the fitted maps on constructed logits, thresholds on
the calibrated scale, and the registered pyfunc serving sigmoid(z / T) through real MLflow."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from pipeline.classes import CLASSES
from pipeline.evaluation import calibration as cb
from pipeline.metrics import select_thresholds

C = len(CLASSES)


def test_ece_equals_a_hand_computation():
    # class 0: bins [0, .1): 0.05 (neg) | [.1, .2): 0.15 (pos), 0.15 (neg) | [.9, 1]: 0.95, 1.0 (both pos)
    #   (1 * |0 - .05| + 2 * |.5 - .15| + 2 * |1 - .975|) / 5 = (.05 + .7 + .05) / 5 = 0.16
    # class 1: all five in [.5, .6) at 0.5, 0.5, 0.5, 0.5, 0.55 with 1 positive: |.2 - .51| = 0.31
    p = np.array([[0.05, 0.5], [0.15, 0.5], [0.15, 0.5], [0.95, 0.5], [1.0, 0.55]])
    y = np.array([[0, 1], [1, 0], [0, 0], [1, 0], [1, 0]])
    np.testing.assert_allclose(cb.expected_calibration_error(y, p, bins=10), [0.16, 0.31], rtol=1e-12)
    table = cb.reliability_bins(y, p, bins=10)
    assert table["count"][0].tolist() == [1, 2, 0, 0, 0, 0, 0, 0, 0, 2]
    assert table["fraction_positive"][0, 1] == 0.5 and np.isnan(table["mean_predicted"][0, 4])
    # two bins: [0, .5) and [.5, 1]: class 0 (3 * |1/3 - .35/3| + 2 * |1 - .975|) / 5
    np.testing.assert_allclose(cb.expected_calibration_error(y, p, bins=2)[0], (3 * abs(1 / 3 - 0.35 / 3) + 0.05) / 5)
    # a perfectly calibrated constant score has no error
    assert cb.expected_calibration_error(np.array([[1], [0], [0], [0]]), np.full((4, 1), 0.25), 10)[0] == 0.0


def overconfident(n: int = 3000, scale: float = 3.0, shift: float = 0.0, seed: int = 0):
    """Labels drawn from sigmoid(z_true) and observed logits scale * z_true + shift, (n, C) each."""
    rng = np.random.default_rng(seed)
    z_true = rng.normal(-1.0, 1.5, size=(n, C))
    y = (rng.random((n, C)) < cb.sigmoid(z_true)).astype(np.int8)
    return y, scale * z_true + shift, np.arange(n) // 3  # three images per patient


@pytest.mark.parametrize("method", ["temperature", "platt"])
def test_rank_preserving_maps_lower_validation_nll_and_keep_every_auc(method):
    y, z, _ = overconfident(shift=1.0 if method == "platt" else 0.0)
    cal = cb.fit(method, y, z, CLASSES)
    p = cal.probabilities(z)
    assert (cb.nll_from_probabilities(y, p) < cb.nll_from_logits(y, z)).all()
    for c in range(C):
        assert roc_auc_score(y[:, c], p[:, c]) == roc_auc_score(y[:, c], z[:, c])
    # the logits are three times too confident: each class's temperature finds that
    np.testing.assert_allclose(cal.temperature, 3.0, rtol=0.15)
    if method == "platt":  # ... and the shift of +1 on the logit scale, i.e. b = -1 / 3 after dividing by T
        np.testing.assert_allclose(cal.bias, -1.0 / 3.0, atol=0.15)
    assert (
        cb.expected_calibration_error(y, p, 10).mean()
        < 0.5 * cb.expected_calibration_error(y, cb.sigmoid(z), 10).mean()
    )


def test_temperature_is_the_nll_minimum():
    y, z, _ = overconfident(n=800)
    t = cb.fit_temperature(y, z)
    for factor in (0.97, 1.03):  # a step either way is worse
        assert (cb.nll_from_logits(y, z / t) < cb.nll_from_logits(y, z / (t * factor))).all()


def test_thresholds_on_calibrated_scores_flag_the_same_images():
    """Re-choosing the thresholds on calibrated validation probabilities equals transforming the raw
    ones, and labels every test image as the raw thresholds do."""
    y, z, _ = overconfident(n=1200)
    y_test, z_test, _ = overconfident(n=600, seed=1)
    cal = cb.fit("temperature", y, z, CLASSES)
    raw_t = select_thresholds(y, cb.sigmoid(z))
    cal_t = select_thresholds(y, cal.probabilities(z))
    np.testing.assert_allclose(cal_t, cal.thresholds(raw_t), rtol=1e-9)
    assert ((cb.sigmoid(z_test) >= raw_t) == (cal.probabilities(z_test) >= cal_t)).all()
    with pytest.raises(ValueError, match="isotonic"):
        cb.fit("isotonic", y, z, CLASSES).thresholds(raw_t)


def test_auto_prefers_a_map_with_a_shift_for_shifted_scores_and_none_when_calibrated():
    y, z, groups = overconfident(n=1500, scale=1.0, shift=2.0)  # right scale, base rate far too high
    method, scores = cb.choose_method(y, z, groups, folds=5)
    assert method in ("platt", "isotonic") and scores[method] < scores["temperature"] < scores["none"]
    y, z, groups = overconfident(n=1500, scale=1.0)  # calibrated already
    method, scores = cb.choose_method(y, z, groups, folds=5)
    assert scores["none"] - min(scores.values()) < 2e-3 and scores["isotonic"] > scores["none"]


def test_isotonic_and_unfitted_classes():
    y, z, _ = overconfident(n=600)
    y[:, 3] = 0  # no positive: nothing to fit
    cal = cb.fit("isotonic", y, z, CLASSES)
    p = cal.probabilities(z)
    assert cal.unfitted == (CLASSES[3],) and np.array_equal(p[:, 3], cb.sigmoid(z[:, 3]))
    assert (p[:, 0] > 0).all() and (p[:, 0] < 1).all()  # bounded away from 0 and 1
    order = np.argsort(z[:, 0])
    assert (np.diff(p[order, 0]) >= 0).all()  # non-decreasing in the logit
    assert cb.fit("temperature", y, z, CLASSES).temperature[3] == 1.0


@pytest.mark.parametrize("method", cb.METHODS)
def test_json_round_trip(method):
    y, z, _ = overconfident(n=300)
    cal = cb.fit(method, y, z, CLASSES)
    again = cb.Calibration.from_json(json.loads(json.dumps(cal.to_json())))
    np.testing.assert_array_equal(again.probabilities(z), cal.probabilities(z))
    assert again.calibrated == (method != "none")


def test_a_broken_calibration_file_is_named():
    with pytest.raises(ValueError, match=r"cal\.json: no calibration 'method'"):
        cb.Calibration.from_json({"method": "magic"}, source="cal.json")
    with pytest.raises(ValueError, match=r"cal\.json: its temperature parameters are incomplete"):
        cb.Calibration.from_json({"method": "temperature", "classes": ["A"], "temperature": {}}, source="cal.json")


def test_reliability_grid_draws(tmp_path: Path):
    from pipeline.evaluation import plots

    y, z, _ = overconfident(n=500)
    cal = cb.fit("temperature", y, z, CLASSES)
    thresholds = select_thresholds(y, cal.probabilities(z))
    report = cb.calibration_report(cal, {"setting": "temperature"}, (y, z), (y, z), thresholds, 10)
    assert (
        report["mean_ece_calibrated"] < report["mean_ece_raw"] and report["val_nll_calibrated"] < report["val_nll_raw"]
    )
    before, after = cb.reliability_bins(y, cb.sigmoid(z), 10), cb.reliability_bins(y, cal.probabilities(z), 10)
    plots.reliability_grid(before, after, thresholds, report, tmp_path / "reliability.png")
    assert (tmp_path / "reliability.png").stat().st_size > 20_000


# ----------------------------------------------------------------------------- the registered pyfunc


def _png(seed: int, size: int = 40) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def test_registered_pyfunc_serves_the_calibrated_probabilities(tmp_path: Path):
    import mlflow
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    from pipeline.data.dataset import eval_transform
    from pipeline.inference import logits
    from pipeline.registry.packaging import log_pyfunc
    from pipeline.serving.predictor import decode_input
    from tests.conftest import tiny_bundle

    net = tiny_bundle(tmp_path / "best.pt")
    images = [_png(i) for i in range(40)]
    crop = eval_transform(32)
    x = torch.stack([crop(torch.from_numpy(decode_input(b, 32))[None]) for b in images])  # (N, 1, 32, 32)
    z = logits(net, x, torch.device("cpu")).astype(np.float64)  # (N, C)
    z = (z - z.mean(0)) / (z.std(0) + 1e-6) * 4  # spread the untrained logits so each class has both labels
    y = (np.random.default_rng(1).random(z.shape) < cb.sigmoid(z / 2)).astype(np.int8)
    cal = cb.fit("temperature", y[:20], z[:20], CLASSES)
    (tmp_path / "calibration.json").write_text(json.dumps(cal.to_json()))
    thresholds = dict(zip(CLASSES, np.full(C, 0.3)))
    (tmp_path / "thresholds.json").write_text(json.dumps({"calibration": "temperature", "thresholds": thresholds}))

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with _use_tracking_uri(uri):
        mlflow.set_experiment(
            experiment_id=mlflow.create_experiment("calibration-test", artifact_location=(tmp_path / "mlruns").as_uri())
        )
        with mlflow.start_run():
            info = log_pyfunc(
                tmp_path / "best.pt",
                tmp_path / "thresholds.json",
                images[0],
                calibration_path=tmp_path / "calibration.json",
            )
        version = mlflow.register_model(info.model_uri, "cxr-calibrated")
        served = mlflow.pyfunc.load_model(f"models:/cxr-calibrated/{version.version}")
        out = served.predict(pd.DataFrame({"image": images}))

    raw = logits(net, x, torch.device("cpu")).astype(np.float64)  # the network's own logits, unnormalised
    expected = cb.sigmoid(raw / np.array([cal.to_json()["temperature"][c] for c in CLASSES]))
    np.testing.assert_allclose(out[list(CLASSES)].to_numpy(float), expected, rtol=0, atol=1e-6)
    assert not np.allclose(expected, cb.sigmoid(raw), atol=1e-3)  # the calibration does change them
    assert served.metadata.metadata == {"calibration": "temperature", "calibrated": True, "drift_check": False}
    labels = ["|".join(c for c, v in zip(CLASSES, row) if v >= 0.3) or "No Finding" for row in expected]
    assert out["labels"].tolist() == labels  # the thresholds apply to the calibrated probabilities

    # thresholds chosen on raw scores must not be packed with a calibration
    (tmp_path / "thresholds.json").write_text(json.dumps({"thresholds": thresholds}))
    with (
        _use_tracking_uri(uri),
        mlflow.start_run(),
        pytest.raises(ValueError, match="thresholds for 'none'-calibrated"),
    ):
        log_pyfunc(
            tmp_path / "best.pt",
            tmp_path / "thresholds.json",
            images[0],
            calibration_path=tmp_path / "calibration.json",
        )
