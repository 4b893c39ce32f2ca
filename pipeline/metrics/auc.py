"""Per-class ROC AUC, average precision and bootstrap intervals for multi-label predictions.

Every function takes labels `y` (N, C) in {0, 1} and scores `scores` (N, C), columns in the
canonical class order of `pipeline.classes.CLASSES`, and returns one value per class. A class
with no positives or no negatives has no AUC; it comes back as NaN rather than a made-up 0.5,
and `mean_auc` leaves it out with a warning.

The bootstrap resamples patients, or images when no patient ids are given, with replacement.
The official ChestX-ray14 test split has ~9 images per patient, and images of one patient are not
independent draws: resampling images treats them as if they were and gives intervals that are too
narrow. A patient resample draws G patients out of G; every image of a patient drawn k times counts
k times. Either way a resample is a vector of row weights w (N,), so its AUC is a *weighted*
Mann-Whitney statistic:

    AUC_w = sum_{i pos, j neg} w_i w_j ([s_i > s_j] + 0.5 [s_i == s_j]) / (W_pos * W_neg)

Sorting each class's negatives by score once, the weight of negatives below a positive's score
is a prefix sum of w in that fixed order, so a resample costs a gather, a cumulative sum and a
few small gathers: O(N * C) numpy work and no sorting (see `_RankPlan`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np

from pipeline.classes import CLASSES

# Resamples processed together: bounds the (R, N * C) work arrays to ~70 MB per model at 25,596 x 14.
_CHUNK = 64


class UndefinedMetricWarning(UserWarning):
    """A metric is undefined for some classes (no positives or no negatives) and was left out."""


def check_predictions(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert labels and scores; returns (y as int8, scores as float64), both (N, C).

    Raises:
        ValueError: naming what is wrong (shape, label values, non-finite scores).
    """
    y = np.asarray(y)
    scores = np.asarray(scores, dtype=np.float64)
    if y.ndim != 2 or scores.shape != y.shape:
        raise ValueError(
            f"labels and scores must both be (N, C) arrays of one shape, got {y.shape} and "
            f"{scores.shape}; reshape a single class to (N, 1)"
        )
    if y.size and not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 or 1 (multi-hot, one column per class)")
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinity; check the model outputs")
    return y.astype(np.int8), scores


