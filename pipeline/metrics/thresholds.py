"""Per-class decision thresholds: chosen on validation, applied unchanged to test.

A class is predicted positive when its score is >= its threshold. Choosing thresholds on the
test split itself would make the reported sensitivity and specificity optimistic, so
`select_thresholds` only ever sees validation predictions and `threshold_metrics` only applies
thresholds it is given; `validation_threshold_metrics` does both in that order.
"""

from __future__ import annotations

import numpy as np

from pipeline.metrics.auc import check_predictions

METHODS = ("youden", "f1")


def _cumulative_counts(y: np.ndarray, scores: np.ndarray):
    """Counts at every candidate threshold, columns sorted by descending score.

    Returns:
        sorted_scores (N, C); is_threshold (N, C), True at the last element of each tie group
        (a distinct score, the candidate thresholds); tp and fp (N, C), the true and false
        positives when thresholding at that position's score.
    """
    order = np.argsort(-scores, axis=0, kind="stable")
    sorted_scores = np.take_along_axis(scores, order, axis=0)
    y_sorted = np.take_along_axis(y, order, axis=0)
    is_threshold = np.ones(scores.shape, dtype=bool)
    is_threshold[:-1] = sorted_scores[:-1] != sorted_scores[1:]
    tp = np.cumsum(y_sorted, axis=0, dtype=np.float64)
    fp = np.arange(1, y.shape[0] + 1)[:, None] - tp
    return sorted_scores, is_threshold, tp, fp


def select_thresholds(y_val: np.ndarray, s_val: np.ndarray, method: str = "youden") -> np.ndarray:
    """Per-class thresholds maximising Youden's J (sensitivity + specificity - 1) or F1.

    Candidates are the distinct validation scores; among equally good ones the highest wins.

    Args:
        y_val: (N, C) validation labels in {0, 1}.
        s_val: (N, C) validation scores.
        method: "youden" or "f1".

    Returns:
        (C,) thresholds; NaN for a class the objective is undefined for (Youden: no positives or
        no negatives; F1: no positives).
    """
    if method not in METHODS:
        raise ValueError(f"threshold method must be one of {METHODS}, got {method!r}")
    y_val, s_val = check_predictions(y_val, s_val)
    sorted_scores, is_threshold, tp, fp = _cumulative_counts(y_val, s_val)
    n_pos = y_val.sum(axis=0, dtype=np.float64)
    n_neg = y_val.shape[0] - n_pos
    with np.errstate(invalid="ignore", divide="ignore"):
        if method == "youden":
            objective = tp / n_pos - fp / n_neg
            defined = (n_pos > 0) & (n_neg > 0)
        else:
            objective = 2 * tp / (tp + fp + n_pos)
            defined = n_pos > 0
    objective = np.where(is_threshold, objective, -np.inf)  # (N, C)
    best = np.argmax(objective, axis=0)  # first maximum = highest score
    thresholds = sorted_scores[best, np.arange(y_val.shape[1])]
    return np.where(defined, thresholds, np.nan)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


def threshold_metrics(y: np.ndarray, scores: np.ndarray, thresholds: np.ndarray) -> dict:
    """Sensitivity, specificity, precision and F1 per class at the given thresholds.

    Args:
        y: (N, C) labels in {0, 1}.
        scores: (N, C) scores.
        thresholds: (C,) thresholds, score >= threshold meaning positive (NaN gives NaN metrics).

    Returns:
        dict of (C,) arrays: "threshold", "sensitivity", "specificity", "precision", "f1" (NaN
        where the denominator is zero or the threshold is NaN) and the counts "tp", "fp", "tn", "fn".
    """
    y, scores = check_predictions(y, scores)
    thresholds = np.asarray(thresholds, dtype=np.float64)
    if thresholds.shape != (y.shape[1],):
        raise ValueError(f"thresholds must be ({y.shape[1]},), one per class, got {thresholds.shape}")
    predicted = scores >= thresholds  # (N, C); NaN thresholds predict nothing, masked below
    positive = y == 1
    tp = (predicted & positive).sum(axis=0)
    fp = (predicted & ~positive).sum(axis=0)
    fn = (~predicted & positive).sum(axis=0)
    tn = (~predicted & ~positive).sum(axis=0)
    undefined = np.isnan(thresholds)
    metrics = {
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "precision": _ratio(tp, tp + fp),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
    }
    metrics = {name: np.where(undefined, np.nan, value) for name, value in metrics.items()}
    return {"threshold": thresholds, **metrics, "tp": tp, "fp": fp, "tn": tn, "fn": fn}


def validation_threshold_metrics(
    y_val: np.ndarray,
    s_val: np.ndarray,
    y_test: np.ndarray,
    s_test: np.ndarray,
    method: str = "youden",
) -> dict:
    """Choose thresholds on validation and report test metrics at exactly those thresholds."""
    return threshold_metrics(y_test, s_test, select_thresholds(y_val, s_val, method))


def roc_curve_points(y: np.ndarray, scores: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """(fpr, tpr) per class for plotting; empty arrays where the curve is undefined."""
    from sklearn.metrics import roc_curve

    y, scores = check_predictions(y, scores)
    points = []
    for c in range(y.shape[1]):
        if 0 < y[:, c].sum() < y.shape[0]:
            fpr, tpr, _ = roc_curve(y[:, c], scores[:, c])
            points.append((fpr, tpr))
        else:
            points.append((np.empty(0), np.empty(0)))
    return points


def pr_curve_points(y: np.ndarray, scores: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """(recall, precision) per class for plotting; empty arrays where a class has no positives."""
    from sklearn.metrics import precision_recall_curve

    y, scores = check_predictions(y, scores)
    points = []
    for c in range(y.shape[1]):
        if y[:, c].sum() > 0:
            precision, recall, _ = precision_recall_curve(y[:, c], scores[:, c])
            points.append((recall, precision))
        else:
            points.append((np.empty(0), np.empty(0)))
    return points
