"""Prepare step: labels + official lists + images -> manifest, split statistics and image cache.

Outputs in `out_dir`: manifest, split statistics, class counts, quarantine list and image cache,
named and described in `pipeline.data.layout`.

Only images that are labelled, in an official list, present on disk and decodable reach the
manifest. The cache is ordered by file name and does not depend on the split, so changing
`val_fraction` or `seed` re-splits without decoding anything again.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.classes import BBOX_CSV, BBOX_IMAGE_SIZE, CLASSES, MAX_AGE, NO_FINDING, TEST_LIST, TRAIN_VAL_LIST
from pipeline.config import PrepareConfig
from pipeline.data import labels as L
from pipeline.data.cache import CacheResult, build_cache, publish_cache
from pipeline.data.images import image_size
from pipeline.data.inventory import EXAMPLES, examples, take_inventory
from pipeline.data.layout import (
    BOXES,
    CACHE_DIR,
    CLASS_COUNTS,
    MANIFEST,
    QUARANTINE,
    RAW_IMAGES,
    RAW_SUFFIXES,
    SPLIT_CLASS_COUNTS,
    SPLIT_STATS,
)
from pipeline.data.splits import SPLITS, assert_patient_disjoint, assign_splits, patient_overlap
from pipeline.io import save_dataframe, write_json


def prepare(
    raw_dir: Path, out_dir: Path, cfg: PrepareConfig, progress: bool = True, work_dir: Path | None = None
) -> dict[str, Any]:
    """Run the prepare step; returns the statistics written to split_stats.json.

    `work_dir`: where the image cache is built and resumed (`<work_dir>/cache`), to be published
    into `out_dir` as hard links once complete; None builds it in `out_dir` itself. When the output
    folder is deleted before each run, only a work folder outside it lets an interrupted build
    resume (and a re-split reuse the decoded images).
    """
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    table, train_val, test = read_inputs(raw_dir)
    present = list_images(raw_dir / RAW_IMAGES)
    inventory = take_inventory(table, train_val, test, present)
    table = table[table["image"].isin(inventory.pop("usable"))].sort_values("image", ignore_index=True)

    paths = [raw_dir / RAW_IMAGES / name for name in table["image"]]
    build_dir = Path(work_dir or out_dir) / CACHE_DIR
    cache = build_cache(paths, build_dir, cfg.image_size, cfg.workers, cfg.chunk_size, progress)
    if not cache.complete:
        raise RuntimeError(f"{build_dir}: the image cache is incomplete; rerun to resume it")
    if work_dir is not None:
        publish_cache(build_dir, out_dir / CACHE_DIR)
    table["cache_index"] = np.arange(len(table))
    quarantine = quarantine_table(table, cache)
    table = table[~table["cache_index"].isin(list(cache.failures))].reset_index(drop=True)
    # the images' own sizes, which the square cache loses: the drift check's size rule is fitted on them
    sizes = [image_size(raw_dir / RAW_IMAGES / name) for name in table["image"]]
    table["width"], table["height"] = [w for w, _ in sizes], [h for _, h in sizes]

    labels = table[list(CLASSES)].to_numpy()
    table["split"] = assign_splits(
        table["image"], table["patient"], labels, train_val, test, cfg.val_fraction, cfg.seed, cfg.stratify
    )
    assert_patient_disjoint(table)
    boxes = prepared_boxes(raw_dir, table.loc[table["split"] != "", "image"], cfg.image_size)
    stats = split_statistics(table, cfg, quarantine, inventory, cache)
    stats["boxes"] = {"source": boxes["source"], "count": len(boxes["boxes"])}
    stats["boxes"].update({key: boxes[key] for key in ("dropped", "clipped")})
    write_outputs(out_dir, table, stats, quarantine)
    write_json(out_dir / BOXES, boxes)
    return stats


def prepared_boxes(raw_dir: Path, images: pd.Series, image_size: int) -> dict[str, Any]:
    """The raw folder's box file, for `images`, scaled from the 1024 px PNGs to the cache's `image_size`.

    Returns:
        {"source": file name or None when there is none, "image_size", "boxes": [{image, class, x, y,
        w, h}], "dropped": boxes of images not in `images`, "clipped": kept boxes cut at the image's
        edge}.
    """
    path = Path(raw_dir) / BBOX_CSV
    if not path.is_file():
        return {"source": None, "image_size": image_size, "boxes": [], "dropped": 0, "clipped": 0}
    df = L.read_bbox_csv(path)
    keep = df["image"].isin(set(images))
    df, clipped = L.clip_boxes(df[keep], BBOX_IMAGE_SIZE)
    df = df.sort_values(["image", "class", "y", "x"], ignore_index=True)
    df[["x", "y", "w", "h"]] = (df[["x", "y", "w", "h"]] * (image_size / BBOX_IMAGE_SIZE)).round(3)
    boxes = df.to_dict("records")
    dropped = int((~keep).sum())
    return {"source": BBOX_CSV, "image_size": image_size, "boxes": boxes, "dropped": dropped, "clipped": clipped}


def read_inputs(raw_dir: Path) -> tuple[pd.DataFrame, list[str], list[str]]:
    """The label table (image, patient, followup, view, sex, age, 14 classes) and the two official lists.

    Sex is "M", "F" or "" and age whole years or <NA> when the label file lacks a usable value;
    `split_statistics` counts those rows.
    """
    csv_path = L.find_label_csv(raw_dir)
    raw = L.read_label_csv(csv_path)
    onehot = L.parse_findings(raw[L.FINDINGS_COL], csv_path)  # (N, C)
    table = pd.DataFrame(
        {
            "image": raw[L.IMAGE_COL],
            "patient": raw[L.PATIENT_COL],
            "followup": raw[L.FOLLOWUP_COL],
            "view": raw[L.VIEW_COL].fillna("").str.strip(),
            "sex": L.parse_sex(raw),
            "age": L.parse_age(raw),
        }
    )
    table[list(CLASSES)] = onehot
    train_val = L.read_split_list(raw_dir / TRAIN_VAL_LIST)
    test = L.read_split_list(raw_dir / TEST_LIST)
    return table, train_val, test


def list_images(images_dir: Path) -> set[str]:
    """PNG and DICOM file names in the images folder (one directory scan; 112k stats would be slower)."""
    if images_dir.exists() and not images_dir.is_dir():
        raise NotADirectoryError(f"{images_dir} is a file, not the folder of images: run the download step again")
    if not images_dir.is_dir():
        raise FileNotFoundError(f"{images_dir} does not exist: run the download step first")
    with os.scandir(images_dir) as it:
        return {e.name for e in it if e.name.lower().endswith(RAW_SUFFIXES) and e.is_file()}


def quarantine_table(table: pd.DataFrame, cache: CacheResult) -> pd.DataFrame:
    rows = [(table["image"].iat[r], reason, detail) for r, (reason, detail) in cache.failures.items()]
    return pd.DataFrame(rows, columns=["image", "reason", "detail"])


def split_statistics(
    table: pd.DataFrame, cfg: PrepareConfig, quarantine: pd.DataFrame, inventory: dict, cache: CacheResult
) -> dict[str, Any]:
    per_split = {}
    for split in SPLITS:
        part = table[table["split"] == split]
        positives = part[list(CLASSES)].sum(axis=0)
        per_split[split] = {
            "images": len(part),
            "patients": int(part["patient"].nunique()),
            "positives": {c: int(positives[c]) for c in CLASSES},
            NO_FINDING: int((part[list(CLASSES)].sum(axis=1) == 0).sum()),
        }
    train_val_images = per_split["train"]["images"] + per_split["val"]["images"]
    reasons = quarantine["reason"].value_counts().sort_index()
    return {
        "num_images": len(table),
        "num_patients": int(table["patient"].nunique()),
        "splits": per_split,
        "val_fraction_requested": cfg.val_fraction,
        "val_fraction_images": per_split["val"]["images"] / max(1, train_val_images),
        "val_train_prevalence_max_abs_diff": prevalence_gap(table),
        "patient_overlap": patient_overlap(table),
        "quarantine": {
            "count": len(quarantine),
            "by_reason": {str(k): int(v) for k, v in reasons.items()},
            "first": quarantine["image"].head(EXAMPLES).tolist(),
        },
        "demographics": demographics(table),
        **inventory,
        "cache": {"file": cache.path.name, "size": cache.size, "count": cache.count, "skipped": cache.skipped},
        "config": cfg.model_dump(),
    }


def demographics(table: pd.DataFrame) -> dict[str, Any]:
    """Rows whose sex or age the label file does not give usably, and ages above MAX_AGE."""
    age = table["age"]
    impossible = age.notna() & (age > MAX_AGE)
    return {
        "sex_missing": examples(set(table.loc[table["sex"] == "", "image"])),
        "age_missing": examples(set(table.loc[age.isna(), "image"])),
        "age_over_max": {**examples(set(table.loc[impossible, "image"])), "max_age": MAX_AGE},
    }


def prevalence_gap(table: pd.DataFrame) -> float:
    """Largest |prevalence(val) - prevalence(train)| over classes; 0 when either split is empty."""
    train = table.loc[table["split"] == "train", list(CLASSES)]
    val = table.loc[table["split"] == "val", list(CLASSES)]
    if len(train) == 0 or len(val) == 0:
        return 0.0
    return float(np.abs(val.mean(axis=0).to_numpy() - train.mean(axis=0).to_numpy()).max())


def class_counts(table: pd.DataFrame) -> dict[str, Any]:
    train = table[table["split"] == "train"]
    positives = [int(train[c].sum()) for c in CLASSES]
    return {
        "split": "train",
        "num_images": len(train),
        "classes": list(CLASSES),
        "positives": dict(zip(CLASSES, positives)),
        "positives_list": positives,
        "no_finding": int((train[list(CLASSES)].sum(axis=1) == 0).sum()),
    }


def split_class_table(table: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for split in SPLITS:
        part = table[table["split"] == split]
        counts = {c: int(part[c].sum()) for c in CLASSES}
        counts[NO_FINDING] = int((part[list(CLASSES)].sum(axis=1) == 0).sum())
        for cls, n in counts.items():
            rows.append((split, cls, n, round(n / len(part), 6) if len(part) else 0.0))
    return pd.DataFrame(rows, columns=["split", "class", "count", "prevalence"])


def write_outputs(out_dir: Path, table: pd.DataFrame, stats: dict, quarantine: pd.DataFrame) -> None:
    columns = [
        "image",
        "patient",
        "followup",
        "view",
        "sex",
        "age",
        "split",
        *CLASSES,
        "cache_index",
        "width",
        "height",
    ]
    manifest = table.loc[table["split"] != "", columns]
    save_dataframe(out_dir / MANIFEST, manifest)
    save_dataframe(out_dir / QUARANTINE, quarantine)
    save_dataframe(out_dir / SPLIT_CLASS_COUNTS, split_class_table(table))
    write_json(out_dir / CLASS_COUNTS, class_counts(table))
    write_json(out_dir / SPLIT_STATS, stats)
