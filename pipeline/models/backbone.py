"""timm backbones, created by name, with pretrained weights from the hub or a local file."""

from __future__ import annotations

from pathlib import Path

import timm
from torch import nn

from ..config import BackboneConfig


def create_backbone(cfg: BackboneConfig) -> nn.Module:
    """A timm model without classifier (`num_classes=0`) taking single-channel input.

    Grayscale is handled by timm's `in_chans=1`: the pretrained RGB stem kernel is summed over
    its input channels, which equals feeding the same image replicated to three channels, at a
    third of the stem's cost.
    """
    kwargs = dict(num_classes=0, in_chans=1, drop_path_rate=cfg.drop_path_rate)
    pretrained = cfg.pretrained or bool(cfg.checkpoint_path)
    if cfg.checkpoint_path:
        kwargs["pretrained_cfg_overlay"] = dict(file=str(Path(cfg.checkpoint_path).resolve()))
    model = timm.create_model(cfg.name, pretrained=pretrained, **kwargs)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model
