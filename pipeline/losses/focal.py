"""Focal loss (Lin et al., ICCV 2017) applied per pair of a multi-label problem.

    FL_ic = alpha_t * (1 - p_t)^gamma * BCE(z_ic, y_ic),
    p_t = sigmoid(z) for a positive and 1 - sigmoid(z) for a negative,
    alpha_t = alpha for a positive and 1 - alpha for a negative (no alpha term when alpha is None).

Reduced by the mean over all B x C pairs (Lin et al. normalise a sum by the number of positive
anchors; the mean keeps the scale of mean BCE), so gamma = 0 with alpha = None is exactly
`F.binary_cross_entropy_with_logits(z, y)`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .bce import loss_inputs


class FocalLoss(nn.Module):
    """Sigmoid focal loss, mean over pairs.

    Args:
        gamma: focusing exponent (0 turns focusing off).
        alpha: weight of positives in [0, 1] (negatives get 1 - alpha), or None for none.
    """

    def __init__(self, gamma: float = 2.0, alpha: float | None = 0.25):
        super().__init__()
        if gamma < 0:
            raise ValueError(f"FocalLoss: gamma is {gamma}; it must be >= 0")
        if alpha is not None and not 0.0 <= alpha <= 1.0:
            raise ValueError(f"FocalLoss: alpha is {alpha}; use a value in [0, 1] or None")
        self.gamma = gamma
        self.alpha = alpha

    def forward(
        self,
        logits: torch.Tensor,
        targets: torch.Tensor,
        prototypes: torch.Tensor | None = None,
        return_terms: bool = False,
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """Focal loss on the logits.

        Args:
            logits: (B, C).
            targets: (B, C) in {0, 1}.
            prototypes: ignored; accepted so every loss shares one call.
            return_terms: return {"loss", "bce"} instead of the scalar.
        """
        with torch.autocast(logits.device.type, enabled=False):
            z, y = loss_inputs(logits, targets)
            bce = F.binary_cross_entropy_with_logits(z, y, reduction="none")  # (B, C)
            pos = y > 0.5
            signed = torch.where(pos, z, -z)  # (B, C): large when the pair is right
            # (1 - p_t)^gamma in log space: finite value and gradient even where p_t == 1
            loss = torch.exp(self.gamma * F.logsigmoid(-signed)) * bce
            if self.alpha is not None:
                loss = loss * torch.where(pos, self.alpha, 1.0 - self.alpha)
            loss = loss.mean()
        return {"loss": loss, "bce": bce.detach().mean()} if return_terms else loss
