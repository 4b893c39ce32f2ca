"""The whole pipeline through the real `dvc repro`, on a tiny synthetic demo, in a copy of the repo.

The run is the session's one tiny pipeline run (conftest's `pipeline_run`). After it, MLflow as
people browse it, read back through the client: the experiment opens in the model-training view,
one `dvc repro` is one parent run with the step runs nested under it, the training run lists the
prepared splits as dataset inputs with the md5 dvc.lock records, the registered model says what it
is, and register logs the pyfunc without MLflow's pickle and type-hint warnings. Then the outputs
of every step, and, on copies of the run, what DVC does on the runs after it.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from pipeline import tracking
from pipeline.classes import CLASSES
from tests.conftest import PipelineRun, copy_run, tracking_env

pytestmark = pytest.mark.slow


def dvc(run: PipelineRun, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(["dvc", *args], cwd=run.repo, env=run.env(), capture_output=True, text=True, timeout=timeout)


MODEL_NAME = "cxr-dwml"
STEPS = ("download", "prepare", "prototypes", "train")  # evaluate and register add to the train run
# the warnings every register printed while the pyfunc was pickled and its predict untyped
PYFUNC_WARNINGS = ("Add type hints to the `predict` method", "CloudPickle", "cloudpickle")


def _experiment(client):
    return client.get_experiment_by_name("cxr-dwml")


def _runs(client, filter_string: str = "") -> list:
    return client.search_runs([_experiment(client).experiment_id], filter_string=filter_string)


def _parents(client) -> list:
    return _runs(client, "tags.`cxr.step` = 'pipeline'")


def test_the_experiment_opens_in_the_model_training_view(pipeline_run: PipelineRun) -> None:
    assert _experiment(pipeline_run.client()).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"


def test_one_dvc_repro_is_one_parent_run_with_every_step_nested(pipeline_run: PipelineRun) -> None:
    client = pipeline_run.client()
    (parent,) = _parents(client)
    assert parent.info.run_name.startswith("pipeline 20") and parent.info.status == "FINISHED"
    key = parent.data.tags[tracking.PIPELINE_TAG]
    assert key.startswith("dvc:") and parent.data.tags["cxr.profile"] == "demo"
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=pipeline_run.repo, capture_output=True, text=True)
    assert parent.data.tags["cxr.git_commit"] == head.stdout.strip()

    children = _runs(client, f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    steps = {run.data.tags["cxr.step"]: run for run in children}
    assert sorted(steps) == sorted(STEPS), sorted(steps)
    for run in children:
        assert run.data.tags[tracking.PIPELINE_TAG] == key and run.info.status == "FINISHED"
        assert parent.info.start_time <= run.info.start_time and run.info.end_time <= parent.info.end_time
    train = steps["train"]
    assert train.data.tags["cxr.step.evaluate"] == train.data.tags["cxr.step.register"] == "done"
    # every run of the experiment is the parent or nested under it: the list reads as one execution
    everything = {r.info.run_id for r in _runs(client)}
    assert everything == {parent.info.run_id} | {r.info.run_id for r in children}


def test_the_training_run_lists_the_prepared_splits_with_their_dvc_md5(pipeline_run: PipelineRun) -> None:
    lock = yaml.safe_load((pipeline_run.repo / "dvc.lock").read_text())["stages"]["prepare"]["outs"]
    manifest_md5 = next(o["md5"] for o in lock if o["path"] == "data/prepared/manifest.csv")
    manifest = pd.read_csv(pipeline_run.repo / "data/prepared/manifest.csv")
    client = pipeline_run.client()
    version = client.get_model_version_by_alias(MODEL_NAME, "champion")
    train = client.get_run(version.run_id)
    inputs = {i.dataset.name: i for i in train.inputs.dataset_inputs}
    assert sorted(inputs) == ["prepared-test", "prepared-train", "prepared-val"]
    for split, context in (("train", "training"), ("val", "validation"), ("test", "test")):
        found = inputs[f"prepared-{split}"]
        assert found.dataset.digest == manifest_md5  # what dvc.lock records for the prepared manifest
        assert {t.key: t.value for t in found.tags}["mlflow.data.context"] == context
        assert yaml.safe_load(found.dataset.profile)["num_rows"] == int((manifest["split"] == split).sum())
        assert "data/prepared/manifest.csv" in found.dataset.source


def test_the_registered_model_says_what_it_is(pipeline_run: PipelineRun) -> None:
    description = pipeline_run.client().get_registered_model(MODEL_NAME).description
    assert description.startswith("Multi-label chest X-ray classifier")
    assert ", ".join(CLASSES) in description and "docs/registry.md" in description
    for words in ("ConvNeXt", "label prototypes", "dual-weighted metric loss", "`image`", "`labels`", "`error`"):
        assert words in description, words
    assert f"models:/{MODEL_NAME}@champion" in description


def test_register_logs_the_pyfunc_without_warnings_and_it_still_predicts(pipeline_run: PipelineRun) -> None:
    import mlflow
    from PIL import Image

    assert "Running stage 'register'" in pipeline_run.output
    for warning in PYFUNC_WARNINGS:
        assert warning not in pipeline_run.output, warning
    with tracking_env(pipeline_run.tracking_uri, pipeline_run.repo):
        model = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}@champion")
    buf = io.BytesIO()
    Image.fromarray(np.full((48, 48), 90, np.uint8)).save(buf, format="PNG")
    out = model.predict(pd.DataFrame({"image": [buf.getvalue(), b"not an image"]}))
    assert out[list(CLASSES)].iloc[0].between(0, 1).all() and out["error"].iloc[0] is None
    assert out["error"].iloc[1].startswith("row 1: unreadable")


def test_dvc_repro_runs_every_stage_and_registers(pipeline_run: PipelineRun) -> None:
    demo_repo = pipeline_run.repo
    for stage in ("download", "prepare", "prototypes", "train", "evaluate", "register"):
        assert f"Running stage '{stage}'" in pipeline_run.stdout

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
    # one class set per mean, the others named
    assert sorted([*metrics["classes_in_mean"], *metrics["excluded_classes"]], key=CLASSES.index) == list(CLASSES)
    assert (demo_repo / "reports/plots/roc.png").stat().st_size > 10_000
    per_class = pd.read_csv(demo_repo / "reports/per_class_auc.csv")
    assert list(per_class["class"]) == list(CLASSES)
    # the selected checkpoint's validation AUC beside the test AUC, per class
    assert list(metrics["val_per_class_auc"]) == list(CLASSES)
    val_auc = [metrics["val_per_class_auc"][c] for c in CLASSES]  # None where a class has no positive there
    assert per_class["val_auc"].tolist() == pytest.approx(
        [float("nan") if v is None else v for v in val_auc], nan_ok=True
    )
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
        assert 0.0 <= method["mean_iobb"] <= 1.0
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

    client = pipeline_run.client()
    champion = client.get_model_version_by_alias("cxr-dwml", "champion")
    challenger = client.get_model_version_by_alias("cxr-dwml", "challenger")
    assert str(champion.version) == str(challenger.version) == "1"
    assert float(champion.tags["test_mean_auc"]) == pytest.approx(metrics["mean_auc"], abs=5e-5)
    train_run = client.get_run(champion.run_id)
    assert train_run.data.tags["cxr.step"] == "train"
    assert train_run.data.metrics["test_mean_auc"] == pytest.approx(metrics["mean_auc"])
    # one validation figure under one name: the selected checkpoint's, as the version's tag has it
    assert train_run.data.metrics["val_mean_auc"] == pytest.approx(metrics["val_mean_auc"])
    assert float(champion.tags["val_mean_auc"]) == pytest.approx(train_run.data.metrics["val_mean_auc"], abs=5e-5)
    assert {"cxr.test_mean_auc_excluded", "cxr.val_mean_auc_excluded"} <= set(train_run.data.tags)
    assert {"cxr.run.download", "cxr.run.prepare", "cxr.run.prototypes"} <= set(train_run.data.tags)
    # runs people can tell apart: the training named by what differs between trainings; and the
    # execution's parent run carries the headline figures, so the collapsed list and charts show them
    assert re.fullmatch(r"train dwml metric convnext_atto e\d+ [0-9a-f]{6}", train_run.info.run_name)
    parent = client.get_run(train_run.data.tags["mlflow.parentRunId"])
    assert parent.info.run_name.startswith("pipeline ") and parent.data.tags["cxr.step"] == "pipeline"
    assert parent.data.metrics["test_mean_auc"] == pytest.approx(metrics["mean_auc"])
    assert parent.data.metrics["val_mean_auc"] == pytest.approx(metrics["val_mean_auc"])
    assert (
        parent.data.metrics["test_mean_auc_ci_low"] == pytest.approx(lo)
        and "test_mean_ece_calibrated" in parent.data.metrics
    )
    assert parent.data.metrics["promoted"] == 1.0 and parent.data.tags["gate.promoted"] == "true"
    assert parent.data.tags["model_version"] == "cxr-dwml v1"
    # the model card beside the reports and with the model; its summary is the version's description
    assert champion.description.startswith(
        f"Promoted to champion: val mean AUC {metrics['val_mean_auc']:.3f}, "
        f"test {metrics['mean_auc']:.3f} [{lo:.3f}, {hi:.3f}]."
    )
    assert "Gate: promoted to champion" in champion.description and "synthetic images" in champion.description
    card = (demo_repo / "reports/model_card.md").read_text()
    assert champion.description.split("\n\n")[0] in card and "(plots/subgroups.png)" in card
    assert (demo_repo / "reports/model_card.html").stat().st_size > 10_000  # the forest plot embedded
    logged = {a.path for a in client.list_artifacts(champion.run_id, "model_card")}
    assert {"model_card/model_card.md", "model_card/model_card.html", "model_card/plots"} <= logged
    # the version page links into the run's artifacts and shows validation and test AUC per class
    artifacts = f"#/experiments/{train_run.info.experiment_id}/runs/{champion.run_id}/artifacts"
    for path in ("model_card/model_card.html", "evaluation/plots/reliability.png", "evaluation/plots/subgroups.png"):
        assert f"]({artifacts}/{path}?workflowType=machine_learning)" in champion.description, path
        assert client.list_artifacts(champion.run_id, path.rsplit("/", 1)[0]), path
    hernia = metrics["val_per_class_auc"]["Hernia"], metrics["per_class_auc"]["Hernia"]
    assert f"| Hernia | {hernia[0]:.3f} | {hernia[1]:.3f} [" in champion.description
    # the logged model carries the headline figures, for the experiment's Models tab
    assert registration["model_uri"].startswith("models:/m-")
    logged_model = client.get_logged_model(registration["model_uri"].removeprefix("models:/"))
    model_metrics = {m.key: m.value for m in logged_model.metrics}
    assert model_metrics["val_mean_auc"] == pytest.approx(metrics["val_mean_auc"], abs=1e-3)
    assert model_metrics["test_mean_auc"] == pytest.approx(metrics["mean_auc"]) and model_metrics["promoted"] == 1.0
    # each evaluation plot as an MLflow image, for the chart and compare views
    images = {a.path for a in client.list_artifacts(champion.run_id, "images")}
    for plot in ("reliability", "subgroups", "roc", "per_class_auc"):
        assert any(p.startswith(f"images/evaluation~{plot}+step+0+") for p in images), (plot, sorted(images))


def test_dvc_reruns_only_what_changed_and_compares_with_a_kept_baseline(
    pipeline_run: PipelineRun, tmp_path: Path
) -> None:
    """On a copy of the run: nothing to do, a failed run then the fixed one, a baseline and a variant."""
    copy = copy_run(pipeline_run, tmp_path / "repo")
    demo_repo, client = copy.repo, copy.client()
    metrics = json.loads((demo_repo / "reports/metrics.json").read_text())

    # a second run has nothing to do and says so
    second = dvc(copy, "repro")
    assert second.returncode == 0, second.stderr
    assert "Running stage" not in second.stdout
    assert "up to date" in second.stdout.lower()

    # a run that fails on a wrong key (DVC has deleted train's uncached plots by then), then the
    # fixed run: train resumes its finished run and rewrites the same bytes, so nothing after it
    # reruns and no second version of the same model is registered
    committed = (demo_repo / "params.yaml").read_text()
    (demo_repo / "params.yaml").write_text(committed.replace("\ntrain:\n", "\ntrain:\n  epochz: 3\n", 1))
    failed = dvc(copy, "repro")
    assert failed.returncode != 0 and "train.epochz" in failed.stdout + failed.stderr
    assert not (demo_repo / "reports/train/history.csv").exists()
    (demo_repo / "params.yaml").write_text(committed)
    fixed = dvc(copy, "repro")
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
    third = dvc(copy, "repro")
    assert third.returncode == 0, third.stderr[-3000:]
    assert "Running stage 'evaluate'" in third.stdout and "Running stage 'train'" not in third.stdout
    again = json.loads((demo_repo / "reports/metrics.json").read_text())
    # same checkpoint, same numbers: only the bootstrap interval may move
    assert again["mean_auc"] == metrics["mean_auc"] and again["per_class_auc"] == metrics["per_class_auc"]
    diff = dvc(copy, "metrics", "diff", "--json")
    assert diff.returncode == 0, diff.stderr
    changed = json.loads(diff.stdout)["reports/metrics.json"]
    assert "bootstrap_resamples" in changed and changed["bootstrap_resamples"]["old"] == 100
    plots = dvc(copy, "plots", "diff", "-o", "plots_html")
    assert plots.returncode == 0, plots.stderr
    html = (demo_repo / "plots_html" / "index.html").read_text()
    assert "per_class_auc" in html and "HEAD" in html and "workspace" in html


def test_a_later_dvc_repro_is_a_parent_of_its_own(pipeline_run: PipelineRun, tmp_path: Path) -> None:
    """On a copy of the run: one more repro, one more parent, with only what it ran nested under it."""
    copy = copy_run(pipeline_run, tmp_path / "repo")
    client = copy.client()
    before = {p.info.run_id for p in _parents(client)}
    result = dvc(copy, "repro", "--force", "--single-item", "download", timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    new = [p for p in _parents(client) if p.info.run_id not in before]
    assert len(new) == 1, [p.info.run_name for p in new]
    keys = {p.data.tags[tracking.PIPELINE_TAG] for p in _parents(client)}
    assert len(keys) == len(before) + 1  # every execution its own key
    nested = _runs(client, f"tags.`mlflow.parentRunId` = '{new[0].info.run_id}'")
    assert [r.data.tags["cxr.step"] for r in nested] == ["download"]
