"""The evaluate step's view of where the model looked: a heatmap gallery and the localisation check.

- Gallery: `gallery_images` test images drawn at random (seeded; those with boxes first), chosen
  without looking at the predictions, so that false positives and misses appear as often as they
  occur rather than the model's surest findings. Each is drawn as reports/heatmaps/<image stem>.png
  with its `top_k` most probable findings and every true finding it missed, each labelled with its
  outcome at the validation threshold: the image (with the class's boxes, if any), Grad-CAM and
  the prototype map (`pipeline.evaluation.explain`).
- Localisation: for every (test image, class) with a box in the prepare step's boxes.json (NIH's
  BBox_List_2017.csv, or the synthetic source's), the class's maps are scored against the boxes:
  pointing game (the map's maximum within `pointing_tolerance_px` at 224 px of a box, a flat map a
  miss), IoU of the map at `iou_threshold` with the union of the boxes, and IoBB (Wang et al. 2017)
  of the boxes around the map's regions at that threshold, with the accuracy at each T(IoBB). A
  "centre" baseline points at the image centre: a map that beats it has found more than where
  findings usually are. Without a box file the check reports itself not available.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..classes import BBOX_CSV, CLASSES
from ..config import ExplainConfig
from ..data.dataset import CachedImageDataset
from ..data.layout import BOXES
from ..io import read_json
from . import plots
from .explain import METHODS, Explainer, box_iobb, box_iou, overlay, pointing_hit, pointing_tolerance

HEATMAPS = "heatmaps"  # reports/heatmaps/<image stem>.png
LOCALIZATION = "localization.json"
BATCH = 32


def crop_boxes(boxes: dict, crop_size: int) -> pd.DataFrame:
    """boxes.json's boxes (cache pixels) in the centre crop's pixels: image, class, x, y, w, h."""
    df = pd.DataFrame(boxes["boxes"], columns=["image", "class", "x", "y", "w", "h"])
    offset = int(round((boxes["image_size"] - crop_size) / 2.0))  # torchvision's CenterCrop
    df[["x", "y"]] = df[["x", "y"]] - offset
    return df


def localization(
    explainer: Explainer, ds: CachedImageDataset, prepared_dir: Path, cfg: ExplainConfig
) -> dict[str, Any]:
    """Pointing game, IoU and IoBB per class over the split's boxed (image, class) pairs; see the module doc."""
    boxes = read_json(Path(prepared_dir) / BOXES)
    if boxes["source"] is None:
        return {"available": False, "reason": f"no {BBOX_CSV} in the raw data (the download step found none)"}
    crop = ds[0][0].shape[-1]
    df = crop_boxes(boxes, crop)
    df = df[df["image"].isin(set(ds.image_names))]
    if df.empty:
        return {"available": False, "reason": f"{BBOX_CSV} boxes none of the {ds.split} images"}
    index = {name: i for i, name in enumerate(ds.image_names)}
    pairs = [(image, cls, g[["x", "y", "w", "h"]].to_numpy()) for (image, cls), g in df.groupby(["image", "class"])]
    tolerance = pointing_tolerance(crop, cfg.pointing_tolerance_px)
    centre = centre_map(crop)
    scores: dict[str, dict[str, list]] = {m: defaultdict(list) for m in (*METHODS, "centre")}
    for start in range(0, len(pairs), BATCH):
        chunk = pairs[start : start + BATCH]
        images = torch.stack([ds[index[image]][0] for image, _, _ in chunk])  # (B, 1, crop, crop)
        classes = torch.tensor([[CLASSES.index(cls)] for _, cls, _ in chunk])  # (B, 1)
        maps = explainer.maps(images, classes)
        for j, (_, cls, b) in enumerate(chunk):
            scores["centre"][cls].append(_score(centre, b, tolerance, cfg.iou_threshold))
            for method in METHODS:
                if maps[method] is not None:
                    heat = maps[method][j, 0].cpu().numpy()
                    scores[method][cls].append(_score(heat, b, tolerance, cfg.iou_threshold))
    return {
        "available": True,
        "source": boxes["source"],
        "split": ds.split,
        "images": len({image for image, _, _ in pairs}),
        "pairs": len(pairs),
        "iou_threshold": cfg.iou_threshold,
        "pointing_tolerance_px_at_224": cfg.pointing_tolerance_px,
        "pointing_tolerance_px": tolerance,  # in pixels of the crop the maps are scored at
        "iobb_thresholds": list(cfg.iobb_thresholds),
        "output_stride": explainer.output_stride,
        "methods": {m: _summarise(s, cfg.iobb_thresholds) for m, s in scores.items() if s},
    }


