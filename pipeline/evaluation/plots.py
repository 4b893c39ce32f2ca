"""PNG figures for MLflow and the reports: training curves, ROC/PR grids, calibration, per-class AUC,
label prototype similarity, ablation.

Figures are drawn on an Agg canvas without pyplot's global state and saved atomically, with no
metadata: the same numbers always give the same bytes, so an unchanged plot is an unchanged file.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..classes import readable_name
from ..io import atomic_open


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | Path) -> None:
    buf = io.BytesIO()
    # no "Software: Matplotlib version..." text chunk: the same figure gives the same bytes after an upgrade
    fig.savefig(buf, format="png", bbox_inches="tight", metadata={"Software": None})
    with atomic_open(path, "wb") as f:
        f.write(buf.getvalue())


def training_curves(history, path: str | Path) -> None:
    """Train loss and validation mean AUC per epoch (history: DataFrame with those columns)."""
    fig = _figure(10, 3.6)
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot(history["epoch"], history["train_loss"], marker="o")
    ax1.set(xlabel="epoch", ylabel="train loss", title="Training loss")
    ax2.plot(history["epoch"], history["val_mean_auc"], marker="o", color="tab:green")
    ax2.set(xlabel="epoch", ylabel="mean AUC", title="Validation mean AUC")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    _save(fig, path)


def curve_grid(
    curves: Sequence[tuple[np.ndarray, np.ndarray]],
    values: Sequence[float],
    classes: Sequence[str],
    path: str | Path,
    kind: str,
) -> None:
    """One small panel per class: ROC (kind='roc', FPR/TPR) or PR (kind='pr', recall/precision)."""
    cols = 5
    rows = math.ceil(len(classes) / cols)
    fig = _figure(3.0 * cols, 2.8 * rows)
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    label = "AUC" if kind == "roc" else "AP"
    for ax, (x, y), value, name in zip(axes, curves, values, classes):
        ax.plot(x, y, lw=1.5)
        if kind == "roc":
            ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color="grey")
        ax.set_title(
            f"{readable_name(name)}\n{label} {value:.3f}"
            if np.isfinite(value)
            else f"{readable_name(name)}\n{label} undefined",
            fontsize=9,
        )
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.tick_params(labelsize=7)
    for ax in axes[len(classes) :]:
        ax.axis("off")
    xlabel, ylabel = ("false positive rate", "true positive rate") if kind == "roc" else ("recall", "precision")
    fig.supxlabel(xlabel)
    fig.supylabel(ylabel)
    fig.tight_layout()
    _save(fig, path)


def calibration(y: np.ndarray, scores: np.ndarray, path: str | Path, bins: int = 10) -> list[dict]:
    """Reliability diagram pooled over classes; returns the bin table (for a plot from a CSV)."""
    y, s = y.ravel(), scores.ravel()
    edges = np.linspace(0, 1, bins + 1)
    idx = np.clip(np.digitize(s, edges[1:-1]), 0, bins - 1)
    rows = []
    for b in range(bins):
        mask = idx == b
        if mask.any():
            rows.append(
                {
                    "bin": b,
                    "mean_predicted": float(s[mask].mean()),
                    "fraction_positive": float(y[mask].mean()),
                    "count": int(mask.sum()),
                }
            )
    fig = _figure(4.5, 4.5)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8)
    ax.plot([r["mean_predicted"] for r in rows], [r["fraction_positive"] for r in rows], marker="o")
    ax.set(
        xlabel="mean predicted probability",
        ylabel="fraction positive",
        title="Calibration (all classes pooled)",
        xlim=(0, 1),
        ylim=(0, 1),
    )
    ax.grid(alpha=0.3)
    _save(fig, path)
    return rows


def reliability_grid(before: dict, after: dict, thresholds: np.ndarray, report: dict, path: str | Path) -> None:
    """Reliability diagram per class: fraction positive against mean predicted probability per bin.

    Each panel shows the raw scores (grey, dashed) and the calibrated probabilities (blue) on the
    diagonal's scale, the validation threshold (red dotted line), and how many images fall in each
    bin of the calibrated probabilities (pale bars, scaled to the panel's largest bin).

    Args:
        before: `pipeline.evaluation.calibration.reliability_bins` of the raw test probabilities.
        after: the same of the calibrated test probabilities.
        thresholds: (C,) validation thresholds on the calibrated scale.
        report: `pipeline.evaluation.calibration.calibration_report`'s dict (classes, bins, method, ECE per class).
        path: the PNG to write.
    """
    from matplotlib.lines import Line2D

    classes, bins = report["classes"], report["bins"]
    cols = 5
    rows = math.ceil(len(classes) / cols)
    fig = _figure(3.0 * cols, 3.0 * rows)
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    centres = (after["edges"][:-1] + after["edges"][1:]) / 2
    for i, (ax, name) in enumerate(zip(axes, classes)):
        counts = after["count"][i]
        if counts.max() > 0:
            ax.bar(centres, 0.25 * counts / counts.max(), width=1 / bins, color="tab:blue", alpha=0.15, lw=0)
        ax.plot([0, 1], [0, 1], ls="--", color="black", lw=0.6)
        ax.plot(before["mean_predicted"][i], before["fraction_positive"][i], "o--", color="grey", ms=3, lw=1)
        ax.plot(after["mean_predicted"][i], after["fraction_positive"][i], "o-", color="tab:blue", ms=3, lw=1.4)
        if np.isfinite(thresholds[i]):
            ax.axvline(thresholds[i], ls=":", color="tab:red", lw=1)
        ece = report["per_class"][name]
        text = (
            f"ECE {ece['ece_raw']:.3f} -> {ece['ece_calibrated']:.3f}"
            if ece["ece_raw"] is not None and ece["ece_calibrated"] is not None
            else "ECE undefined"
        )
        ax.set_title(f"{readable_name(name)}\n{text}", fontsize=9)
        ax.set(xlim=(0, 1), ylim=(0, 1))
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in axes[len(classes) :]:
        ax.axis("off")
    handles = [
        Line2D([], [], ls="--", marker="o", ms=3, color="grey", label="raw"),
        Line2D([], [], marker="o", ms=3, color="tab:blue", label=f"calibrated ({report['method']})"),
        Line2D([], [], ls=":", color="tab:red", label="validation threshold"),
    ]
    fig.legend(handles=handles, loc="lower right", fontsize=9, frameon=False, bbox_to_anchor=(0.98, 0.08))
    fig.supxlabel(f"mean predicted probability ({bins} equal-width bins)")
    fig.supylabel("fraction positive (test)")
    fig.tight_layout()
    _save(fig, path)


def _intervals(ax, at: np.ndarray, low: np.ndarray, high: np.ndarray, vertical: bool, cap: float = 0.15) -> None:
    """Interval lines from low to high with end caps at positions `at` (missing ends: no line)."""
    ok = np.isfinite(low) & np.isfinite(high)
    at, low, high = at[ok], low[ok], high[ok]
    if not len(at):
        return
    lines, caps = (ax.vlines, ax.hlines) if vertical else (ax.hlines, ax.vlines)
    lines(at, low, high, color="black", lw=1)
    for end in (low, high):
        caps(end, at - cap, at + cap, color="black", lw=1)


def per_class_bars(
    names: Sequence[str],
    values: np.ndarray,
    low: np.ndarray,
    high: np.ndarray,
    path: str | Path,
    reference: float | None = None,
) -> None:
    """Per-class AUC with its confidence interval; a dashed line at `reference` (e.g. the paper's mean)."""
    fig = _figure(9, 4.2)
    ax = fig.subplots()
    x = np.arange(len(names))
    ax.bar(x, values, color="tab:blue", alpha=0.8)
    # the interval as drawn from its ends: a percentile bootstrap interval need not contain the
    # point estimate (a small class), which an error bar (distances from the point) cannot show
    _intervals(ax, x, low, high, vertical=True)
    if reference is not None:
        ax.axhline(reference, ls="--", color="tab:red", lw=1, label=f"paper mean {reference:.3f}")
        ax.legend(fontsize=8)
    ax.set_xticks(x, [readable_name(n) for n in names], rotation=45, ha="right", fontsize=8)
    ax.set(ylabel="ROC AUC", ylim=(0.4, 1.0), title="Test AUC per class (95% bootstrap CI)")
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path)


def similarity_heatmap(
    sim: np.ndarray, names: Sequence[str], path: str | Path, title: str = "Cosine similarity of label prototypes"
) -> None:
    """An annotated C x C heatmap of `sim` (e.g. the label prototypes' cosine similarities)."""
    labels = [readable_name(c) for c in names]
    n = len(labels)
    fig = _figure(1.0 + 0.62 * n, 0.6 + 0.55 * n)
    ax = fig.subplots()
    image = ax.imshow(sim, cmap="viridis", vmin=min(0.0, sim.min()), vmax=1.0)
    ax.set_xticks(range(n), labels, rotation=45, ha="right", fontsize=9)
    ax.set_yticks(range(n), labels, fontsize=9)
    threshold = (sim.max() + sim.min()) / 2
    for i in range(n):
        for j in range(n):
            color = "black" if sim[i, j] > threshold else "white"
            ax.text(j, i, f"{sim[i, j]:.2f}", ha="center", va="center", fontsize=7, color=color)
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="cosine")
    fig.tight_layout()
    _save(fig, path)


