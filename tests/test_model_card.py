"""The model card built from a constructed run folder: its numbers are the run's, missing sections
say so, and the HTML page parses with every image it shows.

The folder is made with the library's own writers where one exists (synthetic data through the
prepare step's split statistics, the subgroup report and its forest plot); metrics.json and the
training files are written by hand with distinct values, so each number can be traced to its cell.
"""

from __future__ import annotations

import base64
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.card import render
from pipeline.card import sections as model_card
from pipeline.classes import CLASSES, SEED_PAPER_AUC
from tests.conftest import settings

VOID = {"meta", "img", "br", "hr", "link", "input", "source", "col", "area", "base", "wbr"}


def _metrics(n: int = len(CLASSES)) -> dict:
    auc = {c: round(0.61 + 0.021 * i, 4) for i, c in enumerate(CLASSES)}
    auc["Hernia"] = None  # no positives in the test split
    return {
        "mean_auc": 0.7312,
        "mean_auc_ci": [0.7011, 0.7598],
        "ci_level": 0.95,
        "bootstrap_resamples": 200,
        "bootstrap_unit": "patient",
        "per_class_auc": auc,
        "per_class_auc_ci": {
            c: [None, None] if v is None else [round(v - 0.05, 4), round(v + 0.04, 4)] for c, v in auc.items()
        },
        "undefined_classes": ["Hernia"],
        "min_positive_patients": 10,
        "classes_in_mean": [c for c in CLASSES if c not in ("Pneumonia", "Hernia")],
        "excluded_classes": {
            "Pneumonia": "4 positive patients (fewer than 10)",
            "Hernia": "0 positive patients (fewer than 10)",
        },
        "bootstrap_dropped_resamples": 3,
        "val_classes_in_mean": [c for c in CLASSES if c != "Hernia"],
        "val_excluded_classes": {"Hernia": "1 positive patient (fewer than 10)"},
        "per_class_average_precision": {c: round(0.11 + 0.01 * i, 4) for i, c in enumerate(CLASSES)},
        "threshold_method": "youden",
        "val_mean_auc": 0.7421,
        "val_per_class_auc": {
            c: (None if c == "Hernia" else round(0.66 + 0.011 * i, 4)) for i, c in enumerate(CLASSES)
        },
        "test_images": 184,
        "test_patients": 73,
        "checkpoint_epoch": 3,
    }


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete run: prepared data, the training's files, and the evaluation's reports."""
    from pipeline.data.prepare import prepare
    from pipeline.data.synthetic import generate
    from pipeline.evaluation import plots
    from pipeline.evaluation.subgroups import read_subgroup_meta, subgroup_report

    root = tmp_path_factory.mktemp("run")
    generate(
        root / "raw",
        settings("download.synthetic", num_images=160, num_patients=60, image_size=32, seed=5),
        progress=False,
    )
    prepare(root / "raw", root / "prepared", settings("prepare", image_size=16, workers=1), progress=False)
    (root / "model").mkdir()
    train = settings("train").model_dump()
    (root / "model/resolved_config.json").write_text(json.dumps({"profile": "demo", "train": train}))
    summary = {"best_val_mean_auc": 0.7421, "best_epoch": 3, "epochs_run": 5, "stopped_early": True}
    (root / "model/train_summary.json").write_text(json.dumps(summary))

    reports = root / "reports"
    (reports / "plots").mkdir(parents=True)
    metrics = _metrics()
    (reports / "metrics.json").write_text(json.dumps(metrics))
    pd.DataFrame(
        {
            "class": list(CLASSES),
            "auc": [metrics["per_class_auc"][c] for c in CLASSES],
            "sensitivity": [round(0.5 + 0.01 * i, 6) for i in range(len(CLASSES))],
            "specificity": [round(0.8 - 0.01 * i, 6) for i in range(len(CLASSES))],
            "test_positives": [40 + i for i in range(len(CLASSES))],
        }
    ).to_csv(reports / "per_class_auc.csv", index=False)
    manifest = pd.read_csv(root / "prepared/manifest.csv")
    test = manifest[manifest["split"] == "test"]
    y = test[list(CLASSES)].to_numpy()
    probs = np.clip(0.3 * y + np.random.default_rng(0).random(y.shape), 0, 1)
    meta = read_subgroup_meta(root / "prepared/manifest.csv", test["image"].tolist())
    subgroups = subgroup_report(y, probs, test["patient"].to_numpy(), meta, 2, 50, 0.95, 0)
    (reports / "subgroups.json").write_text(json.dumps(subgroups))
    plots.subgroup_forest(subgroups, metrics["mean_auc"], reports / "plots/subgroups.png")
    return root


def _files(root: Path, source: str = "synthetic") -> model_card.RunFiles:
    return model_card.RunFiles(root / "reports", root / "model", root / "prepared", source)


RECORD = {
    "model_name": "cxr-dwml",
    "version": "4",
    "registered": True,
    "run_id": "0123abcd",
    "selected_on": "val",
    "val_mean_auc": 0.7421,
    "floor": 0.55,
    "margin": 0.0,
    "max_p_value": 0.05,
    "bootstrap_unit": "patient",
    "n_patients": 34,
    "champion_version": "3",
    "champion_val_mean_auc": 0.7302,
    "delta": 0.0119,
    "delta_ci": [0.0021, 0.0215],
    "p_value": 0.012,
    "promote": True,
    "reason": "beats champion v3 by +0.0119 on val (34 patients) (p=0.012)",
    "aliases": ["challenger", "champion"],
    "tags": {"git_commit": "abc123", "weights_sha256": "f" * 64},
}


def _section(markdown: str, title: str) -> str:
    """The Markdown between `## title` and the next `## ` heading."""
    found = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", markdown, re.S | re.M)
    assert found, f"no section {title!r} in the card"
    return found.group(1)


def _table_rows(section: str) -> dict[str, list[str]]:
    """First cell -> the other cells of each Markdown table row in `section` (header and rule left out)."""
    rows = {}
    for line in section.splitlines():
        if line.startswith("| ") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            rows[cells[0]] = cells[1:]
    return rows


def test_per_class_table_shows_the_values_of_metrics_json(run_folder: Path, tmp_path: Path) -> None:
    data = model_card.read_run(_files(run_folder))
    card = model_card.build_card(data, RECORD, "`model_card/model_card.html` of run `0123abcd`")
    md = render.to_markdown(card, run_folder / "reports")
    metrics = json.loads((run_folder / "reports/metrics.json").read_text())
    rows = _table_rows(_section(md, "Test results per finding"))
    assert set(CLASSES) <= set(rows)
    for i, c in enumerate(CLASSES):
        positives, val_auc, auc, ci, ap, sens, spec = rows[c]
        val = metrics.get("val_per_class_auc", {}).get(c)
        assert val_auc == (f"{val:.3f}" if val is not None else "n/a")
        if metrics["per_class_auc"][c] is None:
            assert (auc, ci) == ("n/a", "n/a")
            continue
        lo, hi = metrics["per_class_auc_ci"][c]
        assert auc == f"{metrics['per_class_auc'][c]:.3f}" and ci == f"[{lo:.3f}, {hi:.3f}]"
        assert ap == f"{metrics['per_class_average_precision'][c]:.3f}"
        assert (positives, sens, spec) == (str(40 + i), f"{0.5 + 0.01 * i:.3f}", f"{0.8 - 0.01 * i:.3f}")
    assert "No AUC for Hernia" in md
    # the classes left out of the means, by name and why, never silently averaged
    assert (
        "The test mean AUC is over 12 of 14 findings, those with at least 10 positive and 10 negative test patients; "
        "left out: Pneumonia: 4 positive patients (fewer than 10); Hernia: 0 positive patients (fewer than 10)."
    ) in _section(md, "Test results per finding")
    assert "3 resamples lacked a positive or a negative patient" in md
    assert "over 12 of 14 findings, Pneumonia, Hernia left out" in card.summary
    assert "val mean AUC 0.742 (over 13 of 14 findings, Hernia left out" in card.summary
    assert "**0.731 [0.701, 0.760]**" in _section(md, "Test results per finding")
    # the summary: test mean with its interval, the validation figure, the gate against the champion
    # plain text whose first line reads whole where the registry cuts a description (100 characters)
    first = card.summary.splitlines()[0]
    assert first == "Promoted to champion: val mean AUC 0.742, test 0.731 [0.701, 0.760]." and len(first) <= 100
    assert "Test mean AUC 0.731 [0.701, 0.760] (95% interval" in card.summary and "**" not in card.summary
    assert "val mean AUC 0.742" in card.summary and "Gate: promoted to champion" in card.summary
    assert "champion v3" in card.summary and "delta +0.0119 [+0.0021, +0.0215]" in card.summary
    assert "synthetic images" in card.summary and "model_card/model_card.html" in card.summary
    # split counts are those the prepare step wrote
    stats = json.loads((run_folder / "prepared/split_stats.json").read_text())
    counts = _table_rows(_section(md, "Data and split"))
    assert counts["test"][:2] == [f"{stats['splits']['test']['patients']:,}", f"{stats['splits']['test']['images']:,}"]
    assert counts["Effusion"] == [f"{stats['splits'][s]['positives']['Effusion']:,}" for s in ("train", "val", "test")]
    # training settings and the epoch chosen on validation
    training = _table_rows(_section(md, "Training"))
    assert training["Best epoch (on validation)"][0].startswith("3 of 5 run, stopped early")
    assert f"`{settings('train').model.backbone.name}`" in training["Backbone"][0]
    assert training["Loss"][0].startswith(f"`{settings('train').loss.name}`")
    # subgroups: one row per group of subgroups.json, with its mean and interval
    subgroups = json.loads((run_folder / "reports/subgroups.json").read_text())
    male = subgroups["attributes"]["sex"]["groups"]["M"]
    assert f"| sex | M | {male['images']:,} | {male['patients']:,} | {male['mean_auc']:.3f}" in md
    # the published comparison, and the seed paper's figure named once as such
    comparison = _section(md, "Published comparison")
    assert f"| Jin et al. 2023, dual-weighted metric loss (seed paper) | {SEED_PAPER_AUC:.3f} |" in comparison
    assert "Not comparable" in comparison


def test_the_seed_paper_is_placed_against_the_interval_on_real_data(run_folder: Path) -> None:
    data = model_card.read_run(_files(run_folder, source="nih"))
    md = render.to_markdown(model_card.build_card(data, RECORD, None), run_folder)
    assert f"The seed paper's {SEED_PAPER_AUC} lies above this model's interval." in md
    assert "synthetic" not in model_card.build_card(data, RECORD, None).summary


def test_sections_without_their_files_say_not_available(run_folder: Path, tmp_path: Path) -> None:
    full = render.to_markdown(model_card.build_card(model_card.read_run(_files(run_folder)), RECORD, None), tmp_path)
    # what the run folder lacks (calibration, heatmaps, localisation) is said to be missing, and why
    for title, file in (
        ("Calibration", "calibration.json"),
        ("Where the model looked", "heatmaps"),
        ("Localisation", "localization.json"),
    ):
        assert "**Not available**" in _section(full, title) and file in _section(full, title)
    for title in ("Data and split", "Training", "Subgroups", "Test results per finding"):
        assert "Not available" not in _section(full, title)

    bare = tmp_path / "bare"
    (bare / "reports").mkdir(parents=True)
    (bare / "reports/metrics.json").write_text(json.dumps(_metrics()))
    md = render.to_markdown(model_card.build_card(model_card.read_run(_files(bare)), RECORD, None), bare)
    assert "split_stats.json was not found" in _section(md, "Data and split")
    assert "resolved_config.json was not found" in _section(md, "Training")
    assert "subgroups.json was not found" in _section(md, "Subgroups")
    assert "per_class_auc.csv was not found" in _section(md, "Test results per finding")
    # the numbers that metrics.json alone gives are still there
    assert "| Atelectasis | n/a | 0.660 | 0.610 | [0.560, 0.650] |" in md


def test_calibration_heatmaps_and_localisation_are_shown_when_present(run_folder: Path, tmp_path: Path) -> None:
    import shutil

    from PIL import Image

    root = tmp_path / "run"
    shutil.copytree(run_folder, root)
    reports = root / "reports"
    # as the evaluation writes them: calibration fitted on validation, localisation per method
    calibration = {
        "method": "temperature",
        "calibrated": True,
        "chosen_by": {"setting": "auto", "cross_validated_nll": {"temperature": 0.2, "isotonic": 0.21}},
        "fitted_on": "val",
        "bins": 10,
        "unfitted": ["Hernia"],
        "mean_ece_raw": 0.1071,
        "mean_ece_calibrated": 0.0561,
        "val_nll_raw": 0.31,
        "val_nll_calibrated": 0.27,
        "per_class": {
            c: {"ece_raw": 0.1 + 0.001 * i, "ece_calibrated": 0.05 + 0.001 * i} for i, c in enumerate(CLASSES)
        },
    }
    (reports / "calibration.json").write_text(json.dumps(calibration))
    Image.new("RGB", (40, 30), (200, 30, 30)).save(reports / "plots/reliability.png")
    (reports / "heatmaps").mkdir()
    for name in ("00000001_000", "00000002_001"):
        Image.new("RGB", (32, 32), (30, 30, 200)).save(reports / "heatmaps" / f"{name}.png")
    per_method = lambda hit, iou: {  # noqa: E731
        "mean_pointing_accuracy": hit,
        "mean_iou": iou,
        "mean_iobb": 2 * iou,
        "per_class": {
            "Mass": {"pairs": 12, "pointing_accuracy": hit, "mean_iou": iou, "mean_iobb": 2 * iou},
            "Atelectasis": {"pairs": 3, "pointing_accuracy": hit / 2, "mean_iou": iou / 2, "mean_iobb": iou},
        },
    }
    localization = {
        "available": True,
        "source": "BBox_List_2017.csv",
        "split": "test",
        "images": 14,
        "pairs": 15,
        "iou_threshold": 0.5,
        "pointing_tolerance_px_at_224": 15.0,
        "methods": {
            "gradcam": per_method(0.75, 0.31),
            "prototype": per_method(0.5, 0.2),
            "centre": per_method(0.25, 0.1),
        },
    }
    (reports / "localization.json").write_text(json.dumps(localization))

    card = model_card.build_card(model_card.read_run(_files(root)), RECORD, None)
    md = render.to_markdown(card, reports)
    calibration_md = _section(md, "Calibration")
    assert "| Effusion | 0.102 | 0.052 |" in calibration_md and "| **mean** | 0.107 | 0.056 |" in calibration_md
    assert "applies **temperature** calibration fitted on val" in calibration_md and "`auto` chose it" in calibration_md
    assert "validation): Hernia." in calibration_md and "0.3100 raw, 0.2700 calibrated" in calibration_md
    assert "(plots/reliability.png)" in calibration_md
    heat = _section(md, "Where the model looked")
    assert "(heatmaps/00000001_000.png)" in heat and "(heatmaps/00000002_001.png)" in heat
    loc_md = _section(md, "Localisation")
    assert (
        "| Finding | Pairs | Grad-CAM: pointing | Grad-CAM: IoU | Grad-CAM: IoBB | prototype distance: pointing |"
        in loc_md
    )
    assert "| Atelectasis | 3 | 0.375 | 0.155 | 0.310 | 0.250 | 0.100 | 0.200 | 0.125 | 0.050 | 0.100 |" in loc_md
    assert "| Mass | 12 | 0.750 | 0.310 | 0.620 | 0.500 | 0.200 | 0.400 | 0.250 | 0.100 | 0.200 |" in loc_md
    assert loc_md.index("| Atelectasis |") < loc_md.index("| Mass |")  # the canonical class order
    mean = "| **mean over findings** |  | 0.750 | 0.310 | 0.620 | 0.500 | 0.200 | 0.400 | 0.250 | 0.100 | 0.200 |"
    assert mean in loc_md and "within 15.0 px (at 224 px) of a box, a flat map counting as a miss" in loc_md
    assert "Not available" not in md.split("## Registry decision")[0].split("## Calibration")[1]
    # every figure is logged beside the Markdown in the folder its link names
    assert sorted(str(Path(sub) / f.name) for f, sub in render.figure_files(card, reports)) == [
        "heatmaps/00000001_000.png",
        "heatmaps/00000002_001.png",
        "plots/reliability.png",
        "plots/subgroups.png",
    ]


class _Checker(HTMLParser):
    """Tags must nest and close; collects every <img src>."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.images: list[str] = []
        self.errors: list[str] = []
        self.doctype = False

    def handle_decl(self, decl: str) -> None:
        self.doctype = self.doctype or decl.lower() == "doctype html"

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'} at {self.getpos()}")
        else:
            self.stack.pop()


