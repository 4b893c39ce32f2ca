"""Ablation in one command: train every variant over several seeds on the same data and prototypes.

Run:
    python -m components.ablate --seeds 3                          # all variants, params.yaml's `train`
    python -m components.ablate --variants bce_head,dual --seeds 2 --epochs 4
Variants are the files of conf/ablation/, each laid over the train section and differing from
`dual` only in what its name says: bce_head (linear head + BCE), metric_unweighted, image_only,
category_only, dual (the method), dual_random_prototypes (random label vectors instead of the text
encoder's), asl, focal.
Seeds are train.seed, train.seed + 1, ...; each (variant, seed) is one nested MLflow run tagged
`cxr.ablation=<variant>` under a parent run named `ablation`, with its checkpoints in
--out/<variant>/seed_<s> (an interrupted ablation resumes each run where it stopped). Runs go
seed by seed (every variant on the first seed, then every variant on the next), so an ablation
stopped early compares its variants over the same seeds. A finished run leaves its predictions in
--out/<variant>/seed_<s>/scores.npz, stamped with the fingerprint of its settings and input data;
a later ablation over the same settings and data reads them instead of training again, so the
few-kilobyte score files (not the checkpoints) are all it takes to carry an ablation from one
machine to another and finish it there.

Selection stays on validation: each run's checkpoint is its best validation epoch. Test is only
reported: per variant the mean and std over seeds of validation and test mean AUC, and the paired
delta against bce_head (same seeds, same resampled patients, 95% percentile interval over
--bootstrap patient resamples). Each split's means and deltas are over one class set, the classes
with at least evaluate.min_positive_patients positive and negative patients there; the others are
named in the reports. Writes ablation.json, ablation.md, ablation_runs.csv and
ablation.png into --reports and prints the table.

The same comparison through DVC experiments, one queued experiment per variant (the same files,
composed into params.yaml as the `ablation` group):
    dvc exp run --queue -n dual -S ablation=dual
    dvc exp run --queue -n bce_head -S ablation=bce_head
    dvc exp run --run-all && dvc exp show
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from components.common import fingerprint, mlflow_run, parser, run_main, stage_config
from pipeline.classes import CLASSES
from pipeline.config import read_yaml
from pipeline.io import save_dataframe, write_json, write_text

BASELINE = "bce_head"
# The questions the variants answer, each a paired comparison (variant minus reference) reported
# when both ran: what the dual weighting does on each head, what the metric head does under it,
# what the metric head's projector does, and what the MLP does in front of the linear head.
COMPARISONS = (
    ("linear_dual", "bce_head", "dual weighting, linear head"),
    ("dual", "metric_unweighted", "dual weighting, metric head"),
    ("dual", "linear_dual", "metric head instead of linear, both dual"),
    ("dual_identity_projector", "dual", "no projector instead of the MLP (metric head, dual)"),
    ("dual_linear_projector", "dual", "a linear projector instead of the MLP (metric head, dual)"),
    ("mlp_bce_head", "bce_head", "the MLP in front of the linear BCE head"),
)
VARIANTS = Path("conf/ablation")  # one file per variant, laid over the train section
RUN_COLUMNS = ["variant", "seed", "head", "loss", "prototypes", "best_epoch", "val_mean_auc", "test_mean_auc"]


@dataclass
class RunScores:
    """One trained (variant, seed): where it stopped and its predictions on both splits."""

    variant: str
    seed: int
    head: str
    loss: str
    prototypes: str
    best_epoch: int
    val: object  # pipeline.evaluation.scoring.SplitScores
    test: object


def main(argv: list[str] | None = None) -> int:
    from components.training import input_digests, load_prototypes

    p = parser(__doc__)
    p.add_argument("--prepared", default="data/prepared", help="prepare step output (default: %(default)s)")
    p.add_argument("--prototypes", default="artifacts/prototypes", help="prototypes step output")
    p.add_argument("--out", default="artifacts/ablation", help="checkpoints, one folder per variant and seed")
    p.add_argument("--reports", default="reports", help="where the ablation reports go (default: %(default)s)")
    p.add_argument("--variants", default=None, help="comma-separated, of --variants-dir (default: all)")
    p.add_argument("--variants-dir", default=str(VARIANTS), help="one YAML file per variant (default: %(default)s)")
    p.add_argument("--seeds", type=int, default=1, help="training seeds per variant (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=None, help="override train.epochs for every variant")
    p.add_argument("--bootstrap", type=int, default=1000, help="patient resamples for the deltas")
    args = p.parse_args(argv)
    if args.seeds < 1 or args.bootstrap < 1:
        raise ValueError(f"--seeds ({args.seeds}) and --bootstrap ({args.bootstrap}) must be >= 1")
    base, params = stage_config(args, "train")
    if args.epochs is not None:
        base = base.replace(epochs=args.epochs, at="train")
    folder = Path(args.variants_dir)
    variants = parse_variants(args.variants, folder) if args.variants else known_variants(folder)
    seeds = [base.seed + i for i in range(args.seeds)]
    prepared, protos = Path(args.prepared), Path(args.prototypes)
    text_vectors = load_prototypes(protos)
    digests = input_digests(prepared, protos)
    reports = Path(args.reports)

    runs = []
    with mlflow_run(args, params, "ablation", run_name="ablation") as parent:
        for seed, variant in ((s, v) for s in seeds for v in variants):
            cfg = variant_config(base, variant, seed, folder)
            print(
                f"[ablate] {variant} seed {seed}: head {cfg.model.head}, loss {cfg.loss.name}, "
                f"projector {cfg.model.projector}, prototypes {cfg.model.prototypes}"
            )
            runs.append(
                run_variant(
                    variant,
                    cfg,
                    params.evaluate,
                    prepared,
                    text_vectors,
                    Path(args.out) / variant / f"seed_{seed}",
                    # the drift reference is not fitted for ablation runs: its settings change nothing here
                    fingerprint(cfg.model_dump(exclude={"drift"}), digests, params.evaluate.min_positive_patients),
                    parent is not None,
                    not args.no_progress,
                )
            )
        min_patients = params.evaluate.min_positive_patients
        table = runs_table(runs, min_patients)
        summary = summarize(runs, args.bootstrap, min_patients, base.epochs)
        write_reports(table, summary, reports)
        if parent is not None:
            import mlflow

            for name in ("ablation.json", "ablation.md", "ablation_runs.csv", "ablation.png"):
                mlflow.log_artifact(str(reports / name), artifact_path="ablation")
    print(summary_markdown(summary))
    return 0


def known_variants(folder: Path = VARIANTS) -> list[str]:
    """The variants in `folder` (conf/ablation/), the baseline first."""
    names = sorted(p.stem for p in Path(folder).glob("*.yaml"))
    return sorted(names, key=lambda name: name != BASELINE)


def parse_variants(text: str, folder: Path = VARIANTS) -> list[str]:
    """`a,b` -> ["a", "b"], each checked against the files of `folder` (conf/ablation/)."""
    known = known_variants(folder)
    variants = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in variants if v not in known]
    if unknown or not variants:
        raise ValueError(
            f"--variants: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(known)} "
            f"(the files of {folder})"
        )
    return variants


def variant_config(base, variant: str, seed: int | None = None, folder: Path = VARIANTS):
    """`base` (the train section) with `folder`/<variant>.yaml's train settings laid over it (the
    file's `train` section, as the `ablation` group composes it into params.yaml), and `seed`."""
    path = Path(folder) / f"{variant}.yaml"
    overlay = read_yaml(path).get("train")
    if not isinstance(overlay, dict):
        raise ValueError(f"{path}: no train section; an ablation variant sets train.* keys only")
    from pipeline.tracking import flatten

    changes = flatten(overlay)
    if seed is not None:
        changes["seed"] = seed
    return base.replace(changes, at="train")


