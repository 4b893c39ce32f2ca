"""A torch Dataset over the prepared uint8 cache, and a reproducible DataLoader.

Images stay uint8 until the model: a (1, crop, crop) uint8 tensor is a quarter of its float32
size through worker queues and pinned memory, and normalisation runs on the accelerator.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms import v2

from pipeline.classes import CLASSES
from pipeline.config import AugmentConfig
from pipeline.data.cache import CacheRows
from pipeline.data.layout import CACHE_DIR, MANIFEST
from pipeline.data.splits import SPLITS

# Above this ratio of cached side to crop side a crop is shrunk enough to alias without
# antialiasing, so the fused one-pass crop+rotation gives way to torchvision's antialiased resize.
MAX_FUSED_DOWNSCALE = 1.5


class RandomResizedCropRotate(v2.RandomResizedCrop):
    """`v2.RandomResizedCrop` then a random rotation, sampled in one bilinear pass.

    Crop boxes come from torchvision's own sampler and angles are uniform in [-degrees, degrees],
    as `v2.RandomRotation` draws them. Sampling once instead of twice (resize, then rotate) about
    halves the cost of the geometric augmentations, which decide the cached loader's speed. Without
    antialiasing this is meant for crops within `MAX_FUSED_DOWNSCALE` of the output size. Corners
    that rotate out of the crop show the image around it, or black beyond the image's edge.
    """

    def __init__(self, size: int, scale: tuple[float, float], degrees: float):
        super().__init__(size, scale=scale, antialias=False)
        self.degrees = float(degrees)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        params = super().make_params(flat_inputs)
        params["angle"] = torch.empty(1).uniform_(-self.degrees, self.degrees).item()
        return params

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if type(inpt) is torch.Tensor:
            return resized_crop_rotate(inpt, **params, size=tuple(self.size))
        # tv_tensors (boxes, masks) and PIL images: torchvision's kernels, one after the other
        box = {k: v for k, v in params.items() if k != "angle"}
        cropped = super().transform(inpt, box)
        return v2.functional.rotate(cropped, params["angle"], interpolation=v2.InterpolationMode.BILINEAR)


class RandomRotation(v2.RandomRotation):
    """`v2.RandomRotation` (bilinear, black corners) with the one-pass kernel for plain tensors."""

    def __init__(self, degrees: float):
        super().__init__(degrees, interpolation=v2.InterpolationMode.BILINEAR, fill=None)

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if type(inpt) is torch.Tensor:
            return rotate_bilinear(inpt, params["angle"])
        return super().transform(inpt, params)


def resized_crop_rotate(
    image: torch.Tensor, top: int, left: int, height: int, width: int, angle: float, size: tuple[int, int]
) -> torch.Tensor:
    """Crop a box of `image` (..., H, W), resize it to `size` and rotate it by `angle` degrees.

    Equals `v2.functional.resized_crop(antialias=False)` followed by `v2.functional.rotate`
    (counter-clockwise, about the centre) up to rounding, except that the border pixels and the
    rotated corners sample the image around the box. Points outside the image are 0.
    """
    in_h, in_w = image.shape[-2:]
    out_h, out_w = size
    cos, sin = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    x = torch.arange(out_w, dtype=torch.float32) + (0.5 - out_w / 2)  # (W',) output pixel centres
    y = (torch.arange(out_h, dtype=torch.float32) + (0.5 - out_h / 2))[:, None]  # (H', 1)
    # output pixel -> rotate back -> scale to the box -> box centre, in grid_sample's [-1, 1] units
    ax, ay = 2 * width / (out_w * in_w), 2 * height / (out_h * in_h)
    cx, cy = (2 * left + width) / in_w - 1, (2 * top + height) / in_h - 1
    grid = torch.empty(1, out_h, out_w, 2)  # (1, H', W', 2); filled in place, cheaper than stacking
    grid[..., 0] = (ax * cos) * x - (ax * sin) * y + cx
    grid[..., 1] = (ay * sin) * x + (ay * cos) * y + cy
    flat = image.reshape(-1, 1, in_h, in_w)  # (B*C, 1, H, W): one grid serves every channel
    src = flat if flat.is_floating_point() else flat.float()
    grid = grid.expand(len(flat), -1, -1, -1)
    out = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if not image.is_floating_point():
        out = out.round_().to(image.dtype)
    return out.reshape(*image.shape[:-2], out_h, out_w)


def rotate_bilinear(image: torch.Tensor, angle: float) -> torch.Tensor:
    """Rotate (..., H, W) counter-clockwise by `angle` degrees about the centre; corners are 0."""
    h, w = image.shape[-2:]
    return resized_crop_rotate(image, 0, 0, h, w, angle, (h, w))


def train_transform(cfg: AugmentConfig, image_size: int | None = None) -> v2.Transform:
    """Random crop/rotation/flip/intensity jitter on a (1, H, W) uint8 tensor.

    Args:
        cfg: the augmentations.
        image_size: side of the input images; when the crop is within `MAX_FUSED_DOWNSCALE` of it,
            crop and rotation run as one resampling (`RandomResizedCropRotate`).
    """
    scale = tuple(cfg.random_resized_crop_scale)
    near = image_size is not None and image_size <= MAX_FUSED_DOWNSCALE * cfg.crop_size
    fuse = cfg.rotation_deg > 0 and near
    if fuse:
        steps: list[v2.Transform] = [RandomResizedCropRotate(cfg.crop_size, scale, cfg.rotation_deg)]
    else:
        steps = [v2.RandomResizedCrop(cfg.crop_size, scale=scale, antialias=True)]
        if cfg.rotation_deg > 0:
            steps.append(RandomRotation(cfg.rotation_deg))
    if cfg.hflip:
        steps.append(v2.RandomHorizontalFlip())
    if cfg.brightness > 0 or cfg.contrast > 0:
        steps.append(v2.ColorJitter(brightness=cfg.brightness, contrast=cfg.contrast))
    return v2.Compose(steps)


def eval_transform(crop_size: int) -> v2.Transform:
    return v2.CenterCrop(crop_size)


class CachedImageDataset(Dataset):
    """One split of a prepared folder: `(image, target)` pairs read from the memory-mapped cache.

    Args:
        prepared_dir: the prepare step's output folder (manifest.csv + cache/).
        split: "train", "val", "test", or "all".
        augment: crop size and augmentations, or only the crop size (an int) for evaluation; None
            returns the full cached image untouched.
        train: random augmentations when True, a center crop when False.

    Items are `(image, target)`: image (1, crop, crop) uint8, target (C,) float32.
    """

    def __init__(
        self,
        prepared_dir: str | Path,
        split: str,
        augment: AugmentConfig | int | None = None,
        train: bool = False,
    ):
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
        # rows are read with pread (CacheRows), not from a memory map, whose touched pages would
        # all count in this process's memory; each worker opens its own descriptor
        self._images = CacheRows(self.prepared_dir / CACHE_DIR)
        cache_size = int(self._images.shape[-1])
        self.transform = self._make_transform(augment, train, cache_size)

    @staticmethod
    def _make_transform(augment: AugmentConfig | int | None, train: bool, cache_size: int) -> v2.Transform | None:
        if augment is None:
            return None
        crop = augment if isinstance(augment, int) else augment.crop_size
        if crop > cache_size:
            raise ValueError(
                f"crop_size {crop} exceeds the cached image_size {cache_size}; "
                "lower the crop or rerun prepare with a larger image_size"
            )
        if train:
            if isinstance(augment, int):
                raise ValueError("training augmentations need the train.augment settings, not a crop size")
            return train_transform(augment, cache_size)
        return eval_transform(crop)

    def __len__(self) -> int:
        return len(self.image_names)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Item `key`, or for `key = (i, seed)` (from `SeededSampler`) item i augmented by draws
        that depend on (seed, i) only."""
        i, seed = key if isinstance(key, tuple) else (key, None)
        pixels = self._images[self.cache_index[i]]  # (H, W), a copy this item owns
        image = torch.from_numpy(pixels).unsqueeze(0)  # (1, H, W) uint8
        if self.transform is not None:
            if seed is None:
                image = self.transform(image)
            else:
                # the CPU generator alone, and put back after: the caller's draws (and any GPU's)
                # are not disturbed when this runs in the main process (workers = 0)
                with torch.random.fork_rng(devices=[]):
                    torch.default_generator.manual_seed(item_seed(seed, i))
                    image = self.transform(image)
        return image, torch.from_numpy(self.targets[i])