def _average_ranks(sorted_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First and last index of each element's tie group, for columns sorted ascending.

    Args:
        sorted_scores: (N, C) each column sorted.

    Returns:
        (start, end), both (N, C) int: the 0-based positions bounding each element's tie group.
    """
    n = sorted_scores.shape[0]
    pos = np.broadcast_to(np.arange(n)[:, None], sorted_scores.shape)
    starts_group = np.ones(sorted_scores.shape, dtype=bool)
    starts_group[1:] = sorted_scores[1:] != sorted_scores[:-1]
    ends_group = np.ones(sorted_scores.shape, dtype=bool)
    ends_group[:-1] = starts_group[1:]
    start = np.maximum.accumulate(np.where(starts_group, pos, 0), axis=0)
    end = np.minimum.accumulate(np.where(ends_group, pos, n - 1)[::-1], axis=0)[::-1]
    return start, end


def roc_auc(y: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Per-class ROC AUC by the Mann-Whitney rank sum, ties counted one half.

    Args:
        y: (N, C) labels in {0, 1}.
        scores: (N, C) scores, higher meaning more likely positive.

    Returns:
        (C,) AUC per class; NaN where a class has no positives or no negatives.
    """
    y, scores = check_predictions(y, scores)
    order = np.argsort(scores, axis=0, kind="stable")
    sorted_scores = np.take_along_axis(scores, order, axis=0)  # (N, C)
    start, end = _average_ranks(sorted_scores)
    ranks = (start + end) / 2.0 + 1.0  # (N, C) midranks, 1-based
    y_sorted = np.take_along_axis(y, order, axis=0)
    n_pos = y.sum(axis=0, dtype=np.float64)
    n_neg = y.shape[0] - n_pos
    rank_sum = (ranks * y_sorted).sum(axis=0)
    u = rank_sum - n_pos * (n_pos + 1) / 2.0
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((n_pos > 0) & (n_neg > 0), u / (n_pos * n_neg), np.nan)


def average_precision(y: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Per-class average precision, sum_k (R_k - R_{k-1}) P_k over distinct score thresholds.

    The same step-wise (non-interpolated) definition as scikit-learn's average_precision_score.

    Args:
        y: (N, C) labels in {0, 1}.
        scores: (N, C) scores.

    Returns:
        (C,) average precision; NaN where a class has no positives.
    """
    y, scores = check_predictions(y, scores)
    order = np.argsort(-scores, axis=0, kind="stable")  # descending: position k = top k+1
    sorted_scores = np.take_along_axis(-scores, order, axis=0)
    y_sorted = np.take_along_axis(y, order, axis=0)
    _, end = _average_ranks(sorted_scores)
    true_pos = np.cumsum(y_sorted, axis=0, dtype=np.float64)  # (N, C)
    precision = true_pos / np.arange(1, y.shape[0] + 1)[:, None]
    # Each positive adds 1/n_pos recall at its threshold, whose precision counts the whole tie group.
    precision_at_threshold = np.take_along_axis(precision, end, axis=0)
    n_pos = y.sum(axis=0, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        ap = (precision_at_threshold * y_sorted).sum(axis=0) / n_pos
    return np.where(n_pos > 0, ap, np.nan)


def mean_auc(per_class: np.ndarray, class_names: tuple[str, ...] | None = None) -> float:
    """Mean of the defined per-class AUCs, warning which classes were left out.

    Args:
        per_class: (C,) AUCs with NaN for undefined classes.
        class_names: names for the warning; defaults to CLASSES when C == 14, else indices.

    Returns:
        The mean over defined classes, or NaN when none is defined.
    """
    per_class = np.asarray(per_class, dtype=np.float64)
    undefined = np.flatnonzero(np.isnan(per_class))
    if undefined.size:
        names = class_names or (CLASSES if per_class.size == len(CLASSES) else None)
        named = [names[i] if names else f"class {i}" for i in undefined]
        warnings.warn(
            f"AUC undefined (no positives or no negatives) for {', '.join(named)}; "
            f"mean AUC is over the other {per_class.size - undefined.size} of {per_class.size} classes",
            UndefinedMetricWarning,
            stacklevel=2,
        )
    if undefined.size == per_class.size:
        return float("nan")
    return float(np.nanmean(per_class))


@dataclass
class _RankPlan:
    """Each class's negatives presorted once, so any row weighting's AUC needs no sorting.

    All classes' negatives are laid end to end in one order of length M = sum_c n_neg_c, class
    after class, each class's block sorted by score. For weights w, E = prefix sums of w over that
    order (E[0] = 0), and for a positive i of class c with score s_i:
        weight of class-c negatives below s_i    = E[lower_i] - E[start_c]
        weight of class-c negatives at or below  = E[upper_i] - E[start_c]
    so its Mann-Whitney credit, ties counting one half, is
        w_i * ((E[lower_i] - E[start_c]) + (E[upper_i] - E[start_c])) / 2.
    Integer weights are summed in unsigned integers that may wrap around: each difference is at
    most a resample's total weight, so it comes out exact modulo 2^bits as long as that total
    fits, and 16 bits halve the memory traffic of the cumulative sum. The width is chosen from the
    largest total in the chunk, not from N: a patient resample's total varies around N (a patient
    with many images may be drawn several times), and an image resample's is exactly N.
    """

    neg_rows: np.ndarray  # (M,) row of each negative, class blocks sorted by score
    pos_rows: np.ndarray  # (P,) row of each positive, class after class
    lower: np.ndarray  # (P,) index into E: class-c negatives strictly below the positive
    upper: np.ndarray  # (P,) index into E: class-c negatives at or below the positive
    start: np.ndarray  # (P,) index into E where the positive's class block starts
    pos_class: np.ndarray  # (P, C) one-hot class of each positive, float64 for a matmul
    y: np.ndarray  # (N, C) labels as float64
    # Work arrays kept between calls: fresh (R, M) arrays per chunk cost more in page faults
    # than the gather and cumulative sum that fill them.
    _buffers: dict = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, y: np.ndarray, scores: np.ndarray) -> _RankPlan:
        y, scores = check_predictions(y, scores)
        neg_blocks, pos_blocks, lower, upper, start = [], [], [], [], []
        offset = 0
        for c in range(y.shape[1]):
            neg = np.flatnonzero(y[:, c] == 0)
            neg = neg[np.argsort(scores[neg, c], kind="stable")]
            pos = np.flatnonzero(y[:, c] == 1)
            neg_scores = scores[neg, c]
            neg_blocks.append(neg)
            pos_blocks.append(pos)
            lower.append(offset + np.searchsorted(neg_scores, scores[pos, c], side="left"))
            upper.append(offset + np.searchsorted(neg_scores, scores[pos, c], side="right"))
            start.append(np.full(pos.size, offset))
            offset += neg.size
        pos_class = np.repeat(np.eye(y.shape[1]), [p.size for p in pos_blocks], axis=0)
        return cls(
            neg_rows=np.concatenate(neg_blocks),
            pos_rows=np.concatenate(pos_blocks),
            lower=np.concatenate(lower),
            upper=np.concatenate(upper),
            start=np.concatenate(start),
            pos_class=pos_class,
            y=y.astype(np.float64),
        )

    def _buffer(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        key = (shape, np.dtype(dtype))
        if key not in self._buffers:
            self._buffers[key] = np.empty(shape, dtype=dtype)
        return self._buffers[key]

    def _prefix_sums(self, weights: np.ndarray) -> np.ndarray:
        """E (R, M + 1): prefix sums of each weighting over the presorted negatives."""
        r, m = weights.shape[0], self.neg_rows.size
        if np.issubdtype(weights.dtype, np.integer):
            total = weights.sum(axis=1, dtype=np.float64).max(initial=0)
            acc = next(t for t in (np.uint16, np.uint32, np.uint64) if total < np.iinfo(t).max)
        else:
            acc = np.float64
        gathered = np.take(weights, self.neg_rows, axis=1, out=self._buffer((r, m), weights.dtype))
        prefix = self._buffer((r, m + 1), acc)
        prefix[:, 0] = 0
        np.cumsum(gathered, axis=1, dtype=acc, out=prefix[:, 1:])
        return prefix

    def aucs(self, weights: np.ndarray) -> np.ndarray:
        """Weighted AUC per class for each row weighting.

        Args:
            weights: (R, N) non-negative row weights, e.g. bootstrap counts (any numeric dtype;
                small unsigned integers are fastest).

        Returns:
            (R, C) AUCs; NaN where a weighting leaves a class without positive or negative weight.
        """
        prefix = self._prefix_sums(weights)  # (R, M + 1)
        start = np.take(prefix, self.start, axis=1)  # (R, P)
        # Subtract in the prefix dtype first: wrapped unsigned sums are exact only as differences.
        below_twice = (np.take(prefix, self.lower, axis=1) - start).astype(np.float64)  # (R, P)
        below_twice += np.take(prefix, self.upper, axis=1) - start
        w_pos_rows = np.take(weights, self.pos_rows, axis=1).astype(np.float64)  # (R, P)
        w_pos = w_pos_rows @ self.pos_class  # (R, C)
        u = (w_pos_rows * below_twice) @ self.pos_class / 2.0  # (R, C)
        w_neg = weights.sum(axis=1, dtype=np.float64)[:, None] - w_pos
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where((w_pos > 0) & (w_neg > 0), u / (w_pos * w_neg), np.nan)


def weighted_roc_auc(y: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Per-class ROC AUC with per-row weights (integer weights = rows repeated that many times).

    Args:
        y: (N, C) labels in {0, 1}.
        scores: (N, C) scores.
        weights: (N,) non-negative row weights.

    Returns:
        (C,) weighted AUC; NaN where a class has no positive or no negative weight.
    """
    weights = np.asarray(weights)
    if weights.shape != (np.shape(y)[0],) or (weights < 0).any():
        raise ValueError(f"weights must be (N,) = ({np.shape(y)[0]},) non-negative, got {weights.shape}")
    return _RankPlan.build(y, scores).aucs(weights[None, :])[0]


def resample_counts(rng: np.random.Generator, n_rows: int, n_resamples: int) -> np.ndarray:
    """Bootstrap resamples as counts: how often each of n_rows rows was drawn in n_rows draws.

    Returns:
        (n_resamples, n_rows) counts summing to n_rows per resample; uint8 when the largest
        count fits (always, in practice), as the gathers over them are then cheapest.
    """
    draws = rng.integers(0, n_rows, size=(n_resamples, n_rows))
    draws += np.arange(n_resamples)[:, None] * n_rows  # a separate bin range per resample
    counts = np.bincount(draws.ravel(), minlength=n_resamples * n_rows)
    counts = counts.reshape(n_resamples, n_rows)
    return counts.astype(np.uint8 if counts.max(initial=0) <= 255 else np.int32)


def _group_index(groups: np.ndarray | None, n_rows: int) -> tuple[np.ndarray | None, int]:
    """Each row's resampling unit: its patient's index among the G distinct ids, or None for rows.

    Args:
        groups: (N,) patient id of each row (any hashable dtype: ints, strings), or None to
            resample rows themselves.
        n_rows: N, the number of predictions.

    Returns:
        (index (N,) in 0..G-1, G), or (None, N) when groups is None.

    Raises:
        ValueError: when groups is not one id per row.
    """
    if groups is None:
        return None, n_rows
    groups = np.asarray(groups)
    if groups.shape != (n_rows,):
        raise ValueError(
            f"groups must be (N,) = ({n_rows},), one patient id per prediction row, got shape "
            f"{groups.shape}; pass the patient column aligned row by row with the labels"
        )
    if groups.dtype.kind in "fc" and np.isnan(groups).any():
        raise ValueError("groups contain NaN: every prediction row needs a patient id")
    ids, index = np.unique(groups, return_inverse=True)
    return index.reshape(n_rows), ids.size


def _resample_weights(rng: np.random.Generator, group_index: np.ndarray | None, n_groups: int, r: int) -> np.ndarray:
    """(r, N) row weights of r resamples: how often each row's unit (patient or row) was drawn."""
    counts = resample_counts(rng, n_groups, r)  # (r, G)
    if group_index is None:
        return counts  # rows are the units: the weights are the counts themselves
    return np.take(counts, group_index, axis=1)  # (r, N), same small dtype as the counts


def _bootstrap_samples(
    y: np.ndarray,
    score_sets: list[np.ndarray],
    n_resamples: int,
    seed: int,
    groups: np.ndarray | None = None,
) -> tuple[list[np.ndarray], int]:
    """Per-resample AUCs of several score sets on the same resampled patients (or rows).

    Args:
        y: (N, C) labels.
        score_sets: each (N, C), e.g. two models, or several training seeds of each.
        n_resamples: R.
        seed: resampling seed.
        groups: (N,) patient id of each row; None resamples rows.

    Returns:
        (one (R, C) array of AUCs per score set, the number of units resampled: G patients or N rows).
    """
    if y.shape[0] == 0:
        raise ValueError("cannot bootstrap zero predictions: the evaluated split is empty")
    group_index, n_groups = _group_index(groups, y.shape[0])
    plans = [_RankPlan.build(y, s) for s in score_sets]
    for plan in plans[1:]:  # same labels, same work-array shapes; used one after another
        plan._buffers = plans[0]._buffers
    rng = np.random.default_rng(seed)
    out = [np.empty((n_resamples, y.shape[1])) for _ in plans]
    for first in range(0, n_resamples, _CHUNK):
        r = min(_CHUNK, n_resamples - first)
        weights = _resample_weights(rng, group_index, n_groups, r)  # (r, N)
        for plan, samples in zip(plans, out):
            samples[first : first + r] = plan.aucs(weights)
    return out, n_groups


def _resample_means(samples: np.ndarray, defined: np.ndarray) -> np.ndarray:
    """Mean AUC of each resample over the classes defined on the full data and in that resample."""
    kept = samples[:, defined]  # (R, C_defined)
    n = (~np.isnan(kept)).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, np.nansum(kept, axis=1) / n, np.nan)


