"""Metrics against scikit-learn, bootstrap coverage on a distribution with known AUC, thresholds."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from pipeline.classes import CLASSES
from pipeline.metrics import (
    average_precision,
    bootstrap_auc,
    class_set,
    mean_auc,
    paired_bootstrap_delta,
    pr_curve_points,
    resample_counts,
    roc_auc,
    roc_curve_points,
    select_thresholds,
    threshold_metrics,
    validation_threshold_metrics,
    weighted_roc_auc,
)


def _predictions(seed: int, n: int = 400, c: int = 5, tied: bool = False):
    """Labels with prevalences 5..40% and scores that carry some signal; (N, C) each."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, c)) < np.linspace(0.05, 0.4, c)).astype(np.int64)
    scores = rng.normal(size=(n, c)) + 0.8 * y
    if tied:  # a handful of distinct values: large tie groups across both labels
        scores = np.round(scores)
    return y, scores


def _sklearn_per_class(metric, y, scores, **kwargs) -> np.ndarray:
    return np.array([metric(y[:, c], scores[:, c], **kwargs) for c in range(y.shape[1])])


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_roc_auc_matches_sklearn(seed, tied):
    y, scores = _predictions(seed, tied=tied)
    ours = roc_auc(y, scores)
    assert ours.shape == (y.shape[1],)
    np.testing.assert_allclose(ours, _sklearn_per_class(roc_auc_score, y, scores), rtol=0, atol=1e-9)


def test_roc_auc_all_tied_is_one_half():
    y = np.array([[0], [1], [0], [1]])
    assert roc_auc(y, np.full((4, 1), 0.3))[0] == 0.5


@pytest.mark.parametrize("tied", [False, True])
def test_average_precision_matches_sklearn(tied):
    y, scores = _predictions(2, tied=tied)
    expected = _sklearn_per_class(average_precision_score, y, scores)
    np.testing.assert_allclose(average_precision(y, scores), expected, rtol=0, atol=1e-9)


def test_average_precision_nan_without_positives():
    y, scores = _predictions(3, c=3)
    y[:, 1] = 0
    ap = average_precision(y, scores)
    assert np.isnan(ap[1]) and np.isfinite(ap[[0, 2]]).all()


def test_undefined_class_is_nan_and_left_out_of_the_class_set_by_name():
    y, scores = _predictions(4, c=len(CLASSES))
    y[:, CLASSES.index("Hernia")] = 0  # no positives
    y[:, CLASSES.index("Pneumonia")] = 1  # no negatives
    per_class = roc_auc(y, scores)
    undefined = [CLASSES.index("Pneumonia"), CLASSES.index("Hernia")]
    assert np.isnan(per_class[undefined]).all()
    assert np.isfinite(np.delete(per_class, undefined)).all()
    classes = class_set(y, None, min_patients=1)
    assert classes.excluded() == {
        "Pneumonia": "0 negative images (fewer than 1)",
        "Hernia": "0 positive images (fewer than 1)",
    }
    assert classes.names() == [c for c in CLASSES if c not in ("Pneumonia", "Hernia")]
    assert mean_auc(per_class, classes) == pytest.approx(np.delete(per_class, undefined).mean(), abs=1e-12)


def test_class_set_counts_patients_not_images():
    y = np.zeros((12, 2), dtype=np.int8)
    y[:6, 0] = 1  # six positive images of class 0, all of patient 0
    y[::2, 1] = 1  # class 1: a positive and a negative image in each of the six patients
    patients = np.repeat(np.arange(6), 2)
    patients[:6] = 0
    classes = class_set(y, patients, min_patients=2)
    assert classes.positives.tolist() == [1, 4] and classes.negatives.tolist() == [3, 4]
    assert classes.included.tolist() == [False, True]
    assert classes.excluded(("A", "B")) == {"A": "1 positive patient (fewer than 2)"}
    assert class_set(y, None, min_patients=2).included.tolist() == [True, True]  # six images each way


