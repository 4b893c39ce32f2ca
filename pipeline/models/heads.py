"""Heads on pooled backbone features: the metric (prototype) head and a linear baseline."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (B, C)
    embeddings: torch.Tensor | None = None  # (B, D) unit vectors
    prototypes: torch.Tensor | None = None  # (C, D) unit vectors


def mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))


def squared_distance(v: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """||v_i - p_c||^2 for unit vectors: 2 - 2 cos, in [0, 4]; (B, D), (C, D) -> (B, C)."""
    return (2.0 - 2.0 * v @ p.t()).clamp_(0.0, 4.0)


@torch.no_grad()
def prior_offset(logits: torch.Tensor, prevalence: torch.Tensor, iters: int = 50) -> torch.Tensor:
    """Per-class shift o with mean_i sigmoid(logits_ic + o_c) = prevalence_c, by bisection.

    Args:
        logits: (N, C) logits of some training images.
        prevalence: (C,) target mean scores in (0, 1).

    Returns:
        (C,) offsets. Matching the mean score, not the mean logit, matters when the logits of a
        class spread over several units: sigmoid is far from linear there.
    """
    target = torch.logit(prevalence)  # (C,)
    lo, hi = target - logits.max(0).values, target - logits.min(0).values  # bracket the root
    for _ in range(iters):
        mid = (lo + hi) / 2
        above = torch.sigmoid(logits + mid).mean(0) > prevalence  # (C,)
        hi, lo = torch.where(above, mid, hi), torch.where(above, lo, mid)
    return (lo + hi) / 2


class MetricHead(nn.Module):
    """Images and label texts in one metric space; the label vectors are the class prototypes.

    v = normalize(MLP_v(f)), p = normalize(MLP_t(s)), z_ic = k * (r_c - ||v_i - p_c||^2): an image
    is scored positive for class c when it lies inside the class's radius r_c around p_c.
    """

    def __init__(
        self,
        in_features: int,
        text_vectors: torch.Tensor,
        embed_dim: int = 128,
        hidden_dim: int = 512,
        init_scale: float = 8.0,
        learn_scale: bool = True,
    ) -> None:
        super().__init__()
        num_classes, text_dim = text_vectors.shape
        self.register_buffer("text_vectors", text_vectors.clone())  # (C, E), frozen encoder output
        self.visual_proj = mlp(in_features, hidden_dim, embed_dim)
        self.text_proj = mlp(text_dim, hidden_dim, embed_dim)
        # log-parametrised so that k stays > 0 whatever the optimiser does
        self.log_scale = nn.Parameter(torch.tensor(math.log(init_scale)), requires_grad=learn_scale)
        self.radius = nn.Parameter(torch.full((num_classes,), 2.0))  # (C,); d = 2 is "orthogonal"

    @property
    def scale(self) -> torch.Tensor:
        return self.log_scale.exp()

    def prototypes(self) -> torch.Tensor:
        return F.normalize(self.text_proj(self.text_vectors), dim=-1)  # (C, D)

    @torch.no_grad()
    def init_prior(self, prevalence: torch.Tensor, pooled: torch.Tensor | None = None) -> None:
        """Choose r so that the initial logit of class c is logit(prevalence_c).

        Args:
            prevalence: (C,) positive rates.
            pooled: (N, F) features of some training images: the radius is then set so that their
                mean score is the prior. Without them d is taken as 2 (random directions), which a
                small embed_dim misses by up to +-0.5 per class (several logits), as at init a
                class's distances to all image vectors share one offset.
        """
        p = prevalence.clamp(1e-4, 1 - 1e-4)
        if pooled is None:
            self.radius.copy_(2.0 + torch.logit(p) / self.scale)
            return
        self.radius.zero_()
        self.radius.copy_(prior_offset(self(pooled).logits, p) / self.scale)  # z = k * (r - d)

    def forward(self, pooled: torch.Tensor) -> ModelOutput:
        v = F.normalize(self.visual_proj(pooled), dim=-1)  # (B, D)
        p = self.prototypes()  # (C, D)
        d = squared_distance(v.float(), p.float())  # (B, C)
        logits = self.scale * (self.radius - d)  # (B, C)
        return ModelOutput(logits=logits, embeddings=v, prototypes=p)


class LinearHead(nn.Module):
    """The plain baseline: one linear layer to C logits, trained with BCE-family losses."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features, num_classes)

    @torch.no_grad()
    def init_prior(self, prevalence: torch.Tensor, pooled: torch.Tensor | None = None) -> None:
        """Bias so that the initial scores average `prevalence` (C,) over `pooled` (N, F) if given."""
        p = prevalence.clamp(1e-4, 1 - 1e-4)
        if pooled is None:
            self.fc.bias.copy_(torch.logit(p))
            return
        self.fc.bias.zero_()
        self.fc.bias.copy_(prior_offset(self.fc(pooled), p))

    def forward(self, pooled: torch.Tensor) -> ModelOutput:
        return ModelOutput(logits=self.fc(pooled))  # (B, C)
