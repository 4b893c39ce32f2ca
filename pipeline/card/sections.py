"""A model card for each registered version, built from the files one pipeline run leaves.

The card answers what a person deciding whether a model may be used asks beyond one mean AUC: what
it is for and not for, what it was trained and tested on, how well it does per finding and per kind
of patient, whether its probabilities can be taken at face value, where in the image it looked, and
why the registry made it (or did not make it) the champion.

Each section reads its own file and, when that file is absent (a run made before the step that
writes it existed, or a step switched off), says "not available" and why, so a card can be built
from any run. The card is one list of blocks rendered twice: Markdown (images linked relative to
the card) and one self-contained HTML page (images embedded), so the two never disagree.

Inputs, all optional except the evaluation's metrics and the registration record:
    reports/metrics.json, per_class_auc.csv, subgroups.json, plots/subgroups.png,
    calibration.json, plots/reliability.png, heatmaps/*.png or plots/heatmaps.png, localization.json
    <prepared>/split_stats.json
    <model>/resolved_config.json, train_summary.json
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..classes import CLASSES, NO_FINDING, PUBLISHED, SEED_PAPER, SEED_PAPER_AUC
from ..data.layout import SPLIT_STATS
from ..io import read_json
from ..metrics import describe_class_set
from .document import Block, Bullets, Card, Figure, Heading, Paragraph, Table

ARTIFACT_DIR = "model_card"  # where the card goes in the registered model's run
NOT_AVAILABLE = "Not available"
MAX_HEATMAPS = 8  # images of a heatmap folder shown in the card; the folder holds the rest
SYNTHETIC_SOURCE = "synthetic"
# version tags that say what a model was made from, shown in the registry section
PROVENANCE_TAGS = ("git_commit", "data_hash", "params_hash", "weights_sha256")


# ----------------------------------------------------------------------------- what the card reads


# What metrics.json says about the classes each mean AUC is over: the card names those left out.
CLASS_SET_KEYS = (
    "min_positive_patients",
    "classes_in_mean",
    "excluded_classes",
    "val_classes_in_mean",
    "val_excluded_classes",
)


@dataclass(frozen=True)
class RunFiles:
    """Where one run's files are, and what the card was told beside them.

    Attributes:
        reports: the evaluation's folder (metrics.json, subgroups.json, plots/, ...).
        model_dir: the training's folder (resolved_config.json, train_summary.json).
        prepared: the prepared data's folder (split_stats.json).
        data_source: where the images came from (`synthetic`, `nih`, a mirror's address).
    """

    reports: Path
    model_dir: Path
    prepared: Path
    data_source: str


@dataclass(frozen=True)
class CardData:
    """The parsed files; None for each one the run does not have."""

    files: RunFiles
    metrics: dict[str, Any]
    per_class_csv: list[dict[str, str]] | None
    split_stats: dict[str, Any] | None
    train_config: dict[str, Any] | None
    train_summary: dict[str, Any] | None
    subgroups: dict[str, Any] | None
    calibration: dict[str, Any] | None
    localization: dict[str, Any] | None
    figures: dict[str, Path] = field(default_factory=dict)
    heatmaps: tuple[Path, ...] = ()


def read_run(files: RunFiles) -> CardData:
    """Read every file a card may show.

    Raises:
        FileNotFoundError: the reports folder has no metrics.json (the evaluation has not run).
        ValueError: naming a file that is there but is not valid JSON or lacks what the card needs.
    """
    reports = Path(files.reports)
    metrics = read_json(reports / "metrics.json")
    for key in ("mean_auc", "mean_auc_ci", "per_class_auc", "per_class_auc_ci", *CLASS_SET_KEYS):
        if key not in metrics:
            raise ValueError(f"{reports / 'metrics.json'} has no '{key}': rerun the evaluate step")
    plots = reports / "plots"
    figures = {name: plots / f"{name}.png" for name in ("subgroups", "reliability", "calibration", "heatmaps")}
    heat_dir = reports / "heatmaps"
    return CardData(
        files=files,
        metrics=metrics,
        per_class_csv=_read_csv(reports / "per_class_auc.csv"),
        split_stats=_optional_json(Path(files.prepared) / SPLIT_STATS),
        train_config=_optional_json(Path(files.model_dir) / "resolved_config.json"),
        train_summary=_optional_json(Path(files.model_dir) / "train_summary.json"),
        subgroups=_optional_json(reports / "subgroups.json"),
        calibration=_optional_json(reports / "calibration.json"),
        localization=_optional_json(reports / "localization.json"),
        figures={name: path for name, path in figures.items() if path.is_file()},
        heatmaps=tuple(sorted(heat_dir.glob("*.png"))[:MAX_HEATMAPS]) if heat_dir.is_dir() else (),
    )


def _optional_json(path: Path) -> dict[str, Any] | None:
    return read_json(path) if path.is_file() else None


def _read_csv(path: Path) -> list[dict[str, str]] | None:
    import csv

    if not path.is_file():
        return None
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------- numbers as text


def _num(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{float(x):.{digits}f}"


def _signed(x: Any, digits: int = 4) -> str:
    return "n/a" if x is None else f"{float(x):+.{digits}f}"


def _interval(ci: Any, digits: int = 3, signed: bool = False) -> str:
    if not ci or any(v is None for v in ci):
        return "n/a"
    fmt = _signed if signed else _num
    return f"[{fmt(ci[0], digits)}, {fmt(ci[1], digits)}]"


def _count(x: Any) -> str:
    return "n/a" if x is None else f"{int(x):,}"


def _level(metrics: Mapping[str, Any]) -> str:
    return f"{round(100 * float(metrics.get('ci_level', 0.95)))}%"


def _missing(why: str, what: str = "") -> Paragraph:
    """A section, or the part `what` of one, that the run has no data for, and why."""
    return Paragraph(f"**{NOT_AVAILABLE}**: {what} {why}" if what else f"**{NOT_AVAILABLE}**: {why}")


# ----------------------------------------------------------------------------- the card


def build_card(data: CardData, record: Mapping[str, Any], artifact_note: str | None) -> Card:
    """The card of the version in `record` (the register step's record, `registered` true or false).

    Args:
        data: the run's files, from `read_run`.
        record: model_name, version, registered, and for a new version the gate's decision
            (selected_on, val_mean_auc, floor, champion_version, delta, delta_ci, p_value, promote,
            reason), aliases, run_id and tags.
        artifact_note: where the full card is kept beside the model, for the summary; None to leave out.
    """
    title = f"Model card: {record['model_name']} v{record['version']}"
    summary = version_summary(data, record, artifact_note)
    blocks: list[Block] = [Heading(title, 1), Paragraph(" ".join(summary.split("\n\n")))]
    for section in (
        _intended_use,
        _data_section,
        _training_section,
        _results_section,
        _comparison_section,
        _subgroup_section,
        _calibration_section,
        _heatmap_section,
        _localization_section,
    ):
        blocks += section(data)
    blocks += _registry_section(data, record)
    return Card(title, summary, tuple(blocks))


def version_summary(data: CardData, record: Mapping[str, Any], artifact_note: str | None) -> str:
    """A few short plain-text paragraphs: first one line that reads whole when the registry cuts it at
    100 characters (the decision, the validation and the test mean AUC), then the test mean AUC with
    its interval, the validation figure it was selected on, the gate's decision with the comparison
    against the champion, and where the card is."""
    m = data.metrics
    patients = f", bootstrap over {_count(m['test_patients'])} test patients" if m.get("test_patients") else ""
    val = _num(record.get("val_mean_auc", m.get("val_mean_auc")))
    lines = [
        f"{_verdict(record)}: val mean AUC {val}, test {_num(m['mean_auc'])} {_interval(m['mean_auc_ci'])}.",
        f"Test mean AUC {_num(m['mean_auc'])} {_interval(m['mean_auc_ci'])} "
        f"({_level(m)} interval{patients}; reported, never selected on; {_over(m, '')}).",
        f"Selected on validation: val mean AUC {_num(record.get('val_mean_auc', m.get('val_mean_auc')))} "
        f"({_over(m, 'val_')}" + (f"; floor {record['floor']})." if record.get("floor") is not None else ")."),
        _gate_line(record),
    ]
    if data.files.data_source == SYNTHETIC_SOURCE:
        lines.append("Demo model: trained and tested on synthetic images, not on chest X-rays.")
    if artifact_note:
        lines.append(f"Full model card: {artifact_note}.")
    return "\n\n".join(lines)  # one paragraph each in the registry's rendering


def version_page(data: CardData, artifacts: str, query: str, files: Mapping[str, str]) -> str:
    """What the version's page shows below the summary (MLflow renders a version's description as
    Markdown): links into the run's artifacts and the per-class validation and test AUC side by side.

    Args:
        artifacts: the UI's address of the run's artifacts, e.g. `#/experiments/1/runs/<id>/artifacts`.
        query: appended to each link, e.g. `?workflowType=machine_learning` (the model-training view).
        files: link text -> artifact path, e.g. {"model card": "model_card/model_card.html"}.
    """
    m = data.metrics
    level = f"{round(100 * float(m.get('ci_level') or 0.95))}%"
    links = " · ".join(f"[{label}]({artifacts}/{path}{query})" for label, path in files.items())
    rows = [f"| Finding | Val AUC | Test AUC [{level} CI] |", "|---|---:|---:|"]
    for c in CLASSES:
        test = f"{_num(m['per_class_auc'].get(c))} {_interval(m['per_class_auc_ci'].get(c))}"
        rows.append(f"| {c} | {_num(m.get('val_per_class_auc', {}).get(c))} | {test} |")
    return f"Open: {links}.\n\n" + "\n".join(rows)


def _verdict(record: Mapping[str, Any]) -> str:
    if not record.get("registered", True):
        return f"Already registered as v{record['version']}"
    return "Promoted to champion" if record.get("promote") else "Kept as challenger"


def _gate_line(record: Mapping[str, Any]) -> str:
    if not record.get("registered", True):
        return f"Already registered as v{record['version']}: no new version, aliases unchanged."
    verdict = "promoted to champion" if record.get("promote") else "kept as challenger"
    champ = record.get("champion_version")
    if champ is None or record.get("delta") is None:  # nothing to compare with, or not compared: the reason says why
        return f"Gate: {verdict}: {_reason(record)}."
    return (
        f"Gate: {verdict}; against champion v{champ} on {record.get('selected_on', 'val')}: "
        f"delta {_signed(record['delta'])} {_interval(record.get('delta_ci'), 4, signed=True)}, "
        f"p={_num(record.get('p_value'))} (margin {record.get('margin')}, max p {record.get('max_p_value')})."
    )


def _reason(record: Mapping[str, Any]) -> str:
    return str(record.get("reason") or "none recorded").rstrip(".")


def _intended_use(data: CardData) -> list[Block]:
    synthetic = data.files.data_source == SYNTHETIC_SOURCE
    source = (
        "**This model was trained and tested on synthetic images** (the demo's generator, which draws "
        "ChestX-ray14-like labels, patients and metadata): its numbers show that the pipeline works, "
        "and say nothing about how it reads chest X-rays."
        if synthetic
        else f"Images and labels: ChestX-ray14 (NIH Clinical Center), fetched from `{data.files.data_source}`."
    )
    return [
        Heading("Intended use and limits"),
        Bullets(
            (
                "What it does: scores one frontal chest X-ray (PA or AP) for 14 findings, each with a "
                "probability and a yes/no at a threshold chosen on validation. ConvNeXt image features are "
                "compared with one prototype per finding made from the finding's name by a text encoder "
                f"(the method of {SEED_PAPER}).",
                "For: research on multi-label chest X-ray classification, method comparison, and studies "
                "of how such a model behaves, with a person reading every image.",
                "**Not a diagnostic device.** It is not cleared or approved by any regulator, has not been "
                "tested prospectively or at any other hospital, and must not decide or replace a reading.",
                "Labels: ChestX-ray14's findings were mined from the radiology reports by natural-language "
                "processing, not read from the images; some are wrong. Test AUCs measure agreement with "
                "these mined labels. `No Finding` means none of the 14 was mined, not a normal study.",
                "Split: the official patient-wise split (`train_val_list.txt`, `test_list.txt`); validation "
                "is carved out of train_val by patient. The best epoch, the thresholds and the registry "
                "gate use validation only; test is reported, never selected on.",
                "Population: frontal films from one hospital (the NIH Clinical Center); lateral views, other "
                "hospitals and devices, and photographs or scans of films are outside what it was tested on.",
                source,
            )
        ),
    ]


def _data_section(data: CardData) -> list[Block]:
    blocks: list[Block] = [Heading("Data and split")]
    stats = data.split_stats
    if stats is None:
        return blocks + [_missing(f"{Path(data.files.prepared) / SPLIT_STATS} was not found.")]
    splits = stats.get("splits", {})
    names = [s for s in ("train", "val", "test") if s in splits]
    blocks.append(
        Table(
            ("Split", "Patients", "Images", NO_FINDING),
            tuple(
                (
                    s,
                    _count(splits[s].get("patients")),
                    _count(splits[s].get("images")),
                    _count(splits[s].get(NO_FINDING)),
                )
                for s in names
            ),
        )
    )
    blocks.append(Paragraph("Positive images per finding and split:"))
    blocks.append(
        Table(
            ("Finding", *names),
            tuple((c, *(_count(splits[s].get("positives", {}).get(c)) for s in names)) for c in CLASSES),
        )
    )
    notes = [f"Patients shared between splits: {_count(stats.get('patient_overlap', 0))}."]
    quarantine = stats.get("quarantine", {})
    if quarantine.get("count"):
        notes.append(f"{_count(quarantine['count'])} images could not be decoded and were left out.")
    from ..data.inventory import inventory_notes

    notes += [f"{note[0].upper()}{note[1:]}." for note in inventory_notes(stats, "the raw data")]
    blocks.append(Paragraph(" ".join(notes)))
    return blocks


def _training_section(data: CardData) -> list[Block]:
    blocks: list[Block] = [Heading("Training")]
    config = data.train_config
    if config is None or "train" not in config:
        epoch = data.metrics.get("checkpoint_epoch")
        why = f"{Path(data.files.model_dir) / 'resolved_config.json'} was not found"
        return blocks + [_missing(f"{why}; the evaluated checkpoint is from epoch {epoch}.")]
    train = config["train"]
    model, loss = train.get("model", {}), train.get("loss", {})
    rows = [
        ("Profile", str(config.get("profile", "n/a"))),
        (
            "Backbone",
            f"`{model.get('backbone', {}).get('name')}`, pretrained: {model.get('backbone', {}).get('pretrained')}",
        ),
        ("Head", f"{model.get('head')}, prototypes: {model.get('prototypes')}, embedding {model.get('embed_dim')}"),
        ("Loss", f"`{loss.get('name')}`" + _loss_settings(loss)),
        ("Input", f"{train.get('augment', {}).get('crop_size')} px crops of 8-bit grayscale"),
        ("Optimiser", _optimiser(train.get("optim", {}))),
        (
            "Epochs",
            f"{train.get('epochs')} (batch {train.get('batch_size')}, early-stopping patience "
            f"{train.get('early_stopping_patience')})",
        ),
        ("Seed", str(train.get("seed"))),
    ]
    summary = data.train_summary
    if summary is not None:
        rows.append(
            (
                "Best epoch (on validation)",
                f"{summary.get('best_epoch')} of {summary.get('epochs_run')} run"
                + (", stopped early" if summary.get("stopped_early") else "")
                + f"; val mean AUC {_num(summary.get('best_val_mean_auc'), 4)}",
            )
        )
    else:
        rows.append(
            ("Best epoch (on validation)", f"{data.metrics.get('checkpoint_epoch')} (train_summary.json not found)")
        )
    return blocks + [Table(("Setting", "Value"), tuple(rows))]


def _loss_settings(loss: Mapping[str, Any]) -> str:
    name = loss.get("name")
    own = loss.get(name) if isinstance(loss.get(name), Mapping) else None
    parts = [f"{k} {v}" for k, v in (own or {}).items()]
    if loss.get("separation_weight"):
        parts.append(f"prototype separation weight {loss['separation_weight']}, margin {loss.get('separation_margin')}")
    return f": {', '.join(parts)}" if parts else ""


def _optimiser(optim: Mapping[str, Any]) -> str:
    return (
        f"AdamW, lr backbone {optim.get('lr_backbone')}, head {optim.get('lr_head')}, weight decay "
        f"{optim.get('weight_decay')}, warm-up {optim.get('warmup_epochs')} epochs"
    )


def _results_section(data: CardData) -> list[Block]:
    m = data.metrics
    level = _level(m)
    images = f"{_count(m.get('test_images'))} images of {_count(m.get('test_patients'))} patients"
    blocks: list[Block] = [
        Heading("Test results per finding"),
        Paragraph(
            f"Mean AUC over the findings **{_num(m['mean_auc'])} {_interval(m['mean_auc_ci'])}** on the test split "
            f"({images}); {level} percentile intervals from {m.get('bootstrap_resamples', 'n/a')} bootstrap "
            f"resamples of test {m.get('bootstrap_unit', 'patient')}s. Sensitivity and specificity are at the "
            f"thresholds chosen on validation ({m.get('threshold_method', 'n/a')}). Val AUC is the selected "
            "checkpoint's on the validation split, shown beside the test AUC: a finding far lower on test than on "
            "validation did not carry over."
        ),
    ]
    csv_rows = {r["class"]: r for r in data.per_class_csv or []}
    rows = []
    for c in CLASSES:
        row = csv_rows.get(c, {})
        rows.append(
            (
                c,
                row.get("test_positives", "n/a"),
                _num(m.get("val_per_class_auc", {}).get(c)),
                _num(m["per_class_auc"].get(c)),
                _interval(m["per_class_auc_ci"].get(c)),
                _num(m.get("per_class_average_precision", {}).get(c)),
                _num(_float(row.get("sensitivity"))),
                _num(_float(row.get("specificity"))),
            )
        )
    blocks.append(
        Table(
            ("Finding", "Test positives", "Val AUC", "Test AUC", f"{level} CI", "AP", "Sensitivity", "Specificity"),
            tuple(rows),
        )
    )
    blocks.append(Paragraph(_class_set_paragraph(m, "test", "")))
    if m.get("undefined_classes"):
        blocks.append(
            Paragraph(
                f"No AUC for {', '.join(m['undefined_classes'])}: the test split has no positives (or no negatives)."
            )
        )
    if data.per_class_csv is None:
        blocks.append(_missing("per_class_auc.csv was not found.", "test positives, sensitivity and specificity:"))
    return blocks


def _over(m: Mapping[str, Any], prefix: str) -> str:
    """ "over 13 of 14 findings, Hernia left out": the class set of a mean AUC in a few words."""
    kept, excluded = m[f"{prefix}classes_in_mean"], m[f"{prefix}excluded_classes"]
    left_out = f", {', '.join(excluded)} left out" if excluded else ""
    return f"over {len(kept)} of {len(kept) + len(excluded)} findings{left_out}"


def _class_set_paragraph(m: Mapping[str, Any], split: str, prefix: str) -> str:
    """The classes a split's mean AUC is over, those left out by name with why, and the resamples dropped."""
    kept, excluded = m[f"{prefix}classes_in_mean"], m[f"{prefix}excluded_classes"]
    text = describe_class_set(split, kept, excluded, m["min_positive_patients"])
    text += " The point estimate and every bootstrap resample are over these same findings."
    dropped = m.get("bootstrap_dropped_resamples") if split == "test" else None
    if dropped:
        text += f" {dropped} resamples lacked a positive or a negative patient of one of them and were left out."
    return text


def _float(x: Any) -> float | None:
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def _comparison_section(data: CardData) -> list[Block]:
    m = data.metrics
    ours, ci = m["mean_auc"], m["mean_auc_ci"]
    ranked = sorted([*PUBLISHED, (None, ours)], key=lambda r: -1.0 if r[1] is None else r[1])  # None: this model
    rows = [
        ("**this model**", f"**{_num(ours)}** {_interval(ci)}")
        if name is None
        else (f"{name} (seed paper)" if name == SEED_PAPER else name, _num(auc))
        for name, auc in ranked
    ]
    if data.files.data_source == SYNTHETIC_SOURCE:
        verdict = "Not comparable: this model was tested on synthetic images, the published figures on ChestX-ray14."
    elif ours is None or not ci or None in ci:
        verdict = "This model's mean AUC is undefined, so it cannot be compared."
    elif ci[0] > SEED_PAPER_AUC:
        verdict = f"The seed paper's {SEED_PAPER_AUC} lies below this model's interval."
    elif ci[1] < SEED_PAPER_AUC:
        verdict = f"The seed paper's {SEED_PAPER_AUC} lies above this model's interval."
    else:
        verdict = f"The seed paper's {SEED_PAPER_AUC} lies inside this model's interval."
    return [
        Heading("Published comparison"),
        Paragraph(
            "Mean AUC on the official ChestX-ray14 test split. Random-split results (e.g. CheXNet's 0.841) are "
            f"not comparable and are left out. {verdict}"
        ),
        Table(("Method", "Mean AUC"), tuple(rows)),
    ]


def _subgroup_section(data: CardData) -> list[Block]:
    blocks: list[Block] = [Heading("Subgroups")]
    sub = data.subgroups
    if sub is None:
        return blocks + [_missing(f"{Path(data.files.reports) / 'subgroups.json'} was not found.")]
    blocks.append(
        Paragraph(
            f"Test mean AUC per sex, age band, view and visit, with {round(100 * sub.get('ci_level', 0.95))}% "
            "intervals from a bootstrap over each subgroup's patients. A finding with fewer than "
            f"{sub.get('min_positive_patients')} positive or negative patients in a subgroup is left out of its "
            "mean (the Findings column counts those scored), so compare subgroups whose counts match."
        )
    )
    rows = []
    for attribute, entry in sub.get("attributes", {}).items():
        for group, report in entry.get("groups", {}).items():
            status = report.get("status", "ok")
            mean = (
                f"{_num(report.get('mean_auc'))} {_interval(report.get('mean_auc_ci'))}" if status == "ok" else status
            )
            rows.append(
                (
                    attribute,
                    group,
                    _count(report.get("images")),
                    _count(report.get("patients")),
                    mean,
                    f"{len(report.get('classes_in_mean', []))} of {len(CLASSES)}",
                )
            )
    blocks.append(Table(("Attribute", "Group", "Images", "Patients", "Mean AUC", "Findings"), tuple(rows)))
    left_out = [
        f"{attribute}: {', '.join(f'{n} {why}' for why, n in entry.get('unassigned', {}).items() if n)}"
        for attribute, entry in sub.get("attributes", {}).items()
        if any(entry.get("unassigned", {}).values())
    ]
    if left_out:
        blocks.append(Paragraph("Images in no subgroup of an attribute: " + "; ".join(left_out) + "."))
    if "subgroups" in data.figures:
        blocks.append(
            Figure(data.figures["subgroups"], "Subgroup mean AUC with intervals; dashed: the whole test split")
        )
    else:
        blocks.append(_missing("plots/subgroups.png was not found.", "forest plot:"))
    return blocks


def _calibration_section(data: CardData) -> list[Block]:
    blocks: list[Block] = [Heading("Calibration")]
    cal = data.calibration
    if cal is None:
        blocks.append(
            _missing(
                f"{Path(data.files.reports) / 'calibration.json'} was not found (the run measured no expected "
                "calibration error). Read the probabilities as scores for ranking, not as risks.",
            )
        )
    else:
        blocks += _calibration_table(cal)
    if "reliability" in data.figures:
        blocks.append(Figure(data.figures["reliability"], "Reliability diagrams on the test split"))
    elif "calibration" in data.figures:  # the evaluation's own diagram, every finding in one
        caption = "Reliability diagram on the test split, all findings pooled: dashed, perfect calibration"
        blocks.append(Figure(data.figures["calibration"], caption))
    return blocks


def _calibration_table(cal: Mapping[str, Any]) -> list[Block]:
    """Per-finding expected calibration error on test before and after the calibration fitted on validation."""
    method = cal.get("method", "none")
    if method != "none":
        applied = (
            f"The registered model applies **{method}** calibration fitted on {cal.get('fitted_on', 'val')}: "
            "the probabilities it returns are the calibrated ones."
        )
    else:
        applied = "No calibration is applied: the registered model returns the network's own probabilities."
    chosen = (cal.get("chosen_by") or {}).get("setting")
    if chosen is not None and chosen != method:
        applied += f" The setting `{chosen}` chose it by cross-validated negative log-likelihood on validation."
    if cal.get("unfitted"):
        applied += f" Left as they were (no positives or no negatives in validation): {', '.join(cal['unfitted'])}."
    blocks: list[Block] = [
        Paragraph(
            f"Expected calibration error (ECE, {cal.get('bins', 'n/a')} equal-width bins) on the test split, "
            f"before and after calibration; lower is better. {applied}"
        )
    ]
    per_class = cal.get("per_class") or {}
    if per_class:
        rows = [
            (c, _num((per_class.get(c) or {}).get("ece_raw")), _num((per_class.get(c) or {}).get("ece_calibrated")))
            for c in CLASSES
        ]
        rows.append(("**mean**", _num(cal.get("mean_ece_raw")), _num(cal.get("mean_ece_calibrated"))))
        blocks.append(Table(("Finding", "ECE raw", "ECE calibrated"), tuple(rows)))
    if cal.get("val_nll_raw") is not None:
        blocks.append(
            Paragraph(
                f"Validation negative log-likelihood: {_num(cal['val_nll_raw'], 4)} raw, "
                f"{_num(cal.get('val_nll_calibrated'), 4)} calibrated."
            )
        )
    return blocks


def _heatmap_section(data: CardData) -> list[Block]:
    blocks: list[Block] = [Heading("Where the model looked")]
    shown: list[Block] = []
    if "heatmaps" in data.figures:
        shown.append(Figure(data.figures["heatmaps"], "Heatmaps of test images for their top findings"))
    shown += [Figure(p, f"Test image {p.stem}.png") for p in data.heatmaps]  # the gallery names files by image
    if not shown:
        return blocks + [
            _missing(f"the run wrote no {Path(data.files.reports) / 'heatmaps'} folder or plots/heatmaps.png.")
        ]
    return blocks + [
        Paragraph(
            "Example test images with the regions that drove their top findings (Grad-CAM on the last ConvNeXt "
            "stage, and each location's distance to the finding's prototype). A heatmap shows where the model "
            "looked, not that the finding is there."
        ),
        *shown,
    ]


LOCALIZATION_METHODS = {"gradcam": "Grad-CAM", "prototype": "prototype distance", "centre": "centre (baseline)"}


def _localization_section(data: CardData) -> list[Block]:
    blocks: list[Block] = [Heading("Localisation")]
    loc = data.localization
    if loc is None:
        return blocks + [
            _missing(
                f"{Path(data.files.reports) / 'localization.json'} was not found (no bounding-box file with the run)."
            )
        ]
    if not loc.get("available", True):
        return blocks + [_missing(f"{str(loc.get('reason', 'no reason recorded')).rstrip('.')}.")]
    methods = {m: v for m, v in (loc.get("methods") or {}).items() if isinstance(v, Mapping)}
    blocks.append(
        Paragraph(
            f"{_count(loc.get('pairs'))} (image, finding) pairs with a bounding box on {_count(loc.get('images'))} "
            f"{loc.get('split', 'test')} images (boxes from `{loc.get('source')}`): the share of pairs whose map has "
            f"its maximum within {loc.get('pointing_tolerance_px_at_224')} px (at 224 px) of a box, a flat map "
            f"counting as a miss (pointing game); the IoU of the map above {loc.get('iou_threshold')} of its maximum "
            "with the boxes; and the IoBB of Wang et al. 2017, the share of the boxes around that region that lies "
            "in the boxes. The centre baseline points at the image centre; a map that beats it found more than "
            "where findings usually lie."
        )
    )
    if not methods:
        return blocks + [_missing("localization.json scores no method.", "per-finding localisation:")]
    header = ["Finding", "Pairs"]
    for m in methods:
        name = LOCALIZATION_METHODS.get(m, m)
        header += [f"{name}: pointing", f"{name}: IoU", f"{name}: IoBB"]
    found = [c for c in CLASSES if any(c in (v.get("per_class") or {}) for v in methods.values())]
    rows = []
    for c in found:
        entries = [(v.get("per_class") or {}).get(c) or {} for v in methods.values()]
        row = [c, _count(next((e.get("pairs") for e in entries if e.get("pairs") is not None), None))]
        for e in entries:
            row += [_num(e.get("pointing_accuracy")), _num(e.get("mean_iou")), _num(e.get("mean_iobb"))]
        rows.append(tuple(row))
    mean = ["**mean over findings**", ""]
    for v in methods.values():
        mean += [_num(v.get("mean_pointing_accuracy")), _num(v.get("mean_iou")), _num(v.get("mean_iobb"))]
    rows.append(tuple(mean))
    return blocks + [Table(tuple(header), tuple(rows))]


def _registry_section(data: CardData, record: Mapping[str, Any]) -> list[Block]:
    name, version = record["model_name"], record["version"]
    blocks: list[Block] = [Heading("Registry decision")]
    if not record.get("registered", True):
        return blocks + [
            Paragraph(
                f"These weights are already registered as {name} v{version}: no new version was made, no alias "
                f"moved and its description was left as it was. {record.get('reason', '')}"
            )
        ]
    items = [
        f"Selected on **{record.get('selected_on', 'val')}** only: val mean AUC {_num(record.get('val_mean_auc'), 4)} "
        f"(floor {record.get('floor')}), {_count(record.get('n_patients'))} validation patients.",
    ]
    champ = record.get("champion_version")
    if champ is None:
        items.append("There was no champion to compare with.")
    elif record.get("delta") is not None:
        items.append(
            f"Against champion v{champ} (val mean AUC {_num(record.get('champion_val_mean_auc'), 4)}), paired "
            f"bootstrap over {record.get('bootstrap_unit', 'patient')}s: delta {_signed(record['delta'])} "
            f"{_interval(record.get('delta_ci'), 4, signed=True)}, p={_num(record.get('p_value'))}; promotion needs "
            f"delta > {record.get('margin')} with p <= {record.get('max_p_value')}."
        )
    else:
        items.append(f"Not compared with champion v{champ}: see the reason below.")
    verdict = "became **champion**" if record.get("promote") else f"stayed **challenger** (champion: v{champ})"
    items.append(f"Decision: v{version} {verdict}. Reason: {_reason(record)}.")
    if record.get("aliases") is not None:
        items.append(f"Aliases of v{version} when registered: {', '.join(record['aliases']) or 'none'}.")
    tags = record.get("tags") or {}
    provenance = [f"{k} `{tags[k]}`" for k in PROVENANCE_TAGS if k in tags]
    if record.get("run_id"):
        provenance.insert(0, f"run `{record['run_id']}`")
    if provenance:
        items.append("Provenance: " + ", ".join(provenance) + ".")
    return blocks + [Bullets(tuple(items))]
