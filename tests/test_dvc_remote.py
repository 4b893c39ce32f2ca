"""`dvc push` / `dvc pull` of the prepared data through an S3 remote (moto's server on loopback)."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import copy_repo, run_env
from tests.servers import moto_s3, s3_client

pytestmark = pytest.mark.slow

SMALL = {
    "download": {"synthetic": {"num_images": 60, "num_patients": 30, "image_size": 32, "seed": 3}},
    "prepare": {"image_size": 32, "workers": 1},
    "train": {"augment": {"crop_size": 32}},  # a crop no larger than the cache's images, as params requires
}
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def run(repo: Path, *cmd: str, env: dict) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def test_push_and_pull_round_trip_the_prepared_data(tmp_path: Path) -> None:
    repo = copy_repo(tmp_path / "repo", SMALL)
    with moto_s3() as endpoint:
        env = run_env(repo, **CREDENTIALS)
        s3 = s3_client(endpoint)
        s3.create_bucket(Bucket="dvc-store")
        run(repo, "dvc", "repro", "prepare", env=env)
        # the documented remote set-up: S3 URL plus a custom endpoint
        run(repo, "dvc", "remote", "add", "-d", "storage", "s3://dvc-store/cxr-dwml", env=env)
        run(repo, "dvc", "remote", "modify", "storage", "endpointurl", endpoint, env=env)
        before_prepared = digests(repo / "data/prepared/cache") | {
            "manifest.csv": digests(repo / "data/prepared")["manifest.csv"]
        }
        before_raw = digests(repo / "data/raw/images")
        pushed = run(repo, "dvc", "push", "download", "prepare", env=env)
        assert "pushed" in pushed.stdout.lower()

        keys = s3.list_objects_v2(Bucket="dvc-store", Prefix="cxr-dwml/")
        assert keys.get("KeyCount", 0) > 0

        # lose the workspace data and the local cache, then get everything back from the remote
        shutil.rmtree(repo / "data")
        shutil.rmtree(repo / ".dvc" / "cache")
        run(repo, "dvc", "pull", "download", "prepare", env=env)
        after_prepared = digests(repo / "data/prepared/cache") | {
            "manifest.csv": digests(repo / "data/prepared")["manifest.csv"]
        }
        assert after_prepared == before_prepared
        assert digests(repo / "data/raw/images") == before_raw
        status = run(repo, "dvc", "status", "prepare", env=env)
        assert "changed" not in status.stdout
