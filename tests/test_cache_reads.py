"""Reading the image cache: a pass over every row keeps the process's memory flat.

A memory map keeps each page it touched resident in the reading process, so scoring a 256-px cache
of NIH's size held gigabytes per process; rows are now read with pread into arrays the item owns.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.classes import CLASSES
from pipeline.data.cache import CacheRows, _write_index, cache_file
from pipeline.data.layout import CACHE_DIR, MANIFEST

ROOT = Path(__file__).resolve().parents[1]
ROWS, SIZE = 1200, 256  # 75 MiB of pixels


def write_prepared(folder: Path, rows: int = ROWS, size: int = SIZE) -> np.ndarray:
    """A prepared folder (manifest + complete cache) whose row i is filled with i % 251."""
    cache_dir = folder / CACHE_DIR
    cache_dir.mkdir(parents=True)
    values = (np.arange(rows) % 251).astype(np.uint8)
    data = np.broadcast_to(values[:, None, None], (rows, size, size))
    cache_file(cache_dir, size).write_bytes(np.ascontiguousarray(data).tobytes())
    names = [Path(f"{i:08d}_000.png") for i in range(rows)]
    _write_index(cache_dir, names, size, "test", 256, True, {})
    manifest = pd.DataFrame({"image": [n.name for n in names], "patient": np.arange(rows), "split": "test"})
    for c in CLASSES:
        manifest[c] = 0
    manifest["cache_index"] = np.arange(rows)[::-1]  # any order: rows are read by cache_index
    manifest.to_csv(folder / MANIFEST, index=False)
    return values


def test_rows_read_back_by_cache_index(tmp_path: Path) -> None:
    from pipeline.data.dataset import CachedImageDataset

    values = write_prepared(tmp_path, rows=40, size=32)
    ds = CachedImageDataset(tmp_path, "test")
    for i in (0, 7, 39):
        image, target = ds[i]
        assert image.shape == (1, 32, 32) and image.dtype.is_floating_point is False
        assert int(image[0, 0, 0]) == values[39 - i] and (image == values[39 - i]).all()
    rows = CacheRows(tmp_path / CACHE_DIR)
    with pytest.raises(IndexError, match="row 40 of 40"):
        rows[40]


def test_cut_short_cache_is_named(tmp_path: Path) -> None:
    write_prepared(tmp_path, rows=10, size=32)
    path = cache_file(tmp_path / CACHE_DIR, 32)
    path.write_bytes(path.read_bytes()[: 32 * 32 * 9 + 5])
    with pytest.raises(RuntimeError, match=r"row 9 is cut short; rerun the prepare step"):
        CacheRows(tmp_path / CACHE_DIR)[9]


@pytest.mark.slow
def test_a_pass_over_every_row_keeps_resident_memory_flat(tmp_path: Path) -> None:
    """Resident memory after reading all 75 MiB grows by well under the cache's size (a memory map
    grew by all of it)."""
    write_prepared(tmp_path)
    script = textwrap.dedent(
        f"""
        import json, psutil
        from pipeline.data.dataset import CachedImageDataset
        ds = CachedImageDataset({str(tmp_path)!r}, "test")
        ds[0]
        before = psutil.Process().memory_info().rss
        total = 0
        for i in range(len(ds)):
            total += int(ds[i][0][0, 0, 0])
        print(json.dumps({{"grew": psutil.Process().memory_info().rss - before, "total": total}}))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["total"] == int((np.arange(ROWS) % 251).sum())  # every row was read
    cache_bytes = ROWS * SIZE * SIZE
    assert out["grew"] < cache_bytes / 4, (
        f"resident memory grew by {out['grew'] / 2**20:.0f} MiB reading a {cache_bytes / 2**20:.0f} MiB cache"
    )
