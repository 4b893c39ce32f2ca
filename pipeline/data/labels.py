"""Read the NIH label file and split lists into arrays in the canonical class order."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.classes import CLASSES, LABEL_CSV_NAMES, LABEL_SEPARATOR, NO_FINDING

# The columns prepare needs; age and sex are kept when present (an absent column reads as empty),
# the rest of LABEL_CSV_HEADER (original size, spacing) is ignored, so trimmed copies still work.
IMAGE_COL = "Image Index"
FINDINGS_COL = "Finding Labels"
FOLLOWUP_COL = "Follow-up #"
PATIENT_COL = "Patient ID"
VIEW_COL = "View Position"
AGE_COL = "Patient Age"
SEX_COL = "Patient Gender"
REQUIRED_COLUMNS = (IMAGE_COL, FINDINGS_COL, FOLLOWUP_COL, PATIENT_COL, VIEW_COL)
SEXES = ("M", "F")

_CLASS_INDEX = {name: i for i, name in enumerate(CLASSES)}


def find_label_csv(raw_dir: str | Path) -> Path:
    """The label file in `raw_dir`: the v2020 file when both are present (it fixes patient ages)."""
    raw_dir = Path(raw_dir)
    for name in LABEL_CSV_NAMES:
        path = raw_dir / name
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{raw_dir}: no label file; expected one of {', '.join(LABEL_CSV_NAMES)} "
        "(run the download step or copy the NIH label CSV there)"
    )


def read_label_csv(path: str | Path) -> pd.DataFrame:
    """Read a Data_Entry_2017*.csv and check its header.

    Column names are stripped of surrounding spaces and the empty trailing column some copies carry
    (a comma at the end of every line) is dropped, so the 2017 and v2020 files read the same.

    Raises:
        ValueError: naming the file and the missing columns, or duplicated image names.
    """
    path = Path(path)
    df = pd.read_csv(path, dtype={FINDINGS_COL: str, IMAGE_COL: str, VIEW_COL: str})
    df.columns = [str(c).strip() for c in df.columns]
    empty_unnamed = [c for c in df.columns if c.startswith("Unnamed:") and df[c].isna().all()]
    df = df.drop(columns=empty_unnamed)
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(
            f"{path}: label file lacks column(s) {', '.join(map(repr, missing))}; found "
            f"{', '.join(map(repr, df.columns))}. Use the NIH Data_Entry_2017(_v2020).csv header."
        )
    df[IMAGE_COL] = df[IMAGE_COL].str.strip()
    dup = df[IMAGE_COL][df[IMAGE_COL].duplicated()]
    if len(dup):
        raise ValueError(f"{path}: {len(dup)} image name(s) appear twice, e.g. {', '.join(dup[:5])}")
    for col in (PATIENT_COL, FOLLOWUP_COL):
        values = pd.to_numeric(df[col], errors="coerce")
        if values.isna().any():
            bad = df.loc[values.isna(), IMAGE_COL].head(5).tolist()
            raise ValueError(f"{path}: column '{col}' is not an integer for {', '.join(bad)}")
        df[col] = values.astype(np.int64)
    return df.reset_index(drop=True)


def parse_sex(df: pd.DataFrame) -> pd.Series:
    """ "M", "F" or "" (missing, another value, or no Patient Gender column) for each row."""
    if SEX_COL not in df.columns:
        return pd.Series([""] * len(df), index=df.index, dtype=object)
    sex = df[SEX_COL].fillna("").astype(str).str.strip().str.upper()
    return sex.where(sex.isin(SEXES), "")


def parse_age(df: pd.DataFrame) -> pd.Series:
    """Age in whole years (nullable Int64) for each row; <NA> when missing or unparseable.

    An early copy of the label file writes ages as "058Y": a trailing Y is accepted. Negative or
    fractional values are unparseable. Ages above `MAX_AGE` are kept as written: the evaluation
    counts them as impossible instead of binning them.
    """
    if AGE_COL not in df.columns:
        return pd.Series(pd.NA, index=df.index, dtype="Int64")
    text = df[AGE_COL].astype(str).str.strip().str.rstrip("Yy")
    age = pd.to_numeric(text, errors="coerce")
    valid = age.notna() & (age >= 0) & (age == np.floor(age))
    return age.where(valid).astype("Int64")


def parse_findings(findings: pd.Series, source: str | Path = "label file") -> np.ndarray:
    """Multi-hot labels from 'A|B' strings; "No Finding" is the all-zero row.

    Args:
        findings: the "Finding Labels" column.
        source: the file the column came from, named in errors.

    Returns:
        (N, C) uint8 array in the order of `CLASSES`.

    Raises:
        ValueError: listing every label name that is not one of the 14 classes (or empty).
    """
    out = np.zeros((len(findings), len(CLASSES)), dtype=np.uint8)  # (N, C)
    unknown: dict[str, int] = {}
    for row, text in enumerate(findings.fillna("").astype(str)):
        for name in text.split(LABEL_SEPARATOR):
            name = name.strip()
            if name == NO_FINDING:
                continue
            col = _CLASS_INDEX.get(name)
            if col is None:
                unknown[name or "<empty>"] = unknown.get(name or "<empty>", 0) + 1
            else:
                out[row, col] = 1
    if unknown:
        listed = ", ".join(f"{name!r} ({n}x)" for name, n in sorted(unknown.items()))
        raise ValueError(
            f"{source}: unknown finding label(s) {listed}; valid labels are {NO_FINDING!r} and "
            f"{', '.join(CLASSES)} joined by {LABEL_SEPARATOR!r}. Fix the spelling in the file."
        )
    return out


def read_split_list(path: str | Path) -> list[str]:
    """Image names in an official split list, one per line (the NIH files lack a final newline)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found: the official split lists come with the dataset") from None
    names = [line.strip() for line in text.splitlines()]
    names = [n for n in names if n]
    seen: set[str] = set()
    dup = [n for n in names if n in seen or seen.add(n)]
    if dup:
        raise ValueError(f"{path}: {len(dup)} name(s) listed twice, e.g. {', '.join(dup[:5])}")
    return names


