"""Subgroup evaluation: age bands, per-subgroup AUC against scikit-learn, empty and one-class groups."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from pipeline.classes import CLASSES
from pipeline.evaluation import plots
from pipeline.evaluation.subgroups import age_bands, group_report, read_subgroup_meta, subgroup_report
from pipeline.io import write_json

C = len(CLASSES)


def test_age_bands_edges_and_impossible_ages():
    bands, left_out = age_bands(pd.Series([0, 19, 20, 39, 40, 59, 60, 79, 80, 95, 100, 101, 414, None]))
    expected = ["<20", "<20", "20-39", "20-39", "40-59", "40-59", "60-79", "60-79", "80+", "80+", "80+", "", "", ""]
    assert bands.tolist() == expected
    assert left_out == {"missing": 1, "impossible": 2}


def constructed(n: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, pd.DataFrame]:
    """Labels, scores whose quality differs by sex, patients (2 images each), and metadata."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, C)) < 0.3).astype(np.int8)
    sex = np.where(np.arange(n) % 4 < 2, "M", "F")  # both images of a patient share the sex
    noise = np.where(sex == "M", 0.5, 2.0)[:, None]
    probs = y + noise * rng.standard_normal((n, C))
    patients = np.arange(n) // 2
    meta = pd.DataFrame(
        {
            "image": [f"{i:05d}.png" for i in range(n)],
            "sex": sex,
            "age": np.where(np.arange(n) % 2, 45, 70),
            "view": "PA",  # no AP image: an empty subgroup
            "followup": np.arange(n) % 2,
        }
    )
    return y, probs, patients, meta


def test_subgroup_auc_equals_sklearn_on_the_subgroup_rows():
    y, probs, patients, meta = constructed()
    report = subgroup_report(y, probs, patients, meta, min_patients=5, n_resamples=50, ci=0.95, seed=0)
    for attribute, column, group in (("sex", "sex", "M"), ("sex", "sex", "F"), ("age", "age", "40-59")):
        value = 45 if group == "40-59" else group
        rows = (meta[column] == value).to_numpy()
        g = report["attributes"][attribute]["groups"][group]
        assert g["images"] == rows.sum() and g["patients"] == len(np.unique(patients[rows]))
        expected = [roc_auc_score(y[rows, k], probs[rows, k]) for k in range(C)]
        got = [g["per_class"][c]["auc"] for c in CLASSES]
        np.testing.assert_allclose(got, expected, rtol=1e-12)
        assert g["mean_auc"] == pytest.approx(np.mean(expected))
        lo, hi = g["mean_auc_ci"]
        assert lo < g["mean_auc"] < hi
    males, females = (report["attributes"]["sex"]["groups"][s]["mean_auc"] for s in ("M", "F"))
    assert males > females + 0.1  # the constructed scores are much sharper for M


def test_empty_subgroup_is_reported_empty():
    y, probs, patients, meta = constructed()
    report = subgroup_report(y, probs, patients, meta, min_patients=5, n_resamples=20, ci=0.95, seed=0)
    ap = report["attributes"]["view"]["groups"]["AP"]
    assert ap["status"] == "empty" and ap["images"] == 0 and ap["mean_auc"] is None and ap["mean_auc_ci"] is None
    assert all(v["auc"] is None and v["reason"] == "empty subgroup" for v in ap["per_class"].values())
    under20 = report["attributes"]["age"]["groups"]["<20"]
    assert under20["status"] == "empty"


def test_one_class_and_rare_classes_get_null_with_a_reason():
    rng = np.random.default_rng(1)
    n = 60
    y = np.zeros((n, C), dtype=np.int8)
    y[:30, 0] = 1  # class 0: 30 positives, 30 negatives -> scored
    y[:3, 1] = 1  # class 1: 3 positives < 5
    y[:, 2] = 1  # class 2: only positives (no negatives)
    probs = rng.random((n, C))
    g = group_report(y, probs, np.arange(n), min_patients=5, n_resamples=20, ci=0.95, seed=0)
    pc = g["per_class"]
    assert pc[CLASSES[0]]["auc"] == pytest.approx(roc_auc_score(y[:, 0], probs[:, 0]))
    rare = {
        "auc": None,
        "ci": None,
        "positives": 3,
        "negatives": 57,
        "positive_patients": 3,
        "negative_patients": 57,
        "reason": "3 positive patients (fewer than 5)",
    }
    assert pc[CLASSES[1]] == rare
    assert pc[CLASSES[2]]["auc"] is None and pc[CLASSES[2]]["reason"] == "0 negative patients (fewer than 5)"
    assert pc[CLASSES[3]]["reason"] == "0 positive patients (fewer than 5)"
    assert g["classes_in_mean"] == [CLASSES[0]] and g["mean_auc"] == pytest.approx(pc[CLASSES[0]]["auc"])
    assert g["excluded_classes"][CLASSES[1]] == rare["reason"] and len(g["excluded_classes"]) == C - 1

    none_scorable = group_report(y * 0, probs, np.arange(n), 5, 20, 0.95, 0)
    assert none_scorable["status"] == "no class scorable" and none_scorable["mean_auc"] is None


