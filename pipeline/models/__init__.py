"""Models: a timm ConvNeXt backbone with the metric (prototype) head or a plain linear head."""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

from ..config import ModelConfig
from .backbone import BackboneConfig, create_backbone
from .bundle import BundleError, ModelBundle
from .heads import LinearHead, MetricHead, ModelOutput, centre_text_vectors


class CxrNet(nn.Module):
    """Backbone + head behind one interface: `forward(x) -> logits (B, C)`.

    Input is the raw grayscale image, (B, 1, H, W) uint8 or float in [0, 1]; normalisation lives in
    the model so that training, evaluation and the served pyfunc cannot disagree about it.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, mean: float, std: float) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.register_buffer("mean", torch.tensor(mean).view(1, 1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 1, 1, 1), persistent=False)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = x.float().div_(255.0)
        return (x - self.mean) / self.std

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(self.normalize(x))  # (B, F, h, w)

    def forward_head(self, feats: torch.Tensor, return_embeddings: bool = False):
        pooled = self.backbone.forward_head(feats, pre_logits=True)  # (B, F)
        out = self.head(pooled)
        return out if return_embeddings else out.logits

    def forward(self, x: torch.Tensor, return_embeddings: bool = False):
        """Logits (B, C); with `return_embeddings` a ModelOutput (logits, embeddings, prototypes)."""
        return self.forward_head(self.forward_features(x), return_embeddings)


def build_model(cfg: ModelConfig, text_vectors: np.ndarray) -> CxrNet:
    """Create the network (weights from the global torch RNG: seed it first).

    Args:
        cfg: model settings.
        text_vectors: (C, E) frozen label vectors from the prototypes step (the metric head maps them
            into the shared space; the linear head ignores them apart from C).
    """
    backbone = create_backbone(cfg.backbone)
    features = backbone.num_features
    vectors = torch.as_tensor(np.asarray(text_vectors), dtype=torch.float32)  # (C, E)
    if cfg.head == "metric":
        if cfg.prototypes == "random":
            vectors = torch.randn(vectors.shape)
        head: nn.Module = MetricHead(
            features, vectors, cfg.embed_dim, cfg.hidden_dim, cfg.init_scale, cfg.learn_scale, cfg.projector
        )
    else:
        head = LinearHead(features, vectors.shape[0], cfg.projector, cfg.hidden_dim, cfg.embed_dim)
    mean, std = backbone_norm(backbone)
    return CxrNet(backbone, head, mean, std)


@torch.no_grad()
def init_prior(
    model: CxrNet, loss: nn.Module, prevalence: np.ndarray, images: torch.Tensor, batch_size: int = 128
) -> torch.Tensor:
    """Start each class's score at the stationary point of `loss` for its training prevalence.

    Args:
        model: the freshly built network, on its device.
        loss: the training loss (a `pipeline.losses.PairLoss`).
        prevalence: (C,) training-split positive rates.
        images: (N, 1, H, W) a random, patient-spread sample of training images (uint8 or [0, 1]).
        batch_size: images per forward pass.

    Returns:
        (C,) the offsets added to the logits.
    """
    from ..losses import stationary_offsets

    was_training = model.training
    model.eval()
    device = model.mean.device
    logits = torch.cat(
        [model(images[i : i + batch_size].to(device)).float() for i in range(0, len(images), batch_size)]
    )  # (N, C)
    model.train(was_training)
    prior = torch.as_tensor(prevalence, dtype=torch.float32, device=device)
    offset = stationary_offsets(loss, logits, prior)  # (C,)
    model.head.shift_logits(offset)
    return offset


def backbone_norm(backbone: nn.Module) -> tuple[float, float]:
    """Single-channel mean/std: the average of the pretrained RGB statistics, as the stem sums RGB."""
    cfg = getattr(backbone, "pretrained_cfg", {}) or {}
    mean = cfg.get("mean", (0.485, 0.456, 0.406))
    std = cfg.get("std", (0.229, 0.224, 0.225))
    return float(np.mean(mean)), float(np.mean(std))


def model_from_bundle(
    bundle: ModelBundle, device: str | torch.device = "cpu", source: str = "the model bundle"
) -> CxrNet:
    """Rebuild the network saved by training (`best.pt`) in eval mode, without any download.

    Raises:
        ValueError: naming `source` when its weights do not fit this version's network (a bundle
            written by another version of the project, e.g. before the text projection changed).
    """
    # the weights come from the bundle: never fetch pretrained ones for the skeleton, nor read
    # the training host's checkpoint file
    cfg = bundle.model_config.replace(
        {"backbone.pretrained": False, "backbone.checkpoint_path": None}, at="train.model"
    )
    model = build_model(cfg, bundle.text_vectors)
    missing, unexpected = model.load_state_dict(bundle.model_state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{source}: its weights do not fit this version's model (missing {', '.join(missing[:3]) or '-'}; "
            f"unexpected {', '.join(unexpected[:3]) or '-'}); it was written by another version of "
            "cxr-dwml: retrain it or load it with the version that wrote it"
        )
    return model.to(device).eval()


def load_bundle(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[CxrNet, ModelBundle]:
    """The network saved in a model bundle (`best.pt`), on `device`, and the bundle itself."""
    bundle = ModelBundle.load(path)
    return model_from_bundle(bundle, device, source=str(path)), bundle


__all__ = [
    "BackboneConfig",
    "BundleError",
    "CxrNet",
    "LinearHead",
    "MetricHead",
    "ModelBundle",
    "ModelConfig",
    "ModelOutput",
    "build_model",
    "centre_text_vectors",
    "init_prior",
    "load_bundle",
    "model_from_bundle",
]
