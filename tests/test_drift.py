"""Drift check: image statistics, distances and thresholds, the reference saved into best.pt, and the
pyfunc's per-image and per-batch warnings on inverted and noise images beside synthetic test films."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pipeline.classes import CLASSES
from pipeline.models import ModelBundle
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


def reference(thresholds=(5.0, 30.0), alarm_rate=0.001, sizes: drift.SizeRange | None = None) -> drift.Reference:
    g = drift.Gaussian(np.zeros(1), np.ones(1), np.eye(1))
    return drift.Reference(
        g, g, dict(zip(drift.KINDS, thresholds)), {"image": 2.0, "embedding": 15.0}, alarm_rate, 10, 10, {}, sizes
    )


def test_the_size_range_flags_sizes_and_aspect_ratios_far_from_the_training_images():
    # training images from 900 x 1000 to 1024 x 1024: shorter sides >= 900, longer <= 1024, aspect <= 1.111
    sizes = drift.SizeRange.fit(np.array([1024, 900, 1000]), np.array([1024, 1000, 1000]), 4.0, 1.5)
    assert (sizes.min_side, sizes.max_side) == (900, 1024) and sizes.max_aspect == pytest.approx(1000 / 900)
    assert sizes.side_limits == (225.0, 4096.0) and sizes.aspect_limit == pytest.approx(1.5 * 1000 / 900)
    cases = {
        (1024, 1024): [],
        (2500, 2048): [],  # a film at its own resolution, aspect 1.22
        (300, 300): [],  # a small scan, within 4x
        (1, 1): ["size 1 x 1 px outside 225-4096 px (training images 900-1024 px)"],
        (10000, 10): [
            "size 10000 x 10 px outside 225-4096 px (training images 900-1024 px)",
            "aspect ratio 1000.00 > 1.67 (training images at most 1.11)",
        ],
        (5000, 5000): ["size 5000 x 5000 px outside 225-4096 px (training images 900-1024 px)"],
        (1000, 2000): ["aspect ratio 2.00 > 1.67 (training images at most 1.11)"],
    }
    for (w, h), reasons in cases.items():
        assert sizes.reasons(w, h) == reasons, (w, h)
    grid = np.array([*cases, (np.nan, np.nan)])  # (B, 2); a row that could not be decoded is not flagged
    assert sizes.outside(grid).tolist() == [bool(r) for r in cases.values()] + [False]
    # what the bundle keeps: plain numbers, back to the same range
    ref = reference(sizes=sizes)
    assert drift.Reference.from_dict(ref.to_dict()) == ref and ref.to_dict()["sizes"]["min_side"] == 900


def test_the_size_rule_warns_per_image_and_per_batch_whatever_the_distances():
    ref = reference(sizes=drift.SizeRange.fit(np.array([64]), np.array([64]), 4.0, 1.5))
    calm = {"image": np.full(3, 2.0), "embedding": np.full(3, 15.0)}  # every distance under its threshold
    sizes = np.array([[64, 64], [1, 1], [10, 10000]])
    lines = ref.image_warnings(calm, sizes)
    assert lines[0] is None
    assert lines[1] == "unlike the training images: size 1 x 1 px outside 16-256 px (training images 64-64 px)"
    assert lines[2].startswith("unlike the training images: size 10 x 10000 px outside 16-256 px")
    assert lines[2].endswith("; aspect ratio 1000.00 > 1.50 (training images at most 1.00)")
    result = ref.batch_check(calm, sizes)
    assert result["size"]["images_outside"] == 2 and result["image"]["images_over"] == 0
    assert result["warning"] == (
        "batch unlike the training images: 2 of 3 images outside the training images' sizes "
        "(sides 16-256 px, aspect ratio up to 1.50)"
    )
    one = ref.batch_check({k: v[:2] for k, v in calm.items()}, sizes[[0, 1]])
    assert one["size"]["images_outside"] == 1 and one["warning"] is None  # one odd image: an image warning only
    assert ref.batch_check(calm)["warning"] is None  # without sizes, distances alone
    # a reference saved before size ranges existed loads, without the rule
    old = {k: v for k, v in ref.to_dict().items() if k != "sizes"}
    assert drift.Reference.from_dict(old).sizes is None


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


def test_a_batch_shifted_as_a_whole_warns_by_its_mean():
    """Every image under its threshold, but all of them further out than validation's: the count
    test sees nothing, the mean test does."""
    val_log = {"image": [math.log(2.0), 0.3, 200], "embedding": [math.log(15.0), 0.3, 200]}
    ref = drift.Reference(**{**reference().__dict__, "val_log": val_log})
    shifted = {"image": np.full(40, 3.5), "embedding": np.full(40, 15.0)}
    result = ref.batch_check(shifted)
    assert result["image"]["images_over"] == 0 and result["image"]["mean_chance"] < 1e-10
    assert result["embedding"]["mean_chance"] > 0.3
    assert result["warning"] == (
        "batch unlike the training images: mean image statistics distance 3.5 over 40 images against 2.0 on "
        f"validation (chance {result['image']['mean_chance']:.1e} for training-like images)"
    )
    calm = {"image": np.exp(np.random.default_rng(0).normal(math.log(2.0), 0.3, 40)), "embedding": np.full(40, 15.0)}
    assert ref.batch_check(calm)["warning"] is None
    assert ref.batch_check({k: v[:1] for k, v in shifted.items()})["tests"] == 2  # one image: no mean test
    assert drift.Reference.from_dict(ref.to_dict()) == ref


def test_the_batch_tests_keep_the_alarm_rate_family_wise():
    """Two count tests at alarm_rate 0.01 each would flag a training-like batch up to 2% of the time;
    each runs at 0.01 / 2."""
    ref = reference(alarm_rate=0.01)
    batch = {"image": np.r_[np.full(12, 2.0), 6.0, 7.0], "embedding": np.full(14, 15.0)}  # 2 of 14 over
    result = ref.batch_check(batch)
    assert result["tests"] == 2 and result["alpha_per_test"] == pytest.approx(0.005)
    assert 0.005 < result["image"]["chance"] < 0.01  # under alarm_rate, over the per-test alpha
    assert result["warning"] is None


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
    drift_cfg = settings("train.drift", max_images=2000, alarm_rate=0.001, size_margin=4.0, aspect_margin=1.5)
    args = (root / "prepared", drift_cfg, 0, torch.device("cpu"), 64)
    assert drift.attach_reference(root / "best.pt", *args) is True
    return root, args


def test_attaching_the_reference_is_idempotent(trained_like):
    root, args = trained_like
    before = (root / "best.pt").read_bytes()
    assert drift.attach_reference(root / "best.pt", *args) is False
    assert (root / "best.pt").read_bytes() == before  # a resumed finished training changes nothing
    ref = drift.from_bundle(ModelBundle.load(root / "best.pt"))
    assert ref.train_images > ref.val_images > 0 and ref.thresholds["image"] > ref.val_means["image"]


def test_inverted_and_noise_images_warn_and_test_films_do_not(trained_like):
    from pipeline.serving.predictor import DRIFT_COLUMNS, SIZE_COLUMNS, Predictor

    root, _ = trained_like
    manifest = pd.read_csv(root / "prepared/manifest.csv")
    names = manifest.loc[manifest["split"] == "test", "image"]
    films = [np.asarray(Image.open(root / "raw/images" / n)) for n in names]
    predictor = Predictor(ModelBundle.load(root / "best.pt"), dict.fromkeys(CLASSES, 0.5))
    ref = predictor.drift

    test = predictor.score(films)
    assert list(test.columns) == [*CLASSES, "labels", *DRIFT_COLUMNS, *SIZE_COLUMNS, "drift", "error"]
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


def test_odd_sizes_warn_by_rule_where_distances_may_not(trained_like):
    """The synthetic films are 64 x 64 px: a 1-px grey PNG, noise at 1024 px, a 10000 x 10 strip and
    a film stretched to 64 x 120 are flagged by the size rule; a film at 100 px is not."""
    from pipeline.serving.predictor import Predictor

    root, _ = trained_like
    manifest = pd.read_csv(root / "prepared/manifest.csv")
    assert set(manifest["width"]) == set(manifest["height"]) == {64}
    film = Image.open(root / "raw/images" / manifest.loc[manifest["split"] == "test", "image"].iloc[0])
    rng = np.random.default_rng(1)
    odd = {
        "grey_1px": np.full((1, 1), 128, np.uint8),
        "noise_1024": rng.integers(0, 256, (1024, 1024), dtype=np.uint8),
        "strip_10000x10": rng.integers(0, 256, (10, 10000), dtype=np.uint8),
        "film_64x120": np.asarray(film.resize((64, 120), Image.Resampling.BICUBIC)),
        "film_100": np.asarray(film.resize((100, 100), Image.Resampling.BICUBIC)),
    }
    predictor = Predictor(ModelBundle.load(root / "best.pt"), dict.fromkeys(CLASSES, 0.5))
    assert predictor.drift.sizes == drift.SizeRange(64, 64, 1.0, 4.0, 1.5)
    out = predictor.score(list(odd.values()))
    out.index = list(odd)
    assert out.loc["grey_1px", ["image_width", "image_height"]].tolist() == [1, 1]
    assert out.loc["strip_10000x10", ["image_width", "image_height"]].tolist() == [10000, 10]
    assert "size 1 x 1 px outside 16-256 px (training images 64-64 px)" in out.loc["grey_1px", "drift"]
    assert "size 1024 x 1024 px outside 16-256 px" in out.loc["noise_1024", "drift"]
    assert "size 10000 x 10 px outside" in out.loc["strip_10000x10", "drift"]
    assert "aspect ratio 1000.00 > 1.50" in out.loc["strip_10000x10", "drift"]
    assert "aspect ratio 1.88 > 1.50 (training images at most 1.00)" in out.loc["film_64x120", "drift"]
    film_line = out.loc["film_100", "drift"]
    assert film_line is None or "size" not in film_line, film_line
