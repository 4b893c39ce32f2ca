"""Bootstrap AUC speed: presorted weighted Mann-Whitney against a per-resample scikit-learn loop.

Both run in one process on the same synthetic test-split-sized predictions (25,596 x 14 by
default, class prevalences of ChestX-ray14, 2,797 patients as in the official test split) and
resample patients, as the evaluate step does (`--patients 0` resamples images instead). The
scikit-learn loop draws a resample, materialises its rows (every image of every drawn patient)
and calls roc_auc_score per class; it runs fewer resamples and is extrapolated linearly to 1,000
(its cost per resample is constant).

    .venv/bin/python benchmarks/evaluate.py [--resamples 1000 --rows 25596 --patients 2797 --classes 14
                                            --sklearn-resamples 50]

The last line reads `bootstrap_speedup <ratio>`, ratio = scikit-learn time per 1,000 resamples
divided by ours.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from pipeline.classes import CLASS_COUNTS, CLASSES, TOTAL_IMAGES  # noqa: E402
from pipeline.config import load_params  # noqa: E402
from pipeline.metrics import bootstrap_auc, resample_counts, weighted_roc_auc  # noqa: E402


def synthetic_predictions(rows: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels at ChestX-ray14 prevalences and sigmoid scores of binormal logits; (N, C) each."""
    rng = np.random.default_rng(seed)
    prevalence = np.array([CLASS_COUNTS[c] for c in CLASSES]) / TOTAL_IMAGES
    prevalence = np.resize(prevalence, classes)  # cycle the 14 for other class counts
    y = (rng.random((rows, classes)) < prevalence).astype(np.int8)
    separation = rng.uniform(0.8, 1.8, classes)  # per-class AUC between ~0.71 and ~0.90
    scores = 1.0 / (1.0 + np.exp(-(rng.normal(size=(rows, classes)) + separation * y)))
    return y, scores.astype(np.float32)  # float32 like a model's outputs: ties do occur


def patient_ids(rows: int, patients: int) -> np.ndarray | None:
    """(N,) patient of each row, ~rows / patients images each; None (resample images) for 0 patients."""
    return np.arange(rows) % patients if patients else None


def patient_rows(groups: np.ndarray) -> list[np.ndarray]:
    """The row indices of each patient, found once."""
    order = np.argsort(groups, kind="stable")
    _, starts = np.unique(groups[order], return_index=True)
    return np.split(order, starts[1:])


def resample_rows(rng: np.random.Generator, members: list[np.ndarray] | None, n_rows: int) -> np.ndarray:
    """One resample materialised: the rows of every drawn patient, or drawn rows without patients."""
    if members is None:
        return rng.integers(0, n_rows, n_rows)
    drawn = rng.integers(0, len(members), len(members))
    return np.concatenate([members[g] for g in drawn])


def sklearn_bootstrap(
    y: np.ndarray, scores: np.ndarray, groups: np.ndarray | None, n_resamples: int, seed: int
) -> np.ndarray:
    """The straightforward loop: materialise each resample's rows, roc_auc_score per class."""
    rng = np.random.default_rng(seed)
    members = None if groups is None else patient_rows(groups)
    samples = np.full((n_resamples, y.shape[1]), np.nan)
    for r in range(n_resamples):
        rows = resample_rows(rng, members, y.shape[0])
        for c in range(y.shape[1]):
            labels = y[rows, c]
            if 0 < labels.sum() < labels.size:
                samples[r, c] = roc_auc_score(labels, scores[rows, c])
    return samples


def agreement(y: np.ndarray, scores: np.ndarray, groups: np.ndarray | None, seed: int) -> float:
    """Max |ours - scikit-learn| over classes on one resample's rows."""
    index = np.arange(y.shape[0]) if groups is None else np.unique(groups, return_inverse=True)[1]
    counts = resample_counts(np.random.default_rng(seed), index.max() + 1, 1)[0]
    weights = counts[index]  # (N,) how often each row's patient was drawn
    rows = np.repeat(np.arange(y.shape[0]), weights)
    ours = weighted_roc_auc(y, scores, weights)
    theirs = [roc_auc_score(y[rows, c], scores[rows, c]) for c in range(y.shape[1])]
    return float(np.nanmax(np.abs(ours - theirs)))


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--rows", type=int, default=25_596)
    parser.add_argument("--patients", type=int, default=2_797, help="0: resample images, not patients")
    parser.add_argument("--classes", type=int, default=14)
    parser.add_argument("--sklearn-resamples", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    y, scores = synthetic_predictions(args.rows, args.classes, args.seed)
    groups = patient_ids(args.rows, args.patients)
    unit = f"{args.patients:,} patients" if groups is not None else "images"
    print(
        f"synthetic predictions: {args.rows:,} rows x {args.classes} classes, "
        f"{int(y.sum()):,} positive labels; resampling {unit}"
    )

    min_patients = load_params(Path(__file__).resolve().parents[1] / "params.yaml").evaluate.min_positive_patients
    start, start_cpu = time.perf_counter(), time.process_time()
    result = bootstrap_auc(
        y, scores, n_resamples=args.resamples, seed=args.seed, groups=groups, min_patients=min_patients
    )
    ours, ours_cpu = time.perf_counter() - start, time.process_time() - start_cpu
    ours_per_1000 = ours / args.resamples * 1000
    print(
        f"ours: {args.resamples} resamples in {ours:.2f} s wall, {ours_cpu:.2f} s CPU "
        f"({ours_per_1000:.2f} s wall per 1,000); mean AUC {result['mean_auc']:.4f} "
        f"[{result['mean_low']:.4f}, {result['mean_high']:.4f}] at {result['ci']:.0%} over "
        f"{int(result['classes'].included.sum())} classes, {result['mean_dropped']} resamples dropped"
    )

    start, start_cpu = time.perf_counter(), time.process_time()
    sklearn_bootstrap(y, scores, groups, args.sklearn_resamples, args.seed)
    theirs, theirs_cpu = time.perf_counter() - start, time.process_time() - start_cpu
    theirs_per_1000 = theirs / args.sklearn_resamples * 1000
    print(
        f"scikit-learn loop: {args.sklearn_resamples} resamples in {theirs:.2f} s wall, "
        f"{theirs_cpu:.2f} s CPU -> {theirs_per_1000:.1f} s wall per 1,000 resamples "
        f"(extrapolated linearly from {args.sklearn_resamples})"
    )
    print(f"agreement on one resample: max |ours - scikit-learn| = {agreement(y, scores, groups, args.seed):.1e}")

    ratio = theirs_per_1000 / ours_per_1000
    cpu_ratio = (theirs_cpu / args.sklearn_resamples) / (ours_cpu / args.resamples)
    print(
        f"scikit-learn {theirs_per_1000:.1f} s / ours {ours_per_1000:.2f} s wall per 1,000 "
        f"resamples (CPU-time ratio {cpu_ratio:.1f})"
    )
    print(f"bootstrap_speedup {ratio:.1f}")
    return ratio


if __name__ == "__main__":
    main()