def run_variant(
    variant: str, cfg, ecfg, prepared: Path, text_vectors, out: Path, fp: str, track: bool, progress: bool
) -> RunScores:
    """Train one (variant, seed) (its own nested MLflow run when `track`) and score its best
    checkpoint, or read the scores a finished run over the same settings and data left in `out`."""
    saved = load_run_scores(out / SCORES, fp)
    if saved is not None:
        print(f"[ablate] {variant} seed {cfg.seed}: finished earlier, its scores read from {out / SCORES}")
        return saved
    scores = _train_and_score(variant, cfg, ecfg, prepared, text_vectors, out, fp, track, progress)
    save_run_scores(out / SCORES, scores, fp)
    return scores


def _train_and_score(
    variant: str, cfg, ecfg, prepared: Path, text_vectors, out: Path, fp: str, track: bool, progress: bool
) -> RunScores:
    from pipeline import tracking
    from pipeline.training import train

    min_patients = ecfg.min_positive_patients
    if not track:
        result = train(cfg, prepared, text_vectors, out, fingerprint=fp, progress=progress, min_patients=min_patients)
        return _scores(variant, cfg, ecfg, result, prepared, progress)
    import mlflow

    from components.training import mlflow_logger

    tags = {"cxr.ablation": variant, "cxr.step": "ablation", "cxr.seed": str(cfg.seed)}
    with mlflow.start_run(run_name=f"{variant}-seed{cfg.seed}", nested=True, tags=tags):
        tracking.log_params(tracking.flatten({"train": cfg.model_dump()}))
        mlflow.log_param("ablation", variant)
        result = train(
            cfg,
            prepared,
            text_vectors,
            out,
            fingerprint=fp,
            log=mlflow_logger(),
            progress=progress,
            min_patients=min_patients,
        )
        scores = _scores(variant, cfg, ecfg, result, prepared, progress)
        mlflow.log_metrics(
            {
                "best_val_mean_auc": _mean_auc(scores.val, min_patients),
                "test_mean_auc": _mean_auc(scores.test, min_patients),
            }
        )
    return scores


