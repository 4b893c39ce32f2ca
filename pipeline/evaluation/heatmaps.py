"""The evaluate step's view of where the model looked: a heatmap gallery and the localisation check.

- Gallery: `gallery_images` test images (those with boxes first, then the most confident true
  findings), each drawn as reports/heatmaps/<image stem>.png with its `top_k` most probable findings:
  the image (with the class's boxes, if any), Grad-CAM and the prototype map (`pipeline.evaluation.explain`).
- Localisation: for every (test image, class) with a box in the prepare step's boxes.json (NIH's
  BBox_List_2017.csv, or the synthetic source's), the class's maps are scored against the boxes:
  pointing game (the map's maximum inside a box) and IoU of the map at `iou_threshold` with the
  union of the boxes. A "centre" baseline points at the image centre: a map that beats it has found
  more than where findings usually are. Without a box file the check reports itself not available.
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
from .explain import METHODS, Explainer, box_iou, overlay, pointing_hit

HEATMAPS = "heatmaps"  # reports/heatmaps/<image stem>.png
LOCALIZATION = "localization.json"
BATCH = 32


def crop_boxes(boxes: dict, crop_size: int) -> pd.DataFrame:
    """boxes.json's boxes (cache pixels) in the centre crop's pixels: image, class, x, y, w, h."""
    df = pd.DataFrame(boxes["boxes"], columns=["image", "class", "x", "y", "w", "h"])
    offset = int(round((boxes["image_size"] - crop_size) / 2.0))  # torchvision's CenterCrop
    df[["x", "y"]] = df[["x", "y"]] - offset
    return df


def localization(explainer: Explainer, ds: CachedImageDataset, prepared_dir: Path, threshold: float) -> dict[str, Any]:
    """Pointing game and IoU per class over the split's boxed (image, class) pairs; see the module doc."""
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
    centre = centre_map(crop)
    scores: dict[str, dict[str, list]] = {m: defaultdict(list) for m in (*METHODS, "centre")}
    for start in range(0, len(pairs), BATCH):
        chunk = pairs[start : start + BATCH]
        images = torch.stack([ds[index[image]][0] for image, _, _ in chunk])  # (B, 1, crop, crop)
        classes = torch.tensor([[CLASSES.index(cls)] for _, cls, _ in chunk])  # (B, 1)
        maps = explainer.maps(images, classes)
        for j, (_, cls, b) in enumerate(chunk):
            scores["centre"][cls].append((pointing_hit(centre, b), box_iou(centre, b, threshold)))
            for method in METHODS:
                if maps[method] is not None:
                    heat = maps[method][j, 0].cpu().numpy()
                    scores[method][cls].append((pointing_hit(heat, b), box_iou(heat, b, threshold)))
    return {
        "available": True,
        "source": boxes["source"],
        "split": ds.split,
        "images": len({image for image, _, _ in pairs}),
        "pairs": len(pairs),
        "iou_threshold": threshold,
        "output_stride": explainer.output_stride,
        "methods": {m: _summarise(s) for m, s in scores.items() if s},
    }


def centre_map(size: int) -> np.ndarray:
    """(size, size) in [0, 1]: 1 at the image centre falling linearly to 0 at the corners."""
    t = np.arange(size) - (size - 1) / 2
    r = np.sqrt(np.add.outer(t**2, t**2))
    return 1.0 - r / r.max()


def _summarise(per_class: dict[str, list[tuple[bool, float]]]) -> dict[str, Any]:
    table = {
        cls: {
            "pairs": len(v),
            "pointing_accuracy": float(np.mean([hit for hit, _ in v])),
            "mean_iou": float(np.mean([iou for _, iou in v])),
        }
        for cls, v in sorted(per_class.items(), key=lambda kv: CLASSES.index(kv[0]))
    }
    return {
        "mean_pointing_accuracy": float(np.mean([t["pointing_accuracy"] for t in table.values()])),
        "mean_iou": float(np.mean([t["mean_iou"] for t in table.values()])),
        "per_class": table,
    }


def gallery_images(names: list[str], y: np.ndarray, probs: np.ndarray, boxed: set[str], n: int) -> list[int]:
    """Rows of `n` gallery images: boxed images first, then by their most probable true finding."""
    best = np.where(y > 0, probs, -1.0).max(axis=1)  # (N,); -1: no finding at all
    order = sorted(range(len(names)), key=lambda i: (names[i] not in boxed, -best[i], names[i]))
    return [i for i in order if best[i] >= 0][:n]


def draw_gallery(
    explainer: Explainer,
    ds: CachedImageDataset,
    probs: np.ndarray,
    prepared_dir: Path,
    cfg: ExplainConfig,
    out_dir: Path,
) -> list[Path]:
    """reports/heatmaps/<stem>.png for the chosen test images; `probs` (N, C) in `ds` order."""
    boxes = read_json(Path(prepared_dir) / BOXES)
    crop = ds[0][0].shape[-1]
    df = crop_boxes(boxes, crop)
    rows = gallery_images(ds.image_names, ds.targets, probs, set(df["image"]), cfg.gallery_images)
    written = []
    for i in rows:
        name = ds.image_names[i]
        image, target = ds[i]
        top = np.argsort(-probs[i], kind="stable")[: cfg.top_k]
        maps = explainer.maps(image[None], torch.as_tensor(top)[None])
        grey = image[0].numpy()
        plain = overlay(grey, np.zeros(grey.shape, np.float32), alpha=0.0)  # the image alone, as large
        panels = []
        for k, c in enumerate(top):
            mine = df[(df["image"] == name) & (df["class"] == CLASSES[c])]
            truth = "positive" if target[c] > 0 else "negative"
            proto = maps["prototype"]
            panels.append(
                {
                    "label": f"{CLASSES[c]} p={probs[i, c]:.2f} ({truth})",
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
        f"({report['source']}). Pointing game: the map's maximum inside a box; IoU: the map at "
        f">= {report['iou_threshold']} against the boxes. Centre: a map peaking at the image centre."
    )
    methods = report["methods"]
    lines += ["", "| Class | pairs | " + " | ".join(f"{m} pointing | {m} IoU" for m in methods) + " |"]
    lines.append("|---|---|" + "---|---|" * len(methods))
    first = next(iter(methods.values()))["per_class"]
    for cls in first:
        rows = [m["per_class"][cls] for m in methods.values()]
        cells = [_pair(r["pointing_accuracy"], r["mean_iou"]) for r in rows]
        lines.append(f"| {cls} | {first[cls]['pairs']} | " + " | ".join(cells) + " |")
    means = [_pair(m["mean_pointing_accuracy"], m["mean_iou"]) for m in methods.values()]
    lines.append("| **mean over classes** | | " + " | ".join(means) + " |")
    return "\n".join(lines) + "\n"


def _pair(pointing: float, iou: float) -> str:
    return f"{pointing:.2f} | {iou:.2f}"
