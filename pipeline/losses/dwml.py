"""Dual-weighted metric loss (DWML) on distance logits.

This is the project's own formulation of the loss that Jin, Lu, Zhu and Huo describe in
"Deep learning based classification of multi-label chest X-ray images via dual-weighted metric
loss" (Comput Biol Med 2023;157:106683). Only the paper's abstract is public: it names a metric
space shared by image vectors and label (prototype) vectors and a loss weighted at the image level
and at the disease-category level. The equations below are ours, not the paper's.

B images, C classes, y in {0,1}^(B x C); n training images, n_c^+ of them positive for class c,
n_c^- = n - n_c^+. The model gives logits z_ic = k * (r_c - d_ic), d_ic = ||v_i - p_c||^2.

    pair term        l_ic = softplus(-z_ic) if y_ic = 1,  softplus(z_ic) if y_ic = 0
    category weight  w_c^+ = (n / n_c^+)^beta,  w_c^- = (n / n_c^-)^beta  (or Cui et al.'s
                     effective number), ONE shared normaliser
                         Z = 1 / (n C) * sum_c (n_c^+ w_c^+ + n_c^- w_c^-),   b = w / Z,
                     so b_c^+ / b_c^- = (n_c^- / n_c^+)^beta exactly and b averages 1 over the
                     training split's (image, class) pairs
    image weight     m_ic = (1 - q_ic)^g if y_ic = 1, q_ic^g if y_ic = 0, q = sigmoid(z);
                     a_ic = min(m_ic / mu_c^(y_ic), a_max), mu = running mean of m over the
                     (class, label) cell (all-reduced under DDP)
    separation       S = mean_{c < c'} relu(m_p - ||p_c - p_c'||^2)

    L = 1 / (B C) * sum_{i, c} b_c^(y_ic) * a_ic * l_ic  +  eta * S,   weights detached.

Why these normalisers. The category weights set each class's balance of positives against
negatives; normalising b^+ and b^- separately (as an earlier version did) multiplies every
b^+/b^- by one arbitrary constant, about 1/8 on NIH counts, which left 9 of 14 classes weighting
their positives *below* their negatives. The image weights only say which pairs of a cell are hard:
dividing by the cell's own mean keeps a class's balance, the loss scale and the loss-optimal
ranking unchanged (for fixed weights the optimal score of class c solves
p b^+ (1 - q)^(g+1) / mu^+ = (1 - p) b^- q^(g+1) / mu^-, monotone in p = P(y_c = 1 | x)).
Dividing a_ic by the image's positive and negative counts (`normalize_image`, off by default) also
balances every image, but makes the optimal odds p/(1-p) * E[1/|P| | y=1, x] / E[1/|N| | y=0, x]:
two images with the same P(y_c | x) then get different scores depending on how many other
findings they are likely to have, which changes the ranking AUC measures.

With g = 0 and beta = 0 (or both weightings off) L - eta * S is exactly
`F.binary_cross_entropy_with_logits(z, y)`, values and gradients.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from .base import PairLoss, counts_tensor, pair_terms

# Keys of the dict returned with return_terms=True; all but "loss" are detached.
TERMS = (
    "loss",  # the total, with its graph
    "pair",  # weighted pair term: mean of b * a * l
    "separation",  # S before eta (0 without prototypes)
    "bce",  # unweighted mean of l (equals mean BCE on z)
    "image_weight_pos",  # mean a over positive pairs
    "image_weight_neg",  # mean a over negative pairs
    "image_weight_capped",  # share of pairs whose a hit a_max
    "category_weight_pos",  # mean b over positive pairs
    "category_weight_neg",  # mean b over negative pairs
)


@torch.no_grad()
def modulation(z: torch.Tensor, y: torch.Tensor, gamma: float, normalize_image: bool = False) -> torch.Tensor:
    """Hardness m_ic of each pair: (1 - q)^g for a positive, q^g for a negative.

    Args:
        z: (B, C) logits.
        y: (B, C) labels in {0, 1}.
        gamma: focusing exponent g (0: every pair alike).
        normalize_image: also divide by the image's positive / negative count (rank-distorting:
            see the module docstring).

    Returns:
        (B, C) detached values in [0, 1] (before the image-count division).
    """
    pos = y > 0.5
    # 1 - q computed as sigmoid(-z) keeps precision for confident positives
    miss = torch.where(pos, torch.sigmoid(-z), torch.sigmoid(z))  # (B, C) in [0, 1]
    m = miss.pow(gamma)  # 0 ** 0 == 1, so gamma = 0 gives ones
    if normalize_image:
        n_pos = pos.sum(dim=1, keepdim=True).clamp_min(1)  # (B, 1)
        n_neg = (~pos).sum(dim=1, keepdim=True).clamp_min(1)  # (B, 1)
        m = m / torch.where(pos, n_pos, n_neg).to(m.dtype)
    return m


@torch.no_grad()
def cell_sums(m: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Sum and count of m in each (label, class) cell: (2, 2, C), [sum|count][negative|positive]."""
    pos = (y > 0.5).to(m.dtype)
    sums = torch.stack([(m * (1 - pos)).sum(0), (m * pos).sum(0)])  # (2, C)
    counts = torch.stack([(1 - pos).sum(0), pos.sum(0)])  # (2, C)
    return torch.stack([sums, counts])


