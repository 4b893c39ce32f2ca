"""A synthetic chest X-ray dataset in the exact NIH ChestX-ray14 layout, for demos and tests.

`generate(out_dir, cfg)` writes what the download step would fetch from NIH:

    out_dir/images/<patient:08d>_<followup:03d>.png    8-bit grayscale, cfg.image_size square
    out_dir/Data_Entry_2017_v2020.csv                  the real header and columns
    out_dir/train_val_list.txt, out_dir/test_list.txt  disjoint by patient, no trailing newline
    out_dir/BBox_List_2017.csv                         boxes around the drawn lesions, NIH's format

so every later step runs unchanged on it. Everything is deterministic for a seed.

Labels follow the real class prevalences and their co-occurrence through a Gaussian copula: each
image has a latent normal vector (C,) with a shared "illness" factor plus a few clinically known
pairs (effusion with atelectasis, mass with nodule, ...), thresholded per class at the normal
quantile of the real prevalence. The shared loading is tuned so that about 54% of the images are
"No Finding" and an abnormal image carries about 1.57 labels, as in the real 112,120 images.

Demographics follow the real label file's figures: each patient's age is drawn once, normal with
mean 47 and s.d. 17 years clipped to 1-92, and rises by up to 0.6 years per follow-up (so no age
exceeds 100); 56.5% of patients are male. The images do not depend on age or sex, so any AUC
difference between those subgroups on this data is chance. View does depend on the labels: an
abnormal image is filmed AP more often (about 40% AP overall, as in NIH), and AP magnifies the heart.

Images are drawn with numpy: a chest-like background (body, two lung fields, heart, spine, ribs,
per-patient size/position/brightness/rotation, noise) plus one localised pattern per disease with
random position and strength, some subtle and a few positives with no visible sign at all (the
real labels are text-mined and noisy), so a small CNN learns them without reaching AUC 1.0.
Patterns are at least a few pixels wide at 64 px, the demo cache size.

The box file holds, like NIH's, the eight classes NIH boxed, in 1024-pixel coordinates: one box
per connected region where a drawn lesion's own density reaches half its peak (for cardiomegaly,
the enlarged heart's outline). Boxes are read off the drawing and draw nothing: the images are
the same with or without them.
"""

from __future__ import annotations

import functools
import math
import os
import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline import io
from pipeline.classes import (
    BBOX_CSV,
    BBOX_IMAGE_SIZE,
    BBOX_LABELS,
    CLASS_COUNTS,
    CLASSES,
    LABEL_CSV_HEADER,
    LABEL_CSV_NAMES,
    LABEL_SEPARATOR,
    NO_FINDING,
    NUM_CLASSES,
    TEST_LIST,
    TOTAL_IMAGES,
    TRAIN_VAL_LIST,
    image_name,
)
from pipeline.config import SyntheticConfig
from pipeline.data.layout import RAW_IMAGES
from pipeline.progress import progress_bar

# Loading of every class on the shared latent "illness" factor. With the pairs below, 0.37 gives
# 53.8% all-negative images and 1.57 labels per abnormal image (real: 53.8% and 1.57).
ILLNESS_LOADING = 0.37

# Extra latent correlation for pairs that co-occur clinically (fluid, collapse and airspace
# disease travel together; masses and nodules are both "lumps").
LABEL_PAIRS: dict[tuple[str, str], float] = {
    ("Effusion", "Atelectasis"): 0.15,
    ("Effusion", "Infiltration"): 0.10,
    ("Edema", "Effusion"): 0.12,
    ("Pneumonia", "Infiltration"): 0.20,
    ("Consolidation", "Infiltration"): 0.10,
    ("Mass", "Nodule"): 0.20,
    ("Effusion", "Consolidation"): 0.10,
}

# Real pixel spacing of the 1024 px NIH images, in mm; a smaller image has coarser pixels.
NIH_PIXEL_SPACING = 0.143
NIH_IMAGE_SIZE = 1024

_IDX = {c: i for i, c in enumerate(CLASSES)}


# ----------------------------------------------------------------------------- labels


def real_prevalence() -> np.ndarray:
    """Share of the real images positive for each class, (C,) in CLASSES order."""
    return np.array([CLASS_COUNTS[c] / TOTAL_IMAGES for c in CLASSES])


def latent_correlation(loading: float = ILLNESS_LOADING) -> np.ndarray:
    """Correlation matrix (C, C) of the latent normal behind the labels."""
    corr = np.full((NUM_CLASSES, NUM_CLASSES), loading**2)
    for (a, b), rho in LABEL_PAIRS.items():
        corr[_IDX[a], _IDX[b]] += rho
        corr[_IDX[b], _IDX[a]] += rho
    np.fill_diagonal(corr, 1.0)
    return corr


