"""Dual-weighted metric loss (DWML) on distance logits.

This is the project's own formulation of the loss that Jin, Lu, Zhu and Huo describe in
"Deep learning based classification of multi-label chest X-ray images via dual-weighted metric
loss" (Comput Biol Med 2023;157:106683). Only the paper's abstract is public: it names a metric
space shared by image vectors and label (prototype) vectors and a loss weighted at the image level
and at the disease-category level. The equations below are ours, not the paper's.

B images, C classes, y in {0,1}^(B x C). The model gives unit image vectors v (B, D), unit
prototypes p (C, D) and logits z_ic = k * (r_c - d_ic) with d_ic = ||v_i - p_c||^2 in [0, 4].

    pair term        l_ic = softplus(-z_ic) if y_ic = 1 (pull inside the radius)
                            softplus(z_ic)  if y_ic = 0 (push outside)
    image weight     a_ic ∝ (1 - q_ic)^g / max(1, |P_i|)  if y_ic = 1,   q = sigmoid(z)
                            q_ic^g / max(1, |N_i|)        if y_ic = 0
                     scaled so the batch's B x C weights average 1
    category weight  b_c^+ = (n / n_c^+)^beta,  b_c^- = (n / n_c^-)^beta, each scaled to mean 1
                     over classes (counts from the training split); or the effective number
                     (1 - beta) / (1 - beta^(n_c)) of Cui et al. (CVPR 2019)
    separation       S = mean_{c < c'} relu(m_p - ||p_c - p_c'||^2)

    L = 1 / (B C) * sum_{i, c} b_c^(y_ic) * a_ic * l_ic  +  eta * S

Reduction: the mean over images *and* classes (DESIGN.md writes mean_i sum_c; the two differ by
the constant C). The mean is chosen so that with g = 0, beta = 0 and image normalisation off
(or both weightings off) L - eta * S is exactly `F.binary_cross_entropy_with_logits(z, y)` with
its default mean reduction, keeping one learning-rate scale across BCE and every ablation.
Weights are detached: they say how much each pair counts, not a direction to move.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .bce import counts_tensor, loss_inputs

# Keys of the dict returned with return_terms=True; all but "loss" are detached.
TERMS = (
    "loss",  # the total, with its graph
    "pair",  # weighted pair term: mean of b * a * l
    "separation",  # S before eta (0 without prototypes)
    "bce",  # unweighted mean of l (equals mean BCE on z)
    "image_weight_pos",  # mean a over positive pairs
    "image_weight_neg",  # mean a over negative pairs
    "category_weight_pos",  # mean b over positive pairs
    "category_weight_neg",  # mean b over negative pairs
)


def pair_terms(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-pair metric term: softplus(-z) for positives, softplus(z) for negatives.

    Args:
        z: (B, C) distance logits.
        y: (B, C) labels in {0, 1}.

    Returns:
        (B, C) non-negative terms; logaddexp keeps value and gradient exact for any finite z.
    """
    zero = z.new_zeros(())
    return torch.where(y > 0.5, torch.logaddexp(zero, -z), torch.logaddexp(zero, z))


@torch.no_grad()
def image_weights(
    z: torch.Tensor, y: torch.Tensor, gamma: float, normalize_image: bool = True
) -> torch.Tensor:
    """Image-level weights a_ic: focus on hard pairs and balance positives against negatives.

    Args:
        z: (B, C) logits.
        y: (B, C) labels in {0, 1}.
        gamma: focusing exponent g (0: every pair alike).
        normalize_image: divide by the image's positive / negative count, so each image's
            positives and its negatives carry equal total weight.

    Returns:
        (B, C) detached weights averaging 1 over the batch (all 0 only if every pair is
        exactly solved, e.g. saturated logits with gamma > 0).
    """
    pos = y > 0.5
    # 1 - q computed as sigmoid(-z) keeps precision for confident positives
    miss = torch.where(pos, torch.sigmoid(-z), torch.sigmoid(z))  # (B, C) in [0, 1]
    w = miss.pow(gamma)  # 0 ** 0 == 1, so gamma = 0 gives ones
    if normalize_image:
        n_pos = pos.sum(dim=1, keepdim=True).clamp_min(1)  # (B, 1)
        n_neg = (~pos).sum(dim=1, keepdim=True).clamp_min(1)  # (B, 1)
        w = w / torch.where(pos, n_pos, n_neg).to(w.dtype)
    # dividing by the mean (not multiplying by numel / sum) keeps ones exactly ones; clamping the
    # mean at `tiny` bounds every weight by B * C
    return w / w.mean().clamp_min(torch.finfo(w.dtype).tiny)


