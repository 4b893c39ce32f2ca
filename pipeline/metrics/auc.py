"""Per-class ROC AUC, average precision and bootstrap intervals for multi-label predictions.

Every function takes labels `y` (N, C) in {0, 1} and scores `scores` (N, C), columns in the
canonical class order of `pipeline.classes.CLASSES`, and returns one value per class. A class
with no positives or no negatives has no AUC; it comes back as NaN rather than a made-up 0.5.

A mean AUC is over one class set (`ClassSet`), the same on the full data and in every resample:
the classes with at least `min_patients` positive and as many negative patients. Averaging each
resample over whichever classes it happens to contain mixes class sets: a class with one positive
patient is missing from ~37% of resamples, and the resampled means form two clusters.

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

from dataclasses import dataclass, field

import numpy as np

from pipeline.classes import CLASSES

# Resamples processed together: bounds the (R, N * C) work arrays to ~70 MB per model at 25,596 x 14.
_CHUNK = 64


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


@dataclass(frozen=True)
class _Units:
    """What a bootstrap resamples: each row's patient index, or None when rows are the units."""

    index: np.ndarray | None  # (N,) in 0..G-1
    count: int  # G patients, or N rows

    @classmethod
    def of(cls, groups: np.ndarray | None, n_rows: int) -> _Units:
        if n_rows == 0:
            raise ValueError("cannot bootstrap zero predictions: the evaluated split is empty")
        return cls(*_group_index(groups, n_rows))


@dataclass(frozen=True)
class ClassSet:
    """The classes a mean AUC is over: one set, the same in the point estimate and in every resample.

    A class is in the set when at least `min_units` units (patients, or images when images are
    resampled) have a positive image of it and at least as many have a negative one: the units a
    bootstrap draws, so a class in the set is missing from a resample only with probability about
    2 e^-min_units. A class with fewer is left out of every mean and named (`excluded`), never
    averaged in some resamples and not in others: with one positive patient, ~37% of resamples
    lack it and the resampled means form two clusters, one of them away from the point estimate.

    Attributes:
        included: (C,) bool, True for the classes in the mean.
        positives: (C,) units with at least one positive image of the class.
        negatives: (C,) units with at least one negative image of the class.
        min_units: the fewest positive (and negative) units a class needs.
        unit: "patient" or "image".
    """

    included: np.ndarray
    positives: np.ndarray
    negatives: np.ndarray
    min_units: int
    unit: str

    def names(self, class_names: tuple[str, ...] | list[str] = CLASSES) -> list[str]:
        """The names of the classes in the mean, in class order."""
        return [name for name, kept in zip(class_names, self.included) if kept]

    def excluded(self, class_names: tuple[str, ...] | list[str] = CLASSES) -> dict[str, str]:
        """{name: why} for each class left out of the mean, e.g. "2 positive patients (fewer than 10)"."""
        out = {}
        for name, kept, pos, neg in zip(class_names, self.included, self.positives, self.negatives):
            if not kept:
                count, kind = (pos, "positive") if pos < self.min_units else (neg, "negative")
                out[name] = f"{count} {kind} {self.unit}{'' if count == 1 else 's'} (fewer than {self.min_units})"
        return out


def _units_with(mask: np.ndarray, units: _Units) -> np.ndarray:
    """(C,) how many units (patients, or rows) have a row where `mask` (N, C) is True."""
    if units.index is None:
        return mask.sum(axis=0, dtype=np.int64)
    rows, cols = np.nonzero(mask)
    has = np.zeros((units.count, mask.shape[1]), dtype=bool)  # (G, C)
    has[units.index[rows], cols] = True
    return has.sum(axis=0)


def _class_set(y: np.ndarray, units: _Units, min_units: int) -> ClassSet:
    if min_units < 1:
        raise ValueError(f"the fewest positive patients a class needs must be >= 1, got {min_units}")
    positives, negatives = _units_with(y == 1, units), _units_with(y == 0, units)
    return ClassSet(
        included=(positives >= min_units) & (negatives >= min_units),
        positives=positives,
        negatives=negatives,
        min_units=min_units,
        unit="image" if units.index is None else "patient",
    )


def class_set(y: np.ndarray, groups: np.ndarray | None, min_patients: int) -> ClassSet:
    """The classes with at least `min_patients` positive and as many negative patients in `y`.

    Args:
        y: (N, C) labels in {0, 1}.
        groups: (N,) patient id of each row, or None to count images instead.
        min_patients: evaluate.min_positive_patients.
    """
    y = np.asarray(y)
    return _class_set(y, _Units(*_group_index(groups, y.shape[0])), min_patients)