def test_html_parses_and_embeds_every_image_the_markdown_links(run_folder: Path) -> None:
    reports = run_folder / "reports"
    card = model_card.build_card(model_card.read_run(_files(run_folder)), RECORD, "<of> `x` & <co>")
    markdown, page = render.write_card(card, reports)
    assert (markdown, page) == (reports / "model_card.md", reports / "model_card.html")
    checker = _Checker()
    checker.feed(page.read_text(encoding="utf-8"))
    checker.close()
    assert checker.doctype and not checker.errors and not checker.stack, (checker.errors, checker.stack)
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown.read_text(encoding="utf-8"))
    assert links == ["plots/subgroups.png"]
    assert all((markdown.parent / link).is_file() for link in links)
    embedded = [base64.b64decode(src.split(",", 1)[1]) for src in checker.images]
    assert all(src.startswith("data:image/png;base64,") for src in checker.images)
    assert embedded == [(markdown.parent / link).read_bytes() for link in links]
    text = page.read_text(encoding="utf-8")
    assert "&lt;of&gt; <code>x</code> &amp; &lt;co&gt;" in text and "<of>" not in text  # text escaped, markup not
    assert "<strong>0.731 [0.701, 0.760]</strong>" in text  # bold in the results section


@pytest.mark.parametrize("key", ["per_class_auc_ci", "excluded_classes"])
def test_metrics_without_the_per_class_intervals_or_the_class_set_is_refused(tmp_path: Path, key: str) -> None:
    (tmp_path / "reports").mkdir()
    metrics = _metrics()
    del metrics[key]
    (tmp_path / "reports/metrics.json").write_text(json.dumps(metrics))
    with pytest.raises(ValueError, match=rf"reports/metrics.json has no '{key}': rerun the evaluate step"):
        model_card.read_run(_files(tmp_path))
    with pytest.raises(FileNotFoundError, match="metrics.json does not exist"):
        model_card.read_run(_files(tmp_path / "nowhere"))


