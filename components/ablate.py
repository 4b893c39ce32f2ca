"""Ablation in one command: train and test every loss variant on the same data and prototypes.

Run:
    python -m components.ablate                                   # all variants, params.yaml's `train`
    python -m components.ablate --variants bce_head,dual --epochs 2
Variants (pipeline.losses.ABLATIONS): bce_head (linear head + BCE), metric_unweighted, image_only,
category_only, dual (the method), asl, focal. Each is one MLflow run tagged `cxr.ablation=<variant>`
under a parent run named `ablation`; checkpoints go to --out/<variant> (an interrupted ablation
resumes each variant where it stopped). Writes ablation.csv and ablation.md into --reports and
prints the table: variant, head, loss, best validation mean AUC, test mean AUC.

The same comparison through DVC experiments, one queued experiment per variant:
    dvc exp run --queue -n dual -S train.loss.name=dwml
    dvc exp run --queue -n bce_head -S train.model.head=linear -S train.loss.name=bce
    dvc exp run --run-all && dvc exp show
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import asdict
from pathlib import Path

import pandas as pd

from components.common import fingerprint, mlflow_run, parser, run_main, stage_config
from pipeline.io import save_dataframe, write_text
from pipeline.losses import ABLATIONS, ablation_config

COLUMNS = ["variant", "head", "loss", "val_mean_auc", "best_epoch", "test_mean_auc"]


def main(argv: list[str] | None = None) -> int:
    from components.train import input_digests, load_prototypes
    from pipeline.training import TrainConfig

    p = parser(__doc__)
    p.add_argument("--prepared", default="data/prepared", help="prepare step output (default: %(default)s)")
    p.add_argument("--prototypes", default="artifacts/prototypes", help="prototypes step output")
    p.add_argument("--out", default="artifacts/ablation", help="checkpoints, one folder per variant")
    p.add_argument("--reports", default="reports", help="where ablation.csv/.md go (default: %(default)s)")
    p.add_argument("--variants", default=",".join(ABLATIONS), help="comma-separated (default: all)")
    p.add_argument("--epochs", type=int, default=None, help="override train.epochs for every variant")
    args = p.parse_args(argv)
    base, params = stage_config(args, "train", TrainConfig)
    if args.epochs is not None:
        base.epochs = args.epochs
        base.validate()
    variants = parse_variants(args.variants)
    prepared, protos = Path(args.prepared), Path(args.prototypes)
    text_vectors = load_prototypes(protos)
    digests = input_digests(prepared, protos)

    rows = []
    with mlflow_run(args, params, "ablation", run_name="ablation") as parent:
        for variant in variants:
            cfg = variant_config(base, variant)
            print(f"[ablate] {variant}: head {cfg.model.head}, loss {cfg.loss.name}")
            row = run_variant(variant, cfg, prepared, text_vectors, Path(args.out) / variant,
                              fingerprint(asdict(cfg), digests), parent is not None, not args.no_progress)
            rows.append(row)
        table = pd.DataFrame(rows, columns=COLUMNS)
        write_reports(table, Path(args.reports))
        if parent is not None:
            import mlflow

            for name in ("ablation.csv", "ablation.md"):
                mlflow.log_artifact(str(Path(args.reports) / name), artifact_path="ablation")
    print(table_markdown(table))
    return 0


def parse_variants(text: str) -> list[str]:
    """`a,b` -> ["a", "b"], each checked against ABLATIONS."""
    variants = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in variants if v not in ABLATIONS]
    if unknown or not variants:
        raise ValueError(f"--variants: unknown {', '.join(unknown) or '(none given)'}; "
                         f"choose from {', '.join(ABLATIONS)}")
    return variants


def variant_config(base, variant: str):
    """`base` (the train section) with the variant's loss and head."""
    cfg = copy.deepcopy(base)
    cfg.loss, cfg.model.head = ablation_config(variant, base.loss)
    return cfg


def run_variant(variant: str, cfg, prepared: Path, text_vectors, out: Path, fp: str, track: bool,
                progress: bool) -> dict:
    """Train one variant (its own nested MLflow run when `track`) and score its best checkpoint on test."""
    from pipeline import tracking
    from pipeline.training import train

    row = {"variant": variant, "head": cfg.model.head, "loss": cfg.loss.name}
    if not track:
        result = train(cfg, prepared, text_vectors, out, fingerprint=fp, progress=progress)
        return {**row, **_scores(result, prepared, cfg, progress)}
    import mlflow

    from components.train import mlflow_logger

    tags = {"cxr.ablation": variant, "cxr.step": "ablation"}
    with mlflow.start_run(run_name=variant, nested=True, tags=tags):
        tracking.log_params(tracking.flatten({"train": asdict(cfg)}))
        mlflow.log_param("ablation", variant)
        result = train(cfg, prepared, text_vectors, out, fingerprint=fp, log=mlflow_logger(), progress=progress)
        scores = _scores(result, prepared, cfg, progress)
        mlflow.log_metrics({"best_val_mean_auc": scores["val_mean_auc"], "test_mean_auc": scores["test_mean_auc"]})
    return {**row, **scores}


def _scores(result, prepared: Path, cfg, progress: bool) -> dict:
    return {"val_mean_auc": result.best_auc, "best_epoch": result.best_epoch,
            "test_mean_auc": mean_test_auc(result.best_path, prepared, cfg.eval_batch_size, progress)}


def mean_test_auc(model_path: Path, prepared: Path, batch_size: int, progress: bool = False) -> float:
    """Mean AUC of a best.pt on the test split (classes without positives left out)."""
    from pipeline.evaluation import EvaluateConfig, score_split
    from pipeline.metrics import mean_auc, roc_auc
    from pipeline.models import load_bundle
    from pipeline.training.loop import resolve_device

    device = resolve_device("auto")
    model, bundle = load_bundle(model_path, device)
    cfg = EvaluateConfig(batch_size=batch_size)
    test = score_split(model, prepared, "test", int(bundle["crop_size"]), cfg, device, progress)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a class absent from a small test split is expected
        return float(mean_auc(roc_auc(test.y, test.probs)))


def table_markdown(table: pd.DataFrame) -> str:
    lines = ["| variant | head | loss | val mean AUC | best epoch | test mean AUC |",
             "|---|---|---|---:|---:|---:|"]
    for r in table.itertuples(index=False):
        lines.append(f"| {r.variant} | {r.head} | {r.loss} | {r.val_mean_auc:.4f} | {r.best_epoch} | "
                     f"{r.test_mean_auc:.4f} |")
    return "\n".join(lines) + "\n"


def write_reports(table: pd.DataFrame, reports: Path) -> None:
    save_dataframe(reports / "ablation.csv", table)
    write_text(reports / "ablation.md", "# Loss ablation (same data, prototypes and schedule)\n\n"
               + table_markdown(table))


if __name__ == "__main__":
    raise SystemExit(run_main("ablate", main))
