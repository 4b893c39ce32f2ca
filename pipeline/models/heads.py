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
    def init_prior(self, prevalence: torch.Tensor) -> None:
        # at start d ~ 2 (random directions): choose r so that sigmoid(z) equals the class prior
        p = prevalence.clamp(1e-4, 1 - 1e-4)
        self.radius.copy_(2.0 + torch.logit(p) / self.scale)

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
    def init_prior(self, prevalence: torch.Tensor) -> None:
        self.fc.bias.copy_(torch.logit(prevalence.clamp(1e-4, 1 - 1e-4)))

    def forward(self, pooled: torch.Tensor) -> ModelOutput:
        return ModelOutput(logits=self.fc(pooled))  # (B, C)
