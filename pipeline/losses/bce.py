"""Binary cross-entropy baselines: plain and class-weighted (`pos_weight` from training counts).

Every loss in `pipeline.losses` shares one call: `forward(logits, targets, prototypes=None,
return_terms=False)`, computes in float32 or wider whatever the autocast dtype, and reduces by the
mean over all B x C pairs, so each one equals `F.binary_cross_entropy_with_logits(z, y)` (mean
reduction) when its own knobs are neutral.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def loss_inputs(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and targets as float32 (or float64 if given) tensors of one shape.

    Half-precision logits from an autocast region lose the tails of softplus and sigmoid, so the
    loss is always computed at least in float32; float64 stays float64 for exact tests.

    Args:
        logits: (B, C) raw scores.
        targets: (B, C) multi-hot labels in {0, 1} (bool, int or float).

    Returns:
        (z, y): both (B, C) in the compute dtype.
    """
    if logits.ndim != 2 or logits.shape != targets.shape:
        raise ValueError(
            f"loss: logits {tuple(logits.shape)} and targets {tuple(targets.shape)} must both be "
            "(batch, classes); check the model head and the label columns of the manifest"
        )
    dtype = torch.promote_types(logits.dtype, torch.float32)
    return logits.to(dtype), targets.to(dtype)


def counts_tensor(pos_counts: Sequence[int] | torch.Tensor, num_images: int) -> torch.Tensor:
    """Per-class positive counts of the training split as a checked float64 (C,) tensor."""
    counts = torch.as_tensor(pos_counts, dtype=torch.float64).flatten()  # (C,)
    if counts.numel() == 0:
        raise ValueError("loss: pos_counts is empty; pass one training-positive count per class")
    if num_images <= 0:
        raise ValueError(f"loss: num_images is {num_images}; pass the training-split image count")
    if bool((counts < 0).any()) or bool((counts > num_images).any()):
        raise ValueError(
            f"loss: pos_counts {counts.tolist()} must lie in [0, num_images={num_images}]; "
            "take both from the same training split"
        )
    return counts


class BinaryCrossEntropy(nn.Module):
    """Mean binary cross-entropy over all pairs: the BCE-head baseline."""

    def forward(
        self,
        logits: torch.Tensor,
        targets: torch.Tensor,
        prototypes: torch.Tensor | None = None,
        return_terms: bool = False,
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """Mean BCE on the logits.

        Args:
            logits: (B, C).
            targets: (B, C) in {0, 1}.
            prototypes: ignored; accepted so every loss shares one call.
            return_terms: return {"loss", "bce"} instead of the scalar.
        """
        with torch.autocast(logits.device.type, enabled=False):
            z, y = loss_inputs(logits, targets)
            loss = F.binary_cross_entropy_with_logits(z, y)
        return {"loss": loss, "bce": loss.detach()} if return_terms else loss


class ClassWeightedBinaryCrossEntropy(nn.Module):
    """BCE with `pos_weight_c = n_c^- / n_c^+` from the training split, optionally capped.

    A class with no training positives (or no negatives) counts as having one, so the weight stays
    finite; the cap keeps a rare class (Hernia: ~1 in 500) from dominating the gradient.

    Args:
        pos_counts: (C,) training images positive for each class.
        num_images: training images in all.
        cap: upper bound on each pos_weight, or None for none.
    """

    def __init__(
        self,
        pos_counts: Sequence[int] | torch.Tensor,
        num_images: int,
        cap: float | None = None,
    ):
        super().__init__()
        counts = counts_tensor(pos_counts, num_images)
        pos_weight = (num_images - counts).clamp_min(1) / counts.clamp_min(1)  # (C,)
        if cap is not None:
            pos_weight = pos_weight.clamp_max(cap)
        self.register_buffer("pos_weight", pos_weight.float())

    def forward(
        self,
        logits: torch.Tensor,
        targets: torch.Tensor,
        prototypes: torch.Tensor | None = None,
        return_terms: bool = False,
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """Same call as `BinaryCrossEntropy.forward`; terms: {"loss", "bce"} (bce unweighted)."""
        with torch.autocast(logits.device.type, enabled=False):
            z, y = loss_inputs(logits, targets)
            if z.shape[1] != self.pos_weight.numel():
                raise ValueError(
                    f"loss: logits have {z.shape[1]} classes but pos_counts has "
                    f"{self.pos_weight.numel()}"
                )
            loss = F.binary_cross_entropy_with_logits(z, y, pos_weight=self.pos_weight.to(z.dtype))
            if not return_terms:
                return loss
            return {"loss": loss, "bce": F.binary_cross_entropy_with_logits(z, y).detach()}
