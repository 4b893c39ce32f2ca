"""Atomic writes: the file replaces its destination whole, with the mode the process umask gives."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from pipeline import io, tracking
from tests.conftest import settings


def _checkpoint(path: Path) -> None:
    import torch

    from pipeline.io import save_checkpoint

    save_checkpoint(path, {"epoch": 1, "weights": torch.zeros(3)})


def _run_ref(path: Path) -> None:
    tracking.save_run_ref(path.parent, SimpleNamespace(info=SimpleNamespace(run_id="r", experiment_id="1")))


def _atomic_open(path: Path) -> None:
    with io.atomic_open(path, "wb") as f:
        f.write(b"bytes")


# every writer that renames a temporary file into place: name -> (file it writes, how)
WRITERS = {
    "write_text": ("params.yaml", lambda p: io.write_text(p, "a: 1\n")),
    "write_json": ("train_config.json", lambda p: io.write_json(p, {"a": 1})),
    "save_npy": ("prototypes.npy", lambda p: io.save_npy(p, np.zeros((2, 3)))),
    "save_dataframe csv": ("manifest.csv", lambda p: io.save_dataframe(p, pd.DataFrame({"a": [1]}))),
    "save_dataframe parquet": ("test.parquet", lambda p: io.save_dataframe(p, pd.DataFrame({"a": [1]}))),
    "atomic_open": ("similarity.png", _atomic_open),
    "save_checkpoint": ("best.pt", _checkpoint),
    "save_run_ref": (tracking.RUN_FILE, _run_ref),
}


@pytest.fixture(params=[0o022, 0o002, 0o077], ids=lambda m: f"umask-{m:03o}")
def umask(request):
    """Run the test under a umask; the previous one comes back afterwards."""
    previous = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(previous)


@pytest.mark.parametrize("writer", list(WRITERS))
def test_atomic_writers_give_files_the_mode_of_the_umask(tmp_path, umask, writer) -> None:
    name, write = WRITERS[writer]
    path = tmp_path / "out" / name
    write(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, f"{writer}: {oct(path.stat().st_mode)}"
    write(path)  # replacing an existing file: the new one has the same mode
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    assert [p.name for p in path.parent.iterdir()] == [name]  # no temporary file left beside it


def test_synthetic_images_and_labels_get_the_mode_of_the_umask(tmp_path, umask) -> None:
    from pipeline.data.synthetic import generate

    cfg = settings("download.synthetic", num_images=6, num_patients=3, image_size=32, seed=1)
    generate(tmp_path, cfg, progress=False)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.suffix == ".png" for p in files) and any(p.suffix == ".csv" for p in files)
    modes = {p.relative_to(tmp_path).as_posix(): oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
    assert set(modes.values()) == {oct(0o666 & ~umask)}, modes


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path) -> None:
    path = tmp_path / "metrics.json"
    io.write_json(path, {"auc": 0.8})
    with pytest.raises(TypeError, match="cannot serialise object"):
        io.write_json(path, {"auc": object()})
    assert io.read_json(path) == {"auc": 0.8}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
