"""Heads on pooled backbone features: the metric (prototype) head and a linear baseline.

Both expose `shift_logits(o)`, a per-class offset added to every image's logit, which the prior
init uses to start each class where the training loss wants it (`pipeline.losses.prior`).
"""

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


PROJECTORS = ("mlp", "linear", "identity")


def projector(kind: str, in_dim: int, hidden: int, out_dim: int) -> tuple[nn.Module, int]:
    """The image projection in front of a head, and its output width.

    mlp: Linear-GELU-Linear to out_dim (the method's MLP_v); linear: one Linear to out_dim;
    identity: the pooled features as they are (width in_dim).
    """
    if kind == "mlp":
        return mlp(in_dim, hidden, out_dim), out_dim
    if kind == "linear":
        return nn.Linear(in_dim, out_dim), out_dim
    if kind == "identity":
        return nn.Identity(), in_dim
    raise ValueError(f"projector must be one of {', '.join(PROJECTORS)}, got {kind!r}")


def squared_distance(v: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """||v_i - p_c||^2 for unit vectors: 2 - 2 cos, in [0, 4]; (B, D), (C, D) -> (B, C)."""
    return (2.0 - 2.0 * v @ p.t()).clamp_(0.0, 4.0)


def centre_text_vectors(s: torch.Tensor) -> torch.Tensor:
    """s_bar = normalize(s - mean_c s): (C, E) -> (C, E).

    Sentence vectors of one encoder share a large common direction (BERT's mean-pooled vectors of
    any two label texts have cosine ~0.5-0.9); what tells the classes apart is what is left after
    removing it. One class has nothing to centre against and is only normalised.
    """
    if s.shape[0] > 1:
        s = s - s.mean(dim=0, keepdim=True)
    return F.normalize(s, dim=-1)


@torch.no_grad()
def isometric_weight(s_bar: torch.Tensor, out_dim: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A (out_dim, E) matrix W with orthonormal rows that preserves every inner product of s_bar.

    W = R B^T: B (E, k) is an orthonormal basis whose first columns span the rows of s_bar, R
    (out_dim, k) has orthonormal columns in a random orientation, k = min(out_dim, E). So
    <W s_a, W s_b> = <s_a, s_b> whenever out_dim >= rank(s_bar) (at most C - 1 after centring);
    below that W keeps the rank-out_dim best approximation (the top singular directions).
    """
    e = s_bar.shape[1]
    k = min(out_dim, e)
    _, _, vt = torch.linalg.svd(s_bar.double(), full_matrices=False)  # vt (r, E), by singular value
    span = vt[: min(k, vt.shape[0])].t()  # (E, r')
    rand = torch.randn(e, k, generator=generator, dtype=torch.float64)
    basis, _ = torch.linalg.qr(torch.cat([span, rand], dim=1))  # orthonormal columns, span first
    basis = basis[:, :k]  # (E, k)
    rotation, _ = torch.linalg.qr(torch.randn(out_dim, k, generator=generator, dtype=torch.float64))  # (D, k)
    return (rotation @ basis.t()).float()  # (D, E)


class TextProjection(nn.Module):
    """P: label vectors (C, E) -> (C, D), starting as an isometry of the centred text geometry.

    A bias-free linear map initialised by `isometric_weight`, plus a residual MLP whose output
    layer starts at zero: at initialisation the prototypes are exactly the text vectors' geometry
    (a bias would add one shared direction to every prototype and collapse them), and training can
    bend the map as far as the loss asks.
    """

    def __init__(self, s_bar: torch.Tensor, out_dim: int, hidden_dim: int) -> None:
        super().__init__()
        text_dim = s_bar.shape[1]
        self.linear = nn.Linear(text_dim, out_dim, bias=False)
        self.residual = mlp(text_dim, hidden_dim, out_dim)
        with torch.no_grad():
            self.linear.weight.copy_(isometric_weight(s_bar, out_dim))
            nn.init.zeros_(self.residual[-1].weight)
            nn.init.zeros_(self.residual[-1].bias)

    def forward(self, s_bar: torch.Tensor) -> torch.Tensor:
        return self.linear(s_bar) + self.residual(s_bar)  # (C, D)


class MetricHead(nn.Module):
    """Images and label texts in one metric space; the label vectors are the class prototypes.

    v = normalize(MLP_v(f)), p = normalize(P(s_bar)), z_ic = k * (r_c - ||v_i - p_c||^2): an image
    is scored positive for class c when it lies inside the class's radius r_c around p_c. The
    distance and the logit are computed in float32 with autocast off: in bfloat16 the cosine has
    8 bits of mantissa, and 4,000 images would share about 50 distinct logits per class.
    """

    def __init__(
        self,
        in_features: int,
        text_vectors: torch.Tensor,
        embed_dim: int = 128,
        hidden_dim: int = 512,
        init_scale: float = 8.0,
        learn_scale: bool = True,
        projector_kind: str = "mlp",
    ) -> None:
        super().__init__()
        num_classes = text_vectors.shape[0]
        self.register_buffer("text_vectors", text_vectors.clone())  # (C, E), frozen encoder output
        # MLP_v by default; `linear` or `identity` for the ablation of what the projection adds
        self.visual_proj, space_dim = projector(projector_kind, in_features, hidden_dim, embed_dim)
        self.text_proj = TextProjection(self.centred_text(), space_dim, hidden_dim)
        # log-parametrised so that k stays > 0 whatever the optimiser does
        self.log_scale = nn.Parameter(torch.tensor(math.log(init_scale)), requires_grad=learn_scale)
        self.radius = nn.Parameter(torch.full((num_classes,), 2.0))  # (C,); d = 2 is "orthogonal"

    @property
    def scale(self) -> torch.Tensor:
        return self.log_scale.exp()

    def centred_text(self) -> torch.Tensor:
        return centre_text_vectors(self.text_vectors.float())  # (C, E)

    def prototypes(self) -> torch.Tensor:
        with torch.autocast(self.text_vectors.device.type, enabled=False):
            return F.normalize(self.text_proj(self.centred_text()), dim=-1)  # (C, D)

    def embed(self, pooled: torch.Tensor) -> torch.Tensor:
        """Unit image vectors v (B, D) in float32 from pooled features (B, F)."""
        h = self.visual_proj(pooled)  # (B, D), bf16 under autocast: that is where the FLOPs are
        with torch.autocast(h.device.type, enabled=False):
            return F.normalize(h.float(), dim=-1)

    def logits(self, v: torch.Tensor, p: torch.Tensor | None = None) -> torch.Tensor:
        """z = k (r - d) (B, C) for unit image vectors v (B, D), in float32 with autocast off."""
        p = self.prototypes() if p is None else p
        with torch.autocast(v.device.type, enabled=False):
            d = squared_distance(v.float(), p.float())  # (B, C)
            return self.scale.float() * (self.radius.float() - d)

    @torch.no_grad()
    def shift_logits(self, offset: torch.Tensor) -> None:
        """Add offset (C,) to every image's logit: r_c += o_c / k, as z = k (r - d)."""
        self.radius.add_(offset.to(self.radius) / self.scale)

    def forward(self, pooled: torch.Tensor) -> ModelOutput:
        v = self.embed(pooled)  # (B, D)
        p = self.prototypes()  # (C, D)
        return ModelOutput(logits=self.logits(v, p), embeddings=v, prototypes=p)


class LinearHead(nn.Module):
    """The plain baseline: one linear layer to C logits, trained with BCE-family losses.

    Computed in float32 with autocast off, as the metric head's logits are: bfloat16 logits would
    tie thousands of validation images, and the two heads' AUCs would not be measured alike. The
    layer is F x C, so float32 costs nothing next to the backbone.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        projector_kind: str = "identity",
        hidden_dim: int = 512,
        embed_dim: int = 128,
    ) -> None:
        super().__init__()
        # identity: the plain baseline; mlp: the metric head's MLP_v in front of the same layer (the
        # control that tells the projection's effect from the metric geometry's)
        self.proj, width = projector(projector_kind, in_features, hidden_dim, embed_dim)
        self.fc = nn.Linear(width, num_classes)

    @torch.no_grad()
    def shift_logits(self, offset: torch.Tensor) -> None:
        """Add offset (C,) to every image's logit."""
        self.fc.bias.add_(offset.to(self.fc.bias))

    def forward(self, pooled: torch.Tensor) -> ModelOutput:
        h = self.proj(pooled)  # (B, D), bf16 under autocast like MLP_v
        with torch.autocast(h.device.type, enabled=False):
            return ModelOutput(logits=self.fc(h.float()))  # (B, C)