def test_localisation_without_boxes_says_why(run_folder: Path, tmp_path: Path) -> None:
    import shutil

    root = tmp_path / "run"
    shutil.copytree(run_folder, root)
    reason = "no BBox_List_2017.csv in the raw data (the download step found none)"
    (root / "reports/localization.json").write_text(json.dumps({"available": False, "reason": reason}))
    md = render.to_markdown(model_card.build_card(model_card.read_run(_files(root)), RECORD, None), root)
    assert f"**Not available**: {reason}." in _section(md, "Localisation")


def test_a_version_already_registered_changes_nothing_in_its_card(run_folder: Path) -> None:
    record = {"model_name": "cxr-dwml", "version": "2", "registered": False, "reason": "v2 already holds these"}
    card = model_card.build_card(model_card.read_run(_files(run_folder)), record, None)
    md = render.to_markdown(card, run_folder)
    assert "Already registered as v2" in card.summary
    assert "no new version was made, no alias moved" in _section(md, "Registry decision")


def test_version_page_links_into_the_run_and_sets_val_beside_test(run_folder: Path) -> None:
    data = model_card.read_run(_files(run_folder))
    metrics = json.loads((run_folder / "reports/metrics.json").read_text())
    files = {"model card": "model_card/model_card.html", "calibration": "x.png"}
    page = model_card.version_page(data, "#/experiments/3/runs/abc/artifacts", "?q=1", files)
    first, table = page.split("\n\n")
    assert first == (
        "Open: [model card](#/experiments/3/runs/abc/artifacts/model_card/model_card.html?q=1) · "
        "[calibration](#/experiments/3/runs/abc/artifacts/x.png?q=1)."
    )
    rows = _table_rows(table)
    assert list(rows) == ["Finding", *CLASSES]
    lo, hi = metrics["per_class_auc_ci"]["Mass"]
    val, test = metrics["val_per_class_auc"]["Mass"], metrics["per_class_auc"]["Mass"]
    assert rows["Mass"] == [f"{val:.3f}", f"{test:.3f} [{lo:.3f}, {hi:.3f}]"]
    assert rows["Hernia"] == ["n/a", "n/a n/a"]
