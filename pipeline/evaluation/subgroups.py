"""Test AUC per patient subgroup: sex, age band, view position and first visit vs follow-up.

Each subgroup's per-class and mean AUC come with percentile intervals from a bootstrap over the
subgroup's own patients (`bootstrap_auc(..., groups=patients)`). A class with fewer than
`min_cases` positives or negatives in a subgroup gets no number (`null` and a reason): an AUC from
three positive images says nothing. A subgroup's mean AUC is over the classes it can score, so
subgroups with different class lists are not strictly comparable; `classes_in_mean` says which.

Rows without a value for an attribute (sex not M/F, age missing, view not PA/AP) belong to none of
its subgroups and are counted under `unassigned`; ages above `MAX_AGE` are counted as impossible
and never binned.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from ..classes import CLASSES, MAX_AGE
from ..metrics import bootstrap_auc

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


def group_report(
    y: np.ndarray,
    probs: np.ndarray,
    patients: np.ndarray,
    min_cases: int,
    n_resamples: int,
    ci: float,
    seed: int,
) -> dict:
    """Per-class and mean AUC with patient-bootstrap intervals for one subgroup's rows.

    Args:
        y: (n, C) labels of the subgroup's images.
        probs: (n, C) scores.
        patients: (n,) patient of each image.
        min_cases: fewest positives and fewest negatives a class needs to be scored.
        n_resamples, ci, seed: the bootstrap's settings.

    Returns:
        dict with images, patients, status ("ok", "empty" or "no class scorable"), mean_auc,
        mean_auc_ci, classes_in_mean and per_class {class: auc, ci, positives, negatives, reason}.
    """
    n = len(y)
    positives = y.sum(axis=0).astype(int) if n else np.zeros(len(CLASSES), dtype=int)
    negatives = n - positives
    per_class: dict[str, dict] = {}
    for c, pos, neg in zip(CLASSES, positives, negatives):
        reason = None
        if n == 0:
            reason = "empty subgroup"
        elif pos < min_cases:
            reason = f"too few positives ({pos} < {min_cases})"
        elif neg < min_cases:
            reason = f"too few negatives ({neg} < {min_cases})"
        per_class[c] = {"auc": None, "ci": None, "positives": int(pos), "negatives": int(neg), "reason": reason}
    scorable = [i for i, c in enumerate(CLASSES) if per_class[c]["reason"] is None]
    report = {
        "images": int(n),
        "patients": int(len(np.unique(patients))) if n else 0,
        "status": "ok",
        "mean_auc": None,
        "mean_auc_ci": None,
        "classes_in_mean": [CLASSES[i] for i in scorable],
        "per_class": per_class,
    }
    if n == 0:
        report["status"] = "empty"
        return report
    if not scorable:
        report["status"] = "no class scorable"
        return report
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # resamples missing a class are expected in small subgroups
        boot = bootstrap_auc(y[:, scorable], probs[:, scorable], n_resamples, ci, seed, groups=patients)
    for j, i in enumerate(scorable):
        entry = per_class[CLASSES[i]]
        entry["auc"] = _finite(boot["auc"][j])
        entry["ci"] = [_finite(boot["low"][j]), _finite(boot["high"][j])]
    report["mean_auc"] = _finite(boot["mean_auc"])
    report["mean_auc_ci"] = [_finite(boot["mean_low"]), _finite(boot["mean_high"])]
    return report


def subgroup_report(
    y: np.ndarray,
    probs: np.ndarray,
    patients: np.ndarray,
    meta: pd.DataFrame,
    min_cases: int,
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
            reports[group] = group_report(y[mask], probs[mask], patients[mask], min_cases, n_resamples, ci, seed)
        attributes[name] = {"groups": reports, "unassigned": left_out}
    return {
        "min_cases": min_cases,
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
