"""Multi-label losses: the dual-weighted metric loss and its baselines, one family per file.

Every loss is an `nn.Module` called as `loss(logits, targets, prototypes=None,
return_terms=False)`; it computes in float32 (or wider) whatever the autocast dtype, reduces by the
mean over all B x C pairs, and with `return_terms=True` returns a dict holding "loss" (with its
graph) and detached terms for logging ("bce" always).

    cfg = build(LossConfig, params["train"]["loss"], where="train.loss")
    loss_fn = build_loss(cfg, pos_counts, num_images)   # counts from the training split

`ABLATIONS` names the variants the pipeline runs; `ablation_config(name)` turns one into a
`Variant`: a `LossConfig`, the model head ("linear" or "metric") and the prototype source ("text"
or "random") it goes with. `stationary_offsets(loss, logits, prevalence)` gives the per-class
logit shift at which a loss's expected gradient vanishes (the prior init of the heads).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, Sequence

from .asl import AsymmetricLoss
from .base import PairLoss, pair_terms, prototype_separation
from .bce import BinaryCrossEntropy, ClassWeightedBinaryCrossEntropy
from .dwml import TERMS, DualWeightedMetricLoss, category_weights, image_weights, modulation
from .focal import FocalLoss
from .prior import expected_gradient, stationary_offsets

LossName = Literal["dwml", "bce", "weighted_bce", "focal", "asl"]
Head = Literal["linear", "metric"]
PrototypeSource = Literal["text", "random"]


@dataclass
class LossConfig:
    """The `train.loss` section of params.yaml; defaults are the full dual-weighted loss.

    Attributes:
        name: which loss family.
        gamma: focusing exponent of the DWML image weights, and of the focal loss.
        beta: DWML category exponent; with `effective_number`, Cui et al.'s β in [0, 1)
            (0.999 to 0.9999 are the usual values there).
        image_weighting: DWML image-level weights on/off.
        category_weighting: DWML category-level weights on/off.
        effective_number: DWML category weights by effective number of samples.
        normalize_image: divide DWML image weights by each image's positive / negative count;
            off by default because it changes the loss-optimal ranking (see `dwml`).
        image_weight_cap: a_max, the most one DWML pair may weigh relative to its cell's mean.
        image_weight_momentum: momentum of the running cell means of the DWML image weights.
        category_ratio_cap: cap on the DWML b^+/b^- ratio of any class, or None for none.
        separation_weight: eta of the prototype separation term (metric head only).
        separation_margin: squared-distance margin m_p in [0, 4] between unit prototypes.
        focal_alpha: focal weight of positives in [0, 1], or None for none.
        asl_gamma_neg: ASL focusing exponent on negatives.
        asl_gamma_pos: ASL focusing exponent on positives.
        asl_clip: ASL probability shift m in [0, 1).
        pos_weight_cap: upper bound of weighted BCE's pos_weight, or None for none.
        detach_modulation: focal and ASL treat their focusing factors as constant weights, as
            DWML does its image weights.
    """

    name: LossName = "dwml"
    gamma: float = 1.0
    beta: float = 0.5
    image_weighting: bool = True
    category_weighting: bool = True
    effective_number: bool = False
    normalize_image: bool = False
    image_weight_cap: float = 10.0
    image_weight_momentum: float = 0.9
    category_ratio_cap: float | None = None
    separation_weight: float = 0.1
    separation_margin: float = 1.0
    focal_alpha: float | None = None
    asl_gamma_neg: float = 4.0
    asl_gamma_pos: float = 0.0
    asl_clip: float = 0.05
    pos_weight_cap: float | None = None
    detach_modulation: bool = False

    def validate(self) -> None:
        """Raise ValueError naming the first field out of range."""
        names = typing.get_args(LossName)
        if self.name not in names:
            raise ValueError(f"name is {self.name!r}; choose one of {', '.join(names)}")
        for key in ("gamma", "beta", "separation_weight", "asl_gamma_neg", "asl_gamma_pos"):
            value = getattr(self, key)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{key} is {value}; it must be a finite number >= 0")
        if self.effective_number and not self.beta < 1.0:
            raise ValueError(
                f"beta is {self.beta} with effective_number: true; the effective-number β must "
                "lie in [0, 1) (e.g. 0.999)"
            )
        if not 0.0 <= self.separation_margin <= 4.0:
            raise ValueError(
                f"separation_margin is {self.separation_margin}; squared distances between unit "
                "prototypes lie in [0, 4]"
            )
        if self.focal_alpha is not None and not 0.0 <= self.focal_alpha <= 1.0:
            raise ValueError(f"focal_alpha is {self.focal_alpha}; use [0, 1] or null")
        if not 0.0 <= self.asl_clip < 1.0:
            raise ValueError(f"asl_clip is {self.asl_clip}; use a value in [0, 1)")
        if not self.image_weight_cap >= 1.0:
            raise ValueError(f"image_weight_cap is {self.image_weight_cap}; use a number >= 1")
        if not 0.0 <= self.image_weight_momentum < 1.0:
            raise ValueError(f"image_weight_momentum is {self.image_weight_momentum}; use [0, 1)")
        if self.category_ratio_cap is not None and not self.category_ratio_cap >= 1.0:
            raise ValueError(f"category_ratio_cap is {self.category_ratio_cap}; use a number >= 1 or null")
        if self.pos_weight_cap is not None and not self.pos_weight_cap > 0:
            raise ValueError(f"pos_weight_cap is {self.pos_weight_cap}; use a number > 0 or null")


class Variant(NamedTuple):
    """One ablation variant: the loss, the model head and where the prototypes come from."""

    loss: LossConfig
    head: Head
    prototypes: PrototypeSource


# Variant name -> the LossConfig fields it overrides, plus "head" (the model head it trains) and
# optionally "prototypes". Each metric variant differs from `dual` only in what its name says: the
# same head, prototypes, separation term and detached weighting; focal and ASL run on the metric
# head with detached focusing, so the comparison is between weightings, not heads or gradients.
ABLATIONS: dict[str, dict[str, Any]] = {
    # the linear-classifier baseline: a plain BCE head, no metric space, no prototypes
    "bce_head": {"head": "linear", "name": "bce"},
    "metric_unweighted": {"head": "metric", "name": "dwml", "image_weighting": False, "category_weighting": False},
    "image_only": {"head": "metric", "name": "dwml", "image_weighting": True, "category_weighting": False},
    "category_only": {"head": "metric", "name": "dwml", "image_weighting": False, "category_weighting": True},
    "dual": {"head": "metric", "name": "dwml", "image_weighting": True, "category_weighting": True},
    # the paper's central claim: label-text prototypes against random ones, all else equal
    "dual_random_prototypes": {"head": "metric", "name": "dwml", "image_weighting": True,
                               "category_weighting": True, "prototypes": "random"},
    # Ridnik et al.'s multi-label setting: gamma_neg 4, gamma_pos 0, clip 0.05
    "asl": {"head": "metric", "name": "asl", "asl_gamma_neg": 4.0, "asl_gamma_pos": 0.0, "asl_clip": 0.05,
            "detach_modulation": True},
    # Lin et al.'s best setting: gamma 2, alpha 0.25
    "focal": {"head": "metric", "name": "focal", "gamma": 2.0, "focal_alpha": 0.25, "detach_modulation": True},
}


def ablation_config(variant: str, base: LossConfig | None = None) -> Variant:
    """The loss config, model head and prototype source of one `ABLATIONS` variant over `base`.

    Raises:
        ValueError: for an unknown variant, listing the known ones.
    """
    if variant not in ABLATIONS:
        raise ValueError(f"unknown ablation {variant!r}; choose one of {', '.join(ABLATIONS)}")
    overrides = dict(ABLATIONS[variant])
    head = overrides.pop("head")
    prototypes = overrides.pop("prototypes", "text")
    cfg = dataclasses.replace(base or LossConfig(), **overrides)
    cfg.validate()
    return Variant(cfg, head, prototypes)


def build_loss(cfg: LossConfig, pos_counts: Sequence[int], num_images: int) -> PairLoss:
    """The loss module `cfg` names.

    Args:
        cfg: the loss section.
        pos_counts: (C,) training images positive for each class, in `CLASSES` order.
        num_images: training images in all.
    """
    cfg.validate()
    # every family gets the same separation term: it acts only where prototypes are passed
    sep = dict(separation_weight=cfg.separation_weight, separation_margin=cfg.separation_margin)
    if cfg.name == "dwml":
        return DualWeightedMetricLoss(
            pos_counts,
            num_images,
            gamma=cfg.gamma,
            beta=cfg.beta,
            image_weighting=cfg.image_weighting,
            category_weighting=cfg.category_weighting,
            effective_number=cfg.effective_number,
            normalize_image=cfg.normalize_image,
            image_weight_cap=cfg.image_weight_cap,
            momentum=cfg.image_weight_momentum,
            category_ratio_cap=cfg.category_ratio_cap,
            **sep,
        )
    if cfg.name == "bce":
        return BinaryCrossEntropy(**sep)
    if cfg.name == "weighted_bce":
        return ClassWeightedBinaryCrossEntropy(pos_counts, num_images, cap=cfg.pos_weight_cap, **sep)
    if cfg.name == "focal":
        return FocalLoss(gamma=cfg.gamma, alpha=cfg.focal_alpha, detach_modulation=cfg.detach_modulation, **sep)
    return AsymmetricLoss(cfg.asl_gamma_neg, cfg.asl_gamma_pos, cfg.asl_clip, cfg.detach_modulation, **sep)


__all__ = [
    "ABLATIONS",
    "TERMS",
    "AsymmetricLoss",
    "BinaryCrossEntropy",
    "ClassWeightedBinaryCrossEntropy",
    "DualWeightedMetricLoss",
    "FocalLoss",
    "LossConfig",
    "PairLoss",
    "Variant",
    "ablation_config",
    "build_loss",
    "category_weights",
    "expected_gradient",
    "image_weights",
    "modulation",
    "pair_terms",
    "prototype_separation",
    "stationary_offsets",
]
