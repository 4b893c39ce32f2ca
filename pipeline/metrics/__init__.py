"""Evaluation metrics for (N, C) multi-label predictions in the canonical class order (numpy only)."""

from pipeline.metrics.auc import (
    ClassSet,
    average_precision,
    bootstrap_auc,
    check_predictions,
    class_set,
    describe_class_set,
    mean_auc,
    paired_bootstrap_delta,
    resample_counts,
    roc_auc,
    weighted_roc_auc,
)
from pipeline.metrics.thresholds import (
    pr_curve_points,
    roc_curve_points,
    select_thresholds,
    threshold_metrics,
    validation_threshold_metrics,
)

__all__ = [
    "ClassSet",
    "average_precision",
    "bootstrap_auc",
    "check_predictions",
    "class_set",
    "describe_class_set",
    "mean_auc",
    "paired_bootstrap_delta",
    "pr_curve_points",
    "resample_counts",
    "roc_auc",
    "roc_curve_points",
    "select_thresholds",
    "threshold_metrics",
    "validation_threshold_metrics",
    "weighted_roc_auc",
]
