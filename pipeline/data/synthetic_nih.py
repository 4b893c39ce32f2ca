"""NIH ChestX-ray14's shape for the synthetic source (`download.synthetic.shape: nih`).

The demo shape (pipeline.data.synthetic) draws a small dataset with NIH's prevalences on average.
This one reproduces the real dataset's bookkeeping exactly, so that every stage can be rehearsed
at the size it will meet (benchmarks/scale.py, docs/scale.md). At `num_images: 112120`:

- 30,805 patients; 17,503 of them with one image; images per patient median 1, 90th percentile 8,
  99th 35, max 184;
- train_val_list.txt 86,524 names of 28,008 patients, test_list.txt 25,596 of 2,797, no patient in
  both;
- per split, each class's positive image count as NIH's (DESIGN.md), and the findings-per-image
  counts (0: 60,361 ... 9: 2) over all images;
- 44,810 AP and 67,310 PA images; 63,340 male and 48,780 female images; ages 0-95, mean about 47;
- a box file of about 984 boxes on about 880 test images in NIH's 8 boxed classes (the lesion
  drawn for a boxed finding is always visible; the boxes are read off the drawing).

Which classes an image has still comes from the demo's Gaussian copula (a shared illness factor,
the clinical pairs, and a patient's findings persisting across follow-ups): an image with k
findings takes the k classes whose latent value lies highest above a per-class offset, the offsets
being fitted until every class has its count, and the last few differences are settled by moving
single findings between classes within an image (each image keeps its k).

Below 112,120 images, whole patients are drawn at random from the full-size table until the
images reach `num_images`, test and train_val patients in NIH's proportion, so counts scale
roughly, not exactly. Everything is deterministic for a seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pipeline.classes import BBOX_LABELS, CLASSES, NUM_CLASSES, TOTAL_IMAGES

PATIENTS = 30_805
SINGLE_IMAGE_PATIENTS = 17_503
# (share of patients, images per patient) anchors of the real spread: median 1 (the singles),
# 90th percentile 8, 99th 35, max 184.
PERCENTILE_IMAGES = ((0.90, 8), (0.99, 35), (1.0, 184))
TEST_IMAGES = 25_596
TEST_PATIENTS = 2_797
# Findings per image over all 112,120 images: index k = images with k findings.
FINDINGS_PER_IMAGE = (60_361, 30_963, 14_306, 4_856, 1_247, 301, 67, 16, 1, 2)
# Positive images per class (CLASSES order) in each official list.
TRAIN_VAL_POSITIVES = (8_280, 1_707, 8_659, 13_782, 4_034, 4_708, 876, 2_637, 2_852, 1_378, 1_423, 1_251, 2_242, 141)
TEST_POSITIVES = (3_279, 1_069, 4_658, 6_112, 1_748, 1_623, 555, 2_665, 1_815, 925, 1_093, 435, 1_143, 86)
AP_IMAGES = 44_810
MALE_IMAGES = 63_340
MAX_AGE = 95
# NIH's box file: boxes per class (984 in all, on 880 images, all in the test list).
BOXES_PER_CLASS = {
    "Atelectasis": 180,
    "Cardiomegaly": 146,
    "Effusion": 153,
    "Infiltration": 123,
    "Mass": 85,
    "Nodule": 79,
    "Pneumonia": 120,
    "Pneumothorax": 98,
}
BOXED_IMAGES = 880

_IDX = {c: i for i, c in enumerate(CLASSES)}
assert set(BOXES_PER_CLASS) == set(BBOX_LABELS.values())


@dataclass
class NIHShape:
    """Per-image facts of the full-size table, or of a patient sample of it.

    Attributes:
        patient: (N,) 0-based patient index, images of one patient contiguous.
        followup: (N,) 0-based follow-up number.
        labels: (N, C) uint8 multi-hot in CLASSES order.
        age, gender, view: (N,) years, "M"/"F", "PA"/"AP".
        is_test: (N,) bool, the image is in test_list.txt.
        boxed: image index -> class indices whose lesion gets a box (always drawn visibly).
    """

    patient: np.ndarray
    followup: np.ndarray
    labels: np.ndarray
    age: np.ndarray
    gender: np.ndarray
    view: np.ndarray
    is_test: np.ndarray
    boxed: dict[int, tuple[int, ...]]


# ----------------------------------------------------------------------------- patients


def images_per_patient(rng: np.random.Generator) -> np.ndarray:
    """(PATIENTS,) images per patient, summing to TOTAL_IMAGES, with NIH's singles and percentiles."""
    multi = PATIENTS - SINGLE_IMAGE_PATIENTS
    need = TOTAL_IMAGES - SINGLE_IMAGE_PATIENTS  # images of the patients with two or more
    # The multi-image patients' quantile function through the real percentiles (as shares of these
    # patients): 2 at the start, 8 at the 90th, 35 at the 99th, 184 at the end. Within a segment
    # from a to b it runs a * (b / a) ** (t ** g), t in [0, 1] the position in the segment; g > 1
    # keeps most patients near its lower end, and is bisected so that the images add up.
    # (an anchor sits a patient early, so that both neighbours of a percentile's position hold it)
    ps = np.array(
        [0.0] + [max(0.0, p * (PATIENTS - 1) - SINGLE_IMAGE_PATIENTS - 1) / multi for p, _ in PERCENTILE_IMAGES]
    )
    ps[-1] = 1.0
    ns = np.array([2.0] + [float(n) for _, n in PERCENTILE_IMAGES])
    u = (np.arange(multi) + 0.5) / multi
    seg = np.clip(np.searchsorted(ps, u, side="right") - 1, 0, len(ps) - 2)
    t = (u - ps[seg]) / (ps[seg + 1] - ps[seg])
    a, b = ns[seg], ns[seg + 1]

    def counts(g: float) -> np.ndarray:
        return np.rint(a * (b / a) ** (t**g)).astype(np.int64)

    lo, hi = 1.0, 50.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if counts(mid).sum() > need else (lo, mid)
    c = counts(hi)
    c[-1] = PERCENTILE_IMAGES[-1][1]  # the largest patient exactly
    # Settle the few images left by adding to (or taking from) patients strictly between the
    # anchors, so no percentile moves.
    inner = np.flatnonzero((c > 2) & (c < ns[1] - 1))
    short = need - int(c.sum())
    step = 1 if short > 0 else -1
    for j in rng.permutation(inner)[: abs(short)]:
        c[j] += step
    if c.sum() != need:
        raise RuntimeError(f"images per patient: {c.sum()} != {need}")
    out = np.concatenate([np.ones(SINGLE_IMAGE_PATIENTS, np.int64), c])
    return rng.permutation(out)


