"""The workspace `dvc repro` leaves, in a tiny copy of the repository: outputs are links into the DVC
cache (one copy of the data on disk)."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, copy_repo, run_env

pytestmark = pytest.mark.slow


def dvc(repo: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    done = subprocess.run(["dvc", *args], cwd=repo, env=run_env(repo), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"dvc {' '.join(args)}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def cache_object(repo: Path, path: Path) -> Path:
    """Where DVC keeps the content of workspace file `path` (its md5 names it)."""
    md5 = hashlib.md5(path.read_bytes()).hexdigest()
    return repo / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]


def assert_linked(repo: Path, path: Path) -> None:
    """`path` and its DVC cache object are one file on disk (a hard link, or a symlink to it)."""
    obj = cache_object(repo, path)
    assert obj.exists(), f"{obj} (the cache copy of {path}) is missing"
    assert path.stat().st_ino == obj.stat().st_ino, (
        f"{path} is a copy of {obj}, not a link to it (links: {path.lstat().st_nlink})"
    )


def test_outputs_are_links_into_the_dvc_cache_after_repro_pull_and_the_stage_runner(tmp_path: Path) -> None:
    repo = copy_repo(tmp_path / "repo")
    dvc(repo, "repro", "download")
    image = sorted((repo / "data/raw/images").iterdir())[0]
    assert_linked(repo, image)
    # a persistent output rerun (DVC turns its links into writable copies first) is linked again
    dvc(repo, "repro", "--force", "download")
    assert_linked(repo, image)
    dvc(repo, "repro", "prepare")
    assert_linked(repo, repo / "data/prepared/cache/images_32.u8")
    assert_linked(repo, repo / "data/prepared/manifest.csv")

    # the data back from a remote, on a workspace that lost it and its cache
    dvc(repo, "remote", "add", "-d", "store", str(tmp_path / "remote"))
    dvc(repo, "push", "download", "prepare")
    shutil.rmtree(repo / "data")
    shutil.rmtree(repo / ".dvc" / "cache")
    dvc(repo, "pull", "download", "prepare")
    assert_linked(repo, image)
    assert_linked(repo, repo / "data/prepared/cache/images_32.u8")

    # a copy left by an older set-up: the stage runner (the DAG's tasks) links it again
    shutil.copyfile(image, tmp_path / "copy.png")
    image.unlink()
    shutil.copyfile(tmp_path / "copy.png", image)
    assert image.stat().st_ino != cache_object(repo, image).stat().st_ino
    runner = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "dvc_stage.py"), "download", "--project", str(repo)],
        env=run_env(repo),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert runner.returncode == 0, runner.stdout[-3000:] + runner.stderr[-3000:]
    assert "Running stage" not in runner.stdout  # nothing to rerun: only relinked
    assert_linked(repo, image)
