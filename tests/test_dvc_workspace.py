"""The workspace `dvc repro` leaves, in a tiny copy of the repository: outputs are links into the DVC
cache (one copy of the data on disk), and a killed prepare step resumes its image cache."""

from __future__ import annotations

import copy
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, TINY_PARAMS, copy_repo, deep_update, run_env

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


def test_outputs_are_links_into_the_dvc_cache_after_repro_pull_and_in_a_dag_run_workspace(tmp_path: Path) -> None:
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

    # a DAG run's workspace starts from these outputs as links into the same cache: nothing is copied
    runner = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "dvc_stage.py"), "create", "--run-id", "r1", "--project", str(repo)],
        env=run_env(repo),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert runner.returncode == 0, runner.stdout[-3000:] + runner.stderr[-3000:]
    ws = repo / ".dvc" / "tmp" / "runs" / "r1"
    assert f"starting from the dvc.lock of {repo}" in runner.stdout, runner.stdout
    linked = ws / image.relative_to(repo)
    assert linked.stat().st_ino == cache_object(repo, image).stat().st_ino, f"{linked} is a copy"
    assert (ws / "data/prepared/manifest.csv").stat().st_ino == (repo / "data/prepared/manifest.csv").stat().st_ino


# prepare slow enough to be killed part-way: 64 px images cached at 512 px, 8 images per done-marker
SLOW_PREPARE = deep_update(copy.deepcopy(TINY_PARAMS), {"prepare": {"image_size": 512, "chunk_size": 8, "workers": 1}})


def test_a_killed_prepare_stage_resumes_its_image_cache(tmp_path: Path) -> None:
    from pipeline.config import load_params
    from pipeline.data.prepare import prepare

    repo = copy_repo(tmp_path / "repo", SLOW_PREPARE)
    dvc(repo, "repro", "download")
    markers = repo / "data/prepared-work/cache/chunks_512"
    proc = subprocess.Popen(
        ["dvc", "repro", "prepare"],
        cwd=repo,
        env=run_env(repo),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            if markers.is_dir() and len(list(markers.glob("0*.json"))) >= 5:
                break
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # as a killed job or a lost machine would
        output = proc.communicate(timeout=60)[0]
    done = {m.name: m.stat().st_mtime_ns for m in markers.glob("0*.json")}
    assert 5 <= len(done) < 45, f"the build was not caught part-way ({len(done)} of 45 chunks):\n{output[-2000:]}"
    assert not (repo / "data/prepared/cache").exists()

    rerun = dvc(repo, "repro", "prepare")
    # the rerun's progress starts at the chunks done before the kill, and leaves them untouched
    # (a tqdm bar on a terminal, "[cache 512px] 128/360 img (36%), ..., resumed" in a log)
    first = re.search(r"cache 512px\W.*?(\d+)/360", rerun.stderr + rerun.stdout)
    assert first is not None and int(first.group(1)) >= 8 * len(done), rerun.stderr[-2000:]
    assert {m: markers.joinpath(m).stat().st_mtime_ns for m in done} == done
    assert len(list(markers.glob("0*.json"))) == 45

    # the cache equals one built in one go, and DVC's record of it is exact
    params = load_params(repo / "params.yaml")
    prepare(repo / "data/raw", tmp_path / "in-one-go", params.prepare, progress=False)
    resumed, one_go = repo / "data/prepared/cache", tmp_path / "in-one-go" / "cache"
    files = sorted(p.relative_to(one_go) for p in one_go.rglob("*") if p.is_file())
    assert sorted(p.relative_to(resumed) for p in resumed.rglob("*") if p.is_file()) == files
    assert [f for f in files if (resumed / f).read_bytes() != (one_go / f).read_bytes()] == []
    status = dvc(repo, "status", "prepare")
    assert "changed" not in status.stdout, status.stdout
