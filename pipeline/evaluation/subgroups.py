"""Test AUC per patient subgroup: sex, age band, view position and first visit vs follow-up.

Each subgroup's per-class and mean AUC come with percentile intervals from a bootstrap over the
subgroup's own patients (`bootstrap_auc(..., groups=patients)`). A class with fewer than
`min_patients` positive or negative *patients* in a subgroup gets no number (`null` and a reason):
an AUC from three positive images of one patient says nothing, and images of one patient are not
independent. A subgroup's mean AUC is over one class set, the classes it can score, in the point
estimate and in every resample (`pipeline.metrics.ClassSet`); subgroups with different class
lists are not strictly comparable, and `classes_in_mean` says which.

Rows without a value for an attribute (sex not M/F, age missing, view not PA/AP) belong to none of
its subgroups and are counted under `unassigned`; ages above `MAX_AGE` are counted as impossible
and never binned.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..classes import CLASSES, MAX_AGE
from ..metrics import ClassSet, bootstrap_auc, class_set

# Age bands in whole years, (label, lowest, highest) both ends included; 80+ runs to MAX_AGE.
AGE_BANDS: tuple[tuple[str, int, int], ...] = (
    ("<20", 0, 19),
    ("20-39", 20, 39),
    ("40-59", 40, 59),
    ("60-79", 60, 79),
    ("80+", 80, MAX_AGE),
)
SEX_GROUPS = ("M", "F")
VIEW_GROUPS = ("PA", "AP")
FOLLOWUP_GROUPS = ("first visit", "follow-up")  # follow-up number 0, and 1 or more
META_COLUMNS = ("image", "sex", "age", "view", "followup")


def age_bands(ages: pd.Series | np.ndarray) -> tuple[np.ndarray, dict[str, int]]:
    """The AGE_BANDS label of each age, "" when missing or above MAX_AGE.

    Returns:
        (N,) object array of band labels, and {"missing": n, "impossible": n} for the rows
        left out.
    """
    age = pd.to_numeric(pd.Series(np.asarray(ages, dtype=object)), errors="coerce").to_numpy(dtype=np.float64)
    out = np.full(len(age), "", dtype=object)
    for label, low, high in AGE_BANDS:
        out[(age >= low) & (age <= high)] = label
    missing = np.isnan(age) | (age < 0)
    impossible = age > MAX_AGE
    return out, {"missing": int(missing.sum()), "impossible": int(impossible.sum())}


def subgroup_labels(meta: pd.DataFrame) -> dict[str, tuple[np.ndarray, tuple[str, ...], dict[str, int]]]:
    """For each attribute: each row's group ("" for none), the groups in order, and the rows left out.

    Args:
        meta: one row per image with columns sex, age, view, followup.
    """
    sex = meta["sex"].fillna("").astype(str).to_numpy(dtype=object)
    view = meta["view"].fillna("").astype(str).to_numpy(dtype=object)
    followup = pd.to_numeric(meta["followup"], errors="coerce").to_numpy(dtype=np.float64)
    visit = np.where(followup == 0, FOLLOWUP_GROUPS[0], np.where(followup >= 1, FOLLOWUP_GROUPS[1], ""))
    bands, age_left_out = age_bands(meta["age"])
    sex = np.where(np.isin(sex, SEX_GROUPS), sex, "")
    view = np.where(np.isin(view, VIEW_GROUPS), view, "")
    return {
        "sex": (sex, SEX_GROUPS, {"missing": int((sex == "").sum())}),
        "age": (bands, tuple(b[0] for b in AGE_BANDS), age_left_out),
        "view": (view, VIEW_GROUPS, {"missing": int((view == "").sum())}),
        "followup": (visit.astype(object), FOLLOWUP_GROUPS, {"missing": int((visit == "").sum())}),
    }


def _finite(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


def _per_class(y: np.ndarray, classes: ClassSet | None) -> dict[str, dict]:
    """{class: auc and ci (None until scored), image and patient counts, why it has no number}."""
    n = len(y)
    positives = y.sum(axis=0).astype(int) if n else np.zeros(len(CLASSES), dtype=int)
    reasons = classes.excluded() if classes is not None else dict.fromkeys(CLASSES, "empty subgroup")
    return {
        c: {
            "auc": None,
            "ci": None,
            "positives": int(positives[k]),
            "negatives": int(n - positives[k]),
            "positive_patients": int(classes.positives[k]) if classes is not None else 0,
            "negative_patients": int(classes.negatives[k]) if classes is not None else 0,
            "reason": reasons.get(c),
        }
        for k, c in enumerate(CLASSES)
    }


def group_report(
    y: np.ndarray,
    probs: np.ndarray,
    patients: np.ndarray,
    min_patients: int,
    n_resamples: int,
    ci: float,
    seed: int,
) -> dict:
    """Per-class and mean AUC with patient-bootstrap intervals for one subgroup's rows.

    Args:
        y: (n, C) labels of the subgroup's images.
        probs: (n, C) scores.
        patients: (n,) patient of each image.
        min_patients: fewest positive and fewest negative patients a class needs to be scored.
        n_resamples, ci, seed: the bootstrap's settings.

    Returns:
        dict with images, patients, status ("ok", "empty" or "no class scorable"), mean_auc,
        mean_auc_ci, classes_in_mean, excluded_classes {class: reason}, mean_dropped_resamples
        (resamples missing a class of the mean) and per_class {class: auc, ci, positives,
        negatives, positive_patients, negative_patients, reason}.
    """
    n = len(y)
    classes = class_set(y, patients, min_patients) if n else None
    report = {
        "images": int(n),
        "patients": int(len(np.unique(patients))) if n else 0,
        "status": "ok",
        "mean_auc": None,
        "mean_auc_ci": None,
        "classes_in_mean": classes.names() if classes is not None else [],
        "excluded_classes": classes.excluded() if classes is not None else {},
        "mean_dropped_resamples": 0,
        "per_class": _per_class(y, classes),
    }
    if classes is None:
        report["status"] = "empty"
        return report
    if not classes.included.any():
        report["status"] = "no class scorable"
        return report
    boot = bootstrap_auc(y, probs, n_resamples, ci, seed, groups=patients, min_patients=min_patients)
    for k in np.flatnonzero(classes.included):
        entry = report["per_class"][CLASSES[k]]
        entry["auc"] = _finite(boot["auc"][k])
        entry["ci"] = [_finite(boot["low"][k]), _finite(boot["high"][k])]
    report["mean_auc"] = _finite(boot["mean_auc"])
    report["mean_auc_ci"] = [_finite(boot["mean_low"]), _finite(boot["mean_high"])]
    report["mean_dropped_resamples"] = boot["mean_dropped"]
    return report


def subgroup_report(
    y: np.ndarray,
    probs: np.ndarray,
    patients: np.ndarray,
    meta: pd.DataFrame,
    min_patients: int,
    n_resamples: int,
    ci: float,
    seed: int,
) -> dict:
    """Every attribute's subgroups, each with `group_report`; rows of y/probs/patients/meta align.

    Returns:
        dict with the settings, and "attributes": {attribute: {"groups": {group: report},
        "unassigned": {...counts}}}.
    """
    if len(meta) != len(y):
        raise ValueError(f"subgroup metadata has {len(meta)} rows for {len(y)} scored images")
    attributes = {}
    for name, (labels, groups, left_out) in subgroup_labels(meta).items():
        reports = {}
        for group in groups:
            mask = labels == group
            reports[group] = group_report(y[mask], probs[mask], patients[mask], min_patients, n_resamples, ci, seed)
        attributes[name] = {"groups": reports, "unassigned": left_out}
    return {
        "min_positive_patients": min_patients,
        "ci_level": ci,
        "bootstrap_resamples": n_resamples,
        "bootstrap_unit": "patient",
        "age_bands": {label: [low, high] for label, low, high in AGE_BANDS},
        "attributes": attributes,
    }


def read_subgroup_meta(manifest_path: Path, images: list[str]) -> pd.DataFrame:
    """The META_COLUMNS of the manifest rows for `images`, in that order.

    Raises:
        ValueError: naming the manifest when it lacks a column (a manifest from before sex and age
            were kept: rerun the prepare step) or an image.
    """
    manifest = pd.read_csv(manifest_path, dtype={"sex": str, "view": str}, keep_default_na=False, na_values=[""])
    missing = [c for c in META_COLUMNS if c not in manifest.columns]
    if missing:
        raise ValueError(
            f"{manifest_path}: no column(s) {', '.join(missing)} for the subgroup evaluation; "
            "rerun the prepare step to write them"
        )
    table = manifest.loc[:, list(META_COLUMNS)].set_index("image")
    absent = [name for name in images if name not in table.index]
    if absent:
        raise ValueError(f"{manifest_path}: {len(absent)} scored image(s) not in the manifest, e.g. {absent[:5]}")
    return table.loc[images].reset_index()
