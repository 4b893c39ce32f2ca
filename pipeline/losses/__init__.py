"""Multi-label losses: the dual-weighted metric loss and its baselines, one family per file.

Every loss is an `nn.Module` called as `loss(logits, targets, prototypes=None,
return_terms=False)`; it computes in float32 (or wider) whatever the autocast dtype, reduces by the
mean over all B x C pairs, and with `return_terms=True` returns a dict holding "loss" (with its
graph) and detached terms for logging ("bce" always).

    cfg = load_params("params.yaml").train.loss
    loss_fn = build_loss(cfg, pos_counts, num_images)   # counts from the training split

`ABLATIONS` names the variants the pipeline runs; `ablation_config(name)` turns one into a
`Variant`: a `LossConfig`, the model head ("linear" or "metric") and the prototype source ("text"
or "random") it goes with. `stationary_offsets(loss, logits, prevalence)` gives the per-class
logit shift at which a loss's expected gradient vanishes (the prior init of the heads).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

from ..config import LossConfig, LossName
from .asl import AsymmetricLoss
from .base import PairLoss, pair_terms, prototype_separation
from .bce import BinaryCrossEntropy, ClassWeightedBinaryCrossEntropy
from .dwml import TERMS, DualWeightedMetricLoss, category_weights, image_weights, modulation
from .focal import FocalLoss
from .prior import expected_gradient, stationary_offsets

Head = Literal["linear", "metric"]
PrototypeSource = Literal["text", "random"]


class Variant(NamedTuple):
    """One ablation variant: the loss, the model head and where the prototypes come from."""

    loss: LossConfig
    head: Head
    prototypes: PrototypeSource


# Variant name -> the `train.loss` keys it sets (dotted, below `train.loss`), plus "head" (the
# model head it trains) and optionally "prototypes". Each metric variant differs from `dual` only in
# what its name says: the same head, prototypes, separation term and detached weighting; focal and
# ASL run on the metric head with detached focusing, so the comparison is between weightings, not
# heads or gradients.
ABLATIONS: dict[str, dict[str, Any]] = {
    # the linear-classifier baseline: a plain BCE head, no metric space, no prototypes
    "bce_head": {"head": "linear", "name": "bce"},
    "metric_unweighted": {
        "head": "metric",
        "name": "dwml",
        "dwml.image_weighting": False,
        "dwml.category_weighting": False,
    },
    "image_only": {"head": "metric", "name": "dwml", "dwml.image_weighting": True, "dwml.category_weighting": False},
    "category_only": {"head": "metric", "name": "dwml", "dwml.image_weighting": False, "dwml.category_weighting": True},
    "dual": {"head": "metric", "name": "dwml", "dwml.image_weighting": True, "dwml.category_weighting": True},
    # the paper's central claim: label-text prototypes against random ones, all else equal
    "dual_random_prototypes": {
        "head": "metric",
        "name": "dwml",
        "dwml.image_weighting": True,
        "dwml.category_weighting": True,
        "prototypes": "random",
    },
    # Ridnik et al.'s multi-label setting: gamma_neg 4, gamma_pos 0, clip 0.05
    "asl": {
        "head": "metric",
        "name": "asl",
        "asl.gamma_neg": 4.0,
        "asl.gamma_pos": 0.0,
        "asl.clip": 0.05,
        "asl.detach_modulation": True,
    },
    # Lin et al.'s best setting: gamma 2, alpha 0.25
    "focal": {
        "head": "metric",
        "name": "focal",
        "focal.gamma": 2.0,
        "focal.alpha": 0.25,
        "focal.detach_modulation": True,
    },
}


def ablation_config(variant: str, base: LossConfig) -> Variant:
    """The loss config, model head and prototype source of one `ABLATIONS` variant over `base`.

    Raises:
        ValueError: for an unknown variant, listing the known ones.
    """
    if variant not in ABLATIONS:
        raise ValueError(f"unknown ablation {variant!r}; choose one of {', '.join(ABLATIONS)}")
    overrides = dict(ABLATIONS[variant])
    head = overrides.pop("head")
    prototypes = overrides.pop("prototypes", "text")
    return Variant(base.replace(overrides), head, prototypes)


def build_loss(cfg: LossConfig, pos_counts: Sequence[int], num_images: int) -> PairLoss:
    """The loss module `cfg.name` names, with that family's settings.

    Args:
        cfg: the loss section.
        pos_counts: (C,) training images positive for each class, in `CLASSES` order.
        num_images: training images in all.
    """
    # every family gets the same separation term: it acts only where prototypes are passed
    sep = dict(separation_weight=cfg.separation_weight, separation_margin=cfg.separation_margin)
    if cfg.name == "dwml":
        d = cfg.dwml
        return DualWeightedMetricLoss(
            pos_counts,
            num_images,
            gamma=d.gamma,
            beta=d.beta,
            image_weighting=d.image_weighting,
            category_weighting=d.category_weighting,
            effective_number=d.effective_number,
            normalize_image=d.normalize_image,
            image_weight_cap=d.image_weight_cap,
            momentum=d.image_weight_momentum,
            category_ratio_cap=d.category_ratio_cap,
            **sep,
        )
    if cfg.name == "bce":
        return BinaryCrossEntropy(**sep)
    if cfg.name == "weighted_bce":
        return ClassWeightedBinaryCrossEntropy(pos_counts, num_images, cap=cfg.weighted_bce.pos_weight_cap, **sep)
    if cfg.name == "focal":
        f = cfg.focal
        return FocalLoss(gamma=f.gamma, alpha=f.alpha, detach_modulation=f.detach_modulation, **sep)
    a = cfg.asl
    return AsymmetricLoss(a.gamma_neg, a.gamma_pos, a.clip, a.detach_modulation, **sep)


__all__ = [
    "ABLATIONS",
    "TERMS",
    "AsymmetricLoss",
    "BinaryCrossEntropy",
    "ClassWeightedBinaryCrossEntropy",
    "DualWeightedMetricLoss",
    "FocalLoss",
    "LossConfig",
    "LossName",
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