def _score(heat: np.ndarray, boxes: np.ndarray, tolerance: float, threshold: float) -> tuple[bool, float, float]:
    """(pointing hit, IoU, IoBB) of one map against one (image, class)'s boxes."""
    return pointing_hit(heat, boxes, tolerance), box_iou(heat, boxes, threshold), box_iobb(heat, boxes, threshold)


def centre_map(size: int) -> np.ndarray:
    """(size, size) in [0, 1]: 1 at the image centre falling linearly to 0 at the corners."""
    t = np.arange(size) - (size - 1) / 2
    r = np.sqrt(np.add.outer(t**2, t**2))
    return 1.0 - r / r.max()


def _summarise(per_class: dict[str, list[tuple[bool, float, float]]], iobb_thresholds: list[float]) -> dict[str, Any]:
    table = {
        cls: {
            "pairs": len(v),
            "pointing_accuracy": float(np.mean([hit for hit, _, _ in v])),
            "mean_iou": float(np.mean([iou for _, iou, _ in v])),
            "mean_iobb": float(np.mean([iobb for _, _, iobb in v])),
            # Wang et al.: a localisation is correct when IoBB > T(IoBB)
            "iobb_accuracy": {str(t): float(np.mean([iobb > t for _, _, iobb in v])) for t in iobb_thresholds},
        }
        for cls, v in sorted(per_class.items(), key=lambda kv: CLASSES.index(kv[0]))
    }
    return {
        "mean_pointing_accuracy": float(np.mean([t["pointing_accuracy"] for t in table.values()])),
        "mean_iou": float(np.mean([t["mean_iou"] for t in table.values()])),
        "mean_iobb": float(np.mean([t["mean_iobb"] for t in table.values()])),
        "mean_iobb_accuracy": {
            str(t): float(np.mean([c["iobb_accuracy"][str(t)] for c in table.values()])) for t in iobb_thresholds
        },
        "per_class": table,
    }


def gallery_images(names: list[str], boxed: set[str], n: int, seed: int) -> list[int]:
    """Rows of `n` gallery images drawn at random by `seed`, boxed images first.

    Chosen without looking at the predictions: a gallery of the surest true findings shows the
    model at its best, one drawn at random shows its false positives and misses as often as they occur.
    """
    order = np.random.default_rng(seed).permutation(len(names)).tolist()
    return sorted(order, key=lambda i: names[i] not in boxed)[:n]  # stable: random within each group


def gallery_findings(
    target: np.ndarray, probs: np.ndarray, thresholds: np.ndarray, top_k: int
) -> list[tuple[int, str]]:
    """The findings drawn for one image, most probable first, each with its outcome.

    Args:
        target: (C,) the image's labels.
        probs: (C,) its probabilities, on the scale of `thresholds`.
        thresholds: (C,) the validation thresholds; NaN where validation could not choose one.
        top_k: how many of the most probable findings to draw; every true finding below its
            threshold (a miss) is drawn too.

    Returns:
        [(class index, outcome)], outcome "true positive", "false positive", "missed" or "true
        negative" at the threshold, or "positive" / "negative" for a class without one.
    """
    top = np.argsort(-probs, kind="stable")[:top_k]
    missed = np.flatnonzero((target > 0) & (probs < thresholds))
    chosen = sorted({int(c) for c in (*top, *missed)}, key=lambda c: (-probs[c], c))
    return [(c, _outcome(target[c] > 0, probs[c], thresholds[c])) for c in chosen]


def _outcome(positive: bool, prob: float, threshold: float) -> str:
    if not np.isfinite(threshold):
        return "positive" if positive else "negative"
    called = prob >= threshold
    return {(True, True): "true positive", (False, True): "false positive", (True, False): "missed"}.get(
        (positive, called), "true negative"
    )