SCORES = "scores.npz"
_SPLIT_FIELDS = ("images", "y", "logits", "patients")


def save_run_scores(path: Path, scores: RunScores, fp: str) -> None:
    """A finished run's predictions on both splits, with what it was and the fingerprint of its
    settings and inputs; written whole or not at all."""
    from pipeline.io import atomic_open

    arrays = {
        "fingerprint": np.array(fp),
        "meta": np.array(
            [scores.variant, str(scores.seed), scores.head, scores.loss, scores.prototypes, str(scores.best_epoch)]
        ),
    }
    for split in ("val", "test"):
        part = getattr(scores, split)
        for field in _SPLIT_FIELDS:
            value = getattr(part, field)
            arrays[f"{split}_{field}"] = np.asarray(value, dtype=str) if field in ("images", "patients") else value
    with atomic_open(path, "wb") as f:
        np.savez_compressed(f, **arrays)


def load_run_scores(path: Path, fp: str) -> RunScores | None:
    """The scores `save_run_scores` left at `path` if they belong to settings and inputs `fp`;
    None when there are none, or they are another run's (they are then trained again)."""
    from pipeline.evaluation.scoring import SplitScores

    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as z:
        if str(z["fingerprint"]) != fp:
            print(f"[ablate] {path}: from other settings or data than this run's; training again")
            return None
        variant, seed, head, loss, prototypes, best_epoch = (str(v) for v in z["meta"])
        splits = {
            split: SplitScores(
                images=[str(v) for v in z[f"{split}_images"]],
                y=z[f"{split}_y"],
                logits=z[f"{split}_logits"],
                patients=z[f"{split}_patients"],
            )
            for split in ("val", "test")
        }
    return RunScores(variant, int(seed), head, loss, prototypes, int(best_epoch), splits["val"], splits["test"])


def _scores(variant: str, cfg, ecfg, result, prepared: Path, progress: bool) -> RunScores:
    from pipeline.evaluation.scoring import score_split
    from pipeline.inference import resolve_device
    from pipeline.models import load_bundle

    device = resolve_device(cfg.device, "train.device")
    model, bundle = load_bundle(result.best_path, device)
    crop = bundle.crop_size
    val = score_split(model, prepared, "val", crop, ecfg, device, progress)
    test = score_split(model, prepared, "test", crop, ecfg, device, progress)
    return RunScores(
        variant, cfg.seed, cfg.model.head, cfg.loss.name, cfg.model.prototypes, result.best_epoch, val, test
    )


def _mean_auc(split, min_patients: int) -> float:
    """The split's mean AUC over its class set (`pipeline.metrics.ClassSet`)."""
    from pipeline.metrics import class_set, mean_auc, roc_auc

    return mean_auc(roc_auc(split.y, split.probs), class_set(split.y, split.patients, min_patients))


