"""Prepare step: labels -> manifest, patient-level splits, class counts, uint8 image cache.

Run:
    python -m components.prepare --raw data/raw --out data/prepared
Writes manifest.csv, split_stats.json, class_counts.json, split_class_counts.csv, quarantine.csv
and cache/ into --out; settings from the `prepare` section of params.yaml. The image cache is
built in --work (default: <out>-work, e.g. data/prepared-work/, git-ignored and no DVC output, so
`dvc repro` never deletes it): a killed build resumes from its finished chunks, and once complete
the cache is published into <out>/cache as hard links to the work copy (no second copy on disk).
"""

from __future__ import annotations

from pathlib import Path

from components.common import mlflow_run, parser, run_main, save_resolved, stage_config
from pipeline import tracking


def main(argv: list[str] | None = None) -> int:
    from pipeline.data.inventory import inventory_notes
    from pipeline.data.layout import CLASS_COUNTS, QUARANTINE, SPLIT_CLASS_COUNTS, SPLIT_STATS
    from pipeline.data.prepare import prepare

    p = parser(__doc__)
    p.add_argument("--raw", default="data/raw", help="raw NIH-layout folder (default: %(default)s)")
    p.add_argument("--out", default="data/prepared", help="output folder (default: %(default)s)")
    p.add_argument("--work", default=None, help="where the image cache is built and resumed (default: <out>-work)")
    args = p.parse_args(argv)
    cfg, params = stage_config(args, "prepare")
    raw, out = Path(args.raw), Path(args.out)
    work = Path(args.work) if args.work else out.with_name(f"{out.name}-work")
    if raw.exists() and not raw.is_dir():
        raise NotADirectoryError(
            f"--raw {raw} is a file, not a folder: give the raw data folder the download step fills (default data/raw)"
        )
    if not raw.is_dir():
        raise FileNotFoundError(f"{raw} does not exist: run the download step first (dvc repro download)")
    with mlflow_run(args, params, "prepare") as run:
        stats = prepare(raw, out, cfg, progress=not args.no_progress, work_dir=work)
        if run is not None:
            import mlflow

            tracking.log_params(tracking.flatten({"prepare": vars(cfg)}))
            mlflow.log_metrics(_split_metrics(stats))
            notes = inventory_notes(stats, str(raw))
            if notes:  # beside the counts, where the run list shows it
                mlflow.set_tag("prepare.inventory", " ".join(notes)[:4000])
            for name in (SPLIT_STATS, CLASS_COUNTS, SPLIT_CLASS_COUNTS, QUARANTINE):
                if (out / name).exists():
                    mlflow.log_artifact(str(out / name))
            tracking.save_run_ref(out, run)
    save_resolved(out / "prepare_config.json", "prepare", cfg, params)
    _print_summary(stats)
    for note in inventory_notes(stats, str(raw)):
        print(f"[prepare] {note}")
    return 0


def _split_metrics(stats: dict) -> dict[str, float]:
    metrics = {}
    for split, info in stats.get("splits", {}).items():
        for key in ("images", "patients"):
            if key in info:
                metrics[f"{split}_{key}"] = float(info[key])
    for reason, n in stats.get("quarantine", {}).get("by_reason", {}).items():
        metrics[f"quarantined_{reason}"] = float(n)
    for key in ("listed_missing", "present_unlisted", "listed_unlabelled", "labelled_unlisted"):
        metrics[key] = float((stats.get(key) or {}).get("count", 0))
    return metrics


def _print_summary(stats: dict) -> None:
    parts = [
        f"{s}: {i.get('images', '?')} images / {i.get('patients', '?')} patients"
        for s, i in stats.get("splits", {}).items()
    ]
    print("[prepare] " + "; ".join(parts))


if __name__ == "__main__":
    raise SystemExit(run_main("prepare", main))
