"""Does an image look like the ones the model was trained on? A reference saved at training time,
and a distance per image and per batch at prediction time.

A classifier answers for any input: a lateral film, a photograph, an inverted image or noise still
get 14 probabilities. Two summaries of the training data travel inside the model bundle (`best.pt`,
`ModelBundle.drift_reference`) and every prediction is measured against them:

- image statistics of the network's input (the centre crop in [0, 1]): mean, standard deviation,
  share of dark (< 0.05) and bright (> 0.95) pixels, the 5/25/50/75/95th percentiles and the
  mean absolute difference between neighbouring pixels (noise and photographs have far more fine
  texture than a film);
- the pooled backbone features (the vector the head reads), which move when the content is
  unlike anything the network saw.

Each is a Gaussian fitted on up to `max_images` training images: per-feature mean and scale, and
a Ledoit-Wolf shrunk covariance of the standardised features (well conditioned even with fewer
images than dimensions). An image's distance is its Mahalanobis distance from that Gaussian.

The thresholds come from images the weights never saw but that belong to the training
population: the validation split. The per-image threshold is the upper (1 - alarm_rate)
prediction bound of a log-normal fitted to the validation distances (Student's t with the number
of validation *patients* as the sample size: a patient's images are not independent, and a small
reference must not give a tight threshold), or the empirical quantile when that is further out
(the empirical quantile of a few hundred images does not reach 1 in 1,000, and distances have a
long right tail). A batch of n images is tested two ways per distance: the count k of images over
the per-image threshold (k or more happen by chance with the binomial tail, p = alarm_rate), and the
batch's mean log distance against the validation images' (Student's t, the validation patients
as the reference's sample size), which catches a batch that is shifted as a whole while each image
stays under the threshold. With the size rule's count that is up to five tests, and the batch is
flagged when one of them has a chance under alarm_rate / (the number of tests run): the whole
check keeps alarm_rate family-wise (Bonferroni). One odd image is an image warning, a batch of them
is a batch warning. Nothing is tuned on test images.

Distances are blind to what the resize to the network's input removes: a 1-pixel grey PNG, noise
at 1024 px (averaged to a flat grey) or a 10000 x 10 strip all become a smooth square that can sit
near the training images' statistics. So the size of the image as sent is checked by rule, against
the range of the training images' own sizes (the prepare step's manifest, `width` and `height`):
an image is flagged when its shorter side is under the smallest training image's shorter side
divided by `size_margin`, its longer side over the largest training image's longer side times
`size_margin`, or its aspect ratio (long side / short side) over the training images' largest
times `aspect_margin` (`SizeRange`). No training image is outside its own range, so the rule adds
no false alarms on the training population.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from ..config import DriftConfig
    from ..models import ModelBundle

STATISTICS = ("mean", "std", "dark", "bright", "q05", "q25", "q50", "q75", "q95", "edge")
DARK, BRIGHT = 0.05, 0.95
# a feature that never varied in training still gets this spread: otherwise any change is infinite
MIN_SCALE = 1e-3
KINDS = {"image": "image statistics", "embedding": "embedding"}


def image_statistics(images: torch.Tensor) -> np.ndarray:
    """Per-image intensity statistics (B, len(STATISTICS)) of network inputs (B, 1, H, W), uint8 or [0, 1]."""
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    flat = x.flatten(1)  # (B, H*W)
    quantiles = torch.quantile(flat, torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95]), dim=1).T  # (B, 5)
    vertical = (x[..., 1:, :] - x[..., :-1, :]).abs().flatten(1).mean(1)  # (B,)
    horizontal = (x[..., 1:] - x[..., :-1]).abs().flatten(1).mean(1)  # (B,)
    edge = vertical + horizontal
    stats = torch.cat(
        [
            flat.mean(1, keepdim=True),
            flat.std(1, keepdim=True),
            (flat < DARK).float().mean(1, keepdim=True),
            (flat > BRIGHT).float().mean(1, keepdim=True),
            quantiles,
            edge[:, None],
        ],
        dim=1,
    )
    return stats.double().cpu().numpy()


@dataclass(frozen=True)
class Gaussian:
    """A reference distribution of one feature vector: distances are Mahalanobis distances.

    Attributes:
        mean: (F,) feature means.
        scale: (F,) feature standard deviations (at least MIN_SCALE).
        precision: (F, F) inverse of the shrunk covariance of the standardised features.
    """

    mean: np.ndarray
    scale: np.ndarray
    precision: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray) -> Gaussian:
        """Fit on (N, F) features, N >= 2."""
        from sklearn.covariance import LedoitWolf

        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or len(x) < 2:
            raise ValueError(f"a drift reference needs at least 2 images of (N, F) features, got {x.shape}")
        mean = x.mean(axis=0)
        scale = np.maximum(x.std(axis=0), MIN_SCALE)
        cov = LedoitWolf().fit((x - mean) / scale).covariance_
        return cls(mean, scale, np.linalg.inv(cov))

    def distance(self, x: np.ndarray) -> np.ndarray:
        """Mahalanobis distances (N,) of features (N, F)."""
        u = (np.asarray(x, dtype=np.float64) - self.mean) / self.scale  # (N, F)
        return np.sqrt(np.maximum(np.einsum("nf,fg,ng->n", u, self.precision, u), 0.0))


def threshold(distances: np.ndarray, alarm_rate: float, samples: int | None = None) -> float:
    """Per-image threshold: the larger of the empirical (1 - alarm_rate) quantile of `distances`
    and the (1 - alarm_rate) upper prediction bound of a log-normal fitted to them,
    exp(mean + t_{1 - alarm_rate, m - 1} * sd * sqrt(1 + 1 / m)) of the log distances.

    Args:
        distances: (N,) reference distances.
        alarm_rate: the tail share.
        samples: m, the number of independent units among them (patients); N when None.
    """
    from scipy.stats import t

    d = np.asarray(distances, dtype=np.float64)
    empirical = float(np.quantile(d, 1.0 - alarm_rate))
    m = len(d) if samples is None else min(samples, len(d))
    if m < 2:
        return empirical
    logs = np.log(np.maximum(d, 1e-12))
    bound = t.ppf(1.0 - alarm_rate, df=m - 1) * logs.std(ddof=1) * math.sqrt(1.0 + 1.0 / m)
    return max(empirical, math.exp(logs.mean() + bound))


@dataclass(frozen=True)
class SizeRange:
    """The training images' own sizes (pixels, as stored, before the resize to the cache) and how
    far outside them an image may be before it is flagged.

    Attributes:
        min_side: the smallest shorter side among the training images.
        max_side: the largest longer side.
        max_aspect: the largest aspect ratio, long side / short side (1 for squares).
        size_margin: a side under min_side / size_margin or over max_side * size_margin is flagged.
        aspect_margin: an aspect ratio over max_aspect * aspect_margin is flagged.
    """

    min_side: int
    max_side: int
    max_aspect: float
    size_margin: float
    aspect_margin: float

    @classmethod
    def fit(cls, widths: np.ndarray, heights: np.ndarray, size_margin: float, aspect_margin: float) -> SizeRange:
        """The range of training images of sizes `widths` x `heights` (N,), N >= 1."""
        sides = np.stack([np.asarray(widths), np.asarray(heights)], axis=1).astype(np.int64)  # (N, 2)
        if len(sides) == 0 or sides.min() < 1:
            raise ValueError(f"a size range needs at least one image of positive size, got {len(sides)} images")
        short, long = sides.min(axis=1), sides.max(axis=1)
        return cls(
            int(short.min()), int(long.max()), float((long / short).max()), float(size_margin), float(aspect_margin)
        )

    @property
    def side_limits(self) -> tuple[float, float]:
        """(smallest, largest) side an image may have."""
        return self.min_side / self.size_margin, self.max_side * self.size_margin

    @property
    def aspect_limit(self) -> float:
        """The largest aspect ratio (long side / short side) an image may have."""
        return self.max_aspect * self.aspect_margin

    def outside(self, sizes: np.ndarray) -> np.ndarray:
        """(B,) True for the images of `sizes` (B, 2), (width, height), outside the limits; NaN rows
        (images that could not be decoded) are not."""
        sizes = np.asarray(sizes, dtype=np.float64).reshape(-1, 2)
        return np.array([bool(self.reasons(w, h)) for w, h in sizes], dtype=bool)

    def reasons(self, width: float, height: float) -> list[str]:
        """Why an image of `width` x `height` is outside the limits; empty when it is not (or the
        size is NaN: every comparison with NaN is false)."""
        short, long = min(width, height), max(width, height)
        lo, hi = self.side_limits
        out = []
        if short < lo or long > hi:
            out.append(
                f"size {width:.0f} x {height:.0f} px outside {lo:.0f}-{hi:.0f} px "
                f"(training images {self.min_side}-{self.max_side} px)"
            )
        if short > 0 and long / short > self.aspect_limit:
            aspect = long / short
            out.append(
                f"aspect ratio {aspect:.2f} > {self.aspect_limit:.2f} (training images at most {self.max_aspect:.2f})"
            )
        return out

    def describe(self) -> str:
        """The limits in words, for a batch warning."""
        lo, hi = self.side_limits
        return f"sides {lo:.0f}-{hi:.0f} px, aspect ratio up to {self.aspect_limit:.2f}"


@dataclass(frozen=True)
class Reference:
    """What the model bundle keeps of its training data, and the thresholds derived from it.

    Attributes:
        image / embedding: the training Gaussians of the image statistics and the pooled features.
        thresholds: per kind, the per-image distance threshold.
        val_means: per kind, the mean validation distance (for comparison with a batch's mean).
        alarm_rate: the tail share of in-distribution images a threshold lets through.
        train_images / val_images: how many images the Gaussians and the thresholds were fitted on.
        settings: the settings that made it (a changed setting makes it again).
        sizes: the training images' size range the rule holds images to; None in a reference saved
            before it existed (no size rule then).
        val_log: per kind, [mean, standard deviation, patients] of the validation images' log
            distances, for the batch mean test; None in a reference saved before it (no mean test).
    """

    image: Gaussian
    embedding: Gaussian
    thresholds: dict[str, float]
    val_means: dict[str, float]
    alarm_rate: float
    train_images: int
    val_images: int
    settings: dict[str, Any]
    sizes: SizeRange | None = None
    val_log: dict[str, list[float]] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Reference:
        sizes = data.get("sizes")
        return cls(
            **{
                **data,
                "image": Gaussian(**data["image"]),
                "embedding": Gaussian(**data["embedding"]),
                "sizes": None if sizes is None else SizeRange(**sizes),
            }
        )

    def distances(self, stats: np.ndarray, pooled: np.ndarray) -> dict[str, np.ndarray]:
        """Per kind, the distances (B,) of images with statistics (B, S) and pooled features (B, F)."""
        return {"image": self.image.distance(stats), "embedding": self.embedding.distance(pooled)}

    def image_warnings(self, distances: dict[str, np.ndarray], sizes: np.ndarray | None = None) -> list[str | None]:
        """One line per image naming each distance above its threshold and, with `sizes` (B, 2)
        (width, height), a size outside the training range; None for an image like the training images."""
        out: list[str | None] = []
        for i in range(len(distances["image"])):
            over = [
                f"{KINDS[k]} distance {distances[k][i]:.1f} > {self.thresholds[k]:.1f}"
                for k in KINDS
                if distances[k][i] > self.thresholds[k]
            ]
            if sizes is not None and self.sizes is not None:
                over += self.sizes.reasons(*np.asarray(sizes, dtype=np.float64)[i])
            out.append(f"unlike the training images: {'; '.join(over)}" if over else None)
        return out

    def batch_check(self, distances: dict[str, np.ndarray], sizes: np.ndarray | None = None) -> dict[str, Any]:
        """The batch tests, each with its chance among images like the training data:

        - per kind, how many images are over the per-image threshold (binomial, p = alarm_rate),
          and (with `val_log`, 2+ images) the batch's mean log distance against validation's
          ("mean_chance", one-sided Student's t);
        - with `sizes` (B, 2) (width, height), the count of images outside the size range ("size";
          alarm_rate bounds a training image's chance of that from above).

        `alpha_per_test` is alarm_rate over the number of tests run (family-wise, Bonferroni), and
        `warning` is one line naming each test whose chance is under it (else None)."""
        n = len(distances["image"])
        mean_tests = self.val_log is not None and n >= 2
        tests = 2 * len(KINDS) if mean_tests else len(KINDS)
        tests += int(sizes is not None and self.sizes is not None)
        alpha = self.alarm_rate / tests
        result: dict[str, Any] = {"images": n, "alarm_rate": self.alarm_rate, "tests": tests, "alpha_per_test": alpha}
        over = []
        if sizes is not None and self.sizes is not None:
            outside = int(self.sizes.outside(sizes).sum())
            result["size"] = {
                "limits": self.sizes.describe(),
                "images_outside": outside,
                "chance": self._chance(outside, n),
            }
            if result["size"]["chance"] < alpha:
                over.append(f"{outside} of {n} images outside the training images' sizes ({self.sizes.describe()})")
        for kind in KINDS:
            flagged = int(np.sum(distances[kind] > self.thresholds[kind]))
            chance = self._chance(flagged, n)
            mean = float(np.mean(distances[kind])) if n else None
            result[kind] = {
                "mean_distance": mean,
                "threshold": self.thresholds[kind],
                "images_over": flagged,
                "chance": chance,
            }
            if chance < alpha:
                over.append(
                    f"{flagged} of {n} images over the {KINDS[kind]} distance threshold {self.thresholds[kind]:.1f} "
                    f"(mean distance {mean:.1f}; chance {chance:.1e} for training-like images)"
                )
            if mean_tests:
                mean_chance = self._mean_chance(kind, distances[kind])
                result[kind]["mean_chance"] = mean_chance
                if mean_chance < alpha:
                    over.append(
                        f"mean {KINDS[kind]} distance {mean:.1f} over {n} images against {self.val_means[kind]:.1f} "
                        f"on validation (chance {mean_chance:.1e} for training-like images)"
                    )
        result["warning"] = f"batch unlike the training images: {'; '.join(over)}" if over else None
        return result

    def _mean_chance(self, kind: str, distances: np.ndarray) -> float:
        """P(a batch of training-like images has a mean log distance this high or higher): one-sided
        Student's t of the batch mean against the validation mean, with the validation patients as
        that mean's sample size."""
        from scipy.stats import t

        mu, sd, m = self.val_log[kind]
        logs = np.log(np.maximum(np.asarray(distances, dtype=np.float64), 1e-12))
        spread = max(sd, 1e-12) * math.sqrt(1.0 / len(logs) + 1.0 / max(m, 1))
        return float(t.sf((logs.mean() - mu) / spread, df=max(int(m) - 1, 1)))

    def _chance(self, flagged: int, n: int) -> float:
        """P(X >= flagged) for X ~ Binomial(n, alarm_rate): how often images like the training data
        would flag that many."""
        from scipy.stats import binom

        return float(binom.sf(flagged - 1, n, self.alarm_rate)) if flagged else 1.0


@torch.no_grad()
def features(model, images: torch.Tensor, device: torch.device) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One forward pass of a CxrNet: logits (B, C), pooled backbone features (B, F), and the image
    statistics (B, S) of the input batch (B, 1, H, W)."""
    x = images.to(device)
    pooled = model.backbone.forward_head(model.forward_features(x), pre_logits=True)  # (B, F)
    logits = model.head(pooled).logits  # (B, C)
    return logits.float().cpu().numpy(), pooled.float().cpu().numpy(), image_statistics(images)


def _collect(model, dataset, rows: np.ndarray, device, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Image statistics (N, S) and pooled features (N, F) of `dataset`'s `rows`."""
    stats, pooled = [], []
    for start in range(0, len(rows), batch_size):
        batch = torch.stack([dataset[int(i)][0] for i in rows[start : start + batch_size]])
        _, p, s = features(model, batch, device)
        stats.append(s)
        pooled.append(p)
    return np.concatenate(stats), np.concatenate(pooled)


def training_sizes(prepared_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """Widths and heights (N,) of the training split's images, as the prepare step recorded them."""
    import pandas as pd

    from ..data.layout import MANIFEST

    path = Path(prepared_dir) / MANIFEST
    manifest = pd.read_csv(path, usecols=lambda c: c in {"split", "width", "height"})
    if not {"width", "height"} <= set(manifest.columns):
        raise ValueError(
            f"{path} has no width and height columns (prepared before image sizes were recorded): "
            "rerun the prepare step"
        )
    train = manifest[manifest["split"] == "train"]
    return train["width"].to_numpy(), train["height"].to_numpy()


def fit_reference(
    model, prepared_dir: Path, crop_size: int, cfg: DriftConfig, seed: int, device, batch_size: int
) -> Reference:
    """The drift reference of a trained model: Gaussians on up to `cfg.max_images` random training
    images, thresholds from up to as many random validation images, both centre-cropped as
    evaluation and serving crop them, and the size range of all training images."""
    from ..data.dataset import CachedImageDataset

    model.eval()
    rng = np.random.default_rng(seed)
    fitted, patients = {}, {}
    for split in ("train", "val"):
        ds = CachedImageDataset(prepared_dir, split, crop_size, train=False)
        rows = np.sort(rng.permutation(len(ds))[: cfg.max_images])
        fitted[split] = _collect(model, ds, rows, device, batch_size)  # (stats (N, S), pooled (N, F))
        patients[split] = len(np.unique(ds.patients[rows]))
    image, embedding = Gaussian.fit(fitted["train"][0]), Gaussian.fit(fitted["train"][1])
    val = {"image": image.distance(fitted["val"][0]), "embedding": embedding.distance(fitted["val"][1])}
    logs = {k: np.log(np.maximum(d, 1e-12)) for k, d in val.items()}
    return Reference(
        image=image,
        embedding=embedding,
        thresholds={k: threshold(d, cfg.alarm_rate, patients["val"]) for k, d in val.items()},
        val_means={k: float(d.mean()) for k, d in val.items()},
        alarm_rate=cfg.alarm_rate,
        train_images=len(fitted["train"][0]),
        val_images=len(fitted["val"][0]),
        settings={**cfg.model_dump(), "seed": seed},
        sizes=SizeRange.fit(*training_sizes(prepared_dir), cfg.size_margin, cfg.aspect_margin),
        val_log={k: [float(v.mean()), float(v.std(ddof=1)), patients["val"]] for k, v in logs.items()},
    )


def attach_reference(
    bundle_path: Path, prepared_dir: Path, cfg: DriftConfig, seed: int, device, batch_size: int
) -> bool:
    """Add the drift reference to the model bundle at `bundle_path` unless it holds one made with
    these settings; True when the bundle was rewritten.

    Only a bundle without a reference, or with one from other settings or other code (this
    file's digest), is rewritten: a resumed finished training leaves `best.pt` byte for byte as it was.
    """
    from ..io import file_digest
    from ..models import ModelBundle, model_from_bundle

    bundle = ModelBundle.load(bundle_path)
    settings = {**cfg.model_dump(), "seed": seed, "code": file_digest(__file__)}
    if (bundle.drift_reference or {}).get("settings") == settings:
        return False
    model = model_from_bundle(bundle, device, source=str(bundle_path))
    ref = fit_reference(model, prepared_dir, bundle.crop_size, cfg, seed, device, batch_size)
    bundle.replace(drift_reference={**ref.to_dict(), "settings": settings}).save(bundle_path)
    return True


def from_bundle(bundle: ModelBundle) -> Reference | None:
    """The bundle's drift reference; None for a bundle trained before references were saved."""
    data = bundle.drift_reference
    return None if data is None else Reference.from_dict(data)
