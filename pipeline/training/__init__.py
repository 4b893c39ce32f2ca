"""Training: config, optimiser, checkpoints, the loop, DDP."""

from .loop import TrainConfig, TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "train"]
