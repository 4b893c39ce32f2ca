"""Images/s of the cached loader against decoding the original PNGs every epoch.

Writes `--images` synthetic 1024x1024 8-bit chest-like PNGs in NIH layout to a temporary folder,
runs the prepare step (which decodes each once into the uint8 cache), then feeds both loaders with
the same DataLoader settings, workers and training augmentations:
    cached: memory-mapped uint8 rows -> augment                   (what training uses)
    naive:  PNG decode -> 8-bit gray -> resize to --size -> augment (per epoch, no cache)
The first epoch of each warms up (worker start, page cache) and is reported apart; the rate is
over the later epochs. The last line is `loader_speedup <ratio>`.

    python benchmarks/loader.py --images 256 --workers 2 --size 256 --crop 224 --epochs 3
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.classes import LABEL_CSV_HEADER, NO_FINDING, TEST_LIST, TRAIN_VAL_LIST, image_name  # noqa: E402
from pipeline.config import AugmentConfig, load_params  # noqa: E402
from pipeline.data.dataset import CachedImageDataset, build_loader, train_transform  # noqa: E402
from pipeline.data.images import decode_image  # noqa: E402
from pipeline.data.prepare import prepare  # noqa: E402

SIDE = 1024  # the NIH images' side


def chest_png(path: Path, seed: int) -> None:
    """A 1024 px 8-bit PNG with smooth anatomy-like structure and sensor noise.

    Pure noise would compress (and decode) unlike a radiograph; smooth fields plus mild noise give
    files of a few hundred kB, in the range of the NIH PNGs.
    """
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(60, 200, (12, 12), dtype=np.uint8))
    low = coarse.resize((SIDE, SIDE), Image.Resampling.BICUBIC)
    y, x = np.mgrid[0:SIDE, 0:SIDE] / SIDE
    lungs = sum(np.exp(-(((x - cx) / 0.13) ** 2 + ((y - 0.5) / 0.28) ** 2)) for cx in (0.3, 0.7))
    img = 0.5 * np.asarray(low, dtype=np.float32) + 110 - 70 * lungs + rng.normal(0, 3, (SIDE, SIDE))
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path)


def make_raw(root: Path, num_images: int, workers: int) -> list[Path]:
    """NIH layout: images/, the label CSV and both lists (every image in train_val)."""
    images = root / "images"
    images.mkdir(parents=True)
    names = [image_name(i // 2 + 1, i % 2) for i in range(num_images)]
    paths = [images / n for n in names]
    with cf.ProcessPoolExecutor(max(1, workers)) as pool:
        list(pool.map(chest_png, paths, range(num_images), chunksize=8))
    rows = [",".join(LABEL_CSV_HEADER)]
    for i, n in enumerate(names):
        rows.append(f"{n},{NO_FINDING},{i % 2},{i // 2 + 1},50,M,PA,{SIDE},{SIDE},0.143,0.143")
    (root / "Data_Entry_2017_v2020.csv").write_text("\n".join(rows) + "\n")
    (root / TRAIN_VAL_LIST).write_text("\n".join(names))
    (root / TEST_LIST).write_text("")
    return paths


class PngDataset(Dataset):
    """The no-cache baseline: decode and resize the original PNG on every access."""

    def __init__(self, paths: list[Path], size: int, augment: AugmentConfig):
        self.paths, self.size = paths, size
        self.transform = train_transform(augment, size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = torch.from_numpy(decode_image(self.paths[i], self.size)).unsqueeze(0)  # (1, size, size)
        return self.transform(image), torch.zeros(14)


def time_epochs(dataset: Dataset, args: argparse.Namespace) -> list[float]:
    loader = build_loader(dataset, args.batch_size, shuffle=True, workers=args.workers, seed=0)
    times = []
    for _ in range(args.epochs):
        start = time.perf_counter()
        seen = sum(len(x) for x, _ in loader)
        times.append(time.perf_counter() - start)
        assert seen == len(dataset)
    return times


def rate(times: list[float], n: int) -> float:
    steady = times[1:] or times
    return n * len(steady) / sum(steady)


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers (and cache build processes)")
    p.add_argument("--size", type=int, default=256, help="cached image side")
    p.add_argument("--crop", type=int, default=224)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    if args.workers == 0:
        # items are then made in this process: use one intra-op thread, as a DataLoader worker does
        # (several OpenMP threads per tiny op only contend with each other)
        torch.set_num_threads(1)
    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    augment = params.train.augment.replace(crop_size=args.crop)

    with tempfile.TemporaryDirectory(prefix="loader-bench-") as tmp:
        raw, out = Path(tmp) / "raw", Path(tmp) / "prepared"
        start = time.perf_counter()
        paths = make_raw(raw, args.images, args.workers)
        mb = sum(p.stat().st_size for p in paths) / len(paths) / 1e6
        took = time.perf_counter() - start
        print(f"wrote {args.images} PNGs of {SIDE}x{SIDE} ({mb:.2f} MB each) in {took:.1f}s")
        start = time.perf_counter()
        cfg = params.prepare.replace(
            val_fraction=0.0, image_size=args.size, workers=max(1, args.workers), chunk_size=32
        )
        prepare(raw, out, cfg, progress=False)
        build = time.perf_counter() - start
        print(
            f"prepare (one decode per image -> {args.size}px cache): {build:.2f}s, {args.images / build:.1f} images/s"
        )

        cached = time_epochs(CachedImageDataset(out, "train", augment, train=True), args)
        naive = time_epochs(PngDataset(paths, args.size, augment), args)

    print(
        f"torch {torch.__version__}, {args.workers} DataLoader workers, batch {args.batch_size}, "
        f"{args.size}px -> crop {args.crop}, {args.epochs} epochs (first = warm-up)"
    )
    for name, times in (("cached", cached), ("naive", naive)):
        epochs = " ".join(f"{t:.2f}" for t in times)
        print(f"{name:>7}: {rate(times, args.images):9.1f} images/s   epoch seconds: {epochs}")
    ratio = rate(cached, args.images) / rate(naive, args.images)
    print(f"loader_speedup {ratio:.2f}")
    return ratio


if __name__ == "__main__":
    main()
