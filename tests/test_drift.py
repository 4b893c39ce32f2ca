"""Drift check: image statistics, distances and thresholds, the reference saved into best.pt, and the
pyfunc's per-image and per-batch warnings on inverted and noise images beside synthetic test films."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pipeline.classes import CLASSES
from pipeline.serving import drift
from tests.conftest import settings, tiny_bundle


def test_image_statistics_of_constructed_images():
    black = torch.zeros(1, 1, 8, 8, dtype=torch.uint8)
    checker = torch.from_numpy((np.indices((8, 8)).sum(0) % 2 * 255).astype(np.uint8))[None, None]
    stats = dict(zip(drift.STATISTICS, drift.image_statistics(torch.cat([black, checker])).T))
    assert stats["mean"].tolist() == [0.0, 0.5] and stats["dark"].tolist() == [1.0, 0.5]
    assert stats["bright"].tolist() == [0.0, 0.5] and stats["q95"].tolist() == [0.0, 1.0]
    assert stats["edge"].tolist() == [0.0, 2.0]  # every neighbour differs by 1, down and across


def test_mahalanobis_distance_of_a_known_gaussian():
    rng = np.random.default_rng(0)
    cov = np.array([[4.0, 1.0, 0.0], [1.0, 2.0, 0.5], [0.0, 0.5, 1.0]])
    x = rng.multivariate_normal([1.0, -2.0, 3.0], cov, size=20_000)
    g = drift.Gaussian.fit(x)
    d2 = g.distance(x) ** 2
    assert d2.mean() == pytest.approx(3.0, rel=0.03)  # chi-square with 3 degrees of freedom
    point = np.array([[1.0 + 2.0, -2.0, 3.0]])  # two s.d. along the first axis, correlated with the second
    u = point[0] - [1.0, -2.0, 3.0]
    exact = float(np.sqrt(u @ np.linalg.inv(cov) @ u))
    assert g.distance(point)[0] == pytest.approx(exact, rel=0.05)


def test_threshold_from_a_log_normal_reference():
    d = np.exp(np.random.default_rng(1).normal(1.0, 0.3, 400_000))
    true = float(np.exp(1.0 + 3.0902 * 0.3))  # the 99.9th percentile
    assert drift.threshold(d, 0.001) == pytest.approx(true, rel=0.03)
    # the same distances from 15 patients: a wider bound, not a tight one
    assert drift.threshold(d, 0.001, samples=15) > 1.1 * drift.threshold(d, 0.001)


def reference(thresholds=(5.0, 30.0), alarm_rate=0.001) -> drift.Reference:
    g = drift.Gaussian(np.zeros(1), np.ones(1), np.eye(1))
    return drift.Reference(
        g, g, dict(zip(drift.KINDS, thresholds)), {"image": 2.0, "embedding": 15.0}, alarm_rate, 10, 10, {}
    )


def test_batch_check_counts_images_over_the_threshold():
    ref = reference()
    calm = {"image": np.full(50, 2.0), "embedding": np.r_[np.full(49, 15.0), 31.0]}
    result = ref.batch_check(calm)
    assert result["warning"] is None and result["embedding"]["images_over"] == 1
    assert result["embedding"]["chance"] == pytest.approx(1 - 0.999**50)
    odd = {"image": np.r_[np.full(7, 2.0), 6.0, 9.0, 60.0], "embedding": np.full(10, 15.0)}
    result = ref.batch_check(odd)
    assert result["warning"].startswith("batch unlike the training images: 3 of 10 images over the image statistics")
    assert "threshold 5.0" in result["warning"] and result["image"]["chance"] < 1e-6
    lines = ref.image_warnings(odd)
    assert lines[:7] == [None] * 7 and lines[9] == "unlike the training images: image statistics distance 60.0 > 5.0"


@pytest.fixture(scope="module")
def trained_like(tmp_path_factory):
    """Synthetic demo films prepared at 32 px, and a bundle of an (untrained) tiny network with the
    drift reference attached as the train step attaches it."""
    from pipeline.data.prepare import prepare
    from pipeline.data.synthetic import generate

    root = tmp_path_factory.mktemp("drift")
    synthetic = settings("download.synthetic", num_images=300, num_patients=120, image_size=64, seed=5)
    generate(root / "raw", synthetic, progress=False)
    prepare_cfg = settings("prepare", image_size=32, workers=1, chunk_size=64, val_fraction=0.25)
    prepare(root / "raw", root / "prepared", prepare_cfg, progress=False)
    tiny_bundle(root / "best.pt")
    args = (root / "prepared", 2000, 0.001, 0, torch.device("cpu"), 64)
    assert drift.attach_reference(root / "best.pt", *args) is True
    return root, args


def test_attaching_the_reference_is_idempotent(trained_like):
    root, args = trained_like
    before = (root / "best.pt").read_bytes()
    assert drift.attach_reference(root / "best.pt", *args) is False
    assert (root / "best.pt").read_bytes() == before  # a resumed finished training changes nothing
    ref = drift.from_bundle(torch.load(root / "best.pt", weights_only=False))
    assert ref.train_images > ref.val_images > 0 and ref.thresholds["image"] > ref.val_means["image"]


def test_inverted_and_noise_images_warn_and_test_films_do_not(trained_like):
    from pipeline.io import load_checkpoint
    from pipeline.serving.predictor import DRIFT_COLUMNS, Predictor

    root, _ = trained_like
    manifest = pd.read_csv(root / "prepared/manifest.csv")
    names = manifest.loc[manifest["split"] == "test", "image"]
    films = [np.asarray(Image.open(root / "raw/images" / n)) for n in names]
    predictor = Predictor(load_checkpoint(root / "best.pt"), dict.fromkeys(CLASSES, 0.5))
    ref = predictor.drift

    test = predictor.score(films)
    assert list(test.columns) == [*CLASSES, "labels", *DRIFT_COLUMNS, "drift", "error"]
    distances = {"image": test["drift_image"].to_numpy(), "embedding": test["drift_embedding"].to_numpy()}
    assert ref.batch_check(distances)["warning"] is None, ref.batch_check(distances)
    assert test["drift"].notna().mean() <= 0.05, test.loc[test["drift"].notna(), "drift"].tolist()

    rng = np.random.default_rng(0)
    odd = [255 - f for f in films[:4]] + [rng.integers(0, 256, f.shape, dtype=np.uint8) for f in films[:4]]
    out = predictor.score(odd)
    assert out["drift"].notna().all(), out["drift"].tolist()
    for line, d in zip(out["drift"], out["drift_image"]):
        assert line.startswith("unlike the training images: ") and f"{d:.1f} > {ref.thresholds['image']:.1f}" in line
    batch = ref.batch_check({"image": out["drift_image"].to_numpy(), "embedding": out["drift_embedding"].to_numpy()})
    assert batch["warning"] and "8 of 8 images over the image statistics distance threshold" in batch["warning"]
    # noise is further from the films' statistics than any test film
    assert out["drift_image"][4:].min() > 2 * test["drift_image"].max()