def _percentile_interval(samples: np.ndarray, ci: float) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval of each column of (R, K) samples, ignoring NaN; NaN if none is valid."""
    low = np.full(samples.shape[1], np.nan)
    high = np.full(samples.shape[1], np.nan)
    tail = (1.0 - ci) / 2.0 * 100.0
    for k in range(samples.shape[1]):
        valid = samples[:, k][~np.isnan(samples[:, k])]
        if valid.size:
            low[k], high[k] = np.percentile(valid, [tail, 100.0 - tail])
    return low, high


def _check_bootstrap_args(n_resamples: int, ci: float) -> None:
    """The arguments' own ranges (evaluate's come from params.yaml, validated there; the benchmarks
    and tests call these functions directly)."""
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci must lie strictly between 0 and 1, got {ci}")


def _resampled(groups: np.ndarray | None, n_groups: int) -> dict:
    """What a bootstrap resampled, for its result dict and the reports built on it."""
    return {"resampled": "images" if groups is None else "patients", "n_groups": n_groups}


def bootstrap_auc(
    y: np.ndarray,
    scores: np.ndarray,
    n_resamples: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    groups: np.ndarray | None = None,
) -> dict:
    """Percentile bootstrap intervals of per-class and mean AUC, resampling patients (or images).

    With `groups`, each resample draws the G patients with replacement and keeps all images of each
    drawn patient, as often as it was drawn; without, it draws the N images. A resample in which a
    class has no positives (or no negatives) gives NaN for that class and is left out of that
    class's interval; `n_valid` counts the resamples that were used. The mean AUC of a resample is
    over the classes defined on the full data that are also defined in it. Resamples are
    `resample_counts(np.random.default_rng(seed), G, r)` drawn in chunks of r = 64 (G = N without
    groups, so that case is unchanged).

    Args:
        y: (N, C) labels in {0, 1}.
        scores: (N, C) scores.
        n_resamples: number of resamples.
        ci: two-sided coverage of the interval, e.g. 0.95 for the 2.5th..97.5th percentiles.
        seed: resampling seed.
        groups: (N,) patient id of each row (any hashable dtype), or None to resample images.

    Returns:
        dict with "auc", "low", "high", "n_valid" (C,), "mean_auc", "mean_low", "mean_high"
        (floats), "samples" (R, C) and "mean_samples" (R,) per-resample values, "resampled"
        ("patients" or "images"), "n_groups" (patients, or N images, drawn from), and the
        "n_resamples", "ci", "seed" used.
    """
    _check_bootstrap_args(n_resamples, ci)
    auc = roc_auc(y, scores)
    (samples,), n_groups = _bootstrap_samples(np.asarray(y), [scores], n_resamples, seed, groups)
    means = _resample_means(samples, ~np.isnan(auc))
    low, high = _percentile_interval(samples, ci)
    (mean_low,), (mean_high,) = _percentile_interval(means[:, None], ci)
    return {
        "auc": auc,
        "low": low,
        "high": high,
        "n_valid": (~np.isnan(samples)).sum(axis=0),
        "mean_auc": mean_auc(auc),
        "mean_low": float(mean_low),
        "mean_high": float(mean_high),
        "samples": samples,
        "mean_samples": means,
        **_resampled(groups, n_groups),
        "n_resamples": n_resamples,
        "ci": ci,
        "seed": seed,
    }


def _runs(scores: np.ndarray, name: str) -> list[np.ndarray]:
    """The runs stacked in `scores`: (N, C) is one run, (S, N, C) is S runs (e.g. training seeds)."""
    scores = np.asarray(scores)
    if scores.ndim == 2:
        return [scores]
    if scores.ndim == 3 and scores.shape[0] > 0:
        return list(scores)
    raise ValueError(f"{name} must be (N, C) scores of one run or (S, N, C) of S >= 1 runs, got shape {scores.shape}")


def _mean_over_runs(per_run: list[np.ndarray], defined: np.ndarray) -> np.ndarray:
    """(R,) per-resample mean AUC averaged over runs, from each run's (R, C) samples."""
    return np.mean([_resample_means(samples, defined) for samples in per_run], axis=0)


