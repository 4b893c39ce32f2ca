"""Evaluation: score val/test with the best checkpoint, compute AUC with bootstrap CIs, thresholds,
plots and the comparison with published ChestX-ray14 results.

Nothing here is chosen on test: the calibration map and the thresholds come from the validation
split and are applied unchanged. AUC and average precision rank the model's raw scores; the
thresholds, and every thresholded figure, are on the calibrated probabilities the registered model
serves (`pipeline.evaluation.calibration`).
The bootstrap resamples test *patients* (the official split has ~9 images per patient, so
resampling images would give intervals that are too narrow). Each split's mean AUC is over one
class set, the classes with at least `evaluate.min_positive_patients` positive and negative
patients there, in the point estimate and in every resample; metrics.json names the others.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..classes import CLASSES, PUBLISHED, SEED_PAPER, SEED_PAPER_AUC
from ..config import EvaluateConfig
from ..data.dataset import CachedImageDataset, build_loader
from ..data.layout import MANIFEST
from ..inference import predict, resolve_device
from ..io import save_dataframe, write_json, write_text
from ..metrics import (
    ClassSet,
    average_precision,
    bootstrap_auc,
    class_set,
    describe_class_set,
    mean_auc,
    pr_curve_points,
    roc_auc,
    roc_curve_points,
    select_thresholds,
    threshold_metrics,
)
from ..models import load_bundle
from . import calibration, plots
from .subgroups import read_subgroup_meta, subgroup_report


@dataclass
class SplitScores:
    """One split's predictions, row i of each field describing the same image."""

    images: list[str]
    y: np.ndarray  # (N, C) labels
    logits: np.ndarray  # (N, C) the network's raw outputs
    patients: np.ndarray  # (N,) patient id of each image: the bootstrap's resampling unit

    @property
    def probs(self) -> np.ndarray:
        """(N, C) sigmoid scores, uncalibrated."""
        return calibration.sigmoid(self.logits)


def score_split(
    model,
    prepared_dir: Path,
    split: str,
    crop_size: int,
    cfg: EvaluateConfig,
    device: torch.device,
    progress: bool = True,
) -> SplitScores:
    ds = CachedImageDataset(prepared_dir, split, crop_size, train=False)
    if len(ds) == 0:
        raise ValueError(f"{prepared_dir}: the {split} split is empty; check the prepare step's split_stats.json")
    loader = build_loader(ds, cfg.batch_size, shuffle=False, workers=cfg.workers, seed=cfg.seed)
    index, z = predict(model, loader, device, progress=progress, desc=f"score {split}", raw=True)
    return SplitScores([ds.image_names[i] for i in index], ds.targets[index].astype(np.int8), z, ds.patients[index])


def predictions_frame(scores: SplitScores) -> pd.DataFrame:
    """(N, 2 + C): `image`, `patient`, then one raw (uncalibrated) probability column per class in CLASSES order."""
    df = pd.DataFrame(scores.probs, columns=list(CLASSES))
    df.insert(0, "image", scores.images)
    df.insert(1, "patient", scores.patients)
    return df