@torch.no_grad()
def image_weights(m: torch.Tensor, y: torch.Tensor, cell_mean: torch.Tensor, cap: float) -> torch.Tensor:
    """Image-level weights a_ic = min(m_ic / mu_c^(y_ic), a_max).

    Args:
        m: (B, C) hardness from `modulation`.
        y: (B, C) labels in {0, 1}.
        cell_mean: (2, C) mean hardness of each cell, [negative, positive].
        cap: a_max, the most one pair may count relative to its cell's average.

    Returns:
        (B, C) detached weights; a cell whose every pair is exactly solved (mean 0) weighs 0.
    """
    mu = cell_mean.to(m.dtype).clamp_min(torch.finfo(m.dtype).tiny)  # (2, C), no 0 / 0
    mu_pair = torch.where(y > 0.5, mu[1], mu[0])  # (B, C)
    return (m / mu_pair).clamp_max(cap)


def category_weights(
    class_pos_counts: Sequence[int] | torch.Tensor,
    n: int,
    beta: float,
    effective_number: bool,
    max_ratio: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Category-level weights (b^+, b^-) from training-split counts, with one shared normaliser.

    b_c^+ / b_c^- = (n_c^- / n_c^+)^beta exactly (or the effective-number ratio), and
    sum_c (n_c^+ b_c^+ + n_c^- b_c^-) = n C: b averages 1 over the training pairs. A class with no
    training positives (or no negatives) counts as having one in the weights, so all are finite.

    Args:
        class_pos_counts: (C,) training images positive for each class, n_c^+.
        n: training images in all; n_c^- = n - n_c^+.
        beta: exponent of (n / n_c)^beta, or with `effective_number` the β in [0, 1) of
            (1 - β) / (1 - β^n_c); 0 gives ones either way.
        effective_number: use Cui et al.'s effective number of samples.
        max_ratio: cap on b_c^+ / b_c^- (and on b_c^- / b_c^+), or None for none.

    Returns:
        (b_pos, b_neg): two float64 (C,) tensors.
    """
    pos = counts_tensor(class_pos_counts, n)
    counts = torch.stack([pos, n - pos])  # (2, C): positives, negatives
    clamped = counts.clamp_min(1)
    if effective_number:
        # -expm1(c log beta) = 1 - beta^c without cancellation for beta close to 1
        w = (1.0 - beta) / -torch.expm1(clamped * torch.log(torch.tensor(beta, dtype=counts.dtype)))
    else:
        w = (n / clamped).pow(beta)
    if max_ratio is not None:
        # cap the ratio by lowering the heavier side of each class
        w = torch.stack([torch.minimum(w[0], w[1] * max_ratio), torch.minimum(w[1], w[0] * max_ratio)])
    z = (counts * w).sum() / (n * counts.shape[1])  # the one shared normaliser
    b = w / z
    return b[0], b[1]


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp_min(1)


class DualWeightedMetricLoss(PairLoss):
    """Dual-weighted metric loss; see the module docstring for the equations.

    Args:
        pos_counts: (C,) training images positive for each class (registered as a buffer).
        num_images: training images in all, n.
        gamma: image-level focusing exponent g.
        beta: category-level exponent (or effective-number β).
        image_weighting: apply a_ic (off: a = 1).
        category_weighting: apply b_c (off: b = 1).
        effective_number: category weights by Cui et al.'s effective number.
        normalize_image: divide the hardness by the image's positive / negative count
            (rank-distorting; off in every shipped config).
        image_weight_cap: a_max.
        image_weight_momentum: weight of the old value in the running cell means (0: this batch's
            means only).
        category_ratio_cap: cap on b^+/b^- per class, or None.
        separation_weight: eta; the separation term is added only when prototypes are passed.
        separation_margin: m_p.
    """

    def __init__(
        self,
        pos_counts: Sequence[int] | torch.Tensor,
        num_images: int,
        *,
        gamma: float,
        beta: float,
        image_weighting: bool,
        category_weighting: bool,
        effective_number: bool,
        normalize_image: bool,
        image_weight_cap: float,
        image_weight_momentum: float,
        category_ratio_cap: float | None,
        separation_weight: float,
        separation_margin: float,
    ):
        counts = counts_tensor(pos_counts, num_images)
        super().__init__(
            num_classes=counts.numel(), separation_weight=separation_weight, separation_margin=separation_margin
        )
        self.gamma = gamma
        self.beta = beta
        self.image_weighting = image_weighting
        self.category_weighting = category_weighting
        self.effective_number = effective_number
        self.normalize_image = normalize_image
        self.image_weight_cap = image_weight_cap
        self.momentum = image_weight_momentum
        b_pos, b_neg = category_weights(counts, num_images, beta, effective_number, category_ratio_cap)
        self.register_buffer("pos_counts", counts.float())  # (C,)
        self.register_buffer("num_images", torch.tensor(num_images))
        # float64 so a float64 forward is exact; cast to the compute dtype per call (C is small)
        self.register_buffer("category_weight_pos", b_pos)  # (C,)
        self.register_buffer("category_weight_neg", b_neg)  # (C,)
        # running mean hardness of each (label, class) cell, [negative, positive]; part of the
        # checkpoint so a resumed run weighs its next batch as the uninterrupted one would
        self.register_buffer("cell_mean", torch.ones(2, counts.numel(), dtype=torch.float64))
        self.register_buffer("cell_seen", torch.zeros(2, counts.numel(), dtype=torch.bool))

    def extra_repr(self) -> str:
        return (
            f"gamma={self.gamma}, beta={self.beta}, image_weighting={self.image_weighting}, "
            f"category_weighting={self.category_weighting}, effective_number={self.effective_number}, "
            f"normalize_image={self.normalize_image}, image_weight_cap={self.image_weight_cap}, "
            f"momentum={self.momentum}, separation_weight={self.separation_weight}, "
            f"separation_margin={self.separation_margin}"
        )

    @torch.no_grad()
    def update_cell_means(self, m: torch.Tensor, y: torch.Tensor) -> None:
        """Fold this batch's cell means into the running ones (summed over every DDP rank)."""
        stats = cell_sums(m.to(torch.float64), y)  # (2, 2, C)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(stats)
        sums, counts = stats
        present = counts > 0  # (2, C) cells with pairs in this batch
        batch_mean = sums / counts.clamp_min(1)
        # the first batch of a cell sets its mean; lerp keeps a constant hardness exactly constant
        new = torch.where(self.cell_seen, torch.lerp(batch_mean, self.cell_mean, self.momentum), batch_mean)
        self.cell_mean.copy_(torch.where(present, new, self.cell_mean))
        self.cell_seen |= present

    @torch.no_grad()
    def get_weights(self, z: torch.Tensor, y: torch.Tensor, update: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Detached image weights a (B, C) and category weights b (B, C) for these pairs.

        With `update` the batch is folded into the running cell means first; without it the
        running means are used where a cell has been seen, this batch's own means elsewhere.
        """
        if self.image_weighting:
            m = modulation(z, y, self.gamma, self.normalize_image)  # (B, C)
            if update:
                self.update_cell_means(m, y)
                mean = self.cell_mean
            else:
                sums, counts = cell_sums(m.to(torch.float64), y)
                mean = torch.where(self.cell_seen, self.cell_mean, sums / counts.clamp_min(1))
            a = image_weights(m, y, mean, self.image_weight_cap)
        else:
            a = torch.ones_like(z)
        if self.category_weighting:
            b_pos = self.category_weight_pos.to(z.dtype)  # (C,) broadcast over the batch
            b = torch.where(y > 0.5, b_pos, self.category_weight_neg.to(z.dtype))
        else:
            b = torch.ones_like(z)
        return a, b

    def pair_losses(self, z: torch.Tensor, y: torch.Tensor, update: bool = False):
        a, b = self.get_weights(z.detach(), y, update)  # (B, C) each, detached
        pos = y > 0.5
        terms = {
            "image_weight_pos": _masked_mean(a, pos),
            "image_weight_neg": _masked_mean(a, ~pos),
            "image_weight_capped": (a >= self.image_weight_cap).to(a.dtype).mean(),
            "category_weight_pos": _masked_mean(b, pos),
            "category_weight_neg": _masked_mean(b, ~pos),
        }
        return b * a * pair_terms(z, y), terms