def ablation_plot(summary: dict, path: str | Path) -> None:
    """Left: each variant's mean AUC per seed (val and test); right: test delta vs the baseline, 95% CI.

    Args:
        summary: an ablation summary: "variants", each with
            "val_mean_auc_per_seed", "test_mean_auc_per_seed" and optionally "test_delta_vs_<baseline>".
    """
    variants = summary["variants"]
    names = [v["variant"] for v in variants]
    y = np.arange(len(names))[::-1]  # first variant on top
    fig = _figure(11, 0.5 * len(names) + 1.6)
    ax1, ax2 = fig.subplots(1, 2, sharey=True)
    for offset, split, color in ((0.12, "val", "tab:blue"), (-0.12, "test", "tab:orange")):
        for yi, v in zip(y, variants):
            seeds = v[f"{split}_mean_auc_per_seed"]
            ax1.scatter(seeds, [yi + offset] * len(seeds), s=14, color=color, alpha=0.6)
            ax1.plot(
                [v[f"{split}_mean_auc"]] * 2,
                [yi + offset - 0.1, yi + offset + 0.1],
                color=color,
                lw=2.5,
                label=split if yi == y[0] else None,
            )
    ax1.set(yticks=y, yticklabels=names, xlabel="mean AUC (dots: seeds, bar: mean)", title="Validation and test")
    ax1.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, fontsize=8, frameon=False)
    baseline = summary.get("baseline")
    key = f"test_delta_vs_{baseline}"
    for yi, v in zip(y, variants):
        d = v.get(key)
        if d is None:
            continue
        color = "tab:green" if d["low"] > 0 else ("tab:red" if d["high"] < 0 else "tab:gray")
        # the interval and the point drawn apart: a percentile interval need not contain its point
        # estimate (few resamples left after dropping those missing a class), and error bars cannot
        # be negative
        ax2.hlines(yi, d["low"], d["high"], color=color)
        ax2.plot([d["low"], d["high"]], [yi, yi], "|", color=color, markersize=8)
        ax2.plot(d["delta"], yi, "o", color=color)
    ax2.axvline(0.0, color="black", lw=0.8)
    ax2.set(xlabel=f"test mean AUC minus {baseline} (95% CI, patient bootstrap)", title=f"Paired delta vs {baseline}")
    for ax in (ax1, ax2):
        ax.grid(axis="x", alpha=0.3)
    _save(fig, path)