def evaluate(model_path: Path, prepared_dir: Path, out_dir: Path, cfg: EvaluateConfig, progress: bool = True) -> dict:
    """Write reports/metrics.json, per_class_auc.csv, thresholds.json, subgroups.json,
    calibration.json, predictions, plots, the heatmap gallery and localization.json.

    The calibration and the thresholds are chosen on the validation split and applied unchanged
    to the test split. subgroups.json holds test AUC per sex, age band, view and visit (see
    `pipeline.evaluation.subgroups`); calibration.json the fitted calibration and its ECE on test.
    """
    device = resolve_device(cfg.device, "evaluate.device")
    model, bundle = load_bundle(model_path, device)
    crop = bundle.crop_size
    val = score_split(model, prepared_dir, "val", crop, cfg, device, progress)
    test = score_split(model, prepared_dir, "test", crop, cfg, device, progress)
    cal, chosen_by = fit_calibration(val, cfg)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        boot = bootstrap_auc(
            test.y,
            test.probs,
            cfg.bootstrap_resamples,
            cfg.ci,
            cfg.seed,
            groups=test.patients,
            min_patients=cfg.min_positive_patients,
        )
        val_classes = class_set(val.y, val.patients, cfg.min_positive_patients)
        val_auc = roc_auc(val.y, val.probs)
        val_mean = mean_auc(val_auc, val_classes)
        ap = average_precision(test.y, test.probs)
        # chosen on the probabilities the registered model serves, so its labels match the report
        thresholds = select_thresholds(val.y, cal.probabilities(val.logits), cfg.threshold_method)
        at_thr = threshold_metrics(test.y, cal.probabilities(test.logits), thresholds)
    for w in caught:
        print(f"[evaluate] warning: {w.message}")
    meta = read_subgroup_meta(Path(prepared_dir) / MANIFEST, test.images)
    subgroups = subgroup_report(
        test.y, test.probs, test.patients, meta, cfg.min_positive_patients, cfg.bootstrap_resamples, cfg.ci, cfg.seed
    )
    metrics = _metrics_json(boot, ap, at_thr, test, (val_mean, val_classes, val_auc), cfg, bundle)
    subgroups["overall"] = {"mean_auc": metrics["mean_auc"], "mean_auc_ci": metrics["mean_auc_ci"]}
    table = _per_class_table(boot, ap, at_thr, test, val_auc)
    _write_reports(out_dir, metrics, table, thresholds, val, test, boot, ap, cfg, cal)
    write_json(Path(out_dir) / "subgroups.json", subgroups)
    plots.subgroup_forest(subgroups, metrics["mean_auc"], Path(out_dir) / "plots" / "subgroups.png")
    report = calibration.calibration_report(
        cal, chosen_by, (val.y, val.logits), (test.y, test.logits), thresholds, cfg.calibration.bins
    )
    write_json(Path(out_dir) / "calibration.json", report)
    bins = cfg.calibration.bins
    before = calibration.reliability_bins(test.y, test.probs, bins)
    after = calibration.reliability_bins(test.y, cal.probabilities(test.logits), bins)
    plots.reliability_grid(before, after, thresholds, report, Path(out_dir) / "plots" / "reliability.png")
    explain_test(model, Path(prepared_dir), Path(out_dir), cfg, test, crop, (cal, thresholds))
    return metrics


def explain_test(
    model,
    prepared_dir: Path,
    out_dir: Path,
    cfg: EvaluateConfig,
    test: SplitScores,
    crop: int,
    served: tuple[calibration.Calibration, np.ndarray],
) -> dict:
    """The heatmap gallery (reports/heatmaps/) and localization.json, its section added to comparison.md.

    Args:
        served: the calibration fitted on validation and the thresholds chosen on its probabilities:
            the gallery labels each finding by the outcome the registered model would give it.
    """
    import shutil

    from .explain import explainer
    from .heatmaps import HEATMAPS, LOCALIZATION, draw_gallery, localization, localization_markdown

    cal, thresholds = served
    ds = CachedImageDataset(prepared_dir, "test", crop, train=False)
    row = {name: i for i, name in enumerate(test.images)}
    probs = cal.probabilities(test.logits[[row[name] for name in ds.image_names]])  # (N, C) in the dataset's order
    shutil.rmtree(out_dir / HEATMAPS, ignore_errors=True)  # images of an earlier run would linger
    ex = explainer(model, crop)
    draw_gallery(ex, ds, (probs, np.asarray(thresholds)), prepared_dir, cfg.explain, cfg.seed, out_dir)
    report = localization(ex, ds, prepared_dir, cfg.explain)
    write_json(out_dir / LOCALIZATION, report)
    comparison = out_dir / "comparison.md"
    write_text(comparison, comparison.read_text(encoding="utf-8") + localization_markdown(report))
    return report