def category_weights(
    class_pos_counts: Sequence[int] | torch.Tensor,
    n: int,
    beta: float,
    effective_number: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Category-level weights (b^+, b^-) from training-split counts, each of mean 1 over classes.

    A class with no training positives (or no negatives) counts as having one, so every weight is
    finite.

    Args:
        class_pos_counts: (C,) training images positive for each class, n_c^+.
        n: training images in all; n_c^- = n - n_c^+.
        beta: exponent of (n / n_c)^beta, or with `effective_number` the β in [0, 1) of
            (1 - β) / (1 - β^n_c); 0 gives ones either way.
        effective_number: use Cui et al.'s effective number of samples.

    Returns:
        (b_pos, b_neg): two float64 (C,) tensors.
    """
    pos = counts_tensor(class_pos_counts, n)
    counts = torch.stack([pos, n - pos]).clamp_min(1)  # (2, C): positives, negatives
    if effective_number:
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"category_weights: effective-number beta is {beta}; use [0, 1)")
        # -expm1(c log beta) = 1 - beta^c without cancellation for beta close to 1
        w = (1.0 - beta) / -torch.expm1(counts * torch.log(torch.tensor(beta, dtype=counts.dtype)))
    else:
        w = (n / counts).pow(beta)
    w = w / w.mean(dim=1, keepdim=True)
    return w[0], w[1]


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


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp_min(1)


class DualWeightedMetricLoss(nn.Module):
    """Dual-weighted metric loss; see the module docstring for the equations.

    Args:
        pos_counts: (C,) training images positive for each class (registered as a buffer).
        num_images: training images in all, n.
        gamma: image-level focusing exponent g.
        beta: category-level exponent (or effective-number β).
        image_weighting: apply a_ic (off: a = 1).
        category_weighting: apply b_c (off: b = 1).
        effective_number: category weights by Cui et al.'s effective number.
        normalize_image: divide a_ic by the image's positive / negative count.
        separation_weight: eta; the separation term is added only when prototypes are passed.
        separation_margin: m_p.
    """

    def __init__(
        self,
        pos_counts: Sequence[int] | torch.Tensor,
        num_images: int,
        gamma: float = 1.0,
        beta: float = 0.5,
        image_weighting: bool = True,
        category_weighting: bool = True,
        effective_number: bool = False,
        normalize_image: bool = True,
        separation_weight: float = 0.1,
        separation_margin: float = 1.0,
    ):
        super().__init__()
        if gamma < 0 or beta < 0 or separation_weight < 0:
            raise ValueError(
                f"DualWeightedMetricLoss: gamma ({gamma}), beta ({beta}) and separation_weight "
                f"({separation_weight}) must be >= 0"
            )
        self.gamma = gamma
        self.beta = beta
        self.image_weighting = image_weighting
        self.category_weighting = category_weighting
        self.effective_number = effective_number
        self.normalize_image = normalize_image
        self.separation_weight = separation_weight
        self.separation_margin = separation_margin
        counts = counts_tensor(pos_counts, num_images)
        b_pos, b_neg = category_weights(counts, num_images, beta, effective_number)
        self.register_buffer("pos_counts", counts.float())  # (C,)
        self.register_buffer("num_images", torch.tensor(num_images))
        # float64 so a float64 forward is exact; cast to the compute dtype per call (C is small)
        self.register_buffer("category_weight_pos", b_pos)  # (C,)
        self.register_buffer("category_weight_neg", b_neg)  # (C,)

    def extra_repr(self) -> str:
        return (
            f"gamma={self.gamma}, beta={self.beta}, image_weighting={self.image_weighting}, "
            f"category_weighting={self.category_weighting}, "
            f"effective_number={self.effective_number}, normalize_image={self.normalize_image}, "
            f"separation_weight={self.separation_weight}, "
            f"separation_margin={self.separation_margin}"
        )

    def get_weights(self, z: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Detached image weights a (B, C) and category weights b (B, C) for these pairs."""
        if self.image_weighting:
            a = image_weights(z.detach(), y, self.gamma, self.normalize_image)
        else:
            a = torch.ones_like(z)
        if self.category_weighting:
            b_pos = self.category_weight_pos.to(z.dtype)  # (C,) broadcast over the batch
            b = torch.where(y > 0.5, b_pos, self.category_weight_neg.to(z.dtype))
        else:
            b = torch.ones_like(z)
        return a, b

    def forward(
        self,
        logits: torch.Tensor,
        targets: torch.Tensor,
        prototypes: torch.Tensor | None = None,
        return_terms: bool = False,
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """Loss of one batch.

        Args:
            logits: (B, C) distance logits z = k * (r - d).
            targets: (B, C) labels in {0, 1}.
            prototypes: (C, D) prototypes for the separation term, or None to leave it out
                (e.g. a linear head).
            return_terms: return a dict with the keys of `TERMS` instead of the scalar.
        """
        with torch.autocast(logits.device.type, enabled=False):
            z, y = loss_inputs(logits, targets)
            if z.shape[1] != self.pos_counts.numel():
                raise ValueError(
                    f"DualWeightedMetricLoss: logits have {z.shape[1]} classes but pos_counts "
                    f"has {self.pos_counts.numel()}; build the loss from the same class list"
                )
            per_pair = pair_terms(z, y)  # (B, C)
            a, b = self.get_weights(z, y)  # (B, C) each, detached
            pair = (b * a * per_pair).mean()
            loss = pair
            separation = z.new_zeros(())
            if prototypes is not None:
                separation = prototype_separation(prototypes.to(z.dtype), self.separation_margin)
                loss = loss + self.separation_weight * separation
            if not return_terms:
                return loss
            pos = y > 0.5
            return {
                "loss": loss,
                "pair": pair.detach(),
                "separation": separation.detach(),
                "bce": per_pair.detach().mean(),
                "image_weight_pos": _masked_mean(a, pos),
                "image_weight_neg": _masked_mean(a, ~pos),
                "category_weight_pos": _masked_mean(b, pos),
                "category_weight_neg": _masked_mean(b, ~pos),
            }