BOX_COLUMNS = ["image", "class", "x", "y", "w", "h"]


def read_bbox_csv(path: str | Path) -> pd.DataFrame:
    """NIH's BBox_List_2017.csv as (image, class, x, y, w, h): our class names, pixels of the 1024 px PNG.

    The file's header splits `Bbox [x,y,w,h]` over four columns and ends in empty ones; the first
    six columns are read by position. Labels are mapped to ours (`Infiltrate` -> `Infiltration`).

    Raises:
        ValueError: naming the file and the first rows with an unknown label, a coordinate that is
            not a number, or a box without area.
    """
    from pipeline.classes import BBOX_LABELS

    path = Path(path)
    raw = pd.read_csv(path, header=0, dtype=str, keep_default_na=False)
    if raw.shape[1] < len(BOX_COLUMNS):
        raise ValueError(
            f"{path}: {raw.shape[1]} column(s); a box file needs Image Index, Finding Label and x, y, w, h "
            "(NIH's header: Image Index,Finding Label,Bbox [x,y,w,h],,,)"
        )
    df = raw.iloc[:, : len(BOX_COLUMNS)].copy()
    df.columns = BOX_COLUMNS
    df["image"] = df["image"].str.strip()
    label = df["class"].str.strip()
    unknown = sorted(set(label) - set(BBOX_LABELS) - set(CLASSES))
    if unknown:
        names = ", ".join(map(repr, unknown[:5]))
        raise ValueError(f"{path}: unknown finding label(s) {names}; expected {', '.join(BBOX_LABELS)}")
    df["class"] = label.map(lambda s: BBOX_LABELS.get(s, s))
    for col in ("x", "y", "w", "h"):
        values = pd.to_numeric(df[col], errors="coerce")
        bad = values.isna() | (values < 0) | (values.eq(0) & (col in ("w", "h")))
        if bad.any():
            rows = ", ".join(f"{df['image'].iat[i]} ({df[col].iat[i]!r})" for i in np.flatnonzero(bad)[:3])
            kind = "positive" if col in ("w", "h") else "non-negative"
            raise ValueError(f"{path}: column {col} is not a {kind} number for {rows}")
        df[col] = values.astype(float)
    return df.reset_index(drop=True)
