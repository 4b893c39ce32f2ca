"""MLflow as people browse it, read back through the client after a tiny `dvc repro` of the whole
pipeline: the experiment opens in the model-training view, one `dvc repro` is one parent run with
the step runs nested under it, the training run lists the prepared splits as dataset inputs with
the md5 dvc.lock records, the registered model says what it is, and register logs the pyfunc
without MLflow's pickle and type-hint warnings.
"""

from __future__ import annotations

import copy
import io
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from pipeline import tracking
from pipeline.classes import CLASSES
from tests.conftest import TINY_PARAMS, copy_repo, deep_update, run_env
from tests.test_registry import tracking_env

pytestmark = pytest.mark.slow
MODEL_NAME = "cxr-dwml"
STEPS = ("download", "prepare", "prototypes", "train")  # evaluate and register add to the train run
# the warnings every register printed while the pyfunc was pickled and its predict untyped
PYFUNC_WARNINGS = ("Add type hints to the `predict` method", "CloudPickle", "cloudpickle")


@dataclass
class Repro:
    repo: Path
    client: object  # MlflowClient on the store the run logged to
    output: str  # what `dvc repro` printed, the stages' stdout and stderr included


@pytest.fixture(scope="module")
def repro(tmp_path_factory: pytest.TempPathFactory) -> Repro:
    from mlflow import MlflowClient

    repo = tmp_path_factory.mktemp("browse") / "repo"
    repo.mkdir()
    copy_repo(repo, deep_update(copy.deepcopy(TINY_PARAMS), {"train": {"epochs": 1}}))
    result = subprocess.run(["dvc", "repro"], cwd=repo, env=run_env(repo), capture_output=True, text=True, timeout=900)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    return Repro(repo, MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}"), output)


def _experiment(client):
    return client.get_experiment_by_name("cxr-dwml")


def _runs(client, filter_string: str = "") -> list:
    return client.search_runs([_experiment(client).experiment_id], filter_string=filter_string)


def _parents(client) -> list:
    return _runs(client, "tags.`cxr.step` = 'pipeline'")


def test_the_experiment_opens_in_the_model_training_view(repro: Repro) -> None:
    assert _experiment(repro.client).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"


def test_one_dvc_repro_is_one_parent_run_with_every_step_nested(repro: Repro) -> None:
    (parent,) = _parents(repro.client)
    assert parent.info.run_name.startswith("pipeline 20") and parent.info.status == "FINISHED"
    key = parent.data.tags[tracking.PIPELINE_TAG]
    assert key.startswith("dvc:") and parent.data.tags["cxr.profile"] == "demo"
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repro.repo, capture_output=True, text=True)
    assert parent.data.tags["cxr.git_commit"] == head.stdout.strip()

    children = _runs(repro.client, f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    steps = {run.data.tags["cxr.step"]: run for run in children}
    assert sorted(steps) == sorted(STEPS), sorted(steps)
    for run in children:
        assert run.data.tags[tracking.PIPELINE_TAG] == key and run.info.status == "FINISHED"
        assert parent.info.start_time <= run.info.start_time and run.info.end_time <= parent.info.end_time
    train = steps["train"]
    assert train.data.tags["cxr.step.evaluate"] == train.data.tags["cxr.step.register"] == "done"
    # every run of the experiment is the parent or nested under it: the list reads as one execution
    assert {r.info.run_id for r in _runs(repro.client)} == {parent.info.run_id} | {r.info.run_id for r in children}


def test_the_training_run_lists_the_prepared_splits_with_their_dvc_md5(repro: Repro) -> None:
    lock = yaml.safe_load((repro.repo / "dvc.lock").read_text())["stages"]["prepare"]["outs"]
    manifest_md5 = next(o["md5"] for o in lock if o["path"] == "data/prepared/manifest.csv")
    manifest = pd.read_csv(repro.repo / "data/prepared/manifest.csv")
    version = repro.client.get_model_version_by_alias(MODEL_NAME, "champion")
    train = repro.client.get_run(version.run_id)
    inputs = {i.dataset.name: i for i in train.inputs.dataset_inputs}
    assert sorted(inputs) == ["prepared-test", "prepared-train", "prepared-val"]
    for split, context in (("train", "training"), ("val", "validation"), ("test", "test")):
        found = inputs[f"prepared-{split}"]
        assert found.dataset.digest == manifest_md5  # what dvc.lock records for the prepared manifest
        assert {t.key: t.value for t in found.tags}["mlflow.data.context"] == context
        assert yaml.safe_load(found.dataset.profile)["num_rows"] == int((manifest["split"] == split).sum())
        assert "data/prepared/manifest.csv" in found.dataset.source


def test_the_registered_model_says_what_it_is(repro: Repro) -> None:
    description = repro.client.get_registered_model(MODEL_NAME).description
    assert description.startswith("Multi-label chest X-ray classifier")
    assert ", ".join(CLASSES) in description and "docs/registry.md" in description
    for words in ("ConvNeXt", "label prototypes", "dual-weighted metric loss", "`image`", "`labels`", "`error`"):
        assert words in description, words
    assert f"models:/{MODEL_NAME}@champion" in description


def test_register_logs_the_pyfunc_without_warnings_and_it_still_predicts(repro: Repro) -> None:
    import mlflow
    from PIL import Image

    assert "Running stage 'register'" in repro.output
    for warning in PYFUNC_WARNINGS:
        assert warning not in repro.output, warning
    with tracking_env(f"sqlite:///{repro.repo / 'mlflow.db'}", repro.repo):
        model = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}@champion")
    buf = io.BytesIO()
    Image.fromarray(np.full((48, 48), 90, np.uint8)).save(buf, format="PNG")
    out = model.predict(pd.DataFrame({"image": [buf.getvalue(), b"not an image"]}))
    assert out[list(CLASSES)].iloc[0].between(0, 1).all() and out["error"].iloc[0] is None
    assert out["error"].iloc[1].startswith("row 1: unreadable")


def test_a_second_dvc_repro_is_a_second_parent(repro: Repro) -> None:
    result = subprocess.run(
        ["dvc", "repro", "--force", "--single-item", "download"],
        cwd=repro.repo,
        env=run_env(repro.repo),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    parents = sorted(_parents(repro.client), key=lambda r: r.info.start_time)
    keys = [p.data.tags[tracking.PIPELINE_TAG] for p in parents]
    assert len(keys) == 2 and keys[0] != keys[1], keys
    nested = _runs(repro.client, f"tags.`mlflow.parentRunId` = '{parents[1].info.run_id}'")
    assert [r.data.tags["cxr.step"] for r in nested] == ["download"]