def runs_table(runs: list[RunScores], min_patients: int) -> pd.DataFrame:
    rows = []
    for r in runs:
        rows.append(
            {
                "variant": r.variant,
                "seed": r.seed,
                "head": r.head,
                "loss": r.loss,
                "prototypes": r.prototypes,
                "best_epoch": r.best_epoch,
                "val_mean_auc": _mean_auc(r.val, min_patients),
                "test_mean_auc": _mean_auc(r.test, min_patients),
            }
        )
    return pd.DataFrame(rows, columns=RUN_COLUMNS)


def summarize(runs: list[RunScores], resamples: int, min_patients: int, epochs: int) -> dict:
    """Per variant: mean and std over seeds, the paired patient-bootstrap delta vs bce_head, the
    per-class deltas (seed-averaged AUC differences), and how many runs chose their last epoch
    (a run that did may not have converged in `epochs`).

    Every mean AUC and delta of a split is over that split's one class set: the same labels and
    patients in every run, so the same classes for every variant, seed and resample.
    """
    from pipeline.metrics import class_set

    table = runs_table(runs, min_patients)
    by_variant: dict[str, list[RunScores]] = {}
    for r in runs:
        by_variant.setdefault(r.variant, []).append(r)
    baseline = by_variant.get(BASELINE)
    variants = []
    for name, group in by_variant.items():
        rows = table[table["variant"] == name]
        entry = {
            "variant": name,
            "seeds": [int(s) for s in rows["seed"]],
            "runs_at_last_epoch": int((rows["best_epoch"] == epochs).sum()),
        }
        for split in ("val", "test"):
            values = rows[f"{split}_mean_auc"].to_numpy()
            entry[f"{split}_mean_auc"] = float(values.mean())
            entry[f"{split}_mean_auc_std"] = float(values.std(ddof=1)) if len(values) > 1 else None
            entry[f"{split}_mean_auc_per_seed"] = [float(v) for v in values]
            if baseline is not None and name != BASELINE:
                entry[f"{split}_delta_vs_{BASELINE}"] = paired_delta(baseline, group, split, resamples, min_patients)
                entry[f"{split}_per_class_delta_vs_{BASELINE}"] = per_class_delta(baseline, group, split)
        variants.append(entry)
    comparisons = []
    for variant, reference, question in COMPARISONS:
        if variant in by_variant and reference in by_variant:
            entry = {"variant": variant, "reference": reference, "question": question}
            for split in ("val", "test"):
                entry[split] = paired_delta(by_variant[reference], by_variant[variant], split, resamples, min_patients)
            comparisons.append(entry)
    classes = {
        split: class_set(getattr(runs[0], split).y, getattr(runs[0], split).patients, min_patients)
        for split in ("val", "test")
    }
    return {
        "seeds": sorted({r.seed for r in runs}),
        "epochs": epochs,
        "baseline": BASELINE if baseline is not None else None,
        "bootstrap_resamples": resamples,
        "bootstrap_unit": "patient",
        "min_positive_patients": min_patients,
        **{f"{split}_classes_in_mean": c.names() for split, c in classes.items()},
        **{f"{split}_excluded_classes": c.excluded() for split, c in classes.items()},
        "selection": "best validation epoch per run; test only reported",
        "variants": variants,
        "comparisons": comparisons,
    }


def per_class_delta(baseline: list[RunScores], group: list[RunScores], split: str) -> dict[str, float | None]:
    """Per class: the seed-averaged AUC of `group` minus `baseline`'s on one split (None where a
    class has no positive or no negative image)."""
    from pipeline.metrics import roc_auc

    def mean_auc(rs: list[RunScores]) -> np.ndarray:
        return np.mean([roc_auc(getattr(r, split).y, getattr(r, split).probs) for r in rs], axis=0)  # (C,)

    delta = mean_auc(group) - mean_auc(baseline)
    return {c: (float(d) if np.isfinite(d) else None) for c, d in zip(CLASSES, delta)}


