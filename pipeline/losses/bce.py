"""Binary cross-entropy baselines: plain and class-weighted (`pos_weight` from training counts)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import PairLoss, counts_tensor, loss_inputs, pair_terms

__all__ = ["BinaryCrossEntropy", "ClassWeightedBinaryCrossEntropy", "counts_tensor", "loss_inputs"]


class BinaryCrossEntropy(PairLoss):
    """Mean binary cross-entropy over all pairs: the BCE-head baseline.

    Args:
        separation_weight, separation_margin: the prototype term of `PairLoss`.
    """

    def __init__(self, *, separation_weight: float, separation_margin: float) -> None:
        super().__init__(num_classes=None, separation_weight=separation_weight, separation_margin=separation_margin)

    def pair_losses(self, z: torch.Tensor, y: torch.Tensor, update: bool = False):
        return pair_terms(z, y), {}  # (B, C)


class ClassWeightedBinaryCrossEntropy(PairLoss):
    """BCE with `pos_weight_c = n_c^- / n_c^+` from the training split, optionally capped.

    A class with no training positives (or no negatives) counts as having one, so the weight stays
    finite; the cap keeps a rare class (Hernia: ~1 in 500) from dominating the gradient.

    Args:
        pos_counts: (C,) training images positive for each class.
        num_images: training images in all.
        pos_weight_cap: upper bound on each pos_weight, or None for none.
        separation_weight, separation_margin: the prototype term of `PairLoss`.
    """

    def __init__(
        self,
        pos_counts: Sequence[int] | torch.Tensor,
        num_images: int,
        *,
        pos_weight_cap: float | None,
        separation_weight: float,
        separation_margin: float,
    ):
        counts = counts_tensor(pos_counts, num_images)
        super().__init__(
            num_classes=counts.numel(), separation_weight=separation_weight, separation_margin=separation_margin
        )
        pos_weight = (num_images - counts).clamp_min(1) / counts.clamp_min(1)  # (C,)
        if pos_weight_cap is not None:
            pos_weight = pos_weight.clamp_max(pos_weight_cap)
        self.register_buffer("pos_weight", pos_weight.float())

    def pair_losses(self, z: torch.Tensor, y: torch.Tensor, update: bool = False):
        weight = torch.where(y > 0.5, self.pos_weight.to(z.dtype), 1.0)  # (B, C)
        return weight * pair_terms(z, y), {}
