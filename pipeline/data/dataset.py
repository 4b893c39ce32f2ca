"""A torch Dataset over the prepared uint8 cache, and a reproducible DataLoader.

Images stay uint8 until the model: a (1, crop, crop) uint8 tensor is a quarter of its float32
size through worker queues and pinned memory, and normalisation runs on the accelerator.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms import v2

from pipeline.classes import CLASSES
from pipeline.data.cache import open_cache
from pipeline.data.prepare import CACHE_DIR, MANIFEST
from pipeline.data.splits import SPLITS


@dataclass
class AugmentConfig:
    """Training augmentations (the `train.augment` section); eval uses only `crop_size`.

    Attributes:
        crop_size: side of the crop fed to the model, at most the cache's image_size.
        random_resized_crop_scale: (min, max) share of the image area a training crop covers.
        hflip: random horizontal flips (off by default: the heart is on the left in a chest film).
        rotation_deg: maximum random rotation either way.
        brightness: ColorJitter brightness strength (0 turns it off).
        contrast: ColorJitter contrast strength (0 turns it off).
    """

    crop_size: int = 56
    random_resized_crop_scale: tuple[float, float] = (0.7, 1.0)
    hflip: bool = False
    rotation_deg: float = 5.0
    brightness: float = 0.1
    contrast: float = 0.1

    def validate(self) -> None:
        if self.crop_size < 1:
            raise ValueError(f"crop_size must be >= 1, got {self.crop_size}")
        scale = tuple(self.random_resized_crop_scale)
        if len(scale) != 2 or not 0.0 < scale[0] <= scale[1] <= 1.0:
            raise ValueError(f"random_resized_crop_scale must be (min, max) with 0 < min <= max <= 1, got {scale}")
        for name in ("rotation_deg", "brightness", "contrast"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


def train_transform(cfg: AugmentConfig) -> v2.Transform:
    """Random crop/flip/rotation/intensity jitter on a (1, H, W) uint8 tensor."""
    steps: list[v2.Transform] = [
        v2.RandomResizedCrop(cfg.crop_size, scale=tuple(cfg.random_resized_crop_scale), antialias=True)
    ]
    if cfg.hflip:
        steps.append(v2.RandomHorizontalFlip())
    if cfg.rotation_deg > 0:
        steps.append(v2.RandomRotation(cfg.rotation_deg, interpolation=v2.InterpolationMode.BILINEAR))
    if cfg.brightness > 0 or cfg.contrast > 0:
        steps.append(v2.ColorJitter(brightness=cfg.brightness, contrast=cfg.contrast))
    return v2.Compose(steps)


def eval_transform(cfg: AugmentConfig) -> v2.Transform:
    return v2.CenterCrop(cfg.crop_size)


class CachedImageDataset(Dataset):
    """One split of a prepared folder: `(image, target)` pairs read from the memory-mapped cache.

    Args:
        prepared_dir: the prepare step's output folder (manifest.csv + cache/).
        split: "train", "val", "test", or "all".
        augment: crop size and augmentations; None returns the full cached image untouched.
        train: random augmentations when True, a center crop when False.

    Items are `(image, target)`: image (1, crop, crop) uint8, target (C,) float32.
    """

    def __init__(self, prepared_dir: str | Path, split: str, augment: AugmentConfig | None = None, train: bool = False):
        if split not in (*SPLITS, "all"):
            raise ValueError(f"split must be one of {', '.join((*SPLITS, 'all'))}, got {split!r}")
        self.prepared_dir = Path(prepared_dir)
        manifest = _read_manifest(self.prepared_dir / MANIFEST)
        if split != "all":
            manifest = manifest[manifest["split"] == split].reset_index(drop=True)
        self.split = split
        self.image_names: list[str] = manifest["image"].tolist()
        self.patients = manifest["patient"].to_numpy()
        self.targets = manifest[list(CLASSES)].to_numpy(dtype=np.float32)  # (N, C)
        self.cache_index = manifest["cache_index"].to_numpy(dtype=np.int64)
        self._images: np.ndarray | None = None  # opened lazily, once per worker process
        cache_size = int(self._open().shape[-1])
        self._images = None  # a memmap is not shared across fork/spawn; each worker maps its own
        self.transform = self._make_transform(augment, train, cache_size)

    @staticmethod
    def _make_transform(augment: AugmentConfig | None, train: bool, cache_size: int) -> v2.Transform | None:
        if augment is None:
            return None
        augment.validate()
        if augment.crop_size > cache_size:
            raise ValueError(
                f"crop_size {augment.crop_size} exceeds the cached image_size {cache_size}; "
                "lower the crop or rerun prepare with a larger image_size"
            )
        return train_transform(augment) if train else eval_transform(augment)

    def _open(self) -> np.ndarray:
        if self._images is None:
            self._images = open_cache(self.prepared_dir / CACHE_DIR)
        return self._images

    def __len__(self) -> int:
        return len(self.image_names)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = np.array(self._open()[self.cache_index[i]])  # (H, W) copy out of the page cache
        image = torch.from_numpy(pixels).unsqueeze(0)  # (1, H, W) uint8
        if self.transform is not None:
            image = self.transform(image)
        return image, torch.from_numpy(self.targets[i])

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_images"] = None
        return state


def _read_manifest(path: Path) -> pd.DataFrame:
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: run the prepare step first")
    df = pd.read_csv(path)
    missing = [c for c in ("image", "patient", "split", *CLASSES, "cache_index") if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)}; rerun the prepare step")
    return df


def seed_worker(worker_id: int) -> None:
    """Seed numpy and random in a DataLoader worker from the torch seed the loader gave it."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def build_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    workers: int,
    seed: int,
    sampler: Sampler | None = None,
    pin_memory: bool = False,
    drop_last: bool = False,
) -> DataLoader:
    """A DataLoader whose order and worker augmentations are fixed by `seed`.

    The loader's generator decides the shuffle order and each worker's torch seed, so two loaders
    built with the same seed yield the same batches. With `workers=0` the augmentations draw from
    the global torch RNG: seed it (`torch.manual_seed`) for the same guarantee.
    """
    if sampler is not None and shuffle:
        raise ValueError("pass either shuffle=True or a sampler, not both (the sampler decides order)")
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        sampler=sampler,
        num_workers=workers,
        generator=generator,
        worker_init_fn=seed_worker if workers > 0 else None,
        pin_memory=pin_memory,
        drop_last=drop_last,
        persistent_workers=workers > 0,
    )