def pick_test_patients(counts: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(P,) bool: TEST_PATIENTS patients holding exactly TEST_IMAGES images.

    NIH's test patients have many follow-ups (about 9 images each against 3 in train_val): patients
    are drawn with weight counts**a, `a` bisected so the images come near the target, and the rest is
    settled by swapping a test patient for a train_val one of the right size.
    """
    keys_u = rng.random(len(counts))
    logc = np.log(counts)

    def draw(a: float) -> np.ndarray:
        keys = np.log(keys_u) / np.exp(a * logc)  # Efraimidis-Spirakis: top-k of u^(1/w)
        return np.argsort(-keys)[:TEST_PATIENTS]

    lo, hi = 0.0, 4.0
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if counts[draw(mid)].sum() < TEST_IMAGES else (lo, mid)
    is_test = np.zeros(len(counts), bool)
    is_test[draw(lo)] = True
    for _ in range(10_000):
        diff = TEST_IMAGES - int(counts[is_test].sum())
        if diff == 0:
            return is_test
        # swap one test patient of size s for a train_val patient of size s + diff (or closest)
        tests = np.flatnonzero(is_test)
        out = tests[rng.integers(len(tests))]
        trains = np.flatnonzero(~is_test)
        wanted = counts[out] + diff
        gap = np.abs(counts[trains] - wanted)
        best = trains[gap == gap.min()]
        into = best[rng.integers(len(best))]
        if abs(TEST_IMAGES - (counts[is_test].sum() - counts[out] + counts[into])) < abs(diff):
            is_test[out], is_test[into] = False, True
    raise RuntimeError("could not settle the test split's image count")


# ----------------------------------------------------------------------------- labels


def findings_split(test_images: int, test_findings: int) -> np.ndarray:
    """(2, K) images with k findings in (train_val, test): NIH's totals per k, the test row tilted
    towards more findings until its images and findings match the test list's."""
    total = np.array(FINDINGS_PER_IMAGE, np.int64)
    k = np.arange(len(total))

    def test_row(r: float) -> np.ndarray:
        w = total * r**k
        return np.minimum(w / w.sum() * test_images, total)

    lo, hi = 0.1, 10.0
    for _ in range(80):
        mid = math.sqrt(lo * hi)
        row = test_row(mid)
        lo, hi = (mid, hi) if (row * k).sum() / row.sum() < test_findings / test_images else (lo, mid)
    row = np.floor(test_row(lo)).astype(np.int64)
    # integer settling: images first (to k = 1 and 2, which have room), then findings by moving an
    # image from k to k + 1 (one finding more) or back
    row[1] += test_images - row.sum()
    for _ in range(100_000):
        extra = test_findings - int((row * k).sum())
        if extra == 0:
            break
        step = 1 if extra > 0 else -1
        for j in range(len(k) - 1) if step > 0 else range(len(k) - 1, 0, -1):
            dst = j + step
            if row[j] > 0 and row[dst] < total[dst]:
                row[j] -= 1
                row[dst] += 1
                break
        else:
            raise RuntimeError("cannot split the findings-per-image counts between the lists")
    if row.min() < 0 or (total - row).min() < 0:
        raise RuntimeError("findings-per-image split out of range")
    return np.stack([total - row, row])


def assign_labels(latent: np.ndarray, findings: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """(n, C) multi-hot: image i takes findings[i] classes, class c has targets[c] images.

    Each image takes the classes with the highest `latent + offset`; the per-class offsets are
    fitted until the counts match, and what is left is settled by moving one finding of an image
    from a class with too many to one with too few (the image with the smallest loss of score).
    """
    n, c = latent.shape
    if int(findings.sum()) != int(targets.sum()):
        raise ValueError(f"findings ({findings.sum()}) and class counts ({targets.sum()}) differ")
    offset = np.zeros(c)
    has = findings > 0
    kth = np.clip(findings - 1, 0, c - 1)[:, None]

    def select(off: np.ndarray) -> np.ndarray:
        score = latent + off
        cut = np.take_along_axis(-np.sort(-score, axis=1), kth, axis=1)  # (n, 1) k-th highest
        return (score >= cut) & has[:, None]

    for _ in range(300):  # close enough for the settling below to be a few hundred moves
        counts = select(offset).sum(0)
        if np.abs(counts - targets).sum() <= 0.002 * targets.sum():
            break
        offset += 0.5 * (np.log(targets + 0.5) - np.log(counts + 0.5))
    labels = select(offset)
    if not np.array_equal(labels.sum(1), findings):  # ties at the cut (measure zero for normals)
        raise RuntimeError("findings per image did not come out as asked")
    score = latent + offset
    for _ in range(10_000):
        over = labels.sum(0) - targets
        if not over.any():
            return labels.astype(np.uint8)
        a, b = int(np.argmax(over)), int(np.argmin(over))
        movable = np.flatnonzero(labels[:, a] & ~labels[:, b])
        if movable.size == 0:
            raise RuntimeError(f"cannot move a finding from {CLASSES[a]} to {CLASSES[b]}")
        m = min(int(over[a]), int(-over[b]), movable.size)
        best = movable[np.argsort(score[movable, a] - score[movable, b])[:m]]
        labels[best, a], labels[best, b] = False, True
    raise RuntimeError("class counts did not settle")


def _illness_findings(latent: np.ndarray, per_k: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(n,) findings per image: per_k[k] images with k, the iller (higher mean latent) the more."""
    order = np.argsort(-(latent.mean(1) + 0.3 * rng.standard_normal(len(latent))))
    findings = np.empty(len(latent), np.int64)
    findings[order] = np.repeat(np.arange(len(per_k))[::-1], per_k[::-1])
    return findings


# ----------------------------------------------------------------------------- the table


def full_table(seed: int, persistence: float) -> NIHShape:
    """All 112,120 images: patients, split, labels, demographics and the boxed findings."""
    from pipeline.data.synthetic import sample_latent

    rng = np.random.default_rng([seed, 10])
    counts = images_per_patient(rng)  # (P,)
    is_test_patient = pick_test_patients(counts, rng)
    patient = np.repeat(np.arange(PATIENTS), counts)
    followup = np.concatenate([np.arange(k) for k in counts])
    is_test = is_test_patient[patient]
    latent = sample_latent(TOTAL_IMAGES, rng, groups=patient, persistence=persistence)
    split_findings = findings_split(TEST_IMAGES, sum(TEST_POSITIVES))
    labels = np.zeros((TOTAL_IMAGES, NUM_CLASSES), np.uint8)
    for rows, per_k, targets in (
        (np.flatnonzero(~is_test), split_findings[0], TRAIN_VAL_POSITIVES),
        (np.flatnonzero(is_test), split_findings[1], TEST_POSITIVES),
    ):
        findings = _illness_findings(latent[rows], per_k, rng)
        labels[rows] = assign_labels(latent[rows], findings, np.array(targets))
    # demographics: age per patient (rising a little per follow-up), sex per patient settled to the
    # image count by flipping one-image patients, view by illness
    base_age = np.clip(rng.normal(44.0, 16.5, PATIENTS), 0, MAX_AGE)
    per_visit = rng.uniform(0, 0.5, PATIENTS)
    age = np.floor(np.clip(base_age[patient] + followup * per_visit[patient], 0, MAX_AGE)).astype(int)
    male = rng.random(PATIENTS) < MALE_IMAGES / TOTAL_IMAGES
    singles = rng.permutation(np.flatnonzero(counts == 1))
    short = MALE_IMAGES - int(counts[male].sum())
    flip = singles[(male[singles] if short < 0 else ~male[singles])][: abs(short)]
    male[flip] = ~male[flip]
    gender = np.where(male, "M", "F")[patient]
    ap_score = rng.random(TOTAL_IMAGES) + 0.35 * (labels.sum(1) > 0)
    view = np.full(TOTAL_IMAGES, "PA")
    view[np.argsort(-ap_score)[:AP_IMAGES]] = "AP"
    boxed = _boxed_findings(labels, is_test, rng)
    return NIHShape(patient, followup, labels, age, gender, view, is_test, boxed)


def _boxed_findings(labels: np.ndarray, is_test: np.ndarray, rng: np.random.Generator) -> dict[int, tuple[int, ...]]:
    """Test images and the boxed classes on each: BOXES_PER_CLASS findings, some images with two,
    about BOXED_IMAGES images in all."""
    boxed: dict[int, list[int]] = {}
    doubles = sum(BOXES_PER_CLASS.values()) - BOXED_IMAGES  # findings that share an image
    for cls, n in BOXES_PER_CLASS.items():
        c = _IDX[cls]
        pos = np.flatnonzero(is_test & (labels[:, c] == 1))
        pos = rng.permutation(pos)
        # share an image already boxed for another class, while doubles remain
        share = [i for i in pos if i in boxed][: min(doubles, n // 8)]
        doubles -= len(share)
        fresh = [i for i in pos if i not in boxed][: n - len(share)]
        for i in (*share, *fresh):
            boxed.setdefault(int(i), []).append(c)
    return {i: tuple(cs) for i, cs in sorted(boxed.items())}


def sample(table: NIHShape, num_images: int, seed: int) -> NIHShape:
    """Whole patients of `table`, drawn at random, until the images reach `num_images`: test and
    train_val patients each up to their share of it. The full table when num_images is its size."""
    n = len(table.patient)
    if num_images >= n:
        return table
    rng = np.random.default_rng([seed, 11])
    keep = np.zeros(n, bool)
    starts = np.flatnonzero(np.r_[True, table.patient[1:] != table.patient[:-1]])
    ends = np.r_[starts[1:], n]
    test_share = round(num_images * TEST_IMAGES / TOTAL_IMAGES)
    for want_test, budget in ((True, test_share), (False, num_images - test_share)):
        groups = [g for g in rng.permutation(len(starts)) if table.is_test[starts[g]] == want_test]
        taken = 0
        for g in groups:
            size = ends[g] - starts[g]
            if taken + size > budget:
                continue  # too big for what is left; a smaller patient may still fit
            keep[starts[g] : ends[g]] = True
            taken += size
            if taken == budget:
                break
    rows = np.flatnonzero(keep)
    # patients renumbered 0.. in their order, so names stay dense
    _, patient = np.unique(table.patient[rows], return_inverse=True)
    where = {int(r): j for j, r in enumerate(rows)}
    boxed = {where[i]: cs for i, cs in table.boxed.items() if i in where}
    return NIHShape(
        patient,
        table.followup[rows],
        table.labels[rows],
        table.age[rows],
        table.gender[rows],
        table.view[rows],
        table.is_test[rows],
        boxed,
    )
