"""Train/val/test assignment: the official test list, and validation carved out by patient.

Validation must never share a patient with training (followups of one patient look alike, so a
shared patient inflates validation AUC). Among patient-disjoint choices we pick one whose label
distribution is close to training's, with iterative stratification (Sechidis et al. 2011) run over
patients: each patient is one item whose label vector is the sum over its images.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

SPLITS = ("train", "val", "test")


def official_split(images: pd.Series, patients: pd.Series, train_val: list[str], test: list[str]) -> np.ndarray:
    """'train_val' / 'test' / '' (in neither list) for each image.

    Raises:
        ValueError: an image in both lists, or a patient with images in both lists.
    """
    train_val_set, test_set = set(train_val), set(test)
    both = sorted(train_val_set & test_set)
    if both:
        raise ValueError(
            f"{len(both)} image(s) are in both train_val_list.txt and test_list.txt, e.g. "
            f"{', '.join(both[:5])}; the official lists must be disjoint"
        )
    out = np.full(len(images), "", dtype=object)
    out[images.isin(train_val_set).to_numpy()] = "train_val"
    out[images.isin(test_set).to_numpy()] = "test"
    in_tv = set(patients[out == "train_val"])
    in_test = set(patients[out == "test"])
    shared = sorted(in_tv & in_test)
    if shared:
        raise ValueError(
            f"{len(shared)} patient(s) have images in both train_val_list.txt and test_list.txt "
            f"(patient ids {', '.join(map(str, shared[:10]))}); the official split is by patient, "
            "so the lists or the label file are not the NIH ones"
        )
    return out


def split_by_patient(
    patients: np.ndarray,
    labels: np.ndarray,
    val_fraction: float,
    seed: int,
    stratify: bool = True,
) -> np.ndarray:
    """Pick validation patients out of the train_val images.

    Args:
        patients: (N,) patient id per image.
        labels: (N, C) multi-hot labels per image.
        val_fraction: the share of images (not patients) to put into validation.
        seed: makes the choice deterministic.
        stratify: keep per-class positive counts proportional (else a random patient split).

    Returns:
        (N,) bool, True for validation images.
    """
    ids, inverse = np.unique(patients, return_inverse=True)
    sums = np.zeros((len(ids), labels.shape[1]), dtype=np.int64)  # (P, C)
    np.add.at(sums, inverse, labels.astype(np.int64))
    sizes = np.bincount(inverse, minlength=len(ids))  # (P,) images per patient
    rng = np.random.default_rng(seed)
    if stratify:
        in_val = _iterative_stratification(sums, sizes, val_fraction, rng)
    else:
        in_val = _random_patients(sizes, val_fraction, rng)
    return in_val[inverse]


def _random_patients(sizes: np.ndarray, val_fraction: float, rng: np.random.Generator) -> np.ndarray:
    order = rng.permutation(len(sizes))
    target = val_fraction * sizes.sum()
    in_val = np.zeros(len(sizes), dtype=bool)
    # take whole patients until the image count reaches its target
    in_val[order[np.cumsum(sizes[order]) - sizes[order] < target]] = True
    return in_val


def _iterative_stratification(
    sums: np.ndarray, sizes: np.ndarray, val_fraction: float, rng: np.random.Generator
) -> np.ndarray:
    """Two-fold iterative stratification over patients; returns (P,) bool for validation.

    Rarest label first: its patients go one by one (in seeded random order) to the fold that still
    wants most of that label, ties broken by the fold that wants most images overall. Each fold's
    wants start at its share of the totals and shrink by what it receives. Patients without any
    finding then fill the image wants.
    """
    share = np.array([1.0 - val_fraction, val_fraction])  # (2,) train, val
    label_want = share[:, None] * sums.sum(0)[None, :]  # (2, C)
    image_want = share * sizes.sum()  # (2,)
    fold = np.full(len(sizes), -1, dtype=np.int64)
    has = sums > 0  # (P, C)
    while True:
        open_has = has & (fold < 0)[:, None]
        remaining = open_has.sum(0)
        if not remaining.any():
            break
        label = int(np.argmin(np.where(remaining > 0, remaining, np.iinfo(np.int64).max)))
        for p in rng.permutation(np.flatnonzero(open_has[:, label])):
            f = _pick_fold(label_want[:, label], image_want, rng)
            fold[p] = f
            label_want[f] -= sums[p]
            image_want[f] -= sizes[p]
    for p in rng.permutation(np.flatnonzero(fold < 0)):
        f = int(np.argmax(image_want)) if image_want[0] != image_want[1] else int(rng.integers(2))
        fold[p] = f
        image_want[f] -= sizes[p]
    return fold == 1


def _pick_fold(label_want: np.ndarray, image_want: np.ndarray, rng: np.random.Generator) -> int:
    if label_want[0] != label_want[1]:
        return int(np.argmax(label_want))
    if image_want[0] != image_want[1]:
        return int(np.argmax(image_want))
    return int(rng.integers(2))


def assign_splits(
    images: pd.Series,
    patients: pd.Series,
    labels: np.ndarray,
    train_val: list[str],
    test: list[str],
    val_fraction: float,
    seed: int,
    stratify: bool = True,
) -> np.ndarray:
    """'train' / 'val' / 'test' / '' (in neither official list) for each image."""
    official = official_split(images, patients, train_val, test)
    out = official.copy()
    tv = official == "train_val"
    out[tv] = "train"
    if tv.any() and val_fraction > 0:
        in_val = split_by_patient(patients.to_numpy()[tv], labels[tv], val_fraction, seed, stratify)
        out[np.flatnonzero(tv)[in_val]] = "val"
    return out


def assert_patient_disjoint(df: pd.DataFrame, patient_col: str = "patient", split_col: str = "split") -> None:
    """Raise if any patient has images in more than one split, naming the patients."""
    per_patient = df.groupby(patient_col)[split_col].nunique()
    overlap = per_patient.index[per_patient > 1].tolist()
    if overlap:
        raise AssertionError(
            f"{len(overlap)} patient(s) appear in more than one split: ids "
            f"{', '.join(map(str, overlap[:20]))}{' ...' if len(overlap) > 20 else ''}"
        )


def patient_overlap(df: pd.DataFrame, patient_col: str = "patient", split_col: str = "split") -> int:
    """Number of patients with images in more than one split (0 for a valid split)."""
    return int((df.groupby(patient_col)[split_col].nunique() > 1).sum())
