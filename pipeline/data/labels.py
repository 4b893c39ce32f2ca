"""Read the NIH label file and split lists into arrays in the canonical class order."""

from __future__ import annotations

import csv
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.classes import BBOX_IMAGE_SIZE, BBOX_LABELS, CLASSES, LABEL_CSV_NAMES, LABEL_SEPARATOR, NO_FINDING

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
ROWS_NAMED = 3  # bad rows named in an error


def read_bbox_csv(path: str | Path) -> pd.DataFrame:
    """NIH's BBox_List_2017.csv as (image, class, x, y, w, h): our class names, pixels of the 1024 px PNG.

    The file's header splits `Bbox [x,y,w,h]` over four columns and ends in empty ones; the first
    six columns are read by position. Labels are mapped to ours (`Infiltrate` -> `Infiltration`).
    A box must start inside the image (0 <= x, y < BBOX_IMAGE_SIZE) and have a finite, positive
    width and height; one that runs past the image's edge is kept as drawn (`clip_boxes` clips it).

    Raises:
        ValueError: naming the file and the line of the first rows that are not valid CSV (an
            unclosed quote), lack a column, carry an unknown label, or a coordinate that is not a
            finite number or lies outside those bounds.
    """
    path = Path(path)
    lines, rows = _csv_rows(path)
    if not rows or len(rows[0]) < len(BOX_COLUMNS):
        raise ValueError(
            f"{path}: {len(rows[0]) if rows else 0} column(s); a box file needs Image Index, Finding Label and "
            "x, y, w, h (NIH's header: Image Index,Finding Label,Bbox [x,y,w,h],,,)"
        )
    short = [n for n, fields in zip(lines[1:], rows[1:]) if len(fields) < len(BOX_COLUMNS)]
    if short:
        raise ValueError(f"{path}: {_lines(short)}: too few columns; a box row is image, label, x, y, w, h")
    df = pd.DataFrame([fields[: len(BOX_COLUMNS)] for fields in rows[1:]], columns=BOX_COLUMNS)
    df["image"] = df["image"].str.strip()
    label = df["class"].str.strip()
    unknown = ~label.isin([*BBOX_LABELS, *CLASSES])
    if unknown.any():
        names = ", ".join(map(repr, sorted(set(label[unknown]))[:ROWS_NAMED]))
        at = _lines(np.asarray(lines[1:])[unknown.to_numpy()])
        raise ValueError(f"{path}: {at}: unknown finding label(s) {names}; expected {', '.join(BBOX_LABELS)}")
    df["class"] = label.map(lambda s: BBOX_LABELS.get(s, s))
    for col in ("x", "y", "w", "h"):
        df[col] = _box_coordinate(path, df, col, lines[1:])
    return df


def _csv_rows(path: Path) -> tuple[list[int], list[list[str]]]:
    """Each non-empty row of the file, with the line it starts on (a quoted field may span lines)."""
    numbers, rows, start = [], [], 1
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f, strict=True)
            for fields in reader:
                if any(field.strip() for field in fields):
                    numbers.append(start)
                    rows.append(fields)
                start = reader.line_num + 1
    except csv.Error as e:
        raise ValueError(f"{path}: line {start} is not valid CSV ({e}): check its quotes") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: line {start} is not UTF-8 text ({e})") from None
    return numbers, rows


def _box_coordinate(path: Path, df: pd.DataFrame, col: str, lines: list[int]) -> pd.Series:
    """Column `col` as floats, refusing what cannot be a box in the 1024 px image."""
    text = df[col].str.strip()
    values = pd.to_numeric(text, errors="coerce")
    if col in ("x", "y"):
        bad, rule = ~((values >= 0) & (values < BBOX_IMAGE_SIZE)), f"a number from 0 to below {BBOX_IMAGE_SIZE}"
    else:  # NaN and inf fail these comparisons too
        bad, rule = ~((values > 0) & np.isfinite(values)), "a finite positive number"
    if bad.any():
        rows = np.flatnonzero(bad.to_numpy())[:ROWS_NAMED]
        named = ", ".join(f"line {lines[i]} ({df['image'].iat[i]}: {text.iat[i]!r})" for i in rows)
        raise ValueError(
            f"{path}: column {col} must be {rule} (pixels of the {BBOX_IMAGE_SIZE} px image): {named}; "
            "fix or remove those rows"
        )
    return values.astype(float)


def clip_boxes(df: pd.DataFrame, size: int) -> tuple[pd.DataFrame, int]:
    """Boxes (x, y, w, h) cut at the edges of the `size` px image, and how many had to be cut."""
    over = (df["x"] + df["w"] > size) | (df["y"] + df["h"] > size)
    df = df.assign(w=np.minimum(df["w"], size - df["x"]), h=np.minimum(df["h"], size - df["y"]))
    return df, int(over.sum())


def _lines(numbers: Iterable[int]) -> str:
    """'line 3' or 'lines 3, 7, 9 and 2 more'."""
    numbers = [int(n) for n in numbers]
    more = len(numbers) - ROWS_NAMED
    listed = ", ".join(map(str, numbers[:ROWS_NAMED])) + (f" and {more} more" if more > 0 else "")
    return f"line {listed}" if len(numbers) == 1 else f"lines {listed}"
