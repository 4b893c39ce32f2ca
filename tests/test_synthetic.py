"""The synthetic dataset: NIH layout, determinism, label statistics and learnability."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from pipeline.classes import (
    CLASS_COUNTS,
    CLASSES,
    LABEL_CSV_HEADER,
    LABEL_CSV_NAMES,
    NO_FINDING,
    NO_FINDING_COUNT,
    TEST_LIST,
    TOTAL_IMAGES,
    TRAIN_VAL_LIST,
    image_name,
)
from pipeline.config import ConfigError
from pipeline.data.synthetic import (
    _sample_metadata,
    followup_counts,
    generate,
    real_prevalence,
    render_images,
    sample_labels,
    split_patients,
)
from tests.conftest import settings

ROOT = Path(__file__).resolve().parents[1]

NAME = re.compile(r"^(\d{8})_(\d{3})\.png$")
SMALL = settings("download.synthetic", num_images=120, num_patients=50, image_size=64, seed=7)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synthetic")
    return out, generate(out, SMALL, progress=False)


def _read_lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").split("\n")


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_layout_and_exact_header(dataset):
    out, summary = dataset
    assert (out / "images").is_dir()
    assert (out / TRAIN_VAL_LIST).is_file() and (out / TEST_LIST).is_file()
    first = (out / LABEL_CSV_NAMES[0]).read_text(encoding="utf-8").split("\n", 1)[0]
    assert first == (
        "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
        "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"
    )
    assert first == ",".join(LABEL_CSV_HEADER)
    assert summary["images"] == SMALL.num_images and summary["patients"] == SMALL.num_patients


def test_csv_rows_describe_every_image(dataset):
    out, summary = dataset
    rows = _read_csv(out / LABEL_CSV_NAMES[0])
    assert len(rows) == SMALL.num_images
    images = sorted(p.name for p in (out / "images").glob("*.png"))
    assert images == [r["Image Index"] for r in rows]
    assert len({r["Patient ID"] for r in rows}) == SMALL.num_patients
    spacing = 0.143 * 1024 / SMALL.image_size
    for r in rows:
        patient, followup = NAME.match(r["Image Index"]).groups()
        assert int(patient) == int(r["Patient ID"]) and int(followup) == int(r["Follow-up #"])
        labels = r["Finding Labels"].split("|")
        assert labels == [NO_FINDING] or set(labels) <= set(CLASSES)
        assert 1 <= int(r["Patient Age"]) <= 100
        assert r["Patient Gender"] in ("M", "F") and r["View Position"] in ("PA", "AP")
        assert r["OriginalImage[Width"] == r["Height]"] == str(SMALL.image_size)
        assert float(r["OriginalImagePixelSpacing[x"]) == pytest.approx(spacing, abs=1e-3)
    counts = {c: sum(c in r["Finding Labels"].split("|") for r in rows) for c in CLASSES}
    assert counts == summary["class_counts"]
    assert summary["no_finding"] == sum(r["Finding Labels"] == NO_FINDING for r in rows)


def test_demographics_match_the_nih_file_and_fill_every_age_band():
    from pipeline.evaluation.subgroups import age_bands

    cfg = settings("download.synthetic")  # the demo's size: metadata only, no images drawn
    meta = _sample_metadata(cfg, np.random.default_rng(cfg.seed))
    assert 44 < meta.age.mean() < 50 and 14 < meta.age.std() < 20  # NIH: mean 46.9, s.d. 16.6
    assert meta.age.min() >= 1 and meta.age.max() <= 100
    assert 0.53 < (meta.gender == "M").mean() < 0.60  # NIH: 56.5% of images male
    for patient in np.unique(meta.patient)[:200]:
        assert len(set(meta.gender[meta.patient == patient])) == 1  # sex is fixed per patient
    bands, left_out = age_bands(meta.age)
    assert left_out == {"missing": 0, "impossible": 0}
    assert min((bands == b).sum() for b in ("<20", "20-39", "40-59", "60-79", "80+")) >= 20


def test_list_files_split_by_patient(dataset):
    out, summary = dataset
    for name in (TRAIN_VAL_LIST, TEST_LIST):
        text = (out / name).read_text(encoding="utf-8")
        assert text and not text.endswith("\n"), f"{name} must have no trailing newline"
    train, test = _read_lines(out / TRAIN_VAL_LIST), _read_lines(out / TEST_LIST)
    images = sorted(p.name for p in (out / "images").glob("*.png"))
    assert sorted(train + test) == images  # every image in exactly one list
    assert all(NAME.match(n) for n in images)
    patients = lambda names: {n.split("_")[0] for n in names}  # noqa: E731
    assert not patients(train) & patients(test)
    assert len(test) / len(images) == pytest.approx(SMALL.test_fraction, abs=0.06)
    assert summary["test_images"] == len(test) and summary["train_val_images"] == len(train)
    assert not list((out / "images").glob(".*.tmp"))  # no temp files left behind


def test_images_are_8bit_single_channel(dataset):
    out, _ = dataset
    for path in sorted((out / "images").glob("*.png"))[:10]:
        with Image.open(path) as img:
            assert img.mode == "L" and img.size == (SMALL.image_size, SMALL.image_size)
            pixels = np.asarray(img)
        assert pixels.dtype == np.uint8 and pixels.std() > 10  # not blank


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    cfg = settings("download.synthetic", num_images=12, num_patients=5, image_size=64, seed=SMALL.seed)
    for name, seed in (("a", cfg.seed), ("b", cfg.seed), ("c", cfg.seed + 1)):
        generate(tmp_path / name, cfg.replace(seed=seed), progress=False)
    read = lambda run, name: (tmp_path / run / name).read_bytes()  # noqa: E731
    for name in (LABEL_CSV_NAMES[0], TRAIN_VAL_LIST, TEST_LIST):
        assert read("a", name) == read("b", name)
    assert read("a", LABEL_CSV_NAMES[0]) != read("c", LABEL_CSV_NAMES[0])
    names = sorted(p.name for p in (tmp_path / "a" / "images").glob("*.png"))[:4]
    for name in names:
        assert read("a", f"images/{name}") == read("b", f"images/{name}")
    common = [n for n in names if (tmp_path / "c" / "images" / n).exists()]
    assert common
    assert all(read("a", f"images/{n}") != read("c", f"images/{n}") for n in common)


def test_followups_sum_exactly_and_are_skewed():
    counts = followup_counts(2000, 800, np.random.default_rng(0))
    assert counts.sum() == 2000 and counts.min() >= 1
    assert (counts == 1).mean() > 0.3 and counts.max() >= 8  # many single visits, a long tail
    is_test = split_patients(counts, 0.23, np.random.default_rng(0))
    assert counts[is_test].sum() / 2000 == pytest.approx(0.23, abs=0.01)


def test_label_prevalences_follow_the_real_dataset():
    labels = sample_labels(20_000, np.random.default_rng(0))
    assert labels.shape == (20_000, len(CLASSES)) and labels.dtype == np.uint8
    real = real_prevalence()
    drawn = labels.mean(0)
    # Within 20% relative (or 0.3 points for the rare classes); uniform labels miss by far more.
    np.testing.assert_allclose(drawn, real, rtol=0.2, atol=0.003)
    uniform = np.full_like(real, drawn.mean())
    assert not np.allclose(uniform, real, rtol=0.2, atol=0.003)
    assert real.max() / real.min() > 50 and drawn.max() / max(drawn.min(), 1e-9) > 20


def test_no_finding_most_common_and_several_labels_per_abnormal_image():
    labels = sample_labels(20_000, np.random.default_rng(1))
    n_pos = labels.sum(1)
    no_finding = (n_pos == 0).mean()
    assert no_finding == pytest.approx(NO_FINDING_COUNT / TOTAL_IMAGES, abs=0.03)
    assert no_finding > labels.mean(0).max()  # more common than any single disease
    assert n_pos[n_pos > 0].mean() > 1.2
    # Clinically paired findings co-occur beyond chance.
    eff, ate = CLASSES.index("Effusion"), CLASSES.index("Atelectasis")
    joint = (labels[:, eff] & labels[:, ate]).mean()
    assert joint > 1.5 * labels[:, eff].mean() * labels[:, ate].mean()


def test_labels_persist_within_a_patient():
    groups = np.repeat(np.arange(3000), 2)  # 3000 patients, 2 follow-ups each
    labels = sample_labels(6000, np.random.default_rng(2), groups=groups, persistence=0.6)
    first, second = labels[0::2], labels[1::2]
    inf = CLASSES.index("Infiltration")
    agree = first[:, inf] & second[:, inf]
    assert agree.mean() > 2 * first[:, inf].mean() * second[:, inf].mean()
    real = CLASS_COUNTS["Infiltration"] / TOTAL_IMAGES
    assert labels[:, inf].mean() == pytest.approx(real, abs=0.03)  # persistence keeps marginals


def test_patterns_are_learnable_but_not_trivial():
    # Each class present in about a quarter of the images, so every pattern is tested.
    rng = np.random.default_rng(0)
    n, n_train = 600, 400
    labels = (rng.random((n, len(CLASSES))) < 0.25).astype(np.uint8)
    images = render_images(labels, rng, size=64).astype(np.float32) / 255  # (N, 64, 64)
    x = images.reshape(n, 16, 4, 16, 4).mean((2, 4)).reshape(n, -1)  # (N, 256) 16x16 pixels
    x = (x - x[:n_train].mean(0)) / (x[:n_train].std(0) + 1e-6)
    aucs = []
    for c in range(len(CLASSES)):
        model = LogisticRegression(C=0.05, solver="liblinear").fit(x[:n_train], labels[:n_train, c])
        aucs.append(roc_auc_score(labels[n_train:, c], model.decision_function(x[n_train:])))
    assert 0.6 < np.mean(aucs) < 0.99, f"mean AUC {np.mean(aucs):.3f}: {np.round(aucs, 2)}"


def test_config_validation_names_the_key():
    with pytest.raises(ConfigError, match="synthetic"):
        settings("download.synthetic", num_images=10, num_patients=20)
    with pytest.raises(ValueError, match="test_fraction"):
        settings("download.synthetic", test_fraction=1.5)
    with pytest.raises(ValueError, match="image_size"):
        settings("download.synthetic", image_size=8)
    assert settings("download.synthetic", seed=3).seed == 3


def test_box_file_outlines_the_drawn_lesions(dataset):
    """NIH's format; every boxed class is a positive label of its image; a mass or nodule box holds
    a blob brighter than the ring around it; every drawn box class has its box."""
    from pipeline.classes import BBOX_CSV, BBOX_LABELS
    from pipeline.data.labels import read_bbox_csv

    out, summary = dataset
    assert (out / BBOX_CSV).read_text().split("\n", 1)[0] == "Image Index,Finding Label,Bbox [x,y,w,h],,,"
    boxes = read_bbox_csv(out / BBOX_CSV)
    assert len(boxes) == summary["boxes"] > 0 and set(boxes["class"]) <= set(BBOX_LABELS.values())
    labels = {r["Image Index"]: r["Finding Labels"].split("|") for r in _read_csv(out / LABEL_CSV_NAMES[0])}
    assert all(cls in labels[image] for image, cls in zip(boxes["image"], boxes["class"]))
    scale = SMALL.image_size / 1024
    brighter = []
    for row in boxes[boxes["class"].isin(["Mass", "Nodule"])].itertuples():
        img = np.asarray(Image.open(out / "images" / row.image), dtype=np.float64)
        x0, y0 = int(row.x * scale), int(row.y * scale)
        x1, y1 = x0 + int(row.w * scale), y0 + int(row.h * scale)
        inside = img[y0:y1, x0:x1].mean()
        ring = img[max(y0 - 3, 0) : y1 + 3, max(x0 - 3, 0) : x1 + 3]
        ring_mean = (ring.sum() - img[y0:y1, x0:x1].sum()) / (ring.size - (y1 - y0) * (x1 - x0))
        brighter.append(inside > ring_mean)
    assert len(brighter) >= 3 and np.mean(brighter) >= 0.8
    # each image with a visible box class drawn has a box; invisible positives (10%) do not
    positives = sum(c in BBOX_LABELS.values() for names in labels.values() for c in names)
    assert 0.75 * positives <= boxes.groupby(["image", "class"]).ngroups <= positives


def test_demo_data_measures_every_class_in_validation_and_test():
    """The committed demo settings give every class at least evaluate.min_positive_patients positive
    (and negative) patients in validation and in test, so every mean AUC is over all 14 classes."""
    from pipeline.config import load_params
    from pipeline.data.splits import assign_splits

    params = load_params(ROOT / "params.yaml")
    cfg, prep = params.download.synthetic, params.prepare
    meta = _sample_metadata(cfg, np.random.default_rng([cfg.seed, 0]))
    names = pd.Series([image_name(p, f) for p, f in zip(meta.patient, meta.followup)])
    split = assign_splits(
        names, pd.Series(meta.patient), meta.labels, list(names[~meta.is_test]), list(names[meta.is_test]),
        prep.val_fraction, prep.seed, prep.stratify,
    )  # fmt: skip
    floor = params.evaluate.min_positive_patients
    for name in ("val", "test"):
        rows = split == name
        for c, cls in enumerate(CLASSES):
            positive = len(np.unique(meta.patient[rows & (meta.labels[:, c] == 1)]))
            negative = len(np.unique(meta.patient[rows & (meta.labels[:, c] == 0)]))
            assert positive >= floor and negative >= floor, (name, cls, positive, negative)
    # the floor lifts only the rare classes: the common ones keep NIH's shares
    shares = meta.labels.mean(0)
    assert shares[CLASSES.index("Hernia")] == pytest.approx(cfg.min_prevalence, abs=0.01)
    assert shares[CLASSES.index("Infiltration")] == pytest.approx(CLASS_COUNTS["Infiltration"] / TOTAL_IMAGES, abs=0.03)
