"""Prepare step: label parsing, splits, the image cache and the cached Dataset, on tiny fixtures."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image
from torchvision.transforms import v2

from pipeline.classes import CLASS_COUNTS, CLASSES, LABEL_CSV_HEADER, NO_FINDING, TOTAL_IMAGES, image_name
from pipeline.data import cache as C
from pipeline.data import labels as L
from pipeline.data.dataset import (
    CachedImageDataset,
    RandomResizedCropRotate,
    build_loader,
    resized_crop_rotate,
    rotate_bilinear,
    train_transform,
)
from pipeline.data.inventory import inventory_notes
from pipeline.data.prepare import PrepareConfig, prepare
from pipeline.data.splits import assert_patient_disjoint, official_split, split_by_patient
from tests.conftest import ROOT, settings

SIZE = 32  # cached side in the fixtures: small enough to keep every test well under a second


# ----------------------------------------------------------------------------- fixtures


def chest_like(side: int, seed: int) -> np.ndarray:
    """(side, side) uint8: a bright body, two darker lungs and some noise; never constant."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:side, 0:side] / side
    img = 170 - 60 * np.exp(-(((x - 0.3) / 0.12) ** 2 + ((y - 0.5) / 0.25) ** 2))
    img -= 60 * np.exp(-(((x - 0.7) / 0.12) ** 2 + ((y - 0.5) / 0.25) ** 2))
    img += rng.normal(0, 8, (side, side))
    return np.clip(img, 0, 255).astype(np.uint8)


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def label_rows(num_patients: int, per_patient: int, seed: int) -> pd.DataFrame:
    """NIH-style label rows with findings drawn at the real dataset's prevalences."""
    rng = np.random.default_rng(seed)
    prevalence = np.array([CLASS_COUNTS[c] for c in CLASSES]) / TOTAL_IMAGES
    rows = []
    for patient in range(1, num_patients + 1):
        for followup in range(per_patient):
            found = [c for c, p in zip(CLASSES, prevalence) if rng.random() < p]
            rows.append(
                {
                    "Image Index": image_name(patient, followup),
                    "Finding Labels": "|".join(found) or NO_FINDING,
                    "Follow-up #": followup,
                    "Patient ID": patient,
                    "Patient Age": 50,
                    "Patient Gender": "M",
                    "View Position": "PA" if followup % 2 else "AP",
                    "OriginalImage[Width": 1024,
                    "Height]": 1024,
                    "OriginalImagePixelSpacing[x": 0.143,
                    "y]": 0.143,
                }
            )
    return pd.DataFrame(rows, columns=list(LABEL_CSV_HEADER))


def write_label_csv(path: Path, rows: pd.DataFrame, trailing_comma: bool = False) -> None:
    text = rows.to_csv(index=False, lineterminator="\n")
    if trailing_comma:  # the 2017 file ends every line with a comma (an empty 12th column)
        text = "".join(line + ",\n" for line in text.splitlines())
    path.write_text(text)


def write_list(path: Path, names: list[str]) -> None:
    path.write_text("\n".join(names))  # NIH lists have no final newline


def make_raw(
    root: Path, num_patients: int = 12, per_patient: int = 3, csv_name: str = "Data_Entry_2017_v2020.csv"
) -> Path:
    """A raw folder: test = the last third of patients, train_val = the rest; SIZE*2 px images."""
    rows = label_rows(num_patients, per_patient, seed=0)
    (root / "images").mkdir(parents=True)
    for i, name in enumerate(rows["Image Index"]):
        Image.fromarray(chest_like(SIZE * 2, i)).save(root / "images" / name)
    write_label_csv(root / csv_name, rows, trailing_comma=csv_name == "Data_Entry_2017.csv")
    is_test = rows["Patient ID"] > num_patients * 2 // 3
    write_list(root / "train_val_list.txt", rows.loc[~is_test, "Image Index"].tolist())
    write_list(root / "test_list.txt", rows.loc[is_test, "Image Index"].tolist())
    return root


@pytest.fixture()
def raw(tmp_path: Path) -> Path:
    return make_raw(tmp_path / "raw")


def cfg(**kw) -> PrepareConfig:
    return settings("prepare", **{"image_size": SIZE, "workers": 1, "chunk_size": 8, "val_fraction": 0.25, **kw})


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("prepared")
    raw = make_raw(root / "raw", num_patients=20, per_patient=3)
    prepare(raw, root / "out", cfg(), progress=False)
    return root / "out"


# ----------------------------------------------------------------------------- labels


def test_both_label_csv_headers_parse(tmp_path: Path):
    rows = label_rows(3, 2, seed=1)
    write_label_csv(tmp_path / "Data_Entry_2017_v2020.csv", rows)
    write_label_csv(tmp_path / "Data_Entry_2017.csv", rows, trailing_comma=True)
    new = L.read_label_csv(tmp_path / "Data_Entry_2017_v2020.csv")
    old = L.read_label_csv(tmp_path / "Data_Entry_2017.csv")
    assert list(old.columns) == list(new.columns) == list(LABEL_CSV_HEADER)
    pd.testing.assert_frame_equal(old, new)
    assert L.find_label_csv(tmp_path).name == "Data_Entry_2017_v2020.csv"
    (tmp_path / "Data_Entry_2017_v2020.csv").unlink()
    assert L.find_label_csv(tmp_path).name == "Data_Entry_2017.csv"