def paired_delta(
    baseline: list[RunScores], group: list[RunScores], split: str, resamples: int, min_patients: int
) -> dict:
    """Seed-averaged mean AUC of `group` minus `baseline` on one split, resampling patients; both over
    the seeds they share."""
    from pipeline.metrics import paired_bootstrap_delta

    shared = {r.seed for r in baseline} & {r.seed for r in group}
    baseline = sorted((r for r in baseline if r.seed in shared), key=lambda r: r.seed)
    group = sorted((r for r in group if r.seed in shared), key=lambda r: r.seed)
    ref = getattr(baseline[0], split)
    for r in [*baseline, *group]:
        if list(getattr(r, split).images) != list(ref.images):
            raise RuntimeError(f"ablation: {r.variant} seed {r.seed} scored other {split} images than {BASELINE}")
    a = np.stack([getattr(r, split).probs for r in baseline])  # (S, N, C)
    b = np.stack([getattr(r, split).probs for r in group])
    test = paired_bootstrap_delta(
        ref.y, a, b, n_resamples=resamples, seed=0, groups=ref.patients, min_patients=min_patients
    )
    return {
        "delta": float(test["delta"]),
        "low": float(test["low"]),
        "high": float(test["high"]),
        "p_value_not_better": float(test["p_value"]),
        "dropped_resamples": test["mean_dropped"],
    }


def _fmt(mean: float, std: float | None) -> str:
    return f"{mean:.4f} ± {std:.4f}" if std is not None else f"{mean:.4f}"


def _fmt_delta(d: dict | None) -> str:
    return "—" if d is None else f"{d['delta']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]"


def summary_markdown(summary: dict) -> str:
    n_seeds = max(len(v["seeds"]) for v in summary["variants"])
    lines = [
        f"| variant | val mean AUC (mean ± std, {n_seeds} seeds) | test mean AUC | "
        f"Δ val vs {BASELINE} [95% CI] | Δ test vs {BASELINE} [95% CI] | runs at their last epoch |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for v in summary["variants"]:
        lines.append(
            f"| {v['variant']} | {_fmt(v['val_mean_auc'], v['val_mean_auc_std'])} | "
            f"{_fmt(v['test_mean_auc'], v['test_mean_auc_std'])} | "
            f"{_fmt_delta(v.get(f'val_delta_vs_{BASELINE}'))} | "
            f"{_fmt_delta(v.get(f'test_delta_vs_{BASELINE}'))} | "
            f"{v.get('runs_at_last_epoch', '?')} of {len(v['seeds'])} |"
        )
    return "\n".join(lines) + "\n"


def comparisons_markdown(summary: dict) -> str:
    """The paired comparisons the variants were run for, validation first (what a default is set on)."""
    if not summary.get("comparisons"):
        return ""
    lines = [
        "\n## What each factor does (paired, seed-averaged)\n",
        "| question | variant − reference | Δ val [95% CI] | Δ test [95% CI] |",
        "|---|---|---:|---:|",
    ]
    for c in summary["comparisons"]:
        pair = f"{c['variant']} − {c['reference']}"
        lines.append(f"| {c['question']} | {pair} | {_fmt_delta(c['val'])} | {_fmt_delta(c['test'])} |")
    return "\n".join(lines) + "\n"


def class_sets_markdown(summary: dict) -> str:
    """Which classes each split's means and deltas are over, the others named with why."""
    from pipeline.metrics import describe_class_set

    n = summary["min_positive_patients"]
    lines = [
        describe_class_set(split, summary[f"{split}_classes_in_mean"], summary[f"{split}_excluded_classes"], n)
        for split in ("val", "test")
    ]
    return " ".join(lines) + "\n\n"


def write_reports(table: pd.DataFrame, summary: dict, reports: Path) -> None:
    from pipeline.evaluation.plots import ablation_plot

    save_dataframe(reports / "ablation_runs.csv", table)
    write_json(reports / "ablation.json", summary)
    write_text(
        reports / "ablation.md",
        "# Ablation (same data, prototypes and schedule; seeds "
        f"{', '.join(map(str, sorted(set(table['seed']))))})\n\n"
        "Each run's checkpoint is its best validation epoch; test is reported, never selected on. "
        f"Deltas are seed-averaged mean AUC minus {BASELINE}'s on the same seeds, with a 95% "
        f"percentile interval over {summary['bootstrap_resamples']} resamples of patients.\n\n"
        + class_sets_markdown(summary)
        + summary_markdown(summary)
        + comparisons_markdown(summary),
    )
    ablation_plot(summary, reports / "ablation.png")


if __name__ == "__main__":
    raise SystemExit(run_main("ablate", main))
