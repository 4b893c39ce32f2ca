"""timm backbones, created by name, with pretrained weights from the hub or a local file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import timm
from torch import nn


@dataclass
class BackboneConfig:
    """`train.model.backbone` in params.yaml."""

    name: str = "convnext_atto"
    pretrained: bool = False
    # A local checkpoint (timm .safetensors/.bin/.pth) used instead of the hub: no network needed.
    checkpoint_path: str | None = None
    drop_path_rate: float = 0.0
    grad_checkpointing: bool = False

    def validate(self) -> None:
        # is_model accepts pretrained tags ("convnext_atto.d2_in1k"), which list_models() omits
        if not timm.is_model(self.name):
            close = timm.list_models(f"*{self.name.split('_')[0]}*")[:8]
            raise ValueError(f"unknown timm model name '{self.name}'; similar: {', '.join(close)}")
        if self.checkpoint_path and not Path(self.checkpoint_path).is_file():
            raise ValueError(f"checkpoint_path {self.checkpoint_path} does not exist")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError("drop_path_rate must be in [0, 1)")


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