def _classes(n: int) -> str:
    return f"{n} class" if n == 1 else f"{n} classes"


def subgroup_forest(report: dict, overall: float | None, path: str | Path) -> None:
    """Mean test AUC with its interval for every subgroup, one row each, grouped by attribute.

    Args:
        report: `pipeline.evaluation.subgroups.subgroup_report`'s dict.
        overall: the whole test split's mean AUC, drawn as a dashed reference line (None: no line).
        path: the PNG to write.
    """
    rows = []  # (label, mean, low, high, note)
    for attribute, entry in report["attributes"].items():
        for group, g in entry["groups"].items():
            label = f"{attribute}: {group} (n={g['images']})"
            if g["mean_auc"] is None:
                rows.append((label, np.nan, np.nan, np.nan, g["status"]))
            else:
                low, high = (np.nan if v is None else v for v in g["mean_auc_ci"])
                rows.append((label, g["mean_auc"], low, high, _classes(len(g["classes_in_mean"]))))
    y = np.arange(len(rows))[::-1]  # first row on top
    fig = _figure(8, 0.38 * len(rows) + 1.4)
    ax = fig.subplots()
    for yi, (_, mean, low, high, note) in zip(y, rows):
        if np.isfinite(mean):
            _intervals(ax, np.array([yi]), np.array([low]), np.array([high]), vertical=False)
            ax.plot(mean, yi, "o", color="tab:blue")
            ax.annotate(
                note,
                (1.0, yi),
                xycoords=("axes fraction", "data"),
                xytext=(4, 0),
                textcoords="offset points",
                va="center",
                fontsize=7,
                color="grey",
            )
        else:
            ax.annotate(
                note,
                (0.5, yi),
                xycoords=("axes fraction", "data"),
                ha="center",
                va="center",
                fontsize=8,
                color="tab:red",
            )
    if overall is not None and np.isfinite(overall):
        ax.axvline(overall, ls="--", color="tab:red", lw=1, label=f"all test images {overall:.3f}")
        ax.legend(fontsize=8, loc="lower left")
    ax.set_yticks(y, [r[0] for r in rows], fontsize=8)
    ax.set_ylim(-0.7, len(rows) - 0.3)
    level = round(100 * report["ci_level"])
    ax.set(xlabel=f"mean ROC AUC ({level}% CI, patient bootstrap)", title="Test mean AUC per subgroup")
    ax.grid(axis="x", alpha=0.3)
    _save(fig, path)


