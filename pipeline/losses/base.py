"""What every multi-label loss here shares: input checks, the prototype term and one `forward`.

A loss is a `PairLoss`: it says how much each (image, class) pair costs (`pair_losses`, (B, C),
its weights applied) and `forward` does the rest the same way for all of them: float32 or wider
whatever the autocast dtype, the mean over all B x C pairs, the prototype separation term when
prototypes are passed, and the terms dict for logging. Each family's neutral settings give exactly
`F.binary_cross_entropy_with_logits(z, y)` (mean reduction), so every ablation keeps one
learning-rate scale.
"""

from __future__ import annotations

from collections.abc import Sequence

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


def pair_terms(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-pair BCE on the logits: softplus(-z) for positives, softplus(z) for negatives.

    Args:
        z: (B, C) logits.
        y: (B, C) labels in {0, 1}.

    Returns:
        (B, C) non-negative terms; logaddexp keeps value and gradient exact for any finite z.
    """
    zero = z.new_zeros(())
    return torch.where(y > 0.5, torch.logaddexp(zero, -z), torch.logaddexp(zero, z))


def prototype_separation(p: torch.Tensor, margin: float) -> torch.Tensor:
    """Hinge on close prototype pairs: mean over c < c' of relu(m_p - ||p_c - p_c'||^2).

    Args:
        p: (C, D) prototypes.
        margin: m_p, the squared distance below which two prototypes are pushed apart
            (unit vectors: 2 is orthogonal, 4 antipodal).

    Returns:
        A scalar, 0 when C < 2.
    """
    c = p.shape[0]
    if c < 2:
        return p.sum() * 0.0  # keeps the graph and the dtype
    i, j = torch.triu_indices(c, c, offset=1, device=p.device)  # (C(C-1)/2,) each
    d = (p[i] - p[j]).pow(2).sum(dim=-1)  # squared differences: no sqrt, smooth at d = 0
    return F.relu(margin - d).mean()


class PairLoss(nn.Module):
    """Base of every loss: `pair_losses` says what a pair costs, `forward` reduces and logs.

    Every setting is keyword-only and has no default: a loss is built from its `train.loss`
    section (`pipeline.losses.build_loss`), where the values and their ranges live, validated once.

    Args:
        num_classes: C when the loss holds per-class state (checked against the logits), else None.
        separation_weight: eta of the prototype separation term, added when prototypes are passed.
        separation_margin: m_p of that term.
    """

    def __init__(self, *, num_classes: int | None, separation_weight: float, separation_margin: float) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.separation_weight = separation_weight
        self.separation_margin = separation_margin

    def pair_losses(
        self, z: torch.Tensor, y: torch.Tensor, update: bool = False
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Weighted per-pair losses of one batch.

        Args:
            z: (B, C) logits, float32 or float64.
            y: (B, C) labels in {0, 1}, same dtype.
            update: fold this batch into running statistics (training steps only).

        Returns:
            (B, C) weighted losses whose mean is the pair term, and detached extra terms to log.
        """
        raise NotImplementedError

    def forward(
        self,
        logits: torch.Tensor,
        targets: torch.Tensor,
        prototypes: torch.Tensor | None = None,
        return_terms: bool = False,
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """Loss of one batch.

        Args:
            logits: (B, C).
            targets: (B, C) labels in {0, 1}.
            prototypes: (C, D) prototypes for the separation term, or None to leave it out
                (e.g. a linear head).
            return_terms: return a dict with "loss" (with its graph), "pair", "separation", "bce"
                and the family's own terms, all but "loss" detached.
        """
        with torch.autocast(logits.device.type, enabled=False):
            z, y = loss_inputs(logits, targets)
            if self.num_classes is not None and z.shape[1] != self.num_classes:
                raise ValueError(
                    f"{type(self).__name__}: logits have {z.shape[1]} classes but pos_counts has "
                    f"{self.num_classes}; build the loss from the same class list"
                )
            per_pair, extra = self.pair_losses(z, y, update=self.training and torch.is_grad_enabled())
            pair = per_pair.mean()
            loss, separation = pair, z.new_zeros(())
            if prototypes is not None:
                separation = prototype_separation(prototypes.to(z.dtype), self.separation_margin)
                loss = loss + self.separation_weight * separation
            if not return_terms:
                return loss
            return {
                "loss": loss,
                "pair": pair.detach(),
                "separation": separation.detach(),
                "bce": pair_terms(z.detach(), y).mean(),
                **extra,
            }