def test_a_subgroup_counts_patients_not_images():
    """Six positive images of one patient are one positive patient: too few for a number."""
    rng = np.random.default_rng(2)
    n = 60
    y = np.zeros((n, C), dtype=np.int8)
    y[:30, 0] = 1  # class 0: 30 positive patients
    y[:6, 1] = 1  # class 1: six positive images, all of patient 0
    patients = np.r_[np.zeros(6, dtype=int), np.arange(1, n - 5)]
    probs = y + rng.random((n, C))
    g = group_report(y, probs, patients, min_patients=5, n_resamples=50, ci=0.95, seed=0)
    entry = g["per_class"][CLASSES[1]]
    assert (entry["positives"], entry["positive_patients"]) == (6, 1) and entry["auc"] is None
    assert entry["reason"] == "1 positive patient (fewer than 5)"
    assert g["classes_in_mean"] == [CLASSES[0]] and g["mean_dropped_resamples"] == 0


def test_unassigned_rows_are_counted_not_grouped():
    y, probs, patients, meta = constructed(n=40)
    meta.loc[:3, "sex"] = ""
    meta.loc[4:5, "age"] = 414
    meta.loc[6, "age"] = np.nan
    report = subgroup_report(y, probs, patients, meta, min_patients=1, n_resamples=10, ci=0.95, seed=0)
    attrs = report["attributes"]
    assert attrs["sex"]["unassigned"] == {"missing": 4}
    assert sum(g["images"] for g in attrs["sex"]["groups"].values()) == 36
    assert attrs["age"]["unassigned"] == {"missing": 1, "impossible": 2}
    assert sum(g["images"] for g in attrs["age"]["groups"].values()) == 37
    assert attrs["followup"]["groups"]["first visit"]["images"] == 20


def test_read_subgroup_meta_orders_rows_and_names_a_stale_manifest(tmp_path: Path):
    manifest = tmp_path / "manifest.csv"
    pd.DataFrame(
        {"image": ["a.png", "b.png"], "patient": [1, 2], "followup": [0, 3], "view": ["PA", "AP"]}
        | {"sex": ["F", ""], "age": [33, None], "split": "test"}
    ).to_csv(manifest, index=False)
    meta = read_subgroup_meta(manifest, ["b.png", "a.png"])
    assert meta["image"].tolist() == ["b.png", "a.png"] and meta["followup"].tolist() == [3, 0]
    assert pd.isna(meta["sex"].iat[0]) and meta["sex"].iat[1] == "F" and pd.isna(meta["age"].iat[0])
    with pytest.raises(ValueError, match="not in the manifest"):
        read_subgroup_meta(manifest, ["c.png"])
    pd.read_csv(manifest).drop(columns=["sex", "age"]).to_csv(manifest, index=False)
    with pytest.raises(ValueError, match=r"manifest\.csv: no column\(s\) sex, age .*rerun the prepare step"):
        read_subgroup_meta(manifest, ["a.png"])


def test_forest_plot_and_json_round_trip(tmp_path: Path):
    y, probs, patients, meta = constructed(n=200)
    report = subgroup_report(y, probs, patients, meta, min_patients=5, n_resamples=20, ci=0.95, seed=0)
    write_json(tmp_path / "subgroups.json", report)
    assert json.loads((tmp_path / "subgroups.json").read_text())["attributes"]["view"]["groups"]["AP"]["images"] == 0
    plots.subgroup_forest(report, 0.8, tmp_path / "subgroups.png")
    assert (tmp_path / "subgroups.png").stat().st_size > 5_000


def test_plots_draw_an_interval_that_does_not_contain_its_point(tmp_path: Path):
    """A percentile bootstrap interval of a small group can lie beside its point estimate; the
    evaluate step once failed on it ("'xerr' must not contain negative values")."""
    y, probs, patients, meta = constructed(n=200)
    report = subgroup_report(y, probs, patients, meta, min_patients=5, n_resamples=20, ci=0.95, seed=0)
    group = next(g for e in report["attributes"].values() for g in e["groups"].values() if g["mean_auc"] is not None)
    group["mean_auc_ci"] = [group["mean_auc"] + 0.01, group["mean_auc"] + 0.05]  # above the point
    plots.subgroup_forest(report, 0.8, tmp_path / "subgroups.png")
    assert (tmp_path / "subgroups.png").stat().st_size > 5_000
    values = np.array([0.7, 0.8, 0.9])
    plots.per_class_bars(["a", "b", "c"], values, values + 0.02, values + 0.05, tmp_path / "bars.png", reference=0.8)
    assert (tmp_path / "bars.png").stat().st_size > 5_000
