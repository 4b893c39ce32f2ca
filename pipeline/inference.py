"""Running the network: which device, which autocast precision, and scores for a loader or a batch.

Training (validation), evaluation, the served pyfunc and the benchmarks all go through these
functions, so they cannot disagree about the device "auto" picks, the precision of the forward
pass or how logits become probabilities.
"""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager

import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler

from .classes import CLASSES
from .config import ConfigError


def resolve_device(name: str = "auto", key: str = "device") -> torch.device:
    """`"auto"`: the first CUDA device when there is one, else the CPU; anything else as torch reads it.

    Args:
        name: "auto" or a torch device string ("cpu", "cuda", "cuda:1", ...).
        key: the setting `name` came from (e.g. "train.device"), named in the error.

    Raises:
        ConfigError: `name` is no device string, or names a CUDA device this machine does not have
            (torch would only fail at the first tensor moved there, naming no setting).
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"'{key}' is {name!r}, not a device: use auto, cpu, cuda or cuda:<index>") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (device.index or 0) >= count:
            have = f"{count} CUDA device(s)" if count else "no CUDA device (or no driver for one)"
            raise ConfigError(
                f"'{key}' is {name!r} but torch finds {have} on this machine: set {key} to auto "
                "(CUDA when present, else the CPU) or cpu, or run on a machine with that GPU"
            )
    return device


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of `amp` ("auto", "bf16", "fp16", "off") on `device`; None means float32.

    Only CUDA runs in reduced precision; "auto" takes bfloat16 where the GPU supports it, else float16.
    """
    if device.type != "cuda" or amp == "off":
        return None
    if amp == "fp16" or (amp == "auto" and not torch.cuda.is_bf16_supported()):
        return torch.float16
    return torch.bfloat16


def autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager:
    """torch.autocast on `device` in `dtype`, or nothing at all for dtype None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@torch.no_grad()
def logits(
    model: torch.nn.Module, images: torch.Tensor, device: torch.device, amp_dtype: torch.dtype | None = None
) -> np.ndarray:
    """Logits (B, C) float32 of one batch of images (B, 1, H, W), on the CPU."""
    with autocast(device, amp_dtype):
        z = model(images.to(device, non_blocking=True))  # (B, C)
    return z.float().cpu().numpy()


@torch.no_grad()
def probabilities(
    model: torch.nn.Module, images: torch.Tensor, device: torch.device, amp_dtype: torch.dtype | None = None
) -> np.ndarray:
    """Sigmoid scores (B, C) float32 of one batch of images (B, 1, H, W), on the CPU."""
    return torch.sigmoid(torch.from_numpy(logits(model, images, device, amp_dtype))).numpy()


def predict(
    model: torch.nn.Module,
    loader: DataLoader,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    progress: bool = False,
    desc: str = "predict",
    raw: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Sigmoid scores (N, C), or with `raw` the logits, and the dataset indices they belong to,
    in loader order.

    The indices are read off the loader's sampler, so the sampler must give the same order each
    time it is iterated: sequential, or a DistributedSampler (its order is fixed by seed and epoch).
    """
    from pipeline.progress import progress_bar

    if isinstance(loader.sampler, RandomSampler):
        raise ValueError(
            "predict() needs a loader with shuffle=False: a RandomSampler's order "
            "cannot be replayed to tell which image each score belongs to"
        )
    model.eval()
    order = np.fromiter(iter(loader.sampler), dtype=np.int64)  # (N,) dataset index of each row
    score = logits if raw else probabilities
    probs = [
        score(model, images, device, amp_dtype)
        for images, _ in progress_bar(loader, desc=desc, unit="batch", disable=not progress, leave=False)
    ]
    num_classes = len(CLASSES)
    probs = np.concatenate(probs).astype(np.float64) if probs else np.zeros((0, num_classes))  # (N, C)
    if len(probs) != len(order):
        raise RuntimeError(f"predict: {len(probs)} scores for {len(order)} sampled images; use drop_last=False")
    return order, probs