def heatmap_panel(rows: Sequence[dict], scale: float, title: str, path: str | Path) -> None:
    """One test image's findings, a row each: the image with the class's boxes, Grad-CAM, prototype map.

    Args:
        rows: per finding {"label": title text, "image", "gradcam", "prototype": (H', W', 3) uint8
            renderings (`pipeline.evaluation.explain.overlay`; prototype None for a linear head), "boxes": (n, 4)
            x, y, w, h in pixels of the network's input, possibly empty}.
        scale: rendering pixels per input pixel (for the boxes).
        title: the figure's title (the image's name and labels).
        path: the PNG to write.
    """
    from matplotlib.patches import Rectangle

    cols = 3
    fig = _figure(3 * cols, 3.1 * len(rows) + 0.4)
    axes = fig.subplots(len(rows), cols, squeeze=False)
    for ax_row, row in zip(axes, rows):
        panels = [("image", row["image"]), ("Grad-CAM", row["gradcam"]), ("prototype distance", row["prototype"])]
        for ax, (name, rgb) in zip(ax_row, panels):
            ax.set_axis_off()
            if rgb is None:
                ax.text(0.5, 0.5, "linear head:\nno prototypes", ha="center", va="center", fontsize=9)
                continue
            ax.imshow(rgb, interpolation="nearest")
            for x, y, w, h in np.asarray(row["boxes"], dtype=float).reshape(-1, 4) * scale:
                ax.add_patch(Rectangle((x - 0.5, y - 0.5), w, h, fill=False, ec="white", lw=1.2, ls="--"))
            ax.set_title(f"{row['label']}\n{name}" if name != "image" else row["label"], fontsize=9)
    fig.suptitle(title, fontsize=10)
    _save(fig, path)