@functools.lru_cache(maxsize=8)
def _copula(loading: float, min_prevalence: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    chol = np.linalg.cholesky(latent_correlation(loading))  # fails loudly if not positive definite
    quantile = statistics.NormalDist().inv_cdf
    # Each latent is N(0, 1), so the (1 - prevalence) quantile gives the real positive rate.
    prevalence = np.maximum(real_prevalence(), min_prevalence)
    thresholds = np.array([quantile(1.0 - p) for p in prevalence])  # (C,)
    return chol, thresholds


def sample_labels(
    n: int,
    rng: np.random.Generator,
    groups: np.ndarray | None = None,
    persistence: float = 0.0,
    loading: float = ILLNESS_LOADING,
    min_prevalence: float = 0.0,
) -> np.ndarray:
    """Draw multi-hot labels with the real prevalences and co-occurrence.

    Args:
        n: number of images.
        rng: numpy generator.
        groups: optional (n,) patient index per image; images of one patient share part of
            their latent vector, so findings persist across follow-ups.
        persistence: share of latent variance shared within a group, in [0, 1).
        loading: shared illness factor loading (sets how often an image is "No Finding").
        min_prevalence: floor on every class's share of images (the real share where higher).

    Returns:
        (n, C) uint8 multi-hot labels in CLASSES order.
    """
    return (sample_latent(n, rng, groups, persistence, loading, min_prevalence) > 0).astype(np.uint8)


def sample_latent(
    n: int,
    rng: np.random.Generator,
    groups: np.ndarray | None = None,
    persistence: float = 0.0,
    loading: float = ILLNESS_LOADING,
    min_prevalence: float = 0.0,
) -> np.ndarray:
    """The copula's latent values behind `sample_labels`, less each class's threshold: (n, C) float,
    positive where the class is present at the real prevalence. Arguments as `sample_labels`."""
    chol, thresholds = _copula(float(loading), float(min_prevalence))
    latent = rng.standard_normal((n, NUM_CLASSES)) @ chol.T  # (n, C) ~ N(0, corr)
    if groups is not None and persistence > 0:
        groups = np.asarray(groups)
        shared = rng.standard_normal((int(groups.max()) + 1, NUM_CLASSES)) @ chol.T  # (P, C)
        # A mix of two independent N(0, corr) draws with weights whose squares sum to 1 is again
        # N(0, corr): the marginal prevalences do not move.
        latent = math.sqrt(persistence) * shared[groups] + math.sqrt(1 - persistence) * latent
    return latent - thresholds


def finding_labels(labels: np.ndarray) -> str:
    """One row of multi-hot labels (C,) as NIH writes it: 'Effusion|Mass' or 'No Finding'."""
    names = [c for c, y in zip(CLASSES, labels) if y]
    return LABEL_SEPARATOR.join(names) if names else NO_FINDING


# ----------------------------------------------------------------------------- patients


def followup_counts(num_images: int, num_patients: int, rng: np.random.Generator) -> np.ndarray:
    """Images per patient (P,), each >= 1, summing exactly to num_images; skewed like NIH."""
    # Gamma(0.4) weights: most patients get one or two images, a few get many.
    weights = rng.gamma(0.4, size=num_patients)
    extra = rng.multinomial(num_images - num_patients, weights / weights.sum())
    return 1 + extra


def split_patients(counts: np.ndarray, test_fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Pick whole patients for the test list; (P,) bool, True = test.

    Takes patients in random order until their images come closest to test_fraction of all,
    keeping at least one patient on each side.
    """
    order = rng.permutation(len(counts))
    cum = np.cumsum(counts[order])[:-1]  # images in test if the first k+1 patients go there
    k = int(np.argmin(np.abs(cum - test_fraction * counts.sum()))) + 1
    is_test = np.zeros(len(counts), dtype=bool)
    is_test[order[:k]] = True
    return is_test


@dataclass
class Anatomy:
    """One patient's body as drawn: pose, proportions and exposure (image units: [-1, 1])."""

    cx: float = 0.0  # body centre offset
    cy: float = 0.0
    scale: float = 1.0  # > 1 means a bigger patient on the detector
    angle: float = 0.0  # rotation in radians
    lung_w: float = 1.0  # relative lung width
    lung_h: float = 1.0  # relative lung height
    heart_w: float = 0.27  # heart half-width
    body_w: float = 0.92  # body half-width
    brightness: float = 0.0
    contrast: float = 1.0
    rib_period: float = 0.18
    rib_phase: float = 0.0


def sample_anatomy(rng: np.random.Generator) -> Anatomy:
    """A random patient body."""
    return Anatomy(
        cx=rng.normal(0, 0.03),
        cy=rng.normal(0, 0.03),
        scale=rng.uniform(0.9, 1.04),
        angle=rng.normal(0, 0.04),
        lung_w=rng.uniform(0.9, 1.08),
        lung_h=rng.uniform(0.9, 1.06),
        heart_w=rng.uniform(0.24, 0.29),
        body_w=rng.uniform(0.86, 0.98),
        brightness=rng.normal(0, 0.04),
        contrast=rng.uniform(0.85, 1.1),
        rib_period=rng.uniform(0.16, 0.2),
        rib_phase=rng.uniform(0, 2 * np.pi),
    )


# ----------------------------------------------------------------------------- pixels


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 + 0.5 * np.tanh(0.5 * x)  # no overflow warnings, unlike 1 / (1 + exp(-x))


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel centres in [-1, 1]: x across (1, S), y down (S, 1)."""
    t = ((np.arange(size, dtype=np.float32) + 0.5) / size) * 2 - 1
    return t[None, :], t[:, None]


@functools.lru_cache(maxsize=32)
def _upsampler(size: int, cells: int) -> np.ndarray:
    """Bilinear interpolation matrix (S, cells): field = A @ G @ A.T for a (cells, cells) grid G."""
    pos = (np.arange(size) + 0.5) / size * (cells - 1)
    columns = [np.interp(pos, np.arange(cells), np.eye(cells)[j]) for j in range(cells)]
    return np.stack(columns, 1).astype(np.float32)


def _smooth_field(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth zero-mean noise (S, S), std 0.6..1, with `cells` control points per side."""
    a = _upsampler(size, cells)
    return a @ rng.standard_normal((cells, cells)).astype(np.float32) @ a.T


Array = np.ndarray


def _ellipse(
    u: Array, v: Array, cx: float, cy: float, ax: float | Array, ay: float, edge: float = 0.12
) -> tuple[Array, Array]:
    """Soft filled ellipse mask and its normalised radius^2 q (1 on the rim)."""
    q = ((u - cx) / ax) ** 2 + ((v - cy) / ay) ** 2
    return _sigmoid((1 - q) / edge * 4), q


def _blob(u: Array, v: Array, cx: float, cy: float, r: float, edge: float = 0.25) -> Array:
    """Soft disk of radius r; `edge` is the blur as a share of r."""
    d = np.sqrt((u - cx) ** 2 + (v - cy) ** 2)
    return _sigmoid((r - d) / (edge * r) * 4)


def _gauss(u: Array, v: Array, cx: float, cy: float, sx: float, sy: float) -> Array:
    return np.exp(-0.5 * (((u - cx) / sx) ** 2 + ((v - cy) / sy) ** 2))


def _rotated(u: Array, v: Array, cx: float, cy: float, angle: float) -> tuple[Array, Array]:
    """Coordinates relative to (cx, cy), turned by `angle` radians."""
    c, s = math.cos(angle), math.sin(angle)
    return c * (u - cx) + s * (v - cy), -s * (u - cx) + c * (v - cy)


class _Scene:
    """The pieces of one image under construction; diseases read and change them."""

    def __init__(self, size: int, anatomy: Anatomy, view: str, rng: np.random.Generator):
        x, y = _grid(size)
        jitter = rng.normal(0, 0.012, size=3).tolist()  # repositioning between follow-ups
        a = anatomy
        u, v = _rotated(x, y, a.cx + jitter[0], a.cy + jitter[1], a.angle + jitter[2])
        self.u, self.v = u / a.scale, v / a.scale  # (S, S) body coordinates, y down
        self.size, self.rng, self.anatomy = size, rng, a
        self.lung_w, self.lung_h = a.lung_w, a.lung_h
        # AP films magnify the heart a little: a real confounder for cardiomegaly.
        self.heart_w, self.heart_h = a.heart_w * (1.08 if view == "AP" else 1.0), 0.26
        self.lung_dark = 0.34
        self.add = np.zeros((size, size), np.float32)  # densities added anywhere (brighter)
        self.opacity = np.zeros((size, size), np.float32)  # 1 = lung air replaced by fluid/tissue
        self.pneumothorax = np.zeros((size, size), np.float32)  # air without lung markings
        self._lungs: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def lung_geometry(self, side: int) -> tuple[float, float, float, float]:
        """Centre and half-axes of one lung; side -1 = image left, +1 = image right."""
        ax, ay = 0.31 * self.lung_w, 0.68 * self.lung_h
        return side * (0.1 + ax), -0.78 + ay, ax, ay  # apex fixed; bigger lungs reach lower

    def lung(self, side: int) -> tuple[np.ndarray, np.ndarray]:
        """Soft mask (S, S) of one lung and its normalised radius^2 (1 on the pleura)."""
        if side not in self._lungs:  # anatomy changes run before anything reads a lung
            cx, cy, ax, ay = self.lung_geometry(side)
            # Lungs widen towards the base: scale the half-width with height.
            taper = 0.78 + 0.22 * np.clip((self.v - cy + ay) / (1.4 * ay), 0, 1)
            self._lungs[side] = _ellipse(self.u, self.v, cx, cy, ax * taper, ay)
        return self._lungs[side]

    def both_lungs(self) -> np.ndarray:
        return np.maximum(self.lung(-1)[0], self.lung(1)[0])

    def random_lung_point(self, v_lo: float = -0.6, v_hi: float = 0.6) -> tuple[float, float, int]:
        """A point well inside a random lung; v_lo..v_hi is the height range in half-axes."""
        side = int(self.rng.choice((-1, 1)))
        cx, cy, ax, ay = self.lung_geometry(side)
        t = self.rng.uniform(v_lo, v_hi)
        half = ax * 0.7 * math.sqrt(max(0.0, 1 - t * t))
        return cx + self.rng.uniform(-half, half), cy + t * ay, side

    def compose(self, noise: float) -> np.ndarray:
        """Background anatomy plus disease densities, exposure and noise, as uint8 (S, S)."""
        u, v, a, rng, size = self.u, self.v, self.anatomy, self.rng, self.size
        au = np.abs(u)
        bu, bv = np.abs(u / a.body_w), np.abs((v - 0.2) / 1.4)
        body = _sigmoid((1 - bu * bu * bu - bv * bv * bv) * 25)  # a rounded box
        heart, _ = _ellipse(u, v, 0.1, 0.34, self.heart_w, self.heart_h, edge=0.25)
        spine = _sigmoid((0.07 - au) * 60)
        lungs = self.both_lungs() * (1 - heart) * (1 - 0.7 * spine)  # heart and spine hide lung
        lungs = lungs * (1 - 0.25 * _sigmoid((v - 0.2) * 6))  # soft tissue over the bases
        lungs = lungs * (1 - np.clip(self.opacity, 0, 1))  # airspace disease: air -> tissue
        # Posterior ribs: curved bands sloping down laterally; clavicles: bands rising laterally.
        rib_v = v - 0.15 * au + 0.3 * u * u
        ribs = 0.5 + 0.5 * np.cos(2 * np.pi * rib_v / a.rib_period + a.rib_phase)
        t = np.clip((au - 0.08) / 0.6, 0, 1)
        clavicles = _sigmoid((0.035 - np.abs(v + 0.74 + 0.12 * t)) * 60)
        clavicles = clavicles * _sigmoid((0.72 - au) * 30)
        # Vessels: smooth texture, strongest at the hila, fading to the periphery.
        hila = _gauss(au, v, 0.2, -0.05, 0.08, 0.14)
        markings = _smooth_field(rng, size, 14) * (0.3 + _gauss(au, v, 0.2, -0.05, 0.3, 0.45))
        texture = (0.07 * ribs + 0.05 * markings + 0.12 * hila) * (1 - self.pneumothorax)
        img = 0.05 + 0.55 * body + 0.1 * spine * body + 0.12 * clavicles
        img = img - self.lung_dark * lungs + texture * lungs - 0.12 * self.pneumothorax * lungs
        img = img + self.add + 0.03 * _smooth_field(rng, size, 4)  # + uneven exposure
        img = a.contrast * img + a.brightness
        img = img + noise * rng.standard_normal((size, size), np.float32)
        return np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)


# One function per disease, `s` in (0, 1] its strength. Airspace disease and fluid fill the lung
# (scene.opacity: the air turns to soft tissue, so it never outshines the heart); lumps, lines and
# rims add density (scene.add); cardiomegaly and emphysema change the anatomy and run first.


def _cardiomegaly(sc: _Scene, s: float) -> None:
    sc.heart_w *= 1 + 0.55 * s
    sc.heart_h *= 1 + 0.15 * s


def _emphysema(sc: _Scene, s: float) -> None:
    sc.lung_w *= 1 + 0.1 * s
    sc.lung_h *= 1 + 0.12 * s  # flattened, lower diaphragm
    sc.lung_dark += 0.12 * s  # hyperlucent


def _atelectasis(sc: _Scene, s: float) -> None:
    cx, cy, side = sc.random_lung_point(0.2, 0.65)
    du, dv = _rotated(sc.u, sc.v, cx, cy, sc.rng.uniform(-0.4, 0.4))
    band, _ = _ellipse(du, dv, 0.0, 0.0, 0.2, 0.055, edge=0.3)
    sc.opacity += 0.9 * s * band * sc.lung(side)[0]


def _effusion(sc: _Scene, s: float) -> None:
    sides = (-1, 1) if sc.rng.random() < 0.3 else (int(sc.rng.choice((-1, 1))),)
    for side in sides:
        cx, cy, ax, ay = sc.lung_geometry(side)
        level = cy + ay * (0.55 - 0.45 * s * sc.rng.uniform(0.7, 1.0))
        # Meniscus: the fluid climbs the lateral chest wall.
        lateral = np.clip((side * (sc.u - cx) / ax + 1) / 2, 0, 1.2)  # 0 medial .. 1 lateral
        fluid = _sigmoid((sc.v - level + 0.4 * ay * lateral**2) * 40)
        sc.opacity += s * fluid * sc.lung(side)[0]


def _infiltration(sc: _Scene, s: float) -> None:
    cx, cy, side = sc.random_lung_point(-0.4, 0.5)
    patches = np.maximum(_smooth_field(sc.rng, sc.size, 9), 0)
    window = _gauss(sc.u, sc.v, cx, cy, 0.2, 0.28)
    sc.opacity += 0.65 * s * np.minimum(patches, 1.5) * window * sc.lung(side)[0]


def _mass(sc: _Scene, s: float) -> None:
    cx, cy, side = sc.random_lung_point(-0.6, 0.5)
    r = sc.rng.uniform(0.1, 0.16)
    sc.add += 0.32 * s * _blob(sc.u, sc.v, cx, cy, r, edge=0.3)


def _nodule(sc: _Scene, s: float) -> None:
    for _ in range(int(sc.rng.integers(1, 4))):
        cx, cy, _side = sc.random_lung_point(-0.7, 0.6)
        sc.add += 0.34 * s * _blob(sc.u, sc.v, cx, cy, sc.rng.uniform(0.045, 0.065), edge=0.4)


def _pneumonia(sc: _Scene, s: float) -> None:
    side = int(sc.rng.choice((-1, 1)))
    cx, cy, ax, ay = sc.lung_geometry(side)
    lower = sc.rng.random() < 0.7
    # A lobe: the part of the lung beyond an oblique fissure, lower or upper.
    edge_v = cy + sc.rng.uniform(-0.1, 0.2) * ay + 0.4 * side * (sc.u - cx) * (1 if lower else -1)
    lobe = _sigmoid((sc.v - edge_v) * 25 * (1 if lower else -1))
    texture = 0.75 + 0.25 * np.tanh(_smooth_field(sc.rng, sc.size, 8))
    sc.opacity += 0.8 * s * lobe * texture * sc.lung(side)[0]


def _pneumothorax(sc: _Scene, s: float) -> None:
    side = int(sc.rng.choice((-1, 1)))
    cx, cy, ax, ay = sc.lung_geometry(side)
    # The collapsed lung pulls away from the apex and lateral wall towards the hilum.
    shrink = 1 - 0.3 * s * sc.rng.uniform(0.7, 1.0)
    ccx, ccy = cx - side * ax * (1 - shrink), cy + ay * (1 - shrink)
    collapsed, _ = _ellipse(sc.u, sc.v, ccx, ccy, ax * shrink, ay * shrink)
    upper = _sigmoid((cy + 0.2 * ay - sc.v) * 20)
    sc.pneumothorax = np.maximum(sc.pneumothorax, sc.lung(side)[0] * (1 - collapsed) * upper)


def _consolidation(sc: _Scene, s: float) -> None:
    cx, cy, side = sc.random_lung_point(-0.3, 0.6)
    irregular = _sigmoid(_smooth_field(sc.rng, sc.size, 10) * 4 + 2)
    core = _gauss(sc.u, sc.v, cx, cy, 0.14, 0.16)
    sc.opacity += 1.1 * s * np.minimum(core * 1.6, 1) * irregular * sc.lung(side)[0]


def _edema(sc: _Scene, s: float) -> None:
    lungs = sc.both_lungs()
    hila = _gauss(sc.u, sc.v, -0.3, 0.02, 0.2, 0.28) + _gauss(sc.u, sc.v, 0.3, 0.02, 0.2, 0.28)
    sc.opacity += 0.7 * s * hila * lungs  # bilateral "bat wing" haze


def _fibrosis(sc: _Scene, s: float) -> None:
    warp = 0.07 * _smooth_field(sc.rng, sc.size, 8)
    period = 0.14
    lines_u = np.exp(-(np.sin(np.pi * (sc.u + warp) / period) ** 2) / 0.08)
    lines_v = np.exp(-(np.sin(np.pi * (sc.v - warp) / period) ** 2) / 0.08)
    mesh = np.maximum(lines_u, lines_v)
    lungs = sc.both_lungs()
    periphery = _sigmoid((np.abs(sc.u) - 0.35) * 15)  # fibrosis is peripheral and basal
    sc.add += 0.25 * s * mesh * lungs * periphery * (0.6 + 0.4 * _sigmoid(sc.v * 6))


def _pleural_thickening(sc: _Scene, s: float) -> None:
    side = int(sc.rng.choice((-1, 1)))
    cx, cy, ax, ay = sc.lung_geometry(side)
    _, q = sc.lung(side)
    r = np.sqrt(q)
    rim = _sigmoid((r - 0.74) * 40) * _sigmoid((1.02 - r) * 40)
    lateral = _sigmoid(side * (sc.u - cx) * 12) * _sigmoid((cy + 0.6 * ay - sc.v) * 10)
    sc.add += 0.36 * s * rim * lateral


def _hernia(sc: _Scene, s: float) -> None:
    cx, cy = sc.rng.normal(0, 0.05), 0.48 + sc.rng.normal(0, 0.04)
    r = sc.rng.uniform(0.1, 0.14)
    sac = _blob(sc.u, sc.v, cx, cy, r, edge=0.2)
    gas = _sigmoid((cy - 0.01 - sc.v) * 40)  # air-fluid level inside the herniated stomach
    sc.add += s * sac * (0.15 - 0.4 * gas)


_ANATOMY_CHANGES = {"Cardiomegaly": _cardiomegaly, "Emphysema": _emphysema}
_DENSITIES = {
    "Atelectasis": _atelectasis,
    "Effusion": _effusion,
    "Infiltration": _infiltration,
    "Mass": _mass,
    "Nodule": _nodule,
    "Pneumonia": _pneumonia,
    "Pneumothorax": _pneumothorax,
    "Consolidation": _consolidation,
    "Edema": _edema,
    "Fibrosis": _fibrosis,
    "Pleural_Thickening": _pleural_thickening,
    "Hernia": _hernia,
}
assert set(_ANATOMY_CHANGES) | set(_DENSITIES) == set(CLASSES)


def render_image(
    labels: np.ndarray,
    anatomy: Anatomy,
    rng: np.random.Generator,
    size: int = 128,
    view: str = "PA",
    invisible_fraction: float = 0.1,
    noise: float = 0.03,
) -> np.ndarray:
    """Draw one chest X-ray showing the positive labels.

    Args:
        labels: (C,) multi-hot in CLASSES order.
        anatomy: the patient's body.
        rng: numpy generator (positions, strengths and noise come from it).
        size: side in pixels.
        view: "PA" or "AP" (AP magnifies the heart a little, as in real films).
        invisible_fraction: chance that a positive label leaves no visible trace.
        noise: pixel noise standard deviation in [0, 1] intensity units.

    Returns:
        (size, size) uint8 image.
    """
    return render_with_boxes(labels, anatomy, rng, size, view, invisible_fraction, noise, boxed=())[0]


# The classes NIH drew boxes for, ours by name.
BOX_CLASSES = tuple(BBOX_LABELS.values())


def render_with_boxes(
    labels: np.ndarray,
    anatomy: Anatomy,
    rng: np.random.Generator,
    size: int = 128,
    view: str = "PA",
    invisible_fraction: float = 0.1,
    noise: float = 0.03,
    boxed: tuple[int, ...] | None = None,
) -> tuple[np.ndarray, list[tuple[str, tuple[int, int, int, int]]]]:
    """`render_image`'s image and the boxes (class, (x, y, w, h) in pixels) of its drawn lesions.

    Only the classes in BOX_CLASSES get boxes, and only when drawn (an invisible positive has none).
    `boxed`: box these class indices only, their lesions always drawn visibly (the NIH shape's
    chosen findings); () boxes nothing and skips the work. The pixels do not depend on the boxes.
    """
    sc = _Scene(size, anatomy, view, rng)
    drawn = rng.uniform(0.3, 1.0, NUM_CLASSES)
    strengths = drawn * (rng.random(NUM_CLASSES) >= invisible_fraction)
    if boxed:  # the same draws either way, so no other image's random stream moves
        strengths[list(boxed)] = drawn[list(boxed)]
    wanted = {_IDX[c] for c in BOX_CLASSES} if boxed is None else set(boxed)
    boxes: list[tuple[str, tuple[int, int, int, int]]] = []
    for table in (_ANATOMY_CHANGES, _DENSITIES):
        for cls, draw in table.items():
            i = _IDX[cls]
            if labels[i] and strengths[i] > 0:
                box_it = i in wanted and cls != "Cardiomegaly"
                before = _densities(sc) if box_it else None
                draw(sc, float(strengths[i]))
                if box_it:
                    boxes += [(cls, b) for b in _region_boxes(np.max(np.abs(_densities(sc) - before), axis=0))]
    if labels[_IDX["Cardiomegaly"]] and strengths[_IDX["Cardiomegaly"]] > 0 and _IDX["Cardiomegaly"] in wanted:
        heart, _ = _ellipse(sc.u, sc.v, 0.1, 0.34, sc.heart_w, sc.heart_h, edge=0.25)
        boxes += [("Cardiomegaly", b) for b in _region_boxes(heart)]
    return sc.compose(noise), boxes


def _densities(sc: _Scene) -> np.ndarray:
    """(3, S, S): what a disease drawing changes, added density, opacity and free air."""
    return np.stack([sc.add, sc.opacity, sc.pneumothorax])


def _region_boxes(field: np.ndarray) -> list[tuple[int, int, int, int]]:
    """(x, y, w, h) in pixels of each connected region where `field` (S, S) reaches half its peak."""
    from scipy import ndimage

    peak = float(field.max())
    if peak <= 0:
        return []
    regions, _ = ndimage.label(field >= 0.5 * peak)
    slices = ndimage.find_objects(regions)  # (rows, cols) per region
    return [(c.start, r.start, c.stop - c.start, r.stop - r.start) for r, c in slices]


def bbox_csv(rows: list[tuple[str, str, tuple[int, int, int, int]]], size: int) -> str:
    """NIH's BBox_List_2017.csv text for (image, class, (x, y, w, h) in pixels of `size`) rows."""
    to_nih = {ours: theirs for theirs, ours in BBOX_LABELS.items()}
    scale = BBOX_IMAGE_SIZE / size
    lines = ["Image Index,Finding Label,Bbox [x,y,w,h],,,"]
    for name, cls, box in rows:
        x, y, w, h = (v * scale for v in box)
        lines.append(f"{name},{to_nih[cls]},{x:g},{y:g},{w:g},{h:g},,,")
    return "\n".join(lines) + "\n"


def render_images(labels: np.ndarray, rng: np.random.Generator, size: int = 128, **kwargs) -> np.ndarray:
    """Draw (N, S, S) uint8 images for (N, C) labels, each with a fresh random patient."""
    return np.stack([render_image(y, sample_anatomy(rng), rng, size, **kwargs) for y in labels])


# ----------------------------------------------------------------------------- dataset


@dataclass
class _Metadata:
    """Per-image facts that go into the label file and the split lists."""

    patient: np.ndarray  # (N,) patient id, 1-based like NIH
    followup: np.ndarray  # (N,) 0-based follow-up number
    labels: np.ndarray  # (N, C) uint8
    age: np.ndarray  # (N,) years
    gender: np.ndarray  # (N,) "M" / "F"
    view: np.ndarray  # (N,) "PA" / "AP"
    is_test: np.ndarray  # (N,) bool
    # image index -> class indices to box (drawn visibly); None: box every drawn lesion (demo)
    boxed: dict[int, tuple[int, ...]] | None = None


def _metadata(cfg: SyntheticConfig) -> _Metadata:
    """The dataset's table in the configured shape."""
    if cfg.shape == "nih":
        from pipeline.data import synthetic_nih

        table = synthetic_nih.sample(synthetic_nih.full_table(cfg.seed, cfg.persistence), cfg.num_images, cfg.seed)
        return _Metadata(
            table.patient + 1,
            table.followup,
            table.labels,
            table.age,
            table.gender,
            table.view,
            table.is_test,
            table.boxed,
        )
    return _sample_metadata(cfg, np.random.default_rng([cfg.seed, 0]))


def _sample_metadata(cfg: SyntheticConfig, rng: np.random.Generator) -> _Metadata:
    """The demo shape: patients, follow-ups, labels, demographics and split for every image."""
    counts = followup_counts(cfg.num_images, cfg.num_patients, rng)  # (P,)
    pidx = np.repeat(np.arange(cfg.num_patients), counts)  # (N,) 0-based patient index
    followup = np.concatenate([np.arange(k) for k in counts])
    labels = sample_labels(
        cfg.num_images, rng, groups=pidx, persistence=cfg.persistence, min_prevalence=cfg.min_prevalence
    )
    base_age = np.clip(rng.normal(47, 17, cfg.num_patients), 1, 92)  # (P,)
    years_per_visit = rng.uniform(0, 0.6, cfg.num_patients)
    age = np.floor(np.clip(base_age[pidx] + followup * years_per_visit[pidx], 1, 100)).astype(int)
    gender = np.where(rng.random(cfg.num_patients) < 0.565, "M", "F")[pidx]
    # Sick patients are more often filmed supine at the bedside (AP): ~40% AP overall, as in NIH.
    p_ap = 0.32 + 0.18 * (labels.sum(1) > 0)
    view = np.where(rng.random(cfg.num_images) < p_ap, "AP", "PA")
    is_test = split_patients(counts, cfg.test_fraction, rng)[pidx]
    return _Metadata(pidx + 1, followup, labels, age, gender, view, is_test)


def _label_csv(meta: _Metadata, size: int) -> str:
    spacing = f"{NIH_PIXEL_SPACING * NIH_IMAGE_SIZE / size:.3f}"
    rows = [",".join(LABEL_CSV_HEADER)]
    for i in range(len(meta.patient)):
        rows.append(
            f"{image_name(meta.patient[i], meta.followup[i])},{finding_labels(meta.labels[i])},"
            f"{meta.followup[i]},{meta.patient[i]},{meta.age[i]},{meta.gender[i]},{meta.view[i]},"
            f"{size},{size},{spacing},{spacing}"
        )
    return "\n".join(rows) + "\n"


def _save_png(path: Path, image: np.ndarray) -> None:
    # Temp name + rename so a killed run never leaves a truncated PNG; no fsync per file, which
    # would dominate the cost of thousands of small images.
    fd, tmp = io.create_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            Image.fromarray(image).save(f, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _largest(boxes: list[tuple[str, tuple[int, int, int, int]]]) -> list[tuple[str, tuple[int, int, int, int]]]:
    """One box per class, its largest region's (the NIH shape: one box per boxed finding)."""
    best: dict[str, tuple[int, int, int, int]] = {}
    for cls, b in boxes:
        if cls not in best or b[2] * b[3] > best[cls][2] * best[cls][3]:
            best[cls] = b
    return list(best.items())


def _draw_range(
    out_dir: str,
    cfg: SyntheticConfig,
    items: list[tuple[str, np.ndarray, int, str, tuple[int, ...] | None]],
    start: int,
    patient_seeds: dict[int, np.random.SeedSequence],
) -> list[tuple[str, str, tuple[int, int, int, int]]]:
    """Draw and save images start.. of `items` (name, labels, patient, view, boxed); their boxes."""
    anatomies = {p: sample_anatomy(np.random.default_rng(seq)) for p, seq in patient_seeds.items()}
    boxes = []
    for k, (name, labels, patient, view, boxed) in enumerate(items):
        rng = np.random.default_rng([cfg.seed, 2, start + k])  # one stream per image: reproducible alone
        img, drawn = render_with_boxes(
            labels, anatomies[patient], rng, cfg.image_size, view, cfg.invisible_fraction, cfg.noise, boxed=boxed
        )
        _save_png(Path(out_dir) / RAW_IMAGES / name, img)
        if boxed is not None:
            drawn = _largest(drawn)
        boxes += [(name, cls, box) for cls, box in drawn]
    return boxes


# images per drawing task: progress and work spread in steps of a few seconds
_DRAW_CHUNK = 256


def generate(out_dir: Path, cfg: SyntheticConfig, progress: bool = True, workers: int = 1) -> dict:
    """Write a synthetic dataset in the NIH ChestX-ray14 layout under `out_dir`.

    Args:
        out_dir: destination; created if missing. Existing files of the same names are replaced.
        cfg: shape, sizes, seed and look.
        progress: show a progress bar while drawing images.
        workers: processes drawing images (the output is the same for any number).

    Returns:
        Summary: images, patients, per-split counts, "No Finding" and per-class image counts.
    """
    out_dir = Path(out_dir)
    images_dir = out_dir / RAW_IMAGES
    images_dir.mkdir(parents=True, exist_ok=True)
    # The label file is written last, so its presence means the dataset is complete.
    (out_dir / LABEL_CSV_NAMES[0]).unlink(missing_ok=True)
    meta = _metadata(cfg)
    patients = meta.patient - 1
    num_images, num_patients = len(patients), int(patients.max()) + 1
    patient_seeds = np.random.SeedSequence([cfg.seed, 1]).spawn(num_patients)
    names = [image_name(p, f) for p, f in zip(meta.patient, meta.followup)]
    items = [
        (
            names[i],
            meta.labels[i],
            int(patients[i]),
            str(meta.view[i]),
            None if meta.boxed is None else meta.boxed.get(i, ()),
        )
        for i in range(num_images)
    ]
    boxes: list[tuple[str, str, tuple[int, int, int, int]]] = []
    starts = range(0, num_images, _DRAW_CHUNK)

    def task(s: int) -> tuple:
        chunk = items[s : s + _DRAW_CHUNK]
        seeds = {p: patient_seeds[p] for p in {it[2] for it in chunk}}
        return (str(out_dir), cfg, chunk, s, seeds)

    bar = progress_bar(total=num_images, desc="synthetic images", unit="img", disable=not progress)
    try:
        if workers <= 1:
            for s in starts:
                boxes += _draw_range(*task(s))
                bar.update(min(_DRAW_CHUNK, num_images - s))
        else:
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(max_workers=workers) as pool:
                futures = [pool.submit(_draw_range, *task(s)) for s in starts]
                for s, fut in zip(starts, futures):  # in order: the box file's rows are too
                    boxes += fut.result()
                    bar.update(min(_DRAW_CHUNK, num_images - s))
    finally:
        bar.close()
    train_val = [n for n, t in zip(names, meta.is_test) if not t]
    test = [n for n, t in zip(names, meta.is_test) if t]
    io.write_text(out_dir / TRAIN_VAL_LIST, "\n".join(train_val))  # NIH: no trailing newline
    io.write_text(out_dir / TEST_LIST, "\n".join(test))
    io.write_text(out_dir / BBOX_CSV, bbox_csv(boxes, cfg.image_size))
    io.write_text(out_dir / LABEL_CSV_NAMES[0], _label_csv(meta, cfg.image_size))
    return {
        "shape": cfg.shape,
        "images": num_images,
        "patients": num_patients,
        "train_val_images": int((~meta.is_test).sum()),
        "test_images": int(meta.is_test.sum()),
        "test_patients": int(len(np.unique(patients[meta.is_test]))),
        "image_size": cfg.image_size,
        "no_finding": int((meta.labels.sum(1) == 0).sum()),
        "boxes": len(boxes),
        "boxed_images": len({b[0] for b in boxes}),
        "class_counts": {c: int(n) for c, n in zip(CLASSES, meta.labels.sum(0))},
    }
