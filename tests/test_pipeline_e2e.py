"""The whole pipeline through the real `dvc repro`, on a tiny synthetic demo, in a copy of the repo."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.classes import CLASSES
from tests.conftest import run_env

pytestmark = pytest.mark.slow


def dvc(repo: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(["dvc", *args], cwd=repo, env=run_env(repo), capture_output=True, text=True, timeout=timeout)


def test_dvc_repro_runs_every_stage_and_registers(demo_repo: Path) -> None:
    first = dvc(demo_repo, "repro")
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    for stage in ("download", "prepare", "prototypes", "train", "evaluate", "register"):
        assert f"Running stage '{stage}'" in first.stdout

    raw = demo_repo / "data" / "raw"
    assert (raw / "train_val_list.txt").exists() and (raw / "test_list.txt").exists()
    assert len(list((raw / "images").glob("*.png"))) == 360
    manifest = pd.read_csv(demo_repo / "data/prepared/manifest.csv")
    assert set(manifest["split"]) == {"train", "val", "test"}
    by_split = manifest.groupby("split")["patient"].apply(set)
    assert not (by_split["train"] & by_split["test"]) and not (by_split["val"] & by_split["test"])
    assert not (by_split["train"] & by_split["val"])
    stats = json.loads((demo_repo / "data/prepared/split_stats.json").read_text())
    assert stats["patient_overlap"] == 0

    protos = np.load(demo_repo / "artifacts/prototypes/prototypes.npy")
    assert protos.shape == (14, 384) and np.isfinite(protos).all()
    meta = json.loads((demo_repo / "artifacts/prototypes/prototypes.json").read_text())
    assert meta["classes"] == list(CLASSES)

    assert (demo_repo / "artifacts/model/best.pt").exists() and (demo_repo / "artifacts/model/last.pt").exists()
    history = pd.read_csv(demo_repo / "reports/train/history.csv")
    assert list(history["epoch"]) == [1, 2]

    metrics = json.loads((demo_repo / "reports/metrics.json").read_text())
    assert set(metrics["per_class_auc"]) == set(CLASSES)
    assert 0.0 < metrics["mean_auc"] < 1.0
    lo, hi = metrics["mean_auc_ci"]
    assert lo <= metrics["mean_auc"] <= hi
    assert (demo_repo / "reports/plots/roc.png").stat().st_size > 10_000
    per_class = pd.read_csv(demo_repo / "reports/per_class_auc.csv")
    assert list(per_class["class"]) == list(CLASSES)
    predictions = pd.read_parquet(demo_repo / "reports/predictions/test.parquet")
    assert len(predictions) == (manifest["split"] == "test").sum()
    assert list(predictions.columns) == ["image", "patient", *CLASSES]
    test_rows = manifest[manifest["split"] == "test"]
    assert metrics["bootstrap_unit"] == "patient" and metrics["test_patients"] == test_rows["patient"].nunique()
    subgroups = json.loads((demo_repo / "reports/subgroups.json").read_text())
    assert set(subgroups["attributes"]) == {"sex", "age", "view", "followup"}
    sexes = subgroups["attributes"]["sex"]["groups"]
    assert sexes["M"]["images"] + sexes["F"]["images"] == len(test_rows)  # the demo label file gives every sex
    assert subgroups["overall"]["mean_auc"] == metrics["mean_auc"]
    assert (demo_repo / "reports/plots/subgroups.png").stat().st_size > 10_000
    # where it looked: the gallery, and the localisation check against the synthetic source's boxes
    heatmaps = sorted((demo_repo / "reports/heatmaps").glob("*.png"))
    assert len(heatmaps) == 4 and all(p.stat().st_size > 10_000 for p in heatmaps)
    localization = json.loads((demo_repo / "reports/localization.json").read_text())
    assert localization["available"] is True and localization["source"] == "BBox_List_2017.csv"
    assert set(localization["methods"]) == {"gradcam", "prototype", "centre"}
    for method in localization["methods"].values():
        assert 0.0 <= method["mean_pointing_accuracy"] <= 1.0 and 0.0 <= method["mean_iou"] <= 1.0
    assert "## Localisation (where the model looked)" in (demo_repo / "reports/comparison.md").read_text()
    calibration = json.loads((demo_repo / "reports/calibration.json").read_text())
    assert calibration["fitted_on"] == "val" and set(calibration["per_class"]) == set(CLASSES)
    assert calibration["chosen_by"]["setting"] == "auto"
    assert min(calibration["chosen_by"]["cross_validated_nll"].values()) == pytest.approx(
        calibration["chosen_by"]["cross_validated_nll"][calibration["method"]]
    )
    assert (demo_repo / "reports/plots/reliability.png").stat().st_size > 20_000

    registration = json.loads((demo_repo / "reports/registration.json").read_text())
    assert registration["version"] == "1" and registration["promote"] is True
    assert registration["selected_on"] == "val"
    assert registration["val_mean_auc"] == pytest.approx(metrics["val_mean_auc"])

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{demo_repo / 'mlflow.db'}")
    champion = client.get_model_version_by_alias("cxr-dwml", "champion")
    challenger = client.get_model_version_by_alias("cxr-dwml", "challenger")
    assert str(champion.version) == str(challenger.version) == "1"
    assert float(champion.tags["test_mean_auc"]) == pytest.approx(metrics["mean_auc"])
    train_run = client.get_run(champion.run_id)
    assert train_run.data.tags["cxr.step"] == "train"
    assert "test_mean_auc" in train_run.data.metrics and "val_mean_auc" in train_run.data.metrics
    assert {"cxr.run.download", "cxr.run.prepare", "cxr.run.prototypes"} <= set(train_run.data.tags)
    # the model card beside the reports and with the model; its summary is the version's description
    assert champion.description.startswith(f"**Test mean AUC {metrics['mean_auc']:.3f} [{lo:.3f}, {hi:.3f}]**")
    assert "Gate: **promoted to champion**" in champion.description and "synthetic images" in champion.description
    card = (demo_repo / "reports/model_card.md").read_text()
    assert champion.description.split("\n\n")[0] in card and "(plots/subgroups.png)" in card
    assert (demo_repo / "reports/model_card.html").stat().st_size > 10_000  # the forest plot embedded
    logged = {a.path for a in client.list_artifacts(champion.run_id, "model_card")}
    assert {"model_card/model_card.md", "model_card/model_card.html", "model_card/plots"} <= logged

    # a second run has nothing to do and says so
    second = dvc(demo_repo, "repro")
    assert second.returncode == 0, second.stderr
    assert "Running stage" not in second.stdout
    assert "up to date" in second.stdout.lower()

    # a run that fails on a wrong key (DVC has deleted train's uncached plots by then), then the
    # fixed run: train resumes its finished run and rewrites the same bytes, so nothing after it
    # reruns and no second version of the same model is registered
    committed = (demo_repo / "params.yaml").read_text()
    (demo_repo / "params.yaml").write_text(committed.replace("\ntrain:\n", "\ntrain:\n  epochz: 3\n", 1))
    failed = dvc(demo_repo, "repro")
    assert failed.returncode != 0 and "train.epochz" in failed.stdout + failed.stderr
    assert not (demo_repo / "reports/train/history.csv").exists()
    (demo_repo / "params.yaml").write_text(committed)
    fixed = dvc(demo_repo, "repro")
    assert fixed.returncode == 0, fixed.stdout[-4000:] + fixed.stderr[-4000:]
    assert "Running stage 'evaluate'" not in fixed.stdout and "Running stage 'register'" not in fixed.stdout
    assert [v.version for v in client.search_model_versions("name='cxr-dwml'")] in (["1"], [1])
    assert "Running stage 'train'" in fixed.stdout and "the run had finished" in fixed.stdout
    assert (demo_repo / "reports/train/history.csv").exists()

    # a kept baseline, then a variant: `dvc metrics diff` / `dvc plots diff` put them side by side
    git = ["git", "-c", "user.email=t@example.invalid", "-c", "user.name=t"]
    subprocess.run([*git, "add", "dvc.lock", "reports"], cwd=demo_repo, check=True)
    subprocess.run([*git, "commit", "-qm", "baseline"], cwd=demo_repo, check=True)
    params = (demo_repo / "params.yaml").read_text().replace("bootstrap_resamples: 100", "bootstrap_resamples: 60", 1)
    (demo_repo / "params.yaml").write_text(params)
    third = dvc(demo_repo, "repro")
    assert third.returncode == 0, third.stderr[-3000:]
    assert "Running stage 'evaluate'" in third.stdout and "Running stage 'train'" not in third.stdout
    again = json.loads((demo_repo / "reports/metrics.json").read_text())
    # same checkpoint, same numbers: only the bootstrap interval may move
    assert again["mean_auc"] == metrics["mean_auc"] and again["per_class_auc"] == metrics["per_class_auc"]
    diff = dvc(demo_repo, "metrics", "diff", "--json")
    assert diff.returncode == 0, diff.stderr
    changed = json.loads(diff.stdout)["reports/metrics.json"]
    assert "bootstrap_resamples" in changed and changed["bootstrap_resamples"]["old"] == 100
    plots = dvc(demo_repo, "plots", "diff", "-o", "plots_html")
    assert plots.returncode == 0, plots.stderr
    html = (demo_repo / "plots_html" / "index.html").read_text()
    assert "per_class_auc" in html and "HEAD" in html and "workspace" in html