def _read_manifest(path: Path) -> pd.DataFrame:
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: run the prepare step first")
    df = pd.read_csv(path)
    missing = [c for c in ("image", "patient", "split", *CLASSES, "cache_index") if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)}; rerun the prepare step")
    return df


def item_seed(seed: int, index: int) -> int:
    """The seed of item `index`'s augmentations under the epoch seed `seed` (well mixed, 63 bits)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


class SeededSampler(Sampler[tuple[int, int]]):
    """Yields `(index, seed)`: the wrapped sampler's indices, each with the seed of its augmentations.

    A DataLoader worker draws augmentations from its own random state, and a persistent worker keeps
    that state from one epoch to the next: reseeding the main process each epoch never reaches it,
    so a run resumed at epoch e would augment differently from one that ran through. The sampler
    runs in the main process and its indices travel to the workers, so a seed handed out with each
    index does reach them: item i of an epoch is augmented the same way whatever the number of
    workers, whether they persist, and whether the run was resumed.
    """

    def __init__(self, sampler: Sampler[int]):
        self.sampler = sampler
        self.seed = 0

    def set_epoch(self, epoch: int, seed: int) -> None:
        """The epoch's order (for a DistributedSampler) and the seed its augmentations derive from."""
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)
        self.seed = seed

    def __iter__(self):
        return ((int(i), self.seed) for i in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


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