def draw_gallery(
    explainer: Explainer,
    ds: CachedImageDataset,
    served: tuple[np.ndarray, np.ndarray],
    prepared_dir: Path,
    cfg: ExplainConfig,
    seed: int,
    out_dir: Path,
) -> list[Path]:
    """reports/heatmaps/<stem>.png for `cfg.gallery_images` test images drawn at random by `seed`.

    Args:
        served: (probabilities (N, C) in `ds` order, thresholds (C,)): the calibrated probabilities
            the registered model serves and the validation thresholds on them.
    """
    probs, thresholds = served
    boxes = read_json(Path(prepared_dir) / BOXES)
    crop = ds[0][0].shape[-1]
    df = crop_boxes(boxes, crop)
    written = []
    for i in gallery_images(ds.image_names, set(df["image"]), cfg.gallery_images, seed):
        name = ds.image_names[i]
        image, target = ds[i]
        findings = gallery_findings(target.numpy(), probs[i], thresholds, cfg.top_k)
        maps = explainer.maps(image[None], torch.as_tensor([c for c, _ in findings])[None])
        grey = image[0].numpy()
        plain = overlay(grey, np.zeros(grey.shape, np.float32), alpha=0.0)  # the image alone, as large
        panels = []
        for k, (c, outcome) in enumerate(findings):
            mine = df[(df["image"] == name) & (df["class"] == CLASSES[c])]
            proto = maps["prototype"]
            panels.append(
                {
                    "label": f"{CLASSES[c]} p={probs[i, c]:.2f} ({outcome})",
                    "image": plain,
                    "gradcam": overlay(grey, maps["gradcam"][0, k].cpu().numpy()),
                    "prototype": None if proto is None else overlay(grey, proto[0, k].cpu().numpy()),
                    "boxes": mine[["x", "y", "w", "h"]].to_numpy(),
                }
            )
        labels = "|".join(c for c, t in zip(CLASSES, target) if t > 0) or "No Finding"
        path = Path(out_dir) / HEATMAPS / f"{Path(name).stem}.png"
        plots.heatmap_panel(panels, plain.shape[0] / grey.shape[0], f"{name}: {labels}", path)
        written.append(path)
    return written


def localization_markdown(report: dict[str, Any]) -> str:
    """The localisation section of the evaluation report."""
    lines = ["", "## Localisation (where the model looked)", ""]
    if not report["available"]:
        return "\n".join([*lines, f"Not available: {report['reason']}.", ""])
    lines.append(
        f"{report['pairs']} boxed (image, class) pairs in {report['images']} {report['split']} images "
        f"({report['source']}). Pointing game: the map's maximum within {report['pointing_tolerance_px_at_224']:g} px "
        f"(at 224 px; {report['pointing_tolerance_px']:.1f} px here) of a box, a flat map a miss; IoU: the map at "
        f">= {report['iou_threshold']} against the boxes; IoBB (Wang et al. 2017): the share of the boxes around "
        "that region inside the boxes. Centre: a map peaking at the image centre."
    )
    methods = report["methods"]
    lines += ["", "| Class | pairs | " + " | ".join(f"{m} pointing | {m} IoU | {m} IoBB" for m in methods) + " |"]
    lines.append("|---|---|" + "---|---|---|" * len(methods))
    first = next(iter(methods.values()))["per_class"]
    for cls in first:
        rows = [m["per_class"][cls] for m in methods.values()]
        cells = [_cells(r["pointing_accuracy"], r["mean_iou"], r["mean_iobb"]) for r in rows]
        lines.append(f"| {cls} | {first[cls]['pairs']} | " + " | ".join(cells) + " |")
    means = [_cells(m["mean_pointing_accuracy"], m["mean_iou"], m["mean_iobb"]) for m in methods.values()]
    lines.append("| **mean over classes** | | " + " | ".join(means) + " |")
    thresholds = report["iobb_thresholds"]
    lines += ["", "Localisation accuracy, IoBB > T(IoBB), mean over classes:", ""]
    lines += ["| Method | " + " | ".join(f"T = {t:g}" for t in thresholds) + " |"]
    lines.append("|---|" + "---|" * len(thresholds))
    for m, v in methods.items():
        lines.append(f"| {m} | " + " | ".join(f"{v['mean_iobb_accuracy'][str(t)]:.2f}" for t in thresholds) + " |")
    return "\n".join(lines) + "\n"


def _cells(*values: float) -> str:
    return " | ".join(f"{v:.2f}" for v in values)
