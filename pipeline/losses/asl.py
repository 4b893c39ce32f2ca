"""Asymmetric loss, ASL (Ridnik et al., ICCV 2021), for multi-label classification.

With p = sigmoid(z) and the shifted probability p_m = max(p - m, 0) for negatives:

    L+_ic = -(1 - p)^gamma_pos * log(p)           for a positive,
    L-_ic = -p_m^gamma_neg * log(1 - p_m)         for a negative.

Easy negatives are down-weighted by the focusing term and those with p < m are discarded by the
shift. The focusing weights keep their gradient, as in the paper, unless `detach_modulation`.

Reduction: unlike timm's `AsymmetricLossMultiLabel`, which returns the sum, this takes the mean
over all B x C pairs, so gamma_pos = gamma_neg = 0 with clip = 0 is exactly
`F.binary_cross_entropy_with_logits(z, y)` (mean reduction). Logs are taken in log space
(logsigmoid, log1p) instead of clamping p at an eps, so value and gradient stay exact and finite
for any finite logit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import PairLoss


class AsymmetricLoss(PairLoss):
    """ASL, mean over pairs.

    Args:
        gamma_neg: focusing exponent on negatives.
        gamma_pos: focusing exponent on positives.
        clip: probability margin m in [0, 1) shifted off the negatives (0 turns shifting off).
        detach_modulation: treat the focusing factors as constant weights (the ASL authors' code
            offers the same switch), as the dual-weighted loss treats its image weights.
        separation_weight, separation_margin: the prototype term of `PairLoss`.
    """

    def __init__(
        self,
        *,
        gamma_neg: float,
        gamma_pos: float,
        clip: float,
        detach_modulation: bool,
        separation_weight: float,
        separation_margin: float,
    ):
        super().__init__(num_classes=None, separation_weight=separation_weight, separation_margin=separation_margin)
        self.gamma_neg = gamma_neg
        self.gamma_pos = gamma_pos
        self.clip = clip
        self.detach_modulation = detach_modulation

    def _weight(self, w: torch.Tensor) -> torch.Tensor:
        return w.detach() if self.detach_modulation else w

    def pair_losses(self, z: torch.Tensor, y: torch.Tensor, update: bool = False):
        # positives: -(1 - p)^gamma_pos * log p, with (1 - p) = sigmoid(-z)
        log_not_p = F.logsigmoid(-z)  # (B, C) log(1 - p)
        loss_pos = -self._weight(torch.exp(self.gamma_pos * log_not_p)) * F.logsigmoid(z)
        # negatives: -p_m^gamma_neg * log(1 - p_m)
        if self.clip > 0:
            p_m = (torch.sigmoid(z) - self.clip).clamp_min(0)  # (B, C), <= 1 - clip
            log_not_p_m = torch.log1p(-p_m)
        else:
            p_m, log_not_p_m = torch.sigmoid(z), log_not_p
        # the clamp keeps 0^gamma's gradient finite; the log term is 0 there anyway
        tiny = torch.finfo(z.dtype).tiny
        loss_neg = -self._weight(p_m.clamp_min(tiny).pow(self.gamma_neg)) * log_not_p_m
        return torch.where(y > 0.5, loss_pos, loss_neg), {}
