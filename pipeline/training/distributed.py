"""DDP plumbing for torchrun: rank discovery, process group, gathering predictions."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group torchrun describes (RANK/WORLD_SIZE/LOCAL_RANK), if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    if device_type == "cuda":
        torch.cuda.set_device(info.local_rank)
    return info


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def gather_predictions(info: DistInfo, index: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every rank's (index, probs) concatenated on all ranks, duplicates from sampler padding dropped."""
    if not info.enabled:
        return index, probs
    parts: list = [None] * info.world_size
    dist.all_gather_object(parts, (index, probs))
    index = np.concatenate([p[0] for p in parts])
    probs = np.concatenate([p[1] for p in parts])
    index, first = np.unique(index, return_index=True)
    return index, probs[first]


def broadcast_flag(info: DistInfo, flag: bool) -> bool:
    if not info.enabled:
        return flag
    t = torch.tensor([int(flag)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.broadcast(t, src=0)
    return bool(t.item())


def broadcast_object(info: DistInfo, obj: Any) -> Any:
    """Rank 0's `obj` on every rank (e.g. a checkpoint only rank 0's disk holds)."""
    if not info.enabled:
        return obj
    box = [obj if info.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
