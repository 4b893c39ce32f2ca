"""benchmarks/scale.py at a small size: every stage through `dvc repro`, measured, in its results file.

The full-size rehearsal (112,120 images) takes hours on a small machine and is a benchmark, not a
test; this runs the same script on a few hundred NIH-shaped images to show that it works.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import run_env

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("download", "prepare", "prototypes", "train", "evaluate", "register", "predict")


@pytest.mark.slow
def test_scale_benchmark_runs_every_stage_and_writes_its_figures(tmp_path: Path) -> None:
    out = tmp_path / "scale_test.json"
    cmd = [
        sys.executable, "benchmarks/scale.py", "--images", "500", "--workdir", str(tmp_path / "work"),
        "--predict-images", "12", "--decode-sample", "3", "--train-steps", "2", "--out", str(out),
        "--set", "download.synthetic.image_size=64", "--set", "evaluate.bootstrap_resamples=50",
        "--set", "evaluate.min_positive_patients=2",
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, env=run_env(ROOT), capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    report = json.loads(out.read_text())
    assert report["images"] == 500 and report["test_images"] > 0
    assert set(report["stages"]) == set(STEPS)
    for step in STEPS:
        figures = report["stages"][step]
        assert figures["seconds"] > 0 and figures["peak_rss_mb"] > 0, (step, figures)
        assert figures["disk_mb"] >= 0 or step == "predict", (step, figures)
    assert report["stages"]["download"]["disk_mb"] > 1  # 300 PNGs and their DVC cache entries
    assert report["stages"]["predict"]["images"] == 12
    assert report["noop_repro_seconds"] > 0 and report["status_seconds"] > 0
    assert report["decode_sample"]["images"] == 3 and report["decode_sample"]["decode_resize_ms_per_image"] > 0
    assert report["max_steps_per_epoch"] == 2 and report["train_summary"] is not None
    # a second call resumes: every stage is up to date and kept, none is run again (it stops at
    # register: predict and the decode sample measure afresh on every call, and were checked above)
    resume = [*cmd, "--until", "register", "--decode-sample", "0"]
    again = subprocess.run(resume, cwd=ROOT, env=run_env(ROOT), capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    for stage in STEPS[:-1]:
        assert f"[scale] {stage}: measured before and up to date, kept" in again.stdout
    assert "[scale] predict" not in again.stdout
    assert json.loads(out.read_text())["stages"] == report["stages"], "the measured figures are kept"