def fit_calibration(val: SplitScores, cfg: EvaluateConfig) -> tuple[calibration.Calibration, dict]:
    """The calibration map of `cfg.calibration.method`, fitted on the validation logits, and how it was chosen.

    "auto" compares none, temperature and isotonic by their NLL on held-out validation patients.
    """
    setting = cfg.calibration.method
    chosen_by: dict = {"setting": setting, "cross_validated_nll": None, "reason": f"set: {setting}"}
    method = setting
    if setting == "auto":
        folds = cfg.calibration.folds
        method, scores = calibration.choose_method(val.y, val.logits, val.patients, folds)
        ranked = " < ".join(f"{m} {v:.4f}" for m, v in sorted(scores.items(), key=lambda kv: kv[1]))
        reason = f"lowest validation NLL held out over {folds} patient folds: {ranked}"
        chosen_by.update(cross_validated_nll=scores, folds=folds, unit="patient", reason=reason)
    return calibration.fit(method, val.y, val.logits, CLASSES), chosen_by


def _finite(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


def _metrics_json(boot, ap, at_thr, test: SplitScores, val: tuple[float, ClassSet, np.ndarray], cfg, bundle) -> dict:
    val_mean_auc, val_classes, val_auc = val
    return {
        "mean_auc": _finite(boot["mean_auc"]),
        "mean_auc_ci": [_finite(boot["mean_low"]), _finite(boot["mean_high"])],
        # the one class set both numbers above are over, and the classes left out of it, by name
        "min_positive_patients": cfg.min_positive_patients,
        "classes_in_mean": boot["classes"].names(),
        "excluded_classes": boot["classes"].excluded(),
        "ci_level": cfg.ci,
        "bootstrap_resamples": cfg.bootstrap_resamples,
        # resamples missing a patient of some class in the mean: left out of mean_auc_ci, counted
        "bootstrap_dropped_resamples": boot["mean_dropped"],
        "bootstrap_unit": "patient",
        "per_class_auc": {c: _finite(v) for c, v in zip(CLASSES, boot["auc"])},
        "per_class_auc_ci": {c: [_finite(lo), _finite(hi)] for c, lo, hi in zip(CLASSES, boot["low"], boot["high"])},
        "undefined_classes": [c for c, v in zip(CLASSES, boot["auc"]) if not np.isfinite(v)],
        "mean_average_precision": _finite(np.nanmean(ap)) if np.isfinite(ap).any() else None,
        "per_class_average_precision": {c: _finite(v) for c, v in zip(CLASSES, ap)},
        "threshold_method": cfg.threshold_method,
        "mean_sensitivity": _finite(np.nanmean(at_thr["sensitivity"])),
        "mean_specificity": _finite(np.nanmean(at_thr["specificity"])),
        "mean_f1": _finite(np.nanmean(at_thr["f1"])),
        "val_mean_auc": _finite(val_mean_auc),
        "val_classes_in_mean": val_classes.names(),
        "val_excluded_classes": val_classes.excluded(),
        # the selected checkpoint's per-class validation AUC, beside the test one (never selected on)
        "val_per_class_auc": {c: _finite(v) for c, v in zip(CLASSES, val_auc)},
        "test_images": len(test.images),
        "test_patients": boot["n_groups"],
        "checkpoint_epoch": bundle.epoch,
    }


def _per_class_table(boot, ap, at_thr, test: SplitScores, val_auc: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "class": list(CLASSES),
            "val_auc": val_auc,
            "auc": boot["auc"],
            "auc_low": boot["low"],
            "auc_high": boot["high"],
            "average_precision": ap,
            "threshold": at_thr["threshold"],
            "sensitivity": at_thr["sensitivity"],
            "specificity": at_thr["specificity"],
            "precision": at_thr["precision"],
            "f1": at_thr["f1"],
            "test_positives": test.y.sum(0).astype(int),
        }
    ).round(6)


