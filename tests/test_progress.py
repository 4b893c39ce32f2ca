"""Progress in logs: whole lines at an interval when there is no terminal (an Airflow task log)."""

from __future__ import annotations

import io
import re

import pytest

from pipeline import progress
from pipeline.progress import LogProgress, progress_bar


def test_lines_at_an_interval_with_rate_eta_and_figures(monkeypatch) -> None:
    clock = iter([0.0, 10.0, 20.0, 31.0, 45.0, 62.0, 70.0])
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    out = io.StringIO()
    bar = LogProgress(total=100, desc="epoch 1/16", unit="batch", every=30, stream=out)  # starts at 0 s
    bar.set_postfix(loss="0.4167", img_s="74")
    for _ in range(5):  # at 10, 20, 31, 45, 62 s
        bar.update(10)
    bar.close()  # at 70 s
    lines = out.getvalue().splitlines()
    assert lines == [
        "[epoch 1/16] 30/100 batch (30%), 1.0 batch/s, elapsed 0m31s, ETA 1m12s, loss=0.4167 img_s=74",
        "[epoch 1/16] 50/100 batch (50%), 0.8 batch/s, elapsed 1m02s, ETA 1m02s, loss=0.4167 img_s=74",
        "[epoch 1/16] 50/100 batch (50%), 0.7 batch/s, elapsed 1m10s, loss=0.4167 img_s=74 (done)",
    ]


def test_resumed_work_says_where_it_starts() -> None:
    out = io.StringIO()
    bar = LogProgress(total=360, initial=128, desc="cache 512px", unit="img", every=1e9, stream=out)
    bar.update(232)
    bar.close()
    first, last = out.getvalue().splitlines()
    assert first.startswith("[cache 512px] 128/360 img (36%), ") and first.endswith(", resumed")
    assert last.startswith("[cache 512px] 360/360 img (100%), ") and last.endswith("(done)")


def test_bytes_and_iterables() -> None:
    out = io.StringIO()
    bar = LogProgress(total=0, desc="fetch s3", unit="B", unit_scale=True, every=1e9, stream=out)
    bar.total += 3_000_000
    bar.update(3_000_000)
    bar.close()
    assert re.fullmatch(r"\[fetch s3\] 3\.00MB/3\.00MB \(100%\), \S+B/s, .* \(done\)\n", out.getvalue())
    out = io.StringIO()
    assert list(LogProgress(range(4), desc="score", every=1e9, stream=out)) == [0, 1, 2, 3]
    assert out.getvalue().startswith("[score] 4/4 it (100%)")


def test_no_terminal_gives_lines_and_a_terminal_a_bar(monkeypatch) -> None:
    monkeypatch.setattr(progress, "_is_terminal", lambda: False)
    assert isinstance(progress_bar(total=3, desc="x"), LogProgress)
    monkeypatch.setattr(progress, "_is_terminal", lambda: True)
    assert not isinstance(progress_bar(total=3, desc="x"), LogProgress)
    assert not isinstance(progress_bar(total=3, disable=True), LogProgress)


def test_the_interval_comes_from_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("CXR_PROGRESS_SECONDS", "5")
    assert progress.interval() == 5.0
    monkeypatch.setenv("CXR_PROGRESS_SECONDS", "soon")
    with pytest.raises(ValueError, match=r"CXR_PROGRESS_SECONDS='soon' is not a number of seconds"):
        progress.interval()


def test_the_pipeline_log_shows_progress_as_lines(pipeline_run) -> None:
    """`dvc repro` with its output captured (no terminal): training's progress arrives as whole lines,
    not one line of carriage returns."""
    assert "\r" not in pipeline_run.output
    epochs = [line for line in pipeline_run.output.splitlines() if line.startswith("[epoch 1/")]
    assert epochs and epochs[-1].endswith("(done)") and "batch/s" in epochs[-1] and "loss=" in epochs[-1]
    assert any(line.startswith("[cache ") and line.endswith("(done)") for line in pipeline_run.output.splitlines())
