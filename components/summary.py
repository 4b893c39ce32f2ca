"""Print the latest results: per-class and mean test AUC, the registry decision, how to browse.

Run:
    python -m components.summary [--reports reports]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from components.common import run_main
from pipeline import tracking
from pipeline.classes import CLASSES, SEED_PAPER_AUC
from pipeline.io import read_json
from pipeline.metrics import describe_class_set
from pipeline.tracking import redact_uri


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reports", default="reports")
    p.add_argument("--model", default="artifacts/model", help="the train step's output (its MLflow run)")
    args = p.parse_args(argv)
    reports = Path(args.reports)
    metrics = read_json(reports / "metrics.json")
    print(f"\n{'class':<20} {'AUC':>7}   95% CI")
    for c in CLASSES:
        auc, (lo, hi) = metrics["per_class_auc"][c], metrics["per_class_auc_ci"][c]
        print(f"{c:<20} {auc:>7.4f}   [{lo:.4f}, {hi:.4f}]" if auc is not None else f"{c:<20} {'n/a':>7}")
    print(_mean_line(metrics))
    print(_class_set_line(metrics))
    reg = reports / "registration.json"
    if reg.exists():
        r = read_json(reg)
        state = "champion" if r.get("promote") else "challenger"
        print(f"\nregistered {r['model_name']} v{r['version']} as {state}: {r['reason']}")
    print("\n" + _browse_lines(args.model, reg))
    print("compare with the previous run:  .venv/bin/dvc metrics diff  /  .venv/bin/dvc plots diff")
    return 0


def _browse_lines(model_dir: str, registration: Path) -> str:
    """How to open the runs list and the registered model, in MLflow's model-training view (its UI
    opens in the GenAI view otherwise, where the registry is not in the sidebar)."""
    uri = redact_uri(tracking.default_tracking_uri())
    ref = tracking.load_run_ref(model_dir) or {}
    runs = f"experiments/{ref['experiment_id']}/runs" if ref.get("experiment_id") else "experiments"
    model = read_json(registration).get("model_name") if registration.exists() else None
    if uri.lower().startswith(("http://", "https://")):
        base, start = uri, ""
    else:
        base = "http://127.0.0.1:5000"
        start = f".venv/bin/mlflow ui --backend-store-uri {uri.replace(str(Path.cwd().resolve()) + '/', '')}\n  then "
    lines = [f"browse the runs:  {start}{tracking.ui_url(base, runs)}"]
    if model:
        lines.append(f"the registered model:  {tracking.ui_url(base, f'models/{model}')}")
    return "\n".join(lines)


def _mean_line(metrics: dict) -> str:
    lo, hi = metrics["mean_auc_ci"]
    value = f"{metrics['mean_auc']:>7.4f}   [{lo:.4f}, {hi:.4f}]" if metrics["mean_auc"] is not None else f"{'n/a':>7}"
    return (
        f"{'mean AUC':<20} {value}  ({metrics['test_images']} test images of {metrics.get('test_patients', '?')} "
        f"patients, patient bootstrap; seed paper {SEED_PAPER_AUC:.3f} on NIH)"
    )


def _class_set_line(metrics: dict) -> str:
    """Which classes the mean is over, and the resamples its interval left out."""
    if "classes_in_mean" not in metrics:
        return "metrics.json does not name the classes its mean AUC is over: rerun the evaluate step"
    kept, excluded = metrics["classes_in_mean"], metrics["excluded_classes"]
    line = describe_class_set("test", kept, excluded, metrics["min_positive_patients"])
    dropped = metrics["bootstrap_dropped_resamples"]
    if dropped:
        line += (
            f"\n{dropped} of {metrics['bootstrap_resamples']} resamples had no positive or no negative patient "
            "of a class in the mean and were left out of its interval"
        )
    return line


if __name__ == "__main__":
    raise SystemExit(run_main("summary", main))
