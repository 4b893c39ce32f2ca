"""Multi-label losses: the dual-weighted metric loss and its baselines, one family per file.

Every loss is an `nn.Module` called as `loss(logits, targets, prototypes=None,
return_terms=False)`; it computes in float32 (or wider) whatever the autocast dtype, reduces by the
mean over all B x C pairs, and with `return_terms=True` returns a dict holding "loss" (with its
graph) and detached terms for logging ("bce" always).

    cfg = load_params("params.yaml").train.loss
    loss_fn = build_loss(cfg, pos_counts, num_images)   # counts from the training split

The ablation variants are settings, not code: conf/ablation/<name>.yaml, each laid over the train
section. `stationary_offsets(loss, logits, prevalence)` gives the per-class
logit shift at which a loss's expected gradient vanishes (the prior init of the heads).
"""

from __future__ import annotations

from collections.abc import Sequence

from ..config import LossConfig, LossName
from .asl import AsymmetricLoss
from .base import PairLoss, pair_terms, prototype_separation
from .bce import BinaryCrossEntropy, ClassWeightedBinaryCrossEntropy
from .dwml import TERMS, DualWeightedMetricLoss, category_weights, image_weights, modulation
from .focal import FocalLoss
from .prior import expected_gradient, stationary_offsets


def build_loss(cfg: LossConfig, pos_counts: Sequence[int], num_images: int) -> PairLoss:
    """The loss module `cfg.name` names, built from that family's section of `cfg` as it stands.

    Each family's constructor takes exactly its section's keys (keyword-only, no defaults), so the
    values come from params.yaml alone and a key added to a section reaches its loss or fails here.

    Args:
        cfg: the loss section.
        pos_counts: (C,) training images positive for each class, in `CLASSES` order.
        num_images: training images in all.
    """
    # every family gets the same separation term: it acts only where prototypes are passed
    sep = {"separation_weight": cfg.separation_weight, "separation_margin": cfg.separation_margin}
    if cfg.name == "bce":
        return BinaryCrossEntropy(**sep)
    family = {
        "dwml": DualWeightedMetricLoss,
        "weighted_bce": ClassWeightedBinaryCrossEntropy,
        "focal": FocalLoss,
        "asl": AsymmetricLoss,
    }[cfg.name]
    settings = getattr(cfg, cfg.name).model_dump()
    if family in (DualWeightedMetricLoss, ClassWeightedBinaryCrossEntropy):  # per-class state
        return family(pos_counts, num_images, **settings, **sep)
    return family(**settings, **sep)


__all__ = [
    "TERMS",
    "AsymmetricLoss",
    "BinaryCrossEntropy",
    "ClassWeightedBinaryCrossEntropy",
    "DualWeightedMetricLoss",
    "FocalLoss",
    "LossConfig",
    "LossName",
    "PairLoss",
    "build_loss",
    "category_weights",
    "expected_gradient",
    "image_weights",
    "modulation",
    "pair_terms",
    "prototype_separation",
    "stationary_offsets",
]
