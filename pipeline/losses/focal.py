"""Focal loss (Lin et al., ICCV 2017) applied per pair of a multi-label problem.

    FL_ic = alpha_t * (1 - p_t)^gamma * BCE(z_ic, y_ic),
    p_t = sigmoid(z) for a positive and 1 - sigmoid(z) for a negative,
    alpha_t = alpha for a positive and 1 - alpha for a negative (no alpha term when alpha is None).

Reduced by the mean over all B x C pairs (Lin et al. normalise a sum by the number of positive
anchors; the mean keeps the scale of mean BCE), so gamma = 0 with alpha = None is exactly
`F.binary_cross_entropy_with_logits(z, y)`. With `detach_modulation` the factor (1 - p_t)^gamma
is a weight, not a direction to move, as the dual-weighted loss treats its image weights: the
ablation compares the two weightings with that as the only difference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import PairLoss, pair_terms


class FocalLoss(PairLoss):
    """Sigmoid focal loss, mean over pairs.

    Args:
        gamma: focusing exponent (0 turns focusing off).
        alpha: weight of positives in [0, 1] (negatives get 1 - alpha), or None for none.
        detach_modulation: treat (1 - p_t)^gamma as a constant weight.
        separation_weight, separation_margin: the prototype term of `PairLoss`.
    """

    def __init__(
        self,
        *,
        gamma: float,
        alpha: float | None,
        detach_modulation: bool,
        separation_weight: float,
        separation_margin: float,
    ):
        super().__init__(num_classes=None, separation_weight=separation_weight, separation_margin=separation_margin)
        self.gamma = gamma
        self.alpha = alpha
        self.detach_modulation = detach_modulation

    def pair_losses(self, z: torch.Tensor, y: torch.Tensor, update: bool = False):
        pos = y > 0.5
        signed = torch.where(pos, z, -z)  # (B, C): large when the pair is right
        # (1 - p_t)^gamma in log space: finite value and gradient even where p_t == 1
        modulation = torch.exp(self.gamma * F.logsigmoid(-signed))  # (B, C)
        if self.detach_modulation:
            modulation = modulation.detach()
        loss = modulation * pair_terms(z, y)
        if self.alpha is not None:
            loss = loss * torch.where(pos, self.alpha, 1.0 - self.alpha)
        return loss, {}
