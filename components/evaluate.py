"""Evaluate step: per-class and mean test AUC with bootstrap CIs, thresholds, plots, comparison.

Run:
    python -m components.evaluate --prepared data/prepared --model artifacts/model --out reports
Writes reports/metrics.json, subgroups.json, calibration.json and localization.json (DVC metrics),
per_class_auc.csv, thresholds.json, comparison.md, predictions/{val,test}.parquet, plots/*.png|csv
(subgroups.png and reliability.png among them) and the heatmap gallery heatmaps/<image>.png, and
logs them all to the training run in MLflow.
"""

from __future__ import annotations

from pathlib import Path

from components.common import mlflow_run, parser, run_main, save_resolved, stage_config
from pipeline import tracking
from pipeline.classes import CLASSES
from pipeline.data.layout import MANIFEST
from pipeline.io import read_json


def main(argv: list[str] | None = None) -> int:
    from pipeline.evaluation.scoring import comparison_markdown, evaluate

    p = parser(__doc__)
    p.add_argument("--prepared", default="data/prepared", help="prepare step output (default: %(default)s)")
    p.add_argument("--model", default="artifacts/model", help="train step output (default: %(default)s)")
    p.add_argument("--out", default="reports", help="reports folder (default: %(default)s)")
    args = p.parse_args(argv)
    cfg, params = stage_config(args, "evaluate")
    model_dir, out = Path(args.model), Path(args.out)
    if not (model_dir / "best.pt").exists():
        raise FileNotFoundError(f"{model_dir / 'best.pt'} not found: run the train step first (dvc repro train)")
    ref = tracking.load_run_ref(model_dir)
    with mlflow_run(args, params, "evaluate", run_id=ref and ref["run_id"]) as run:
        metrics = evaluate(model_dir / "best.pt", Path(args.prepared), out, cfg, progress=not args.no_progress)
        save_resolved(out / "evaluate_config.json", "evaluate", cfg, params)
        if run is not None:
            _log(out, metrics)
            tracking.log_splits(Path(args.prepared) / MANIFEST, ("val", "test"))  # thresholds, and the report
    print(comparison_markdown(metrics))
    return 0


def _log(out: Path, metrics: dict) -> None:
    import mlflow

    values = {
        "test_mean_auc": metrics["mean_auc"],
        "test_mean_auc_ci_low": metrics["mean_auc_ci"][0],
        "test_mean_auc_ci_high": metrics["mean_auc_ci"][1],
        "test_mean_ap": metrics["mean_average_precision"],
        "test_mean_f1": metrics["mean_f1"],
        "test_mean_sensitivity": metrics["mean_sensitivity"],
        "test_mean_specificity": metrics["mean_specificity"],
    }
    values.update({f"test_auc_{c}": metrics["per_class_auc"][c] for c in CLASSES})
    calibration = read_json(out / "calibration.json")
    values.update(
        {
            "test_mean_ece_raw": calibration["mean_ece_raw"],
            "test_mean_ece_calibrated": calibration["mean_ece_calibrated"],
            "val_nll_raw": calibration["val_nll_raw"],
            "val_nll_calibrated": calibration["val_nll_calibrated"],
        }
    )
    values["test_mean_auc_classes"] = len(metrics["classes_in_mean"])
    # the selected checkpoint's validation mean AUC, what the registry gate and the version's tags
    # use (the training curve per epoch is epoch_val_mean_auc)
    values["val_mean_auc"] = metrics["val_mean_auc"]
    values["val_mean_auc_classes"] = len(metrics["val_classes_in_mean"])
    values["test_bootstrap_dropped_resamples"] = metrics["bootstrap_dropped_resamples"]
    mlflow.log_metrics({k: float(v) for k, v in values.items() if v is not None})
    # the execution's headline on its parent run: what the collapsed runs list and charts show
    headline = (
        "val_mean_auc",
        "test_mean_auc",
        "test_mean_auc_ci_low",
        "test_mean_auc_ci_high",
        "test_mean_ece_calibrated",
    )
    tracking.log_to_parent(mlflow.active_run(), {k: values.get(k) for k in headline})
    mlflow.set_tag("cxr.calibration", calibration["method"])
    # the classes each mean AUC leaves out, by name: a run's mean is comparable to another's only
    # over the same classes
    for split, prefix in (("test", ""), ("val", "val_")):
        excluded = metrics[f"{prefix}excluded_classes"]
        mlflow.set_tag(
            f"cxr.{split}_mean_auc_excluded", "; ".join(f"{c}: {why}" for c, why in excluded.items()) or "none"
        )
    names = (
        "metrics.json",
        "subgroups.json",
        "localization.json",
        "calibration.json",
        "per_class_auc.csv",
        "thresholds.json",
        "comparison.md",
    )
    for name in (*names, "evaluate_config.json"):
        mlflow.log_artifact(str(out / name), artifact_path="evaluation")
    mlflow.log_artifacts(str(out / "plots"), artifact_path="evaluation/plots")
    _log_images(out / "plots")
    mlflow.log_artifacts(str(out / "heatmaps"), artifact_path="evaluation/heatmaps")
    mlflow.log_artifacts(str(out / "predictions"), artifact_path="evaluation/predictions")
    mlflow.set_tag("cxr.test_mean_auc", f"{metrics['mean_auc']:.4f}" if metrics["mean_auc"] is not None else "nan")


def _log_images(plots: Path) -> None:
    """Each plot also as an MLflow image (key `evaluation/<name>`): the chart view shows it on the run's
    page and side by side when runs are compared, which plain artifacts are not."""
    import mlflow
    from PIL import Image

    for path in sorted(plots.glob("*.png")):
        with Image.open(path) as image:
            mlflow.log_image(image.convert("RGB"), key=f"evaluation/{path.stem}", step=0, synchronous=True)


if __name__ == "__main__":
    raise SystemExit(run_main("evaluate", main))