def mean_auc(per_class: np.ndarray, classes: ClassSet) -> float:
    """Mean of the per-class AUCs over `classes`; NaN when the set is empty.

    Args:
        per_class: (C,) AUCs, NaN where undefined.
        classes: the class set, from the same labels (`class_set`).

    Raises:
        ValueError: a class of the set has no AUC: the set was built from other labels.
    """
    per_class = np.asarray(per_class, dtype=np.float64)
    kept = per_class[classes.included]
    if np.isnan(kept).any():
        raise ValueError("a class in the mean has no AUC: build the class set from the same labels as the AUCs")
    return float(kept.mean()) if kept.size else float("nan")


def describe_class_set(split: str, in_mean: list[str], excluded: dict[str, str], min_patients: int) -> str:
    """One sentence for a report: how many classes a split's mean AUC is over, which were left out and why.

    Args:
        split: the split's name, e.g. "test".
        in_mean: the classes in the mean (`ClassSet.names()`).
        excluded: {class: reason} of the others (`ClassSet.excluded()`).
        min_patients: the fewest positive (and negative) patients a class needed.
    """
    head = f"The {split} mean AUC is over {len(in_mean)} of {len(in_mean) + len(excluded)} findings"
    if not excluded:
        return head + "."
    why = "; ".join(f"{name}: {reason}" for name, reason in excluded.items())
    enough = f"at least {min_patients} positive and {min_patients} negative {split} patients"
    return f"{head}, those with {enough}; left out: {why}."


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
    y: np.ndarray, score_sets: list[np.ndarray], n_resamples: int, seed: int, units: _Units
) -> list[np.ndarray]:
    """Per-resample AUCs of several score sets on the same resampled patients (or rows).

    Args:
        y: (N, C) labels.
        score_sets: each (N, C), e.g. two models, or several training seeds of each.
        n_resamples: R.
        seed: resampling seed.
        units: what is resampled.

    Returns:
        One (R, C) array of AUCs per score set.
    """
    plans = [_RankPlan.build(y, s) for s in score_sets]
    for plan in plans[1:]:  # same labels, same work-array shapes; used one after another
        plan._buffers = plans[0]._buffers
    rng = np.random.default_rng(seed)
    out = [np.empty((n_resamples, y.shape[1])) for _ in plans]
    for first in range(0, n_resamples, _CHUNK):
        r = min(_CHUNK, n_resamples - first)
        weights = _resample_weights(rng, units.index, units.count, r)  # (r, N)
        for plan, samples in zip(plans, out):
            samples[first : first + r] = plan.aucs(weights)
    return out


def _resample_means(samples: np.ndarray, classes: ClassSet) -> np.ndarray:
    """(R,) mean AUC of each resample over `classes`; NaN (the resample dropped) where one of them
    is undefined in it, or where the set is empty."""
    if not classes.included.any():
        return np.full(samples.shape[0], np.nan)
    return samples[:, classes.included].mean(axis=1)  # NaN propagates: a resample missing a class


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


def _resampled(groups: np.ndarray | None, units: _Units) -> dict:
    """What a bootstrap resampled, for its result dict and the reports built on it."""
    return {"resampled": "images" if groups is None else "patients", "n_groups": units.count}


def _mean_summary(means: np.ndarray, classes: ClassSet) -> dict:
    """The class set a mean is over and how many resamples it kept: for the result dicts."""
    dropped = int(np.isnan(means).sum()) if classes.included.any() else 0
    return {"classes": classes, "mean_dropped": dropped, "mean_n_valid": int(means.size - np.isnan(means).sum())}


