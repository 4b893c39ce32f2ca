"""timm backbones, created by name, with pretrained weights from the hub or a local file."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..config import BackboneConfig, ConfigError

KEY = "train.model.backbone"


def create_backbone(cfg: BackboneConfig) -> nn.Module:
    """A timm model without classifier (`num_classes=0`) taking single-channel input.

    Grayscale is handled by timm's `in_chans=1`: the pretrained RGB stem kernel is summed over
    its input channels, which equals feeding the same image replicated to three channels, at a
    third of the stem's cost.
    """
    import timm  # here, not at import: timm brings in torchvision, which a step reading a bundle never needs

    check_backbone(cfg)
    kwargs = dict(num_classes=0, in_chans=1, drop_path_rate=cfg.drop_path_rate)
    pretrained = cfg.pretrained or bool(cfg.checkpoint_path)
    if cfg.checkpoint_path:
        kwargs["pretrained_cfg_overlay"] = dict(file=str(Path(cfg.checkpoint_path).resolve()))
    model = timm.create_model(cfg.name, pretrained=pretrained, **kwargs)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


def check_backbone(cfg: BackboneConfig) -> None:
    """The backbone can be built here: timm knows its name, and its checkpoint file exists.

    Raises:
        ConfigError: one line naming the key and what to do.
    """
    import timm

    # is_model accepts pretrained tags ("convnext_atto.d2_in1k"), which list_models() omits
    if not timm.is_model(cfg.name):
        close = ", ".join(timm.list_models(f"*{cfg.name.split('_')[0]}*")[:8]) or "-"
        raise ConfigError(f"'{KEY}.name': unknown timm model name '{cfg.name}'; similar: {close}")
    if cfg.checkpoint_path and not Path(cfg.checkpoint_path).is_file():
        raise ConfigError(
            f"'{KEY}.checkpoint_path': {cfg.checkpoint_path} does not exist on this machine; "
            "point it to a local .safetensors/.bin/.pth file, or set it to null to use the hub"
        )
