"""Train step: ConvNeXt + metric head (or the linear baseline) with the dual-weighted metric loss.

Run:
    python -m components.train --prepared data/prepared --prototypes artifacts/prototypes --out artifacts/model
    torchrun --nproc_per_node 4 -m components.train ...        # DDP on 4 GPUs (rank 0 logs and saves)
    torchrun --nnodes 2 --node_rank R --master_addr HOST --nproc_per_node 8 -m components.train ...
Writes best.pt (inference bundle, with the drift reference `predict` compares new images with),
last.pt (full state for resume), train_summary.json and
resolved_config.json into --out, and history.csv and training_curves.png into --reports. A `last.pt`
written with the same settings and inputs is resumed (an interrupted run continues; a finished one
does nothing). The files describe the trained model, not how the run went: a finished run resumed
rewrites them byte for byte (the epoch a run resumed from is printed, not written), so DVC sees
unchanged outputs and the steps after train do not rerun.
"""

from __future__ import annotations

import os
from pathlib import Path

from components.common import fingerprint, mlflow_run, parser, run_main, stage_config
from components.training import input_digests, load_prototypes, mlflow_logger
from pipeline import tracking
from pipeline.data.layout import MANIFEST
from pipeline.io import save_dataframe, write_json


def main(argv: list[str] | None = None) -> int:
    from pipeline.training import train

    p = parser(__doc__)
    p.add_argument("--prepared", default="data/prepared", help="prepare step output (default: %(default)s)")
    p.add_argument("--prototypes", default="artifacts/prototypes", help="prototypes step output")
    p.add_argument("--out", default="artifacts/model", help="checkpoint folder (default: %(default)s)")
    p.add_argument("--reports", default="reports/train", help="history and curves (default: %(default)s)")
    p.add_argument("--no-resume", action="store_true", help="ignore an existing last.pt")
    args = p.parse_args(argv)
    cfg, params = stage_config(args, "train")
    if args.no_resume:
        cfg = cfg.replace(resume=False)
    prepared, protos_dir, out = Path(args.prepared), Path(args.prototypes), Path(args.out)
    text_vectors = load_prototypes(protos_dir)
    min_patients = params.evaluate.min_positive_patients  # the class set the best epoch is chosen on
    # the drift reference is fitted after training: its settings must not make last.pt unresumable
    fp = fingerprint(cfg.model_dump(exclude={"drift"}), input_digests(prepared, protos_dir), min_patients)
    is_main = int(os.environ.get("RANK", "0")) == 0
    previous = tracking.load_run_ref(out) if (is_main and cfg.resume and _resumable(out, fp)) else None
    run_args = args if is_main else _without_mlflow(args)
    with mlflow_run(
        run_args, params, "train", run_id=previous and previous["run_id"], run_name=run_name(cfg, fp)
    ) as run:
        if run is not None:
            _log_start(params, cfg, prepared, protos_dir, out, run)
        result = train(
            cfg,
            prepared,
            text_vectors,
            out,
            fingerprint=fp,
            log=mlflow_logger() if run is not None else None,
            progress=not args.no_progress,
            min_patients=min_patients,
        )
        if is_main:
            _attach_drift_reference(out, prepared, cfg)
            summary = _write_outputs(out, Path(args.reports), result, cfg, params, fp)
            if run is not None:
                _log_end(out, Path(args.reports), summary)
    if is_main:
        if result.resumed_from is not None:
            finished = result.resumed_from >= result.epochs_run
            print(
                f"[train] resumed {out / 'last.pt'} at epoch {result.resumed_from}"
                + (": the run had finished, nothing trained" if finished else "")
            )
        print(
            f"[train] best validation mean AUC {result.best_auc:.4f} at epoch {result.best_epoch} "
            f"({result.epochs_run} epochs{', stopped early' if result.stopped_early else ''})"
        )
    return 0


def _attach_drift_reference(out: Path, prepared: Path, cfg) -> None:
    """Save the summary of the training data that `predict` compares new images with into best.pt."""
    from pipeline.inference import resolve_device
    from pipeline.serving.drift import attach_reference

    device = resolve_device(cfg.device, "train.device")
    if attach_reference(out / "best.pt", prepared, cfg.drift, cfg.seed, device, cfg.eval_batch_size):
        print(f"[train] drift reference saved into {out / 'best.pt'}")


def run_name(cfg, fp: str) -> str:
    """What the list of runs and the charts call a training: what differs between trainings, e.g.
    `train dwml metric convnext_atto e16 3f2a9c` (loss, head, backbone, epochs, settings hash)."""
    return f"train {cfg.loss.name} {cfg.model.head} {cfg.model.backbone.name} e{cfg.epochs} {fp[:6]}"


def _resumable(out: Path, fp: str) -> bool:
    from pipeline.io import load_checkpoint

    last = out / "last.pt"
    if not last.exists():
        return False
    try:
        # mmap: only the small dict is read, not every tensor of a large checkpoint
        return load_checkpoint(last, mmap=True).get("fingerprint") == fp
    except RuntimeError:  # a damaged last.pt is not resumed; training says so when it reads it
        return False


def _without_mlflow(args):
    args = type(args)(**vars(args))
    args.no_mlflow = True
    return args


def _log_start(params, cfg, prepared: Path, protos: Path, out: Path, run) -> None:
    import mlflow

    tracking.log_params(tracking.flatten({"train": cfg.model_dump()}))
    mlflow.log_param("profile", params.profile)
    tracking.log_splits(prepared / MANIFEST, ("train", "val"))  # trained on, and selected on
    # link this run to the data steps that produced its inputs
    for step, folder in (("download", prepared.parent / "raw"), ("prepare", prepared), ("prototypes", protos)):
        ref = tracking.load_run_ref(folder)
        if ref:
            mlflow.set_tag(f"cxr.run.{step}", ref["run_id"])
    tracking.save_run_ref(out, run)


def _write_outputs(out: Path, reports: Path, result, cfg, params, fp: str) -> dict:
    import pandas as pd

    from pipeline.evaluation.plots import training_curves

    history = pd.DataFrame(result.history)
    save_dataframe(reports / "history.csv", history)
    if len(history):
        training_curves(history, reports / "training_curves.png")
    summary = {
        "best_val_mean_auc": result.best_auc,
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "stopped_early": result.stopped_early,
        "fingerprint": fp,
    }
    write_json(out / "train_summary.json", summary)
    write_json(out / "resolved_config.json", {"profile": params.profile, "train": cfg.model_dump()})
    return summary


def _log_end(out: Path, reports: Path, summary: dict) -> None:
    import mlflow

    mlflow.log_metrics({"best_val_mean_auc": summary["best_val_mean_auc"], "best_epoch": summary["best_epoch"]})
    for path in (
        out / "resolved_config.json",
        out / "train_summary.json",
        reports / "history.csv",
        reports / "training_curves.png",
    ):
        if path.exists():
            mlflow.log_artifact(str(path), artifact_path="train")


if __name__ == "__main__":
    raise SystemExit(run_main("train", main))
