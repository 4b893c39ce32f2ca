"""AdamW with separate backbone/head learning rates, decay only on weight matrices, warmup + cosine."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import OptimConfig


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Four groups: {backbone, head} x {decay, no decay}.

    Norm weights, biases, the metric scale and the per-class radii are 0-d or 1-d: decaying them
    towards zero would fight the normalisation and the learned class geometry, so they get none.
    """
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        part = "backbone" if name.startswith("backbone.") or ".backbone." in name else "head"
        decay = param.ndim >= 2
        groups.setdefault((part, decay), []).append(param)
    lr = {"backbone": cfg.lr_backbone, "head": cfg.lr_head}
    return [
        {
            "params": params,
            "lr": lr[part],
            "weight_decay": cfg.weight_decay if decay else 0.0,
            "name": f"{part}{'' if decay else '_no_decay'}",
        }
        for (part, decay), params in sorted(groups.items())
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, cfg), betas=tuple(cfg.betas))


def warmup_cosine(total_steps: int, warmup_steps: int, min_ratio: float):
    """LR multiplier per step: linear warmup to 1, then cosine down to `min_ratio`."""

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def build_scheduler(optimizer, cfg: OptimConfig, steps_per_epoch: int, epochs: int):
    total = steps_per_epoch * epochs
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total, warmup, cfg.min_lr_ratio))