def test_label_csv_missing_column_names_file_and_column(tmp_path: Path):
    path = tmp_path / "Data_Entry_2017.csv"
    write_label_csv(path, label_rows(2, 1, seed=1).drop(columns=["Patient ID"]))
    with pytest.raises(ValueError, match=r"Data_Entry_2017\.csv.*'Patient ID'"):
        L.read_label_csv(path)
    with pytest.raises(FileNotFoundError, match="no label file"):
        L.find_label_csv(tmp_path / "elsewhere")


def test_parse_findings_multi_hot_and_no_finding():
    out = L.parse_findings(pd.Series(["No Finding", "Effusion|Hernia", "Atelectasis"]))
    assert out.dtype == np.uint8 and out.shape == (3, 14)
    assert out[0].sum() == 0
    assert out[1, CLASSES.index("Effusion")] == 1 and out[1, CLASSES.index("Hernia")] == 1 and out[1].sum() == 2
    assert out[2, 0] == 1 and out[2].sum() == 1


def test_misspelt_label_fails_naming_label_and_file(raw: Path):
    path = raw / "Data_Entry_2017_v2020.csv"
    text = path.read_text()
    first_row = text.splitlines()[1]
    path.write_text(text.replace(first_row, first_row.replace(first_row.split(",")[1], "Efusion|Mass"), 1))
    with pytest.raises(ValueError, match=r"Data_Entry_2017_v2020\.csv.*'Efusion'"):
        prepare(raw, raw.parent / "out", cfg(), progress=False)


def test_split_list_without_final_newline(tmp_path: Path):
    write_list(tmp_path / "test_list.txt", ["a.png", "b.png"])
    assert not (tmp_path / "test_list.txt").read_text().endswith("\n")
    assert L.read_split_list(tmp_path / "test_list.txt") == ["a.png", "b.png"]


# ----------------------------------------------------------------------------- prepare end to end