def paired_bootstrap_delta(
    y: np.ndarray,
    scores_a: np.ndarray,
    scores_b: np.ndarray,
    n_resamples: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    margin: float = 0.0,
    groups: np.ndarray | None = None,
) -> dict:
    """Mean AUC of model b minus model a, with a paired bootstrap over the same resampled patients.

    Both models are scored on the same resampled patients (or images, without `groups`), so the
    variation they share cancels out of the difference. For a promotion gate "b beats a by at
    least `margin`", promote when `low > margin` (a one-sided test at level (1 - ci) / 2) or when
    `p_value` is small.

    Either side may stack several runs (e.g. training seeds) as (S, N, C); S may differ between a
    and b. Its mean AUC is then the mean over its runs of each run's mean AUC, on the full data
    and in every resample, all runs scored on the same resampled patients: the delta compares
    the methods, and the interval carries the patient-level uncertainty shared by their runs.

    `p_value` is the one-sided bootstrap p-value for "b is not better than a by more than
    `margin`": the fraction of resamples whose delta is <= margin (with the default margin 0,
    the fraction where b does not beat a). It is 1.0 for identical models.

    Args:
        y: (N, C) labels in {0, 1}.
        scores_a: (N, C) or (S_a, N, C) scores of the reference model (e.g. the champion).
        scores_b: (N, C) or (S_b, N, C) scores of the candidate.
        n_resamples: number of resamples.
        ci: two-sided coverage of the delta interval.
        seed: resampling seed.
        margin: the improvement the p-value is tested against.
        groups: (N,) patient id of each row (any hashable dtype), or None to resample images.

    Returns:
        dict with "delta" (full-data mean AUC of b minus a), "low", "high", "p_value", "margin",
        "mean_auc_a", "mean_auc_b" (each averaged over its runs), "n_runs_a", "n_runs_b",
        "samples" (R,) per-resample deltas, "resampled" ("patients" or "images"), "n_groups",
        "n_resamples", "ci", "seed".
    """
    _check_bootstrap_args(n_resamples, ci)
    runs_a, runs_b = _runs(scores_a, "scores_a"), _runs(scores_b, "scores_b")
    auc_a = [roc_auc(y, s) for s in runs_a]  # each (C,)
    auc_b = [roc_auc(y, s) for s in runs_b]
    defined = ~np.isnan(auc_a[0])  # the labels decide definedness, so every run agrees
    samples, n_groups = _bootstrap_samples(np.asarray(y), runs_a + runs_b, n_resamples, seed, groups)
    deltas = _mean_over_runs(samples[len(runs_a) :], defined) - _mean_over_runs(samples[: len(runs_a)], defined)
    (low,), (high,) = _percentile_interval(deltas[:, None], ci)
    valid = deltas[~np.isnan(deltas)]
    mean_a = float(np.mean([mean_auc(a) for a in auc_a]))
    mean_b = float(np.mean([mean_auc(b) for b in auc_b]))
    return {
        "delta": mean_b - mean_a,
        "low": float(low),
        "high": float(high),
        "p_value": float(np.mean(valid <= margin)) if valid.size else float("nan"),
        "margin": margin,
        "mean_auc_a": mean_a,
        "mean_auc_b": mean_b,
        "n_runs_a": len(runs_a),
        "n_runs_b": len(runs_b),
        "samples": deltas,
        **_resampled(groups, n_groups),
        "n_resamples": n_resamples,
        "ci": ci,
        "seed": seed,
    }
