"""The NIH-shaped synthetic source: NIH ChestX-ray14's bookkeeping, exactly, at 112,120 images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.classes import BBOX_CSV, CLASS_COUNTS, CLASSES, LABEL_CSV_NAMES, TEST_LIST, TRAIN_VAL_LIST
from pipeline.config import ConfigError
from pipeline.data import synthetic_nih as nih
from pipeline.data.synthetic import generate
from tests.conftest import settings


@pytest.fixture(scope="module")
def table() -> nih.NIHShape:
    return nih.full_table(seed=42, persistence=0.6)


def test_patients_have_nih_spread(table: nih.NIHShape) -> None:
    per_patient = np.bincount(table.patient)
    assert len(per_patient) == 30_805 and per_patient.sum() == 112_120
    assert (per_patient == 1).sum() == 17_503
    assert np.median(per_patient) == 1
    assert np.percentile(per_patient, 90) == 8 and np.percentile(per_patient, 99) == 35
    assert per_patient.max() == 184
    # follow-ups number each patient's images 0..k-1
    first = np.r_[True, table.patient[1:] != table.patient[:-1]]
    assert (table.followup[first] == 0).all() and (np.diff(table.followup)[~first[1:]] == 1).all()


def test_lists_have_nih_sizes_and_share_no_patient(table: nih.NIHShape) -> None:
    assert table.is_test.sum() == 25_596 and (~table.is_test).sum() == 86_524
    test_patients, train_patients = set(table.patient[table.is_test]), set(table.patient[~table.is_test])
    assert len(test_patients) == 2_797 and len(train_patients) == 28_008
    assert not test_patients & train_patients


def test_labels_have_nih_counts_per_list(table: nih.NIHShape) -> None:
    assert table.labels[~table.is_test].sum(0).tolist() == list(nih.TRAIN_VAL_POSITIVES)
    assert table.labels[table.is_test].sum(0).tolist() == list(nih.TEST_POSITIVES)
    assert table.labels.sum(0).tolist() == [CLASS_COUNTS[c] for c in CLASSES]
    assert np.bincount(table.labels.sum(1)).tolist() == list(nih.FINDINGS_PER_IMAGE)
    # co-occurrence from the copula's clinical pairs: effusion with atelectasis well above chance
    y = table.labels.astype(float)
    e, a = CLASSES.index("Effusion"), CLASSES.index("Atelectasis")
    assert (y[:, e] * y[:, a]).sum() > 1.5 * y[:, e].sum() * y[:, a].sum() / len(y)


def test_demographics_and_views(table: nih.NIHShape) -> None:
    assert (table.view == "AP").sum() == 44_810 and (table.view == "PA").sum() == 67_310
    assert (table.gender == "M").sum() == 63_340 and (table.gender == "F").sum() == 48_780
    assert table.age.min() >= 0 and table.age.max() <= 95 and 44 < table.age.mean() < 49
    # one sex per patient
    sexes = pd.DataFrame({"p": table.patient, "g": table.gender}).groupby("p")["g"].nunique()
    assert (sexes == 1).all()


def test_boxed_findings_are_test_positives_in_nih_classes(table: nih.NIHShape) -> None:
    pairs = [(i, c) for i, cs in table.boxed.items() for c in cs]
    assert len(pairs) == 984 and abs(len(table.boxed) - 880) <= 20
    counts = {CLASSES[c]: n for c, n in zip(*np.unique([c for _, c in pairs], return_counts=True))}
    assert counts == nih.BOXES_PER_CLASS
    assert all(table.is_test[i] and table.labels[i, c] for i, c in pairs)


def test_the_table_is_the_same_for_a_seed() -> None:
    a, b = nih.full_table(7, 0.6), nih.full_table(7, 0.6)
    assert np.array_equal(a.labels, b.labels) and np.array_equal(a.is_test, b.is_test) and a.boxed == b.boxed


def test_a_sample_takes_whole_patients_in_nih_proportion(table: nih.NIHShape) -> None:
    s = nih.sample(table, 5_000, seed=1)
    assert abs(len(s.patient) - 5_000) <= 5
    assert abs(s.is_test.sum() / len(s.patient) - 25_596 / 112_120) < 0.01
    assert not set(s.patient[s.is_test]) & set(s.patient[~s.is_test])
    assert np.array_equal(np.unique(s.patient), np.arange(s.patient.max() + 1))  # renumbered densely
    assert nih.sample(table, 112_120, seed=1) is table


def test_generate_writes_the_nih_shape(tmp_path: Path) -> None:
    cfg = settings("download.synthetic", shape="nih", num_images=400, image_size=32, seed=3)
    summary = generate(tmp_path, cfg, progress=False, workers=2)
    labels = pd.read_csv(tmp_path / LABEL_CSV_NAMES[0])
    assert len(labels) == summary["images"] and abs(summary["images"] - 400) <= 2
    test = (tmp_path / TEST_LIST).read_text().split("\n")
    train_val = (tmp_path / TRAIN_VAL_LIST).read_text().split("\n")
    assert len(test) == summary["test_images"] and len(test) + len(train_val) == len(labels)
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == sorted(labels["Image Index"])
    boxes = pd.read_csv(tmp_path / BBOX_CSV)
    assert set(boxes["Image Index"]) <= set(test)
    # the same files for any number of drawing processes
    again = tmp_path / "again"
    generate(again, cfg, progress=False, workers=1)
    for name in list(labels["Image Index"])[:20]:
        assert (again / "images" / name).read_bytes() == (tmp_path / "images" / name).read_bytes()
    assert (again / BBOX_CSV).read_text() == (tmp_path / BBOX_CSV).read_text()


@pytest.mark.parametrize("images", [50, 112_121])
def test_nih_shape_size_is_checked(images: int) -> None:
    with pytest.raises((ConfigError, ValueError), match=r"num_images .* with shape nih must be 100\.\.112120"):
        settings("download.synthetic", shape="nih", num_images=images)
