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
from pipeline.tracking import redact_uri


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reports", default="reports")
    args = p.parse_args(argv)
    reports = Path(args.reports)
    metrics = read_json(reports / "metrics.json")
    print(f"\n{'class':<20} {'AUC':>7}   95% CI")
    for c in CLASSES:
        auc, (lo, hi) = metrics["per_class_auc"][c], metrics["per_class_auc_ci"][c]
        print(f"{c:<20} {auc:>7.4f}   [{lo:.4f}, {hi:.4f}]" if auc is not None else f"{c:<20} {'n/a':>7}")
    lo, hi = metrics["mean_auc_ci"]
    print(
        f"{'mean AUC':<20} {metrics['mean_auc']:>7.4f}   [{lo:.4f}, {hi:.4f}]  "
        f"({metrics['test_images']} test images of {metrics.get('test_patients', '?')} patients, "
        f"patient bootstrap; seed paper {SEED_PAPER_AUC:.3f} on NIH)"
    )
    reg = reports / "registration.json"
    if reg.exists():
        r = read_json(reg)
        state = "champion" if r.get("promote") else "challenger"
        print(f"\nregistered {r['model_name']} v{r['version']} as {state}: {r['reason']}")
    uri = redact_uri(tracking.default_tracking_uri())
    browse = (
        f"mlflow ui --backend-store-uri {uri.replace(str(Path.cwd().resolve()) + '/', '')}"
        if uri.startswith("sqlite")
        else f"open {uri}"
    )
    print(f"\nbrowse the runs:  .venv/bin/{browse}   (then http://127.0.0.1:5000)")
    print("compare with the previous run:  .venv/bin/dvc metrics diff  /  .venv/bin/dvc plots diff")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main("summary", main))