def comparison_markdown(metrics: dict) -> str:
    """This run beside the published official-split results, the seed paper marked."""
    ours = metrics["mean_auc"]
    lo, hi = metrics["mean_auc_ci"]
    rows = list(PUBLISHED)
    lines = ["| Method | Mean AUC |", "|---|---|"]
    for name, auc in sorted(rows + [("**this run**", ours if ours is not None else float("nan"))], key=lambda r: r[1]):
        mark = " **(seed paper)**" if name == SEED_PAPER else ""
        value = (
            f"{auc:.3f}"
            if name != "**this run**"
            else (f"**{ours:.3f}** [{lo:.3f}, {hi:.3f}]" if ours is not None else "undefined")
        )
        lines.append(f"| {name}{mark} | {value} |")
    lines += ["", "| Class | AUC (this run) | 95% CI |", "|---|---|---|"]
    for c in CLASSES:
        auc = metrics["per_class_auc"][c]
        ci = metrics["per_class_auc_ci"][c]
        lines.append(
            f"| {c} | {auc:.3f} | [{ci[0]:.3f}, {ci[1]:.3f}] |" if auc is not None else f"| {c} | undefined | |"
        )
    kept, excluded, n = metrics["classes_in_mean"], metrics["excluded_classes"], metrics["min_positive_patients"]
    lines += ["", describe_class_set("test", kept, excluded, n), ""]
    lines.append(
        "Published figures are mean AUC on the official ChestX-ray14 test split; the demo profile's "
        "synthetic data is not comparable to them. Intervals: percentile bootstrap over test patients "
        f"({metrics['test_patients']} patients, {metrics['test_images']} images)."
    )
    return "\n".join(lines) + "\n"


def _write_reports(out_dir: Path, metrics, table, thresholds, val, test, boot, ap, cfg, cal) -> None:
    out_dir = Path(out_dir)
    plot_dir = out_dir / "plots"
    write_json(out_dir / "metrics.json", metrics)
    save_dataframe(out_dir / "per_class_auc.csv", table)
    write_json(
        out_dir / "thresholds.json",
        {
            "method": cfg.threshold_method,
            "chosen_on": "val",
            # the scale the thresholds apply to: the registered model's (calibrated) probabilities
            "probabilities": "calibrated" if cal.calibrated else "raw",
            "calibration": cal.method,
            "thresholds": {c: float(t) for c, t in zip(CLASSES, thresholds)},
        },
    )
    save_dataframe(out_dir / "predictions" / "test.parquet", predictions_frame(test))
    save_dataframe(out_dir / "predictions" / "val.parquet", predictions_frame(val))
    write_text(out_dir / "comparison.md", comparison_markdown(metrics))
    plots.curve_grid(roc_curve_points(test.y, test.probs), boot["auc"], CLASSES, plot_dir / "roc.png", "roc")
    plots.curve_grid(pr_curve_points(test.y, test.probs), ap, CLASSES, plot_dir / "pr.png", "pr")
    calib = plots.calibration(test.y, cal.probabilities(test.logits), plot_dir / "calibration.png")
    save_dataframe(plot_dir / "calibration.csv", pd.DataFrame(calib))
    plots.per_class_bars(
        list(CLASSES), boot["auc"], boot["low"], boot["high"], plot_dir / "per_class_auc.png", reference=SEED_PAPER_AUC
    )
    save_dataframe(plot_dir / "roc.csv", _roc_long(test))


def _roc_long(test: SplitScores, points: int = 101) -> pd.DataFrame:
    """ROC curves resampled at fixed FPRs, long format (class, fpr, tpr), for plotting and diffing runs."""
    grid = np.linspace(0, 1, points)
    rows = []
    for c, (fpr, tpr) in zip(CLASSES, roc_curve_points(test.y, test.probs)):
        if len(fpr):
            rows.append(pd.DataFrame({"class": c, "fpr": grid, "tpr": np.interp(grid, fpr, tpr)}))
    return pd.concat(rows, ignore_index=True).round(5) if rows else pd.DataFrame(columns=["class", "fpr", "tpr"])