def test_mean_auc_refuses_a_class_set_of_other_labels_and_is_nan_over_no_class():
    y, _ = _predictions(4, c=2)
    classes = class_set(y, None, min_patients=1)
    with pytest.raises(ValueError, match="same labels"):
        mean_auc(np.array([0.6, np.nan]), classes)
    empty = class_set(y, None, min_patients=10_000)
    assert math.isnan(mean_auc(np.array([0.6, 0.8]), empty))
    with pytest.raises(ValueError, match=">= 1"):
        class_set(y, None, min_patients=0)


def test_bad_inputs_are_rejected_with_a_reason():
    y, scores = _predictions(5, c=2)
    with pytest.raises(ValueError, match="one shape"):
        roc_auc(y, scores[:, :1])
    with pytest.raises(ValueError, match="0 or 1"):
        roc_auc(y * 2, scores)
    scores[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        roc_auc(y, scores)


@pytest.mark.parametrize("tied", [False, True])
def test_weighted_auc_with_all_ones_equals_plain_auc(tied):
    y, scores = _predictions(6, tied=tied)
    weighted = weighted_roc_auc(y, scores, np.ones(y.shape[0], dtype=np.uint8))
    np.testing.assert_allclose(weighted, roc_auc(y, scores), rtol=0, atol=1e-12)


@pytest.mark.parametrize("tied", [False, True])
def test_weighted_auc_with_counts_equals_auc_of_the_repeated_rows(tied):
    y, scores = _predictions(7, tied=tied)
    counts = resample_counts(np.random.default_rng(0), y.shape[0], 1)[0]
    rows = np.repeat(np.arange(y.shape[0]), counts)  # the resample, materialised
    expected = _sklearn_per_class(roc_auc_score, y[rows], scores[rows])
    np.testing.assert_allclose(weighted_roc_auc(y, scores, counts), expected, rtol=0, atol=1e-9)


@pytest.mark.parametrize("high", [4, 40_000])  # row totals below and above 2^16
def test_weighted_auc_matches_sklearn_sample_weight(high):
    y, scores = _predictions(20, tied=True)
    weights = np.random.default_rng(20).integers(0, high, y.shape[0])
    expected = _sklearn_per_class(roc_auc_score, y, scores, sample_weight=weights)
    np.testing.assert_allclose(weighted_roc_auc(y, scores, weights), expected, rtol=0, atol=1e-9)


def test_resample_counts_are_draws_with_replacement():
    counts = resample_counts(np.random.default_rng(0), 500, 40)
    assert counts.shape == (40, 500) and counts.dtype == np.uint8
    assert (counts.sum(axis=1) == 500).all()
    # About 1 - 1/e of the rows appear in a bootstrap resample.
    assert (counts > 0).mean() == pytest.approx(1 - math.exp(-1), abs=0.02)


def test_bootstrap_resamples_match_sklearn_on_the_same_rows():
    y, scores = _predictions(8, n=300, c=3, tied=True)
    result = bootstrap_auc(y, scores, n_resamples=20, seed=3, min_patients=1)
    counts = resample_counts(np.random.default_rng(3), y.shape[0], 20)
    for r in range(20):
        rows = np.repeat(np.arange(y.shape[0]), counts[r])
        expected = _sklearn_per_class(roc_auc_score, y[rows], scores[rows])
        np.testing.assert_allclose(result["samples"][r], expected, rtol=0, atol=1e-9)
    assert (result["low"] <= result["auc"]).all() and (result["auc"] <= result["high"]).all()
    assert result["mean_low"] <= result["mean_auc"] <= result["mean_high"]


def test_bootstrap_is_reproducible_by_seed():
    y, scores = _predictions(9)
    first = bootstrap_auc(y, scores, n_resamples=100, seed=1, min_patients=1)
    again = bootstrap_auc(y, scores, n_resamples=100, seed=1, min_patients=1)
    other = bootstrap_auc(y, scores, n_resamples=100, seed=2, min_patients=1)
    np.testing.assert_array_equal(first["samples"], again["samples"])
    assert not np.array_equal(first["samples"], other["samples"])


def test_bootstrap_ignores_resamples_without_positives():
    y, scores = _predictions(10, n=40, c=2)
    y[:, 0] = 0
    y[0, 0] = 1  # one positive: about (1 - 1/40)^40 = 36% of resamples miss it
    result = bootstrap_auc(y, scores, n_resamples=300, seed=0, min_patients=1)
    n_valid = result["n_valid"][0]
    assert 150 < n_valid < 240
    assert np.isnan(result["samples"][:, 0]).sum() == 300 - n_valid
    assert np.isfinite([result["low"][0], result["high"][0]]).all()
    # class 0 is in the mean: a resample without its positive is dropped from the mean, and counted
    missing = np.isnan(result["samples"][:, 0])
    np.testing.assert_array_equal(np.isnan(result["mean_samples"]), missing)
    assert result["mean_dropped"] == missing.sum() and result["mean_n_valid"] == n_valid


def test_bootstrap_leaves_a_class_undefined_on_the_full_data_out_of_the_mean():
    y, scores = _predictions(11, c=3)
    y[:, 2] = 0
    result = bootstrap_auc(y, scores, n_resamples=50, min_patients=1)
    assert result["classes"].excluded(("a", "b", "c")) == {"c": "0 positive images (fewer than 1)"}
    assert np.isnan([result["low"][2], result["high"][2]]).all() and result["n_valid"][2] == 0
    expected = result["samples"][:, :2].mean(axis=1)
    np.testing.assert_allclose(result["mean_samples"], expected, rtol=0, atol=1e-12)


def _one_rare_patient(n: int = 400):
    """n patients of one image: 13 ordinary classes at AUC ~0.98, and Hernia with a single
    positive patient, scored lowest (AUC 0), as in the demo's test split."""
    rng = np.random.default_rng(0)
    y = (rng.random((n, len(CLASSES))) < 0.2).astype(np.int8)
    y[:, -1] = 0
    y[0, -1] = 1
    scores = rng.normal(size=y.shape) + 2.8 * y
    scores[0, -1] = scores[:, -1].min() - 1.0
    return y, scores, np.arange(n)


def test_a_class_with_one_positive_patient_no_longer_splits_the_resampled_means():
    """Seen before: mean 0.910, interval [0.907, 0.983]: the resamples that missed the one Hernia
    patient averaged 13 classes, the others 14, and the interval spanned both clusters."""
    y, scores, patients = _one_rare_patient()
    ordinary = bootstrap_auc(y[:, :-1], scores[:, :-1], 1000, seed=0, groups=patients, min_patients=10)
    result = bootstrap_auc(y, scores, 1000, seed=0, groups=patients, min_patients=10)
    assert result["classes"].excluded() == {"Hernia": "1 positive patient (fewer than 10)"}
    assert result["mean_auc"] == pytest.approx(ordinary["mean_auc"], abs=1e-12)
    assert result["mean_low"] <= result["mean_auc"] <= result["mean_high"]
    np.testing.assert_allclose(result["mean_samples"], ordinary["mean_samples"], rtol=0, atol=1e-12)
    assert result["mean_dropped"] == 0
    # in the set (a minimum of 1): every kept resample is over all 14, the others dropped and counted
    kept = bootstrap_auc(y, scores, 1000, seed=0, groups=patients, min_patients=1)
    missing = np.isnan(kept["samples"][:, -1])
    assert kept["mean_dropped"] == missing.sum() and 0.3 < missing.mean() < 0.45  # (1 - 1/400)^400 = 37%
    np.testing.assert_allclose(kept["mean_samples"][~missing], kept["samples"][~missing].mean(axis=1), atol=1e-12)
    assert kept["mean_low"] <= kept["mean_auc"] <= kept["mean_high"]
    # one cluster: as wide as 13/14 of the ordinary classes' interval, not spanning 0.91..0.98
    ordinary_width = ordinary["mean_high"] - ordinary["mean_low"]
    assert kept["mean_high"] - kept["mean_low"] == pytest.approx(13 / 14 * ordinary_width, rel=0.2)


def test_paired_delta_is_over_one_class_set():
    y, scores, patients = _one_rare_patient()
    better = scores + 0.5 * y  # better on every class, the rare one included
    result = paired_bootstrap_delta(y, scores, better, 300, seed=1, groups=patients, min_patients=10)
    assert result["classes"].excluded() == {"Hernia": "1 positive patient (fewer than 10)"}
    alone = [bootstrap_auc(y, s, 300, seed=1, groups=patients, min_patients=10) for s in (scores, better)]
    assert result["mean_auc_a"] == pytest.approx(alone[0]["mean_auc"]) and result["mean_dropped"] == 0
    np.testing.assert_allclose(result["samples"], alone[1]["mean_samples"] - alone[0]["mean_samples"], atol=1e-12)
    kept = paired_bootstrap_delta(y, scores, better, 300, seed=1, groups=patients, min_patients=1)
    assert kept["mean_dropped"] == np.isnan(kept["samples"]).sum() > 50


def test_bootstrap_interval_covers_the_true_auc_of_a_binormal_model():
    """Positives ~ N(d, 1), negatives ~ N(0, 1): the true AUC is Phi(d / sqrt(2))."""
    d, n_pos, n_neg, trials = 1.0, 60, 60, 200
    true_auc = 0.5 * (1.0 + math.erf(d / 2.0))  # Phi(d / sqrt 2)
    y = np.r_[np.ones(n_pos), np.zeros(n_neg)].astype(np.int64)[:, None]
    rng = np.random.default_rng(12)
    covered = 0
    for trial in range(trials):
        scores = rng.normal(size=(n_pos + n_neg, 1)) + d * y
        result = bootstrap_auc(y, scores, n_resamples=200, seed=trial, min_patients=1)
        covered += result["low"][0] <= true_auc <= result["high"][0]
    # Binomial(200, 0.95) lies in 180..198 with probability > 0.999.
    assert 0.88 <= covered / trials <= 0.99, covered


def test_paired_delta_of_identical_models_is_zero():
    y, scores = _predictions(13)
    result = paired_bootstrap_delta(y, scores, scores.copy(), n_resamples=200, min_patients=1)
    assert result["delta"] == 0.0 and result["low"] == 0.0 and result["high"] == 0.0
    assert result["low"] <= 0.0 <= result["high"]
    assert result["p_value"] == 1.0  # every resample has delta <= 0: no evidence b is better


def test_paired_delta_detects_a_better_model_on_the_same_rows():
    y, _ = _predictions(14, n=600)
    rng = np.random.default_rng(14)
    noise = rng.normal(size=y.shape)
    weak, strong = y + 2.0 * noise, y + 0.7 * noise  # same noise: strong is a better model
    result = paired_bootstrap_delta(y, weak, strong, n_resamples=300, seed=5, min_patients=1)
    assert result["delta"] > 0.05 and result["low"] > 0.0
    assert result["p_value"] < 0.01
    assert (
        paired_bootstrap_delta(y, weak, strong, n_resamples=300, seed=5, margin=0.9, min_patients=1)["p_value"] == 1.0
    )
    # Paired: each delta is the difference of the two models' mean AUCs on one resample.
    a = bootstrap_auc(y, weak, n_resamples=300, seed=5, min_patients=1)["mean_samples"]
    b = bootstrap_auc(y, strong, n_resamples=300, seed=5, min_patients=1)["mean_samples"]
    np.testing.assert_allclose(result["samples"], b - a, rtol=0, atol=1e-12)


def _one_image_per_patient(seed: int, n: int = 300):
    """Labels, two models' scores and patient ids for n patients with one image each."""
    y, _ = _predictions(seed, n=n, c=3)
    noise = np.random.default_rng(seed).normal(size=y.shape)
    return y, y + 2.0 * noise, y + 0.7 * noise, np.arange(n)


def test_patient_bootstrap_with_one_image_per_patient_is_the_image_bootstrap():
    y, scores, _, patients = _one_image_per_patient(30)
    images = bootstrap_auc(y, scores, n_resamples=200, seed=4, min_patients=1)
    by_patient = bootstrap_auc(y, scores, n_resamples=200, seed=4, groups=patients, min_patients=1)
    # ids in row order: patient j is row j, so the same draws give the same resamples
    np.testing.assert_array_equal(by_patient["samples"], images["samples"])
    assert (images["resampled"], images["n_groups"]) == ("images", 300)
    assert (by_patient["resampled"], by_patient["n_groups"]) == ("patients", 300)
    # ids as shuffled strings: other resamples of the same distribution
    names = np.array([f"p{i:05d}" for i in np.random.default_rng(0).permutation(300)])
    shuffled = bootstrap_auc(y, scores, n_resamples=1000, seed=4, groups=names, min_patients=1)
    wide = bootstrap_auc(y, scores, n_resamples=1000, seed=4, min_patients=1)
    assert shuffled["mean_high"] - shuffled["mean_low"] == pytest.approx(wide["mean_high"] - wide["mean_low"], rel=0.15)
    np.testing.assert_allclose(shuffled["high"] - shuffled["low"], wide["high"] - wide["low"], rtol=0.2)


def _width(result: dict) -> float:
    return result["mean_high"] - result["mean_low"]


def test_intervals_widen_back_when_images_of_one_patient_are_duplicated():
    """Nine copies of every image add no information: only the patient bootstrap knows that."""
    y, scores, _, patients = _one_image_per_patient(31)
    rows = np.repeat(np.arange(y.shape[0]), 9)  # (9N,) each patient's image nine times
    original = bootstrap_auc(y, scores, n_resamples=400, seed=6, min_patients=1)
    images = bootstrap_auc(y[rows], scores[rows], n_resamples=400, seed=6, min_patients=1)
    by_patient = bootstrap_auc(y[rows], scores[rows], n_resamples=400, seed=6, groups=patients[rows], min_patients=1)
    assert by_patient["auc"] == pytest.approx(original["auc"], abs=1e-12)
    assert _width(images) < 0.5 * _width(original)  # ~1/3: it believes in nine times the patients
    assert _width(by_patient) == pytest.approx(_width(original), rel=0.2)
    assert _width(by_patient) > 2.0 * _width(images)
    assert by_patient["n_groups"] == 300 and images["n_groups"] == 2700
    # a patient drawn k times weighs each of its nine rows k times: the original's resamples exactly
    np.testing.assert_allclose(by_patient["samples"], original["samples"], rtol=0, atol=1e-12)


def test_patient_bootstrap_rows_weigh_as_often_as_their_patient_was_drawn():
    y, scores = _predictions(32, n=120, c=3, tied=True)
    patients = np.random.default_rng(32).integers(0, 25, y.shape[0])  # ~5 images per patient
    result = bootstrap_auc(y, scores, n_resamples=10, seed=2, groups=patients, min_patients=1)
    ids, index = np.unique(patients, return_inverse=True)
    counts = resample_counts(np.random.default_rng(2), ids.size, 10)
    for r in range(10):
        rows = np.repeat(np.arange(y.shape[0]), counts[r][index])
        expected = _sklearn_per_class(roc_auc_score, y[rows], scores[rows])
        np.testing.assert_allclose(result["samples"][r], expected, rtol=0, atol=1e-9)


def test_patient_bootstrap_sums_exactly_when_a_resample_outweighs_the_rows():
    """A patient resample's total weight is not N: drawing a big patient twice pushes it past 2^16."""
    y, scores = _predictions(36, n=65_000, c=2, tied=True)
    patients = np.r_[np.zeros(20_000, dtype=np.int64), np.arange(1, 45_001)]  # one patient, 20,000 images
    result = bootstrap_auc(y, scores, n_resamples=8, seed=1, groups=patients, min_patients=1)
    ids, index = np.unique(patients, return_inverse=True)
    counts = resample_counts(np.random.default_rng(1), ids.size, 8)
    weights = counts[:, index]  # (R, N)
    assert weights.sum(axis=1).max() > np.iinfo(np.uint16).max  # the seed draws the big patient twice
    for r in range(8):
        expected = weighted_roc_auc(y, scores, weights[r].astype(np.float64))  # float sums: no wrap-around
        np.testing.assert_allclose(result["samples"][r], expected, rtol=0, atol=1e-9)


def test_paired_delta_resamples_patients_when_given_groups():
    y, weak, strong, patients = _one_image_per_patient(33)
    rows = np.repeat(np.arange(y.shape[0]), 9)
    original = paired_bootstrap_delta(y, weak, strong, n_resamples=300, seed=7, min_patients=1)
    images = paired_bootstrap_delta(y[rows], weak[rows], strong[rows], n_resamples=300, seed=7, min_patients=1)
    by_patient = paired_bootstrap_delta(
        y[rows], weak[rows], strong[rows], n_resamples=300, seed=7, groups=patients[rows], min_patients=1
    )
    assert by_patient["delta"] == pytest.approx(original["delta"], abs=1e-12) and by_patient["delta"] > 0
    np.testing.assert_allclose(by_patient["samples"], original["samples"], rtol=0, atol=1e-12)
    assert (by_patient["high"] - by_patient["low"]) > 2.0 * (images["high"] - images["low"])
    assert (by_patient["resampled"], by_patient["n_groups"]) == ("patients", 300)
    assert images["resampled"] == "images"
    # paired: each delta is the difference of the two models' patient-bootstrap means
    a = bootstrap_auc(y[rows], weak[rows], n_resamples=300, seed=7, groups=patients[rows], min_patients=1)[
        "mean_samples"
    ]
    b = bootstrap_auc(y[rows], strong[rows], n_resamples=300, seed=7, groups=patients[rows], min_patients=1)[
        "mean_samples"
    ]
    np.testing.assert_allclose(by_patient["samples"], b - a, rtol=0, atol=1e-12)


def test_paired_delta_of_stacked_seeds_averages_runs_on_the_same_patients():
    y, weak, strong, _ = _one_image_per_patient(34)
    patients = np.arange(y.shape[0]) // 3  # three images per patient
    one = paired_bootstrap_delta(y, weak, strong, n_resamples=200, seed=8, groups=patients, min_patients=1)
    copies = paired_bootstrap_delta(
        y, np.stack([weak] * 3), np.stack([strong] * 2), n_resamples=200, seed=8, groups=patients, min_patients=1
    )
    for key in ("delta", "low", "high", "p_value", "mean_auc_a", "mean_auc_b"):
        assert copies[key] == pytest.approx(one[key], abs=1e-12), key
    assert (copies["n_runs_a"], copies["n_runs_b"]) == (3, 2) and (one["n_runs_a"], one["n_runs_b"]) == (1, 1)
    # different runs: mean over b's runs minus mean over a's, each resample on the same patients
    runs_a = np.stack([weak, weak + 0.3 * np.random.default_rng(1).normal(size=y.shape)])
    runs_b = np.stack([strong, strong + 0.3 * np.random.default_rng(2).normal(size=y.shape), weak])
    stacked = paired_bootstrap_delta(y, runs_a, runs_b, n_resamples=200, seed=8, groups=patients, min_patients=1)
    boot = lambda s: bootstrap_auc(y, s, n_resamples=200, seed=8, groups=patients, min_patients=1)  # noqa: E731
    mean_a = np.mean([boot(s)["mean_auc"] for s in runs_a])
    mean_b = np.mean([boot(s)["mean_auc"] for s in runs_b])
    assert stacked["mean_auc_a"] == pytest.approx(mean_a) and stacked["mean_auc_b"] == pytest.approx(mean_b)
    assert stacked["delta"] == pytest.approx(mean_b - mean_a, abs=1e-12)
    expected = np.mean([boot(s)["mean_samples"] for s in runs_b], axis=0) - np.mean(
        [boot(s)["mean_samples"] for s in runs_a], axis=0
    )
    np.testing.assert_allclose(stacked["samples"], expected, rtol=0, atol=1e-12)


def test_bad_groups_and_stacked_shapes_are_rejected_with_a_reason():
    y, scores = _predictions(35, n=50, c=2)
    with pytest.raises(ValueError, match=r"groups must be \(N,\) = \(50,\).*got shape \(49,\)"):
        bootstrap_auc(y, scores, n_resamples=5, groups=np.arange(49), min_patients=1)
    with pytest.raises(ValueError, match=r"groups must be .*got shape \(50, 1\)"):
        paired_bootstrap_delta(y, scores, scores, n_resamples=5, groups=np.arange(50)[:, None], min_patients=1)
    with pytest.raises(ValueError, match="NaN"):
        bootstrap_auc(y, scores, n_resamples=5, groups=np.r_[np.arange(49.0), np.nan], min_patients=1)
    with pytest.raises(ValueError, match=r"scores_b must be \(N, C\).*\(S, N, C\).*got shape \(1, 1, 50, 2\)"):
        paired_bootstrap_delta(y, scores, scores[None, None], n_resamples=5, min_patients=1)
    with pytest.raises(ValueError, match="scores_a must be"):
        paired_bootstrap_delta(y, np.empty((0, 50, 2)), scores, n_resamples=5, min_patients=1)
    with pytest.raises(ValueError, match="one shape"):  # a run of other rows than the labels
        paired_bootstrap_delta(y, np.stack([scores[:40]] * 2), scores, n_resamples=5, min_patients=1)


def test_bootstrap_settings_are_validated():
    with pytest.raises(ValueError, match="ci"):
        bootstrap_auc(*_predictions(15), ci=1.5, min_patients=1)
    with pytest.raises(ValueError, match="n_resamples must be >= 1"):
        bootstrap_auc(*_predictions(15), n_resamples=0, min_patients=1)
    with pytest.raises(ValueError, match="must be >= 1, got 0"):
        bootstrap_auc(*_predictions(15), min_patients=0)


def _brute_force_objective(y, s, t, method):
    pred = s >= t
    tp, fp = (pred & (y == 1)).sum(), (pred & (y == 0)).sum()
    n_pos, n_neg = (y == 1).sum(), (y == 0).sum()
    if method == "youden":
        return tp / n_pos - fp / n_neg
    return 2 * tp / (tp + fp + n_pos)


@pytest.mark.parametrize("method", ["youden", "f1"])
def test_select_thresholds_maximises_the_objective(method):
    y, scores = _predictions(16, n=80, c=4)
    scores = np.round(scores, 1)  # ties between candidates
    thresholds = select_thresholds(y, scores, method)
    for c in range(y.shape[1]):
        values = {t: _brute_force_objective(y[:, c], scores[:, c], t, method) for t in np.unique(scores[:, c])}
        best = max(values.values())
        assert values[thresholds[c]] == pytest.approx(best, abs=1e-12)
        assert thresholds[c] == max(t for t, v in values.items() if v >= best - 1e-12)


def test_select_thresholds_rejects_unknown_method_and_marks_undefined_classes():
    y, scores = _predictions(17, c=2)
    with pytest.raises(ValueError, match="youden"):
        select_thresholds(y, scores, "accuracy")
    y[:, 1] = 0
    assert np.isnan(select_thresholds(y, scores)[1]) and np.isfinite(select_thresholds(y, scores)[0])


def test_threshold_metrics_counts():
    y = np.array([[1], [1], [0], [0], [0]])
    scores = np.array([[0.9], [0.4], [0.6], [0.2], [0.1]])
    m = threshold_metrics(y, scores, np.array([0.5]))
    assert (m["tp"][0], m["fp"][0], m["fn"][0], m["tn"][0]) == (1, 1, 1, 2)
    assert m["sensitivity"][0] == 0.5 and m["specificity"][0] == pytest.approx(2 / 3)
    assert m["precision"][0] == 0.5 and m["f1"][0] == 0.5
    assert np.isnan(threshold_metrics(y, scores, np.array([np.nan]))["sensitivity"][0])


def test_thresholds_chosen_on_validation_are_applied_unchanged_to_test():
    rng = np.random.default_rng(18)
    n = 200
    y = (np.arange(n) % 2)[:, None].repeat(2, axis=1)  # (N, 2), half positive
    # Validation separates perfectly at 0.5; test scores are shifted up by 0.25.
    s_val = np.where(y == 1, rng.uniform(0.5, 1.0, (n, 2)), rng.uniform(0.0, 0.5, (n, 2)))
    s_test = s_val + 0.25
    t_val = select_thresholds(y, s_val)
    result = validation_threshold_metrics(y, s_val, y, s_test)
    np.testing.assert_array_equal(result["threshold"], t_val)
    predicted = s_test >= t_val
    expected_specificity = (~predicted & (y == 0)).sum(axis=0) / (y == 0).sum(axis=0)
    np.testing.assert_allclose(result["specificity"], expected_specificity)
    assert (result["sensitivity"] == 1.0).all() and (result["specificity"] < 0.7).all()
    # Thresholds re-chosen on test would separate it perfectly again.
    rechosen = threshold_metrics(y, s_test, select_thresholds(y, s_test))
    assert (rechosen["specificity"] == 1.0).all()


def test_curve_points_for_plotting():
    y, scores = _predictions(19, c=3)
    y[:, 2] = 0
    roc, pr = roc_curve_points(y, scores), pr_curve_points(y, scores)
    assert len(roc) == len(pr) == 3
    fpr, tpr = roc[0]
    assert fpr[0] == 0.0 and tpr[-1] == 1.0 and np.all(np.diff(fpr) >= 0)
    recall, precision = pr[0]
    assert recall[0] == 1.0 and recall[-1] == 0.0 and precision.shape == recall.shape
    assert roc[2][0].size == 0 and pr[2][0].size == 0


def test_comparison_table_marks_the_seed_paper_once_in_auc_order():
    from pipeline.classes import PUBLISHED, SEED_PAPER, SEED_PAPER_AUC
    from pipeline.evaluation.scoring import comparison_markdown

    per_class = {c: 0.7 + 0.01 * i for i, c in enumerate(CLASSES)}
    per_class["Hernia"] = None  # undefined on this test split
    metrics = {
        "mean_auc": 0.8123,
        "mean_auc_ci": [0.8001, 0.8234],
        "per_class_auc": per_class,
        "per_class_auc_ci": {c: [v - 0.02, v + 0.02] if v is not None else [None, None] for c, v in per_class.items()},
        "test_patients": 2797,
        "test_images": 25596,
        "min_positive_patients": 10,
        "classes_in_mean": list(CLASSES[:-1]),
        "excluded_classes": {"Hernia": "0 positive patients (fewer than 10)"},
    }
    text = comparison_markdown(metrics)
    assert text.count("seed paper") == 1
    assert f"| {SEED_PAPER} **(seed paper)** | {SEED_PAPER_AUC:.3f} |" in text
    assert [auc for name, auc in PUBLISHED if name == SEED_PAPER] == [SEED_PAPER_AUC]
    method_rows = text.split("\n\n")[0].splitlines()[2:]
    assert len(method_rows) == len(PUBLISHED) + 1
    values = [float(row.split("|")[2].strip(" *").split()[0].strip("*")) for row in method_rows]
    assert values == sorted(values)  # ascending mean AUC, this run in its place
    assert "| **this run** | **0.812** [0.800, 0.823] |" in method_rows
    assert "| Hernia | undefined | |" in text and "| Atelectasis | 0.700 | [0.680, 0.720] |" in text
    assert "2797 patients, 25596 images" in text
    assert (
        "The test mean AUC is over 13 of 14 findings, those with at least 10 positive and 10 negative test "
        "patients; left out: Hernia: 0 positive patients (fewer than 10)." in text
    )


def test_summary_names_the_classes_left_out_of_the_mean(tmp_path, monkeypatch, capsys):
    import json

    from components import summary

    metrics = {
        "per_class_auc": {c: 0.8 for c in CLASSES},
        "per_class_auc_ci": {c: [0.7, 0.9] for c in CLASSES},
        "mean_auc": 0.8,
        "mean_auc_ci": [0.75, 0.85],
        "test_images": 10,
        "min_positive_patients": 10,
        "classes_in_mean": list(CLASSES[:-1]),
        "excluded_classes": {"Hernia": "1 positive patient (fewer than 10)"},
        "bootstrap_resamples": 1000,
        "bootstrap_dropped_resamples": 2,
    }
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert summary.main(["--reports", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "The test mean AUC is over 13 of 14 findings" in out and "Hernia: 1 positive patient" in out
    assert "2 of 1000 resamples had no positive or no negative patient" in out
    del metrics["classes_in_mean"]  # a metrics.json from before the class set: said, not passed over
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    assert summary.main(["--reports", str(tmp_path)]) == 0
    assert "does not name the classes its mean AUC is over: rerun the evaluate step" in capsys.readouterr().out