def bootstrap_auc(
    y: np.ndarray,
    scores: np.ndarray,
    n_resamples: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    groups: np.ndarray | None = None,
    *,
    min_patients: int,
) -> dict:
    """Percentile bootstrap intervals of per-class and mean AUC, resampling patients (or images).

    With `groups`, each resample draws the G patients with replacement and keeps all images of each
    drawn patient, as often as it was drawn; without, it draws the N images. A resample in which a
    class has no positives (or no negatives) gives NaN for that class and is left out of that
    class's interval; `n_valid` counts the resamples that were used.

    The mean AUC, on the full data and in every resample, is over one class set (`ClassSet`): the
    classes with at least `min_patients` positive and as many negative patients (images without
    `groups`). A resample in which a class of the set is undefined is dropped from the mean's
    interval and counted in "mean_dropped". Resamples are
    `resample_counts(np.random.default_rng(seed), G, r)` drawn in chunks of r = 64 (G = N without
    groups, so that case is unchanged).

    Args:
        y: (N, C) labels in {0, 1}.
        scores: (N, C) scores.
        n_resamples: number of resamples.
        ci: two-sided coverage of the interval, e.g. 0.95 for the 2.5th..97.5th percentiles.
        seed: resampling seed.
        groups: (N,) patient id of each row (any hashable dtype), or None to resample images.
        min_patients: the fewest positive, and negative, patients a class needs to be in the mean
            (evaluate.min_positive_patients).

    Returns:
        dict with "auc", "low", "high", "n_valid" (C,), "mean_auc", "mean_low", "mean_high"
        (floats; NaN when no class is in the set), "classes" (the `ClassSet`), "mean_dropped" and
        "mean_n_valid" (resamples left out of and used for the mean's interval), "samples" (R, C)
        and "mean_samples" (R,) per-resample values (NaN where dropped), "resampled" ("patients"
        or "images"), "n_groups" (patients, or N images, drawn from), and the "n_resamples",
        "ci", "seed" used.
    """
    _check_bootstrap_args(n_resamples, ci)
    auc = roc_auc(y, scores)
    y = np.asarray(y)
    units = _Units.of(groups, y.shape[0])
    classes = _class_set(y, units, min_patients)
    (samples,) = _bootstrap_samples(y, [scores], n_resamples, seed, units)
    means = _resample_means(samples, classes)
    low, high = _percentile_interval(samples, ci)
    (mean_low,), (mean_high,) = _percentile_interval(means[:, None], ci)
    return {
        "auc": auc,
        "low": low,
        "high": high,
        "n_valid": (~np.isnan(samples)).sum(axis=0),
        "mean_auc": mean_auc(auc, classes),
        "mean_low": float(mean_low),
        "mean_high": float(mean_high),
        **_mean_summary(means, classes),
        "samples": samples,
        "mean_samples": means,
        **_resampled(groups, units),
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


def _mean_over_runs(per_run: list[np.ndarray], classes: ClassSet) -> np.ndarray:
    """(R,) per-resample mean AUC averaged over runs, from each run's (R, C) samples."""
    return np.mean([_resample_means(samples, classes) for samples in per_run], axis=0)


def paired_bootstrap_delta(
    y: np.ndarray,
    scores_a: np.ndarray,
    scores_b: np.ndarray,
    n_resamples: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    margin: float = 0.0,
    groups: np.ndarray | None = None,
    *,
    min_patients: int,
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
    Both means are over one class set, as in `bootstrap_auc`; the labels decide it, so it is the
    same for every run, and a resample in which one of its classes is undefined is dropped.

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
        min_patients: the fewest positive, and negative, patients a class needs to be in the means.

    Returns:
        dict with "delta" (full-data mean AUC of b minus a), "low", "high", "p_value", "margin",
        "mean_auc_a", "mean_auc_b" (each averaged over its runs), "n_runs_a", "n_runs_b",
        "classes" (the `ClassSet`), "mean_dropped", "mean_n_valid", "samples" (R,) per-resample
        deltas, "resampled" ("patients" or "images"), "n_groups", "n_resamples", "ci", "seed".
        With no class in the set, every number is NaN.
    """
    _check_bootstrap_args(n_resamples, ci)
    runs_a, runs_b = _runs(scores_a, "scores_a"), _runs(scores_b, "scores_b")
    auc_a = [roc_auc(y, s) for s in runs_a]  # each (C,)
    auc_b = [roc_auc(y, s) for s in runs_b]
    y = np.asarray(y)
    units = _Units.of(groups, y.shape[0])
    classes = _class_set(y, units, min_patients)
    samples = _bootstrap_samples(y, runs_a + runs_b, n_resamples, seed, units)
    deltas = _mean_over_runs(samples[len(runs_a) :], classes) - _mean_over_runs(samples[: len(runs_a)], classes)
    (low,), (high,) = _percentile_interval(deltas[:, None], ci)
    valid = deltas[~np.isnan(deltas)]
    mean_a = float(np.mean([mean_auc(a, classes) for a in auc_a]))
    mean_b = float(np.mean([mean_auc(b, classes) for b in auc_b]))
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
        **_mean_summary(deltas, classes),
        "samples": deltas,
        **_resampled(groups, units),
        "n_resamples": n_resamples,
        "ci": ci,
        "seed": seed,
    }