def add_odd_images(raw: Path) -> dict[str, str]:
    """Replace four listed images with awkward files; returns {role: image name}."""
    names = sorted(p.name for p in (raw / "images").iterdir())
    roles = dict(zip(["rgba", "u16", "large", "truncated"], names[:4]))
    rgba = np.zeros((SIZE * 2, SIZE * 2, 4), np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2], rgba[..., 3] = 200, 100, 50, 255
    Image.fromarray(rgba, "RGBA").save(raw / "images" / roles["rgba"])
    ramp = np.tile(np.linspace(1000, 4000, SIZE * 2), (SIZE * 2, 1)).astype(np.uint16)  # a 12-bit range
    Image.fromarray(ramp).save(raw / "images" / roles["u16"])
    Image.fromarray(chest_like(512, 7)).save(raw / "images" / roles["large"])
    data = png_bytes(Image.fromarray(chest_like(256, 8)))
    (raw / "images" / roles["truncated"]).write_bytes(data[: len(data) // 2])
    return roles


def test_prepare_normalises_odd_images_and_quarantines_truncated(raw: Path):
    roles = add_odd_images(raw)
    out = raw.parent / "out"
    stats = prepare(raw, out, cfg(), progress=False)

    with Image.open(raw / "images" / roles["rgba"]) as im:
        assert im.mode == "RGBA"
    with Image.open(raw / "images" / roles["u16"]) as im:
        assert im.mode.startswith("I")
    quarantine = pd.read_csv(out / "quarantine.csv")
    assert quarantine[["image", "reason"]].values.tolist() == [[roles["truncated"], "truncated"]]
    assert stats["quarantine"]["by_reason"] == {"truncated": 1}

    manifest = pd.read_csv(out / "manifest.csv")
    assert roles["truncated"] not in set(manifest["image"])
    images = C.open_cache(out / "cache")
    assert images.shape == (36, SIZE, SIZE) and images.dtype == np.uint8
    row = dict(zip(manifest["image"], manifest["cache_index"]))
    rgba = images[row[roles["rgba"]]]
    assert abs(int(rgba.mean()) - round(0.299 * 200 + 0.587 * 100 + 0.114 * 50)) <= 1  # luminance
    ramp = images[row[roles["u16"]]].astype(int)
    assert ramp[:, 0].max() <= 5 and ramp[:, -1].min() >= 250  # the 12-bit range spread over 0..255
    assert np.all(np.diff(ramp[0]) >= 0)
    large = images[row[roles["large"]]].astype(float)
    assert 60 < large.mean() < 200 and large.std() > 5  # resized, not blank
    # the body between the lungs is brighter than the left lung field
    assert large[:, SIZE // 2 - 4 : SIZE // 2 + 4].mean() > large[:, : SIZE // 2 - 4].mean()


def test_decode_image_reads_paths_bytes_and_arrays_alike(raw: Path):
    from pipeline.data.images import decode_image

    roles = add_odd_images(raw)
    for role in ("rgba", "u16", "large"):
        path = raw / "images" / roles[role]
        native = decode_image(path)  # (H, W) at the file's own size
        with Image.open(path) as im:
            assert native.shape == (im.height, im.width) and native.dtype == np.uint8
        assert np.array_equal(decode_image(path.read_bytes()), native)
        with open(path, "rb") as f:
            assert np.array_equal(decode_image(f), native)
        resized = decode_image(path, SIZE)
        assert resized.shape == (SIZE, SIZE) and resized.flags.writeable
        assert np.array_equal(decode_image(path.read_bytes(), SIZE), resized)
        assert np.array_equal(decode_image(native, SIZE), resized)  # an array takes the same resize
    with Image.open(raw / "images" / roles["rgba"]) as im:
        rgba = np.asarray(im)  # (H, W, 4)
    assert np.array_equal(decode_image(rgba, SIZE), decode_image(raw / "images" / roles["rgba"], SIZE))
    with pytest.raises(ValueError, match=r"\(H, W\) or \(H, W, 3\|4\), got shape \(2, 3, 5, 5\)"):
        decode_image(np.zeros((2, 3, 5, 5), np.uint8))
    with pytest.raises(OSError, match="truncated"):
        decode_image(raw / "images" / roles["truncated"])


def test_the_prepare_step_says_what_it_did_not_find(raw: Path, capsys, monkeypatch):
    """A partial download: most listed images absent. The step's output says so in one line, not
    only split_stats.json."""
    from components.common import run_main
    from components.prepare import main

    for path in sorted((raw / "images").iterdir())[5:]:
        path.unlink()
    monkeypatch.chdir(ROOT)
    out = raw.parent / "out"
    assert run_main("prepare", main, ["--raw", str(raw), "--out", str(out), "--no-mlflow", "--no-progress"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "partial download" in line]
    listed = json.loads((out / "split_stats.json").read_text())["listed_images"]
    assert len(lines) == 1 and lines[0].startswith(
        f"[prepare] {listed - 5:,} of {listed:,} listed images are not in {raw}"
    )


def test_prepare_reports_missing_unlisted_and_writes_outputs(raw: Path):
    (raw / "images" / image_name(1, 0)).unlink()  # listed but missing
    Image.fromarray(chest_like(SIZE, 0)).save(raw / "images" / "00099999_000.png")  # present, unlisted
    Image.fromarray(chest_like(SIZE * 3, 1)[:SIZE]).save(raw / "images" / image_name(2, 0))  # wide: 96 x 32
    out = raw.parent / "out"
    stats = prepare(raw, out, cfg(), progress=False)

    assert stats["listed_missing"] == {"count": 1, "first": [image_name(1, 0)]}
    assert stats["present_unlisted"] == {"count": 1, "first": ["00099999_000.png"]}
    assert stats["patient_overlap"] == 0
    saved = json.loads((out / "split_stats.json").read_text())
    assert saved["listed_missing"]["count"] == 1 and saved["num_images"] == 35
    listed = saved["listed_images"]
    assert inventory_notes(saved, "data/raw") == [
        f"1 of {listed:,} listed images are not in data/raw: a partial download? (first: {image_name(1, 0)}, ...)",
        "1 images in data/raw are in neither list file and were left out (first: 00099999_000.png, ...)",
    ]

    manifest = pd.read_csv(out / "manifest.csv")
    expected = [
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
    assert list(manifest.columns) == expected
    # each file's own size, before the square cache (the drift check's size rule is fitted on it)
    sizes = manifest.set_index("image")[["width", "height"]]
    assert sizes.loc[image_name(2, 0)].tolist() == [SIZE * 3, SIZE]
    assert (sizes.drop(index=image_name(2, 0)) == SIZE * 2).all().all()
    assert set(manifest["split"]) == {"train", "val", "test"}
    assert_patient_disjoint(manifest)
    assert set(manifest[list(CLASSES)].values.ravel()) <= {0, 1}

    counts = json.loads((out / "class_counts.json").read_text())
    train = manifest[manifest["split"] == "train"]
    assert counts["num_images"] == len(train)
    assert counts["positives_list"] == [int(train[c].sum()) for c in CLASSES]
    assert list(counts["positives"]) == list(CLASSES)

    long = pd.read_csv(out / "split_class_counts.csv")
    assert list(long.columns) == ["split", "class", "count", "prevalence"]
    assert len(long) == 3 * 15
    got = long[(long["split"] == "test") & (long["class"] == "Effusion")]["count"].item()
    assert got == manifest.loc[manifest["split"] == "test", "Effusion"].sum()


def test_manifest_carries_sex_and_age_from_the_label_file(raw: Path):
    csv = raw / "Data_Entry_2017_v2020.csv"
    rows = pd.read_csv(csv, dtype=str)
    ages = ["7", "058Y", "", "abc", "414", "-3", "61.5"]  # ok, ok, missing, unparseable, impossible, bad, bad
    sexes = ["F", "m", "", "X", "M", "F", "M"]
    rows.loc[: len(ages) - 1, "Patient Age"] = ages
    rows.loc[: len(sexes) - 1, "Patient Gender"] = sexes
    rows.loc[len(ages) :, "Patient Gender"] = "F"
    write_label_csv(csv, rows)
    out = raw.parent / "out"
    stats = prepare(raw, out, cfg(), progress=False)

    manifest = pd.read_csv(out / "manifest.csv", keep_default_na=False, dtype={"sex": str, "age": str})
    by_image = manifest.set_index("image")
    names = rows["Image Index"].tolist()
    got_age = [by_image.at[n, "age"] for n in names[: len(ages)]]
    got_sex = [by_image.at[n, "sex"] for n in names[: len(sexes)]]
    assert got_age == ["7", "58", "", "", "414", "", ""]
    assert got_sex == ["F", "M", "", "", "M", "F", "M"]
    assert (by_image.loc[names[len(ages) :], "age"] == "50").all()
    assert (by_image.loc[names[len(ages) :], "sex"] == "F").all()

    demo = stats["demographics"]
    assert demo["age_missing"]["count"] == 4 and set(demo["age_missing"]["first"]) == {names[i] for i in (2, 3, 5, 6)}
    assert demo["sex_missing"] == {"count": 2, "first": sorted([names[2], names[3]])}
    assert demo["age_over_max"]["count"] == 1 and demo["age_over_max"]["first"] == [names[4]]


def test_label_file_without_age_and_sex_columns_gives_empty_values(tmp_path: Path):
    rows = label_rows(2, 2, seed=0).drop(columns=["Patient Age", "Patient Gender"])
    write_label_csv(tmp_path / "labels.csv", rows)
    table = L.read_label_csv(tmp_path / "labels.csv")
    assert L.parse_sex(table).tolist() == [""] * 4
    assert L.parse_age(table).isna().all()


def test_patient_in_both_official_lists_is_an_error(raw: Path):
    test_names = (raw / "test_list.txt").read_text().split("\n")
    moved = test_names[0]
    write_list(raw / "test_list.txt", test_names[1:])
    write_list(raw / "train_val_list.txt", (raw / "train_val_list.txt").read_text().split("\n") + [moved])
    write_list(raw / "test_list.txt", test_names[1:])
    patient = int(moved[:8])
    with pytest.raises(ValueError, match=rf"both train_val_list.txt and test_list.txt.*{patient}"):
        prepare(raw, raw.parent / "out", cfg(), progress=False)


def test_assert_patient_disjoint_names_the_patients():
    df = pd.DataFrame({"patient": [1, 1, 2, 3, 3], "split": ["train", "val", "train", "test", "test"]})
    with pytest.raises(AssertionError, match=r"ids 1\b"):
        assert_patient_disjoint(df)
    assert_patient_disjoint(df[df["patient"] != 1])


def test_image_in_both_lists_is_an_error():
    images = pd.Series(["a.png", "b.png"])
    with pytest.raises(ValueError, match="a.png"):
        official_split(images, pd.Series([1, 2]), ["a.png"], ["a.png", "b.png"])


# ----------------------------------------------------------------------------- validation split


def synthetic_patients(num_patients: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 8, num_patients)
    patients = np.repeat(np.arange(num_patients) + 100, sizes)
    prevalence = np.array([CLASS_COUNTS[c] for c in CLASSES]) / TOTAL_IMAGES
    # patients differ in how sick they are, so labels cluster by patient as in the real data
    sick = np.repeat(rng.gamma(2.0, 0.5, num_patients), sizes)[:, None]
    labels = (rng.random((len(patients), 14)) < np.minimum(1, prevalence * sick)).astype(np.uint8)
    return patients, labels


@pytest.mark.parametrize("stratify", [True, False])
def test_val_split_by_patient_fraction_and_distribution(stratify: bool):
    patients, labels = synthetic_patients(3000, seed=3)
    in_val = split_by_patient(patients, labels, 0.2, seed=42, stratify=stratify)
    assert abs(in_val.mean() - 0.2) < 0.01
    assert not set(patients[in_val]) & set(patients[~in_val])
    gap = np.abs(labels[in_val].mean(0) - labels[~in_val].mean(0))
    if stratify:
        assert gap.max() < 0.006, gap
        # positives per class within a few images of the requested share, even for the rare ones
        share = labels[in_val].sum(0) / np.maximum(1, labels.sum(0))
        assert np.all(np.abs(share - 0.2) < 0.05), share
    assert np.array_equal(in_val, split_by_patient(patients, labels, 0.2, seed=42, stratify=stratify))
    assert not np.array_equal(in_val, split_by_patient(patients, labels, 0.2, seed=7, stratify=stratify))


def test_stratified_split_beats_random_on_label_balance():
    patients, labels = synthetic_patients(3000, seed=5)
    gaps = {}
    for stratify in (True, False):
        per_seed = []
        for seed in range(3):
            in_val = split_by_patient(patients, labels, 0.15, seed=seed, stratify=stratify)
            share = labels[in_val].sum(0) / labels.sum(0)
            per_seed.append(np.abs(share - 0.15).max())
        gaps[stratify] = np.mean(per_seed)
    assert gaps[True] < gaps[False] / 2, gaps


# ----------------------------------------------------------------------------- cache


def test_cache_skipped_on_rerun_and_rebuilt_when_inputs_or_size_change(raw: Path):
    out = raw.parent / "out"
    first = prepare(raw, out, cfg(), progress=False)
    assert first["cache"]["skipped"] is False
    data = out / "cache" / f"images_{SIZE}.u8"
    stamp = data.stat().st_mtime_ns
    assert prepare(raw, out, cfg(val_fraction=0.3, seed=1), progress=False)["cache"]["skipped"] is True
    assert data.stat().st_mtime_ns == stamp  # not rewritten

    some = raw / "images" / image_name(2, 1)
    os.utime(some, ns=(some.stat().st_atime_ns, some.stat().st_mtime_ns + 10**9))  # touched
    assert prepare(raw, out, cfg(), progress=False)["cache"]["skipped"] is False

    stats = prepare(raw, out, cfg(image_size=24), progress=False)
    assert stats["cache"]["skipped"] is False
    assert C.open_cache(out / "cache").shape == (36, 24, 24)
    assert not data.exists()  # the stale size is removed
    assert json.loads((out / "cache" / "index.json").read_text())["size"] == 24


def test_interrupted_cache_build_resumes_to_identical_bytes(raw: Path, tmp_path: Path):
    add_odd_images(raw)
    paths = sorted((raw / "images").iterdir())
    full = C.build_cache(paths, tmp_path / "full", SIZE, workers=2, chunk_size=8, progress=False)
    assert full.complete and not full.skipped and full.chunks_built == 5
    reference = (tmp_path / "full" / f"images_{SIZE}.u8").read_bytes()

    part = C.build_cache(paths, tmp_path / "part", SIZE, workers=1, chunk_size=8, progress=False, max_chunks=2)
    assert not part.complete and part.chunks_built == 2
    with pytest.raises(RuntimeError, match="incomplete"):
        C.open_cache(tmp_path / "part")
    rest = C.build_cache(paths, tmp_path / "part", SIZE, workers=1, chunk_size=8, progress=False)
    assert rest.complete and rest.chunks_built == 3
    assert (tmp_path / "part" / f"images_{SIZE}.u8").read_bytes() == reference
    assert rest.failures == full.failures and [r for r, _ in rest.failures.values()] == ["truncated"]

    # a chunk whose marker is lost is decoded again, even though the index said complete
    images = np.memmap(tmp_path / "part" / f"images_{SIZE}.u8", np.uint8, "r+", shape=(36, SIZE, SIZE))
    images[8:16] = 7
    images.flush()
    del images
    C.remove_marker(tmp_path / "part", SIZE, 1)
    again = C.build_cache(paths, tmp_path / "part", SIZE, workers=1, chunk_size=8, progress=False)
    assert again.chunks_built == 1 and not again.skipped
    assert (tmp_path / "part" / f"images_{SIZE}.u8").read_bytes() == reference
    assert C.build_cache(paths, tmp_path / "part", SIZE, progress=False).skipped


def test_cache_built_in_a_work_folder_is_published_as_links_and_never_written_through_one(raw: Path):
    """prepare builds the cache in `work_dir` and publishes it into the output as hard links; DVC
    then links the same file into its cache and makes it read-only. A rebuild must replace the
    shared file by its own copy, never write rows through the link into DVC's copy."""
    out, work = raw.parent / "out", raw.parent / "out-work"
    prepare(raw, out, cfg(), progress=False, work_dir=work)
    data, built = out / "cache" / f"images_{SIZE}.u8", work / "cache" / f"images_{SIZE}.u8"
    assert data.stat().st_ino == built.stat().st_ino  # one copy on disk
    names = sorted(str(p.relative_to(out / "cache")) for p in (out / "cache").rglob("*") if p.is_file())
    assert names == sorted(str(p.relative_to(work / "cache")) for p in (work / "cache").rglob("*") if p.is_file())
    assert C.open_cache(out / "cache").shape[1:] == (SIZE, SIZE)

    # what `dvc repro` does next: a link in its cache, read-only; then the output folder is deleted
    dvc_copy = raw.parent / "dvc-cache-object"
    os.link(data, dvc_copy)
    dvc_copy.chmod(0o444)
    reference = dvc_copy.read_bytes()
    (out / "cache").rename(raw.parent / "deleted-output")
    # a resplit reuses the decoded images; the output gets the cache back
    assert prepare(raw, out, cfg(seed=1), progress=False, work_dir=work)["cache"]["skipped"] is True
    assert data.stat().st_ino == dvc_copy.stat().st_ino
    # a lost done-marker makes the build decode a chunk again: into a private copy
    C.remove_marker(work / "cache", SIZE, 0)
    assert prepare(raw, out, cfg(), progress=False, work_dir=work)["cache"]["skipped"] is False
    assert built.stat().st_ino != dvc_copy.stat().st_ino and built.stat().st_mode & 0o200
    assert dvc_copy.read_bytes() == reference and dvc_copy.stat().st_mode & 0o777 == 0o444
    assert data.stat().st_ino == built.stat().st_ino and data.read_bytes() == reference


# ----------------------------------------------------------------------------- dataset


def test_dataset_shapes_dtypes_and_deterministic_eval(prepared: Path):
    aug = settings("train.augment", crop_size=24)
    val = CachedImageDataset(prepared, "val", aug, train=False)
    manifest = pd.read_csv(prepared / "manifest.csv")
    assert val.image_names == manifest.loc[manifest["split"] == "val", "image"].tolist()
    assert val.targets.shape == (len(val), 14)
    image, target = val[0]
    assert image.shape == (1, 24, 24) and image.dtype == torch.uint8
    assert target.shape == (14,) and target.dtype == torch.float32
    assert torch.equal(target, torch.from_numpy(val.targets[0]))
    assert torch.equal(val[0][0], image)
    full = C.open_cache(prepared / "cache")[val.cache_index[0]]
    assert np.array_equal(image[0].numpy(), full[4:28, 4:28])  # the center crop of the cached row

    raw_item = CachedImageDataset(prepared, "test", None)[0][0]
    assert raw_item.shape == (1, SIZE, SIZE)
    with pytest.raises(ValueError, match="crop_size 40 exceeds the cached image_size 32"):
        CachedImageDataset(prepared, "train", settings("train.augment", crop_size=40), train=True)


def test_train_loader_reproducible_with_seed(prepared: Path):
    train = CachedImageDataset(prepared, "train", settings("train.augment", crop_size=24, hflip=True), train=True)

    def batches(seed: int, workers: int) -> list[torch.Tensor]:
        torch.manual_seed(0)  # the workers=0 path draws augmentations from the global RNG
        loader = build_loader(train, batch_size=8, shuffle=True, workers=workers, seed=seed)
        return [x for x, _ in loader]

    a, b = batches(1, 2), batches(1, 2)
    assert len(a) == -(-len(train) // 8)
    assert a[0].shape == (8, 1, 24, 24) and a[0].dtype == torch.uint8
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, batches(2, 2)))
    assert all(torch.equal(x, y) for x, y in zip(batches(3, 0), batches(3, 0)))


@pytest.mark.parametrize("angle", [-5.0, 3.3, 30.0])
def test_fast_rotation_matches_torchvision(angle: float):
    image = torch.from_numpy(chest_like(40, 1)[:, :36].copy()).unsqueeze(0)  # (1, 40, 36) non-square
    ours = rotate_bilinear(image, angle)
    ref = v2.functional.rotate(image, angle, interpolation=v2.InterpolationMode.BILINEAR, fill=None)
    assert ours.dtype == torch.uint8 and ours.shape == image.shape
    assert (ours.int() - ref.int()).abs().max() <= 1
    assert not torch.equal(ours, image)


def test_fused_crop_rotate_matches_torchvision_crop_then_rotate():
    image = torch.from_numpy(chest_like(64, 2)).unsqueeze(0)  # (1, 64, 64)
    box = dict(top=5, left=9, height=50, width=44)
    ours = resized_crop_rotate(image, **box, angle=0.0, size=(56, 56))
    ref = v2.functional.resized_crop(image, **box, size=[56, 56], antialias=False)
    # the border row/column reads the pixels just outside the box, torchvision repeats the box's edge
    assert ours.shape == (1, 56, 56) and (ours.int() - ref.int())[:, 1:-1, 1:-1].abs().max() <= 1
    # with an angle: the centre agrees with crop-then-rotate (two resamplings blur a little)
    ours = resized_crop_rotate(image, **box, angle=5.0, size=(56, 56)).float()
    ref = v2.functional.rotate(ref, 5.0, interpolation=v2.InterpolationMode.BILINEAR).float()
    assert (ours - ref)[:, 8:48, 8:48].abs().mean() < 3
    unrotated = (ours[:, 8:48, 8:48] - image[:, 8:48, 8:48]).abs().mean()
    assert (ours - ref)[:, 8:48, 8:48].abs().mean() < unrotated


def test_train_transform_fuses_only_near_crop_size():
    fused = train_transform(settings("train.augment", crop_size=56), image_size=64).transforms
    assert isinstance(fused[0], RandomResizedCropRotate) and len(fused) == 2  # + ColorJitter
    apart = train_transform(settings("train.augment", crop_size=56), image_size=256).transforms
    assert [type(t).__name__ for t in apart] == ["RandomResizedCrop", "RandomRotation", "ColorJitter"]
    for transform in (fused, apart):
        out = v2.Compose(transform)(torch.from_numpy(chest_like(64, 3)).unsqueeze(0))
        assert out.shape == (1, 56, 56) and out.dtype == torch.uint8 and out.float().std() > 5


def test_prepare_on_synthetic_dataset(tmp_path: Path):
    from pipeline.data.synthetic import generate

    synthetic = settings("download.synthetic", num_images=240, num_patients=80, image_size=64, seed=3)
    generate(tmp_path / "raw", synthetic, progress=False)
    prepare_cfg = cfg(image_size=64, workers=2, chunk_size=64, val_fraction=0.2)
    stats = prepare(tmp_path / "raw", tmp_path / "out", prepare_cfg, progress=False)
    splits = stats["splits"]
    assert sum(s["images"] for s in splits.values()) == stats["num_images"] == 240
    assert stats["quarantine"]["count"] == 0 and stats["listed_missing"]["count"] == 0
    assert stats["patient_overlap"] == 0
    assert abs(stats["val_fraction_images"] - 0.2) < 0.05
    manifest = pd.read_csv(tmp_path / "out" / "manifest.csv")
    assert_patient_disjoint(manifest)
    train = CachedImageDataset(tmp_path / "out", "train", settings("train.augment", crop_size=56), train=True)
    image, _ = train[0]
    assert image.shape == (1, 56, 56) and image.float().std() > 1


# ----------------------------------------------------------------------------- boxes


def test_boxes_are_scaled_to_the_cache_and_kept_for_manifest_images(raw: Path):
    names = sorted(p.name for p in (raw / "images").iterdir())
    rows = [
        "Image Index,Finding Label,Bbox [x,y,w,h],,,",
        f"{names[0]},Infiltrate,256,512,128,64,,,",  # NIH's name for Infiltration
        f"{names[1]},Mass,0,1000,24,24,,,",
        f"{names[2]},Nodule,1000,32,50,32,,,",  # 26 px past the right edge
        "00099999_000.png,Nodule,1,2,3,4,,,",  # an image the release does not hold
    ]
    (raw / "BBox_List_2017.csv").write_text("\n".join(rows) + "\n")
    stats = prepare(raw, raw.parent / "out", cfg(), progress=False)
    boxes = json.loads((raw.parent / "out" / "boxes.json").read_text())
    assert boxes["source"] == "BBox_List_2017.csv" and boxes["image_size"] == SIZE and boxes["dropped"] == 1
    scale = SIZE / 1024  # NIH's boxes are in pixels of the 1024 px PNGs
    box = dict(zip("xywh", np.array([256, 512, 128, 64]) * scale))
    assert boxes["boxes"] == [
        {"image": names[0], "class": "Infiltration", **box},
        {"image": names[1], "class": "Mass", "x": 0.0, "y": 1000 * scale, "w": 24 * scale, "h": 24 * scale},
        # cut at the image's edge, and counted
        {"image": names[2], "class": "Nodule", "x": 1000 * scale, "y": 1.0, "w": 24 * scale, "h": 1.0},
    ]
    assert stats["boxes"] == {"source": "BBox_List_2017.csv", "count": 3, "dropped": 1, "clipped": 1}
    assert boxes["clipped"] == 1


def test_without_a_box_file_boxes_are_marked_absent(raw: Path):
    prepare(raw, raw.parent / "out", cfg(), progress=False)
    boxes = json.loads((raw.parent / "out" / "boxes.json").read_text())
    assert boxes == {"source": None, "image_size": SIZE, "boxes": [], "dropped": 0, "clipped": 0}


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("a.png,Infiltration tissue,1,2,3,4,,,", r"line 3: unknown finding label\(s\) 'Infiltration tissue'"),
        ("a.png,Mass,1,two,3,4,,,", r"column y must be a number from 0 to below 1024 .*: line 3 \(a.png: 'two'\)"),
        ("a.png,Mass,1,2,0,4,,,", r"column w must be a finite positive number .*: line 3 \(a.png: '0'\)"),
        ("a.png,Mass,1,2,inf,4,,,", r"column w must be a finite positive number .*: line 3 \(a.png: 'inf'\)"),
        ("a.png,Mass,1,2,3,nan,,,", r"column h must be a finite positive number .*: line 3 \(a.png: 'nan'\)"),
        ("a.png,Mass,1,1024,3,4,,,", r"column y must be a number from 0 to below 1024 .*: line 3 \(a.png: '1024'\)"),
        ("a.png,Mass,-1e9,2,3,4,,,", r"column x must be a number from 0 to below 1024 .*: line 3 \(a.png: '-1e9'\)"),
        ('a.png,"Mass,1,2,3,4,,,\nb.png,Mass,1,2,3,4,,,', r"line 3 is not valid CSV \(unexpected end of data\)"),
        ("a.png,Mass,1,2", r"line 3: too few columns"),
    ],
)
def test_a_bad_box_row_names_the_file_and_the_row(tmp_path: Path, row: str, message: str):
    path = tmp_path / "BBox_List_2017.csv"
    path.write_text("Image Index,Finding Label,Bbox [x,y,w,h],,,\n00000001_000.png,Mass,1,2,3,4,,,\n" + row + "\n")
    with pytest.raises(ValueError, match=f"^{path}: .*{message}") as refused:
        L.read_bbox_csv(path)
    assert "\n" not in str(refused.value)


# ----------------------------------------------------------------------------- component


def test_a_file_given_as_the_raw_folder_is_named_as_a_file(tmp_path: Path, capsys, monkeypatch):
    from components.common import run_main
    from components.prepare import main

    monkeypatch.delenv("CXR_DEBUG", raising=False)
    params = ROOT / "params.yaml"
    args = ["--params", str(params), "--raw", str(params), "--out", str(tmp_path / "out"), "--no-mlflow"]
    assert run_main("prepare", main, args) == 2
    (line, hint) = capsys.readouterr().err.splitlines()
    assert hint.startswith("cxr-dwml prepare: (set CXR_DEBUG=1") and line == (
        f"cxr-dwml prepare: error: --raw {params} is a file, not a folder: give the raw data folder the "
        "download step fills (default data/raw)"
    )
    assert not (tmp_path / "out").exists()
    # the library says the same of an images "folder" that is a file
    raw = make_raw(tmp_path / "raw", num_patients=3, per_patient=1)
    shutil.rmtree(raw / "images")
    (raw / "images").write_text("not a folder")
    with pytest.raises(NotADirectoryError, match=f"{raw / 'images'} is a file, not the folder of images"):
        prepare(raw, tmp_path / "out", cfg(), progress=False)


SMALL_DISK = """
mount -t tmpfs -o size={first}k tmpfs "$WORK" || exit 90
$PREPARE 2> "$OUT/first.err"; echo $? > "$OUT/first.rc"
# room for the data file but not for every done-marker: the disk fills up half way
mount -o remount,size={second}k "$WORK" || exit 91
$PREPARE 2> "$OUT/second.err"; echo $? > "$OUT/second.rc"
stat -c '%n %i' "$WORK"/cache/chunks_*/*.json > "$OUT/second.markers"
mount -o remount,size={third}k "$WORK" || exit 92
$PREPARE 2> "$OUT/third.err"; echo $? > "$OUT/third.rc"
stat -c '%n %i' "$WORK"/cache/chunks_*/*.json > "$OUT/third.markers"
"""


def _small_disk_available(folder: Path) -> str | None:
    """Why a tmpfs cannot be mounted in a user namespace here, or None when it can."""
    probe = ["unshare", "--user", "--map-root-user", "--mount", "mount", "-t", "tmpfs", "tmpfs", str(folder)]
    try:
        done = subprocess.run(probe, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        return "util-linux `unshare` is not installed"
    if done.returncode == 0:
        return None
    return done.stderr.strip() or f"exit status {done.returncode}"


def _bytes(text: str) -> float:
    """'187kB' -> 187000.0 (tqdm's units)."""
    number, unit = re.fullmatch(r"([\d.]+)([kMGT]?)B", text).groups()
    return float(number) * 1000 ** " kMGT".index(unit or " ")


def test_a_full_disk_names_the_cache_folder_and_the_space_needed_and_a_rerun_resumes(raw: Path, tmp_path: Path):
    """A real full disk: a tmpfs of a few pages, mounted in a user namespace of its own (no root on
    the machine; nothing outside the test's processes sees it, and it vanishes with them)."""
    work, out, logs = tmp_path / "work", tmp_path / "out", tmp_path / "logs"
    work.mkdir()
    logs.mkdir()
    why = _small_disk_available(work)
    if why:
        pytest.skip(f"cannot mount a small tmpfs in a user namespace here: {why}")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["prepare"].update(image_size=64, workers=1, chunk_size=1)  # a row and a marker: a 4 KiB page each
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    images = len(list((raw / "images").iterdir()))
    args = f"--params {tmp_path / 'params.yaml'} --raw {raw} --out {out} --work {work} --no-mlflow --no-progress"
    env = {**os.environ, "WORK": str(work), "OUT": str(logs)}
    env["PREPARE"] = f"{sys.executable} -m components.prepare {args}"
    env.pop("CXR_DEBUG", None)
    script = SMALL_DISK.format(first=images * 4 // 2, second=(images + 12) * 4, third=images * 3 * 4)
    done = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    rc = {run: int((logs / f"{run}.rc").read_text()) for run in ("first", "second", "third")}
    assert rc == {"first": 2, "second": 2, "third": 0}, {run: (logs / f"{run}.err").read_text() for run in rc}
    line = re.compile(
        rf"cxr-dwml prepare: error: {re.escape(str(work / 'cache'))}: no space left on the device for the "
        r"image cache: it needs about (\S+) more there, (\S+) is free\. Free space on that disk \(or build "
        r"the cache on another one\) and rerun: the chunks already built are kept"
    )
    for run, needed in (("first", images * 64 * 64), ("second", 4096)):
        err = (logs / f"{run}.err").read_text().splitlines()
        found = line.fullmatch(err[0])
        assert len(err) == 2 and found, err
        assert _bytes(found[1]) >= needed and _bytes(found[2]) < _bytes(found[1])
    # the chunks the second run finished were kept, not decoded again
    before = dict(entry.split() for entry in (logs / "second.markers").read_text().splitlines())
    after = dict(entry.split() for entry in (logs / "third.markers").read_text().splitlines())
    assert 0 < len(before) < images == len(after) and all(after[name] == ino for name, ino in before.items())
    # and the resumed cache is the one a build on a roomy disk makes
    prepare(raw, tmp_path / "reference", cfg(image_size=64), progress=False)
    built = (out / "cache" / "images_64.u8").read_bytes()
    assert built == (tmp_path / "reference" / "cache" / "images_64.u8").read_bytes()
