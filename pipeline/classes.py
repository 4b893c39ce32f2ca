"""ChestX-ray14 facts shared by every step: labels, their counts, files, and published results."""

from __future__ import annotations

# The canonical order every ChestX-ray14 paper reports; all (.., C) arrays use it.
CLASSES: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)
NUM_CLASSES = len(CLASSES)
NO_FINDING = "No Finding"
LABEL_SEPARATOR = "|"

# Image counts over all 112,120 images of the real dataset (NIH, Data_Entry_2017).
TOTAL_IMAGES = 112_120
NO_FINDING_COUNT = 60_361
CLASS_COUNTS: dict[str, int] = {
    "Atelectasis": 11_559,
    "Cardiomegaly": 2_776,
    "Effusion": 13_317,
    "Infiltration": 19_894,
    "Mass": 5_782,
    "Nodule": 6_331,
    "Pneumonia": 1_431,
    "Pneumothorax": 5_302,
    "Consolidation": 4_667,
    "Edema": 2_303,
    "Emphysema": 2_516,
    "Fibrosis": 1_686,
    "Pleural_Thickening": 3_385,
    "Hernia": 227,
}

# Both label files NIH publishes; the second column names differ only in the v2020 file's spacing.
LABEL_CSV_NAMES = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")
LABEL_CSV_HEADER = (
    "Image Index",
    "Finding Labels",
    "Follow-up #",
    "Patient ID",
    "Patient Age",
    "Patient Gender",
    "View Position",
    "OriginalImage[Width",
    "Height]",
    "OriginalImagePixelSpacing[x",
    "y]",
)
# The oldest plausible age in years: the 2017 label file has a few impossible ages above it (e.g. 414),
# which the v2020 file corrects (its ages run 0-95); they are counted, never binned.
MAX_AGE = 100
TRAIN_VAL_LIST = "train_val_list.txt"
TEST_LIST = "test_list.txt"

# NIH's optional box file, beside the label file: 984 boxes drawn by radiologists over 8 classes,
# header `Image Index,Finding Label,Bbox [x,y,w,h],,,` with x, y, w, h in four columns, in pixels
# of the 1024 x 1024 PNGs. It names Infiltration "Infiltrate".
BBOX_CSV = "BBox_List_2017.csv"
BBOX_CSV_HEADER = ("Image Index", "Finding Label", "Bbox [x", "y", "w", "h]")
BBOX_IMAGE_SIZE = 1024
BBOX_LABELS: dict[str, str] = {
    "Atelectasis": "Atelectasis",
    "Cardiomegaly": "Cardiomegaly",
    "Effusion": "Effusion",
    "Infiltrate": "Infiltration",
    "Mass": "Mass",
    "Nodule": "Nodule",
    "Pneumonia": "Pneumonia",
    "Pneumothorax": "Pneumothorax",
}  # the file's label -> ours

# Mean AUC on the official test split (DESIGN.md); CheXNet's random-split 0.841 is not comparable.
SEED_PAPER = "Jin et al. 2023, dual-weighted metric loss"  # the method this project implements
SEED_PAPER_AUC = 0.826
PUBLISHED: tuple[tuple[str, float], ...] = (
    ("Wang et al. 2017 (ResNet-50)", 0.745),
    ("Yao et al. 2018", 0.761),
    ("Baltruschat et al. 2019", 0.806),
    ("Guendel et al. 2018", 0.807),
    ("SwinCheX 2022", 0.810),
    ("Guan & Huang 2020", 0.816),
    ("Ma et al. 2019", 0.817),
    ("XProtoNet 2021", 0.822),
    (SEED_PAPER, SEED_PAPER_AUC),
    ("Xiao et al. 2023 (MAE ViT-B/16)", 0.830),
)


def readable_name(cls: str) -> str:
    """'Pleural_Thickening' -> 'pleural thickening' (the default text for a prototype)."""
    return cls.replace("_", " ").lower()


def image_name(patient: int, followup: int) -> str:
    """NIH file name of one image: `<patient:08d>_<followup:03d>.png`."""
    return f"{patient:08d}_{followup:03d}.png"
