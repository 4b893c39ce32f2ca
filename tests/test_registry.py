"""Registration and the promotion gate: the pure decision, then the real register component against a
real `mlflow server` on loopback (PostgreSQL backend where it runs, SQLite otherwise).

The trained model is the session's tiny pipeline run (conftest's `pipeline_run`), read only. On a
server, each version gets its own "training run" (the step that would have made it), the real
evaluate component logs the real model's test predictions into it, and the real register component
registers it. The deliberately worse and better versions reuse the network with rewritten test
predictions and metrics, which is all the gate looks at.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from components.provenance import airflow_tags, data_hash, dvc_data_hash, git_commit, run_tags
from pipeline.classes import CLASSES
from pipeline.registry.client import version_tags
from pipeline.registry.gate import SelectionSet, decide, selection_set
from tests.conftest import ROOT, PipelineRun, labels_of, run_env, settings, tracking_env
from tests.servers import FaultProxy, mlflow_server, postgres_databases, postgres_missing

MODEL_NAME = "cxr-dwml"


# ----------------------------------------------------------------------------- the pure gate


def _gate_data(n: int = 300, seed: int = 0):
    """Validation labels of n images of n // 3 patients, and a good and a weak model's SelectionSet."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, len(CLASSES))) < 0.3).astype(int)
    noise = rng.random(y.shape)
    patients = np.arange(n) // 3
    frame = lambda scores: pd.DataFrame(
        {
            "image": [f"{i:05d}.png" for i in range(n)],  # noqa: E731
            **dict(zip(CLASSES, scores.T)),
        }
    )
    good = SelectionSet(frame(0.6 * y + noise), y, patients)  # mean AUC ~0.9
    weak = SelectionSet(frame(0.15 * y + noise), y, patients)  # mean AUC ~0.6
    return good, weak


MIN_PATIENTS = settings("evaluate").min_positive_patients


def _auc(ours: SelectionSet) -> float:
    from pipeline.metrics import class_set, mean_auc, roc_auc

    return mean_auc(roc_auc(ours.y, ours.scores), class_set(ours.y, ours.patients, MIN_PATIENTS))


def test_gate_floor_first_model_and_missing_champion_predictions() -> None:
    good, weak = _gate_data()
    cfg = settings("register", min_auc=0.7, bootstrap_resamples=200)
    below = decide(cfg, weak, None, None, min_patients=MIN_PATIENTS)  # the floor applies to the validation mean AUC
    assert below["promote"] is False and "validation mean AUC" in below["reason"]
    assert below["val_mean_auc"] == pytest.approx(_auc(weak)) and below["selected_on"] == "val"
    undefined = SelectionSet(good.predictions, np.zeros_like(good.y), good.patients)  # no positives at all
    nan = decide(cfg, undefined, None, None, min_patients=MIN_PATIENTS)
    assert nan["promote"] is False and nan["val_mean_auc"] is None
    assert f"no finding has {MIN_PATIENTS} positive and {MIN_PATIENTS} negative val patients" in nan["reason"]
    assert nan["val_excluded_classes"]["Hernia"] == f"0 positive patients (fewer than {MIN_PATIENTS})"
    first = decide(cfg, good, None, None, min_patients=MIN_PATIENTS)
    assert first["promote"] is True and first["champion_version"] is None
    assert (first["bootstrap_unit"], first["n_patients"]) == ("patient", 100)
    # a champion whose predictions cannot be fetched is never replaced blindly
    blind = decide(cfg, good, None, "3", min_patients=MIN_PATIENTS)
    assert blind["promote"] is False and "v3" in blind["reason"]
    assert "evaluation/predictions/val.parquet" in blind["reason"]


def test_gate_paired_patient_bootstrap_margin_and_validation_set() -> None:
    good, weak = _gate_data()
    cfg = settings("register", min_auc=0.5, bootstrap_resamples=200)
    better = decide(cfg, good, weak.predictions, "1", min_patients=MIN_PATIENTS)
    assert better["promote"] is True and better["selected_on"] == "val"
    assert better["delta"] == pytest.approx(_auc(good) - _auc(weak))
    assert better["champion_val_mean_auc"] == pytest.approx(_auc(weak))
    assert better["p_value"] <= cfg.max_p_value and better["delta_ci"][0] > 0
    assert "on val (100 patients)" in better["reason"]
    worse = decide(cfg, weak, good.predictions, "1", min_patients=MIN_PATIENTS)
    assert worse["promote"] is False and worse["delta"] < 0 and worse["p_value"] > 0.5
    same = decide(cfg, good, good.predictions, "1", min_patients=MIN_PATIENTS)
    assert same["promote"] is False and same["delta"] == 0 and same["p_value"] == 1.0
    # better, but not by the margin asked for
    strict_cfg = settings("register", min_auc=0.5, margin=0.5, bootstrap_resamples=200)
    strict = decide(strict_cfg, good, weak.predictions, "1", min_patients=MIN_PATIENTS)
    assert strict["promote"] is False and 0 < strict["delta"] < 0.5
    # rows in another order are matched by image name, not position; patients are the resampled unit
    flipped = SelectionSet(good.predictions.iloc[::-1].reset_index(drop=True), good.y[::-1], good.patients[::-1])
    shuffled = decide(cfg, flipped, weak.predictions, "1", min_patients=MIN_PATIENTS)
    assert shuffled["delta"] == pytest.approx(better["delta"])
    assert shuffled["delta_ci"] == pytest.approx(better["delta_ci"])
    other = decide(cfg, good, weak.predictions.iloc[:100], "1", min_patients=MIN_PATIENTS)
    assert other["promote"] is False and "another val set" in other["reason"]


def test_gate_resamples_patients_not_images() -> None:
    from pipeline.metrics import paired_bootstrap_delta

    good, weak = _gate_data()
    cfg = settings("register", min_auc=0.5, bootstrap_resamples=300, seed=4)
    decision = decide(cfg, good, weak.predictions, "1", min_patients=MIN_PATIENTS)
    paired = functools.partial(
        paired_bootstrap_delta, good.y, weak.scores, good.scores, 300, seed=4, min_patients=MIN_PATIENTS
    )
    by_patient, by_image = paired(groups=good.patients), paired()
    assert decision["delta_ci"] == [by_patient["low"], by_patient["high"]]
    assert decision["p_value"] == by_patient["p_value"] and decision["n_patients"] == 100
    assert decision["delta_ci"] != [by_image["low"], by_image["high"]]


def test_gate_leaves_a_class_with_few_validation_patients_out_by_name() -> None:
    """One Hernia patient in validation: the gate's means and its paired bootstrap are over the other 13."""
    from sklearn.metrics import roc_auc_score

    from pipeline.metrics import paired_bootstrap_delta

    good, weak = _gate_data()
    y = good.y.copy()
    y[:, -1] = 0
    y[:3, -1] = 1  # the three images of patient 0
    ours = SelectionSet(good.predictions, y, good.patients)
    cfg = settings("register", min_auc=0.5, bootstrap_resamples=200)
    decision = decide(cfg, ours, weak.predictions, "1", min_patients=MIN_PATIENTS)
    assert decision["val_excluded_classes"] == {"Hernia": f"1 positive patient (fewer than {MIN_PATIENTS})"}
    assert decision["val_classes_in_mean"] == list(CLASSES[:-1])
    expected = np.mean([roc_auc_score(y[:, k], good.scores[:, k]) for k in range(len(CLASSES) - 1)])
    assert decision["val_mean_auc"] == pytest.approx(expected, abs=1e-12)
    thirteen = paired_bootstrap_delta(
        y[:, :-1], weak.scores[:, :-1], good.scores[:, :-1], 200, seed=cfg.seed, groups=good.patients, min_patients=1
    )
    assert decision["delta"] == pytest.approx(thirteen["delta"], abs=1e-12)
    assert decision["delta_ci"] == pytest.approx([thirteen["low"], thirteen["high"]], abs=1e-12)
    assert decision["bootstrap_dropped_resamples"] == 0


def test_selection_set_reads_labels_and_patients_of_validation_images_only() -> None:
    manifest = pd.DataFrame(
        {
            "image": ["a.png", "b.png", "c.png", "t.png"],
            "patient": [7, 7, 9, 11],
            "split": ["val", "val", "val", "test"],
            **{c: [1, 0, 0, 1] for c in CLASSES},
        }
    )
    preds = pd.DataFrame({"image": ["c.png", "a.png"], **{c: [0.1, 0.9] for c in CLASSES}})
    ours = selection_set(preds, manifest, "reports/predictions/val.parquet")
    assert ours.split == "val" and list(ours.patients) == [9, 7]
    np.testing.assert_array_equal(ours.y[:, 0], [0, 1])
    outside = r"reports/predictions/test.parquet are not in the val split \(e.g. t.png in test\)"
    with pytest.raises(ValueError, match=outside):
        selection_set(
            pd.concat([preds, preds.assign(image="t.png").iloc[:1]]), manifest, "reports/predictions/test.parquet"
        )
    with pytest.raises(ValueError, match=r"not in the prepared manifest \(e.g. x.png\)"):
        selection_set(preds.assign(image=["x.png", "a.png"]), manifest, "val.parquet")
    with pytest.raises(ValueError, match="no column Hernia"):
        selection_set(preds.drop(columns="Hernia"), manifest, "val.parquet")


def test_provenance_helpers(tmp_path: Path) -> None:
    assert dvc_data_hash(tmp_path / "dvc.lock") == "unknown"
    lock = {
        "schema": "2.0",
        "stages": {
            "prepare": {
                "outs": [
                    {"path": "data/prepared/manifest.csv", "md5": "aa" * 16},
                    {"path": "data/prepared/cache", "md5": "bb" * 16 + ".dir"},
                ]
            }
        },
    }
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    assert dvc_data_hash(tmp_path / "dvc.lock") == f"{'aa' * 16},{'bb' * 16}.dir"
    short = data_hash(dvc_data_hash(tmp_path / "dvc.lock"))
    assert len(short) == 16 and short != data_hash(f"{'aa' * 16},{'cc' * 16}.dir") and data_hash("unknown") == "unknown"
    assert git_commit(tmp_path) == "unknown"  # not a git repository


def test_airflow_context_becomes_run_tags() -> None:
    env = {
        "AIRFLOW_CTX_DAG_ID": "cxr_dwml",
        "AIRFLOW_CTX_DAG_RUN_ID": "manual__1",
        "AIRFLOW_CTX_TASK_ID": "train",
        "AIRFLOW_CTX_TRY_NUMBER": "2",
        "AIRFLOW_CTX_LOGICAL_DATE": "",
        "HOME": "/root",
    }
    assert airflow_tags(env) == {
        "airflow.dag_id": "cxr_dwml",
        "airflow.run_id": "manual__1",
        "airflow.task_id": "train",
        "airflow.try_number": "2",
    }
    assert run_tags("train", "demo", env) == {"cxr.step": "train", "cxr.profile": "demo", **airflow_tags(env)}
    assert run_tags("prepare", "paper", {}) == {"cxr.step": "prepare", "cxr.profile": "paper"}


def test_version_tags_put_provenance_first() -> None:
    metrics = {
        "val_mean_auc": 0.7,
        "mean_auc": 0.65,
        "mean_auc_ci": [0.6, 0.7],
        "per_class_auc": {"Hernia": 0.9, "Mass": None},
    }
    tags = version_tags(metrics, "run1", {"git_commit": "abc", "profile": "demo"})
    assert list(tags)[:3] == ["git_commit", "profile", "training_run_id"]
    assert tags == {
        "git_commit": "abc",
        "profile": "demo",
        "training_run_id": "run1",
        "val_mean_auc": "0.7000",
        "test_mean_auc": "0.6500",
        "test_mean_auc_ci": "[0.6, 0.7]",
    }  # per-class AUCs go to the card and registration.json, not 14 more tags
    long = version_tags({"val_mean_auc": 0.6938992031627869, "mean_auc_ci": [0.659078812, None]}, "r", {})
    assert (long["val_mean_auc"], long["test_mean_auc"]) == ("0.6939", "None")
    assert long["test_mean_auc_ci"] == "[0.6591, null]"


# ----------------------------------------------------------------------------- real servers


def _training_run(model_dir: Path, best: Path, run_name: str, experiment: str = MODEL_NAME) -> str:
    """What the train step leaves for register: best.pt and a linked MLflow run on this server, in
    `experiment` (params.yaml's mlflow.experiment)."""
    import mlflow

    from pipeline import tracking

    model_dir.mkdir(parents=True)
    shutil.copy2(best, model_dir / "best.pt")
    tracking.setup(experiment)
    with mlflow.start_run(run_name=run_name, tags=run_tags("train", "demo")) as run:
        tracking.save_run_ref(model_dir, run)
    return run.info.run_id


def _other_weights(best: Path, out: Path, seed: int) -> Path:
    """`best` with one weight moved: another network for the registry (one version per weights),
    the same for the gate, which reads only the rewritten predictions."""
    import torch

    from pipeline.models import ModelBundle

    bundle = ModelBundle.load(best)
    state = {**bundle.model_state, "head.radius": bundle.model_state["head.radius"] + 1e-3 * seed}
    bundle.replace(model_state=state).save(out)
    assert not torch.equal(state["head.radius"], ModelBundle.load(best).model_state["head.radius"])
    return out


def _rewrite_split(repo: Path, reports: Path, split: str, strength: float, seed: int) -> dict:
    """Rewrite reports/predictions/<split>.parquet so scores follow the labels by `strength` (< 0: against)."""
    from pipeline.config import load_params
    from pipeline.metrics import bootstrap_auc

    path = reports / "predictions" / f"{split}.parquet"
    preds = pd.read_parquet(path)
    y = labels_of(repo, preds["image"])
    noise = np.random.default_rng(seed).random(y.shape)
    preds[list(CLASSES)] = np.clip(0.5 + strength * (y - 0.5) + 0.1 * (noise - 0.5), 0, 1)
    preds.to_parquet(path, index=False)
    scores, patients = preds[list(CLASSES)].to_numpy(), preds["patient"].to_numpy()
    min_patients = load_params(repo / "params.yaml").evaluate.min_positive_patients  # what the run's steps used
    return bootstrap_auc(y, scores, 100, seed=seed, groups=patients, min_patients=min_patients)


def _rewrite_predictions(repo: Path, real: Path, out: Path, strength: float, seed: int) -> dict:
    """A reports folder like `real` whose val and test scores follow the labels by `strength`."""
    shutil.copytree(real, out)
    val = _rewrite_split(repo, out, "val", strength, seed)
    test = _rewrite_split(repo, out, "test", strength, seed)
    metrics = json.loads((real / "metrics.json").read_text())
    metrics["val_mean_auc"] = val["mean_auc"]
    metrics["mean_auc"] = test["mean_auc"]
    metrics["mean_auc_ci"] = [test["mean_low"], test["mean_high"]]
    metrics["per_class_auc"] = {c: (None if np.isnan(a) else float(a)) for c, a in zip(CLASSES, test["auc"])}
    (out / "metrics.json").write_text(json.dumps(metrics))
    return metrics


def _register(repo: Path, model_dir: Path, reports: Path, out: Path) -> dict:
    from components import register

    code = register.main(
        [
            "--params",
            str(repo / "params.yaml"),
            "--model",
            str(model_dir),
            "--reports",
            str(reports),
            "--prepared",
            str(repo / "data/prepared"),
            "--out",
            str(out),
        ]
    )
    assert code == 0
    return json.loads(out.read_text())


def _registration_scenario(url: str, repo: Path, work: Path, capsys: pytest.CaptureFixture) -> None:
    """v1 the real model, v2 a worse one, v3 a better one; then a manual rollback to v1."""
    from mlflow import MlflowClient

    from components import evaluate, promote
    from components.common import fingerprint, run_main
    from pipeline.config import load_params

    best = repo / "artifacts/model/best.pt"
    with tracking_env(url, repo):
        run1 = _training_run(work / "model1", best, "train-real")
        assert (
            evaluate.main(
                [
                    "--params",
                    str(repo / "params.yaml"),
                    "--prepared",
                    str(repo / "data/prepared"),
                    "--model",
                    str(work / "model1"),
                    "--out",
                    str(work / "reports1"),
                    "--no-progress",
                ]
            )
            == 0
        )
        reg1 = _register(repo, work / "model1", work / "reports1", work / "registration1" / "registration.json")

        worse_metrics = _rewrite_predictions(repo, work / "reports1", work / "reports2", strength=-0.6, seed=1)
        run2 = _training_run(work / "model2", _other_weights(best, work / "worse.pt", seed=1), "train-worse")
        assert (work / "reports2/predictions/test.parquet").exists()  # there to be opened, were the gate to look
        with opened_paths() as opened:  # selection reads validation predictions only, ours and the champion's
            reg2 = _register(repo, work / "model2", work / "reports2", work / "registration2" / "registration.json")

        _rewrite_predictions(repo, work / "reports1", work / "reports3", strength=0.6, seed=2)
        run3 = _training_run(work / "model3", _other_weights(best, work / "better.pt", seed=2), "train-better")
        reg3 = _register(repo, work / "model3", work / "reports3", work / "registration3" / "registration.json")

        client = MlflowClient(tracking_uri=url)
        v1, v2, v3 = (client.get_model_version(MODEL_NAME, v) for v in ("1", "2", "3"))
        champion_after_3 = client.get_model_version_by_alias(MODEL_NAME, "champion").version

        assert promote.main(["--params", str(repo / "params.yaml"), "--version", "1"]) == 0  # rollback
        capsys.readouterr()
        assert promote.main(["--params", str(repo / "params.yaml"), "--list"]) == 0
        listing = capsys.readouterr().out.splitlines()
        unknown = run_main("promote", promote.main, ["--params", str(repo / "params.yaml"), "--version", "99"])
        unknown_err = capsys.readouterr().err
        champion_after_rollback = client.get_model_version_by_alias(MODEL_NAME, "champion").version
        challenger = client.get_model_version_by_alias(MODEL_NAME, "challenger").version
        params_hash = fingerprint(load_params(repo / "params.yaml").model_dump())
        logged = [a.path for a in client.list_artifacts(run1, "registration")]
        card_figures = [a.path for a in client.list_artifacts(run1, "model_card/plots")]
    real_metrics = json.loads((work / "reports1/metrics.json").read_text())
    manifest = pd.read_csv(repo / "data/prepared/manifest.csv")
    manifest_val = manifest[manifest["split"] == "val"]

    # v1: the first version that clears the floor (on validation) becomes champion; its tags hold
    # provenance and numbers, test AUCs for reporting only
    assert reg1["version"] == "1" and reg1["promote"] is True and reg1["aliases"] == ["challenger", "champion"]
    assert reg1["selected_on"] == "val" and reg1["bootstrap_unit"] == "patient"
    assert reg1["val_mean_auc"] == pytest.approx(real_metrics["val_mean_auc"])
    assert reg1["test_mean_auc"] == pytest.approx(real_metrics["mean_auc"])
    assert reg1["test_mean_auc_ci"] == pytest.approx(real_metrics["mean_auc_ci"])
    assert v1.run_id == run1 and v1.tags["training_run_id"] == run1
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    assert v1.tags["git_commit"] == head
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["prepare"]["outs"]
    assert all(o["md5"] in reg1["dvc_data_md5s"] for o in lock)
    assert v1.tags["data_hash"] == data_hash(reg1["dvc_data_md5s"])
    assert v1.tags["params_hash"] == params_hash and v1.tags["profile"] == "demo"
    # the tags read like the card: 4 decimals
    assert v1.tags["test_mean_auc"] == f"{real_metrics['mean_auc']:.4f}"
    assert float(v1.tags["val_mean_auc"]) == pytest.approx(real_metrics["val_mean_auc"], abs=5e-5)
    assert json.loads(v1.tags["test_mean_auc_ci"]) == pytest.approx(real_metrics["mean_auc_ci"], abs=5e-5)
    assert reg1["test_per_class_auc"] == real_metrics["per_class_auc"]
    assert v1.tags["gate.promoted"] == "true" and v1.tags["gate.reason"].startswith("no champion yet")
    # a handful of tags: provenance, the mean AUCs and the gate's decision, no per-class values
    assert len(v1.tags) <= 12 and not any(k.startswith("test_auc") for k in v1.tags), sorted(v1.tags)
    assert reg1["tags"]["git_commit"] == head and "registration/registration.json" in logged
    # its description and model card: the test figures of the real evaluation, the forest plot beside the card
    lo, hi = real_metrics["mean_auc_ci"]
    assert v1.description.startswith("Promoted to champion: val mean AUC ")
    assert f"Test mean AUC {real_metrics['mean_auc']:.3f} [{lo:.3f}, {hi:.3f}] (" in v1.description
    assert "Gate: promoted to champion: no champion yet" in v1.description
    assert card_figures == ["model_card/plots/reliability.png", "model_card/plots/subgroups.png"]
    card1 = (work / "reports1" / "model_card.md").read_text()
    assert "(plots/subgroups.png)" in card1 and "| sex | M |" in card1
    assert "(plots/reliability.png)" in card1 and "ECE calibrated" in card1  # the evaluation's calibration.json

    # v2's gate read no test predictions: neither ours nor the champion's (evaluate logged both splits
    # in run1); MLflow downloads an artifact under its file name alone, so any test.parquet is a test read
    parquet = [Path(p) for p in opened if p.endswith(".parquet")]
    assert not [p for p in parquet if p.name == "test.parquet"], parquet
    assert work / "reports2/predictions/val.parquet" in parquet, parquet  # what it does read: ours,
    assert any(p.name == "val.parquet" and p.parent.parent != work / "reports2" for p in parquet), parquet  # and v1's
    logged = [a.path for a in MlflowClient(tracking_uri=url).list_artifacts(run1, "evaluation/predictions")]
    assert "evaluation/predictions/test.parquet" in logged, logged

    # v2: worse on the same validation patients: stays challenger, the decision and its numbers are recorded
    assert reg2["version"] == "2" and reg2["promote"] is False and reg2["champion_version"] == "1"
    assert reg2["aliases"] == ["challenger"] and v2.run_id == run2
    assert reg2["val_mean_auc"] == pytest.approx(worse_metrics["val_mean_auc"]) and reg2["val_mean_auc"] < 0.2
    assert reg2["test_mean_auc"] == pytest.approx(worse_metrics["mean_auc"])
    assert reg2["delta"] < 0 and reg2["p_value"] > 0.05 and "does not beat champion v1" in reg2["reason"]
    assert reg2["champion_val_mean_auc"] == pytest.approx(real_metrics["val_mean_auc"])
    assert reg2["n_patients"] == manifest_val["patient"].nunique()
    assert f"on val ({reg2['n_patients']} patients)" in reg2["reason"]
    assert v2.tags["gate.promoted"] == "false" and v2.tags["gate.champion_version"] == "1"
    assert float(v2.tags["gate.p_value"]) == pytest.approx(reg2["p_value"], rel=1e-3)  # 4 significant digits
    assert float(v2.tags["gate.delta"]) == pytest.approx(reg2["delta"], rel=1e-3)
    lo, hi = reg2["delta_ci"]
    assert v2.description.startswith("Kept as challenger: val mean AUC ")
    assert f"Gate: kept as challenger; against champion v1 on val: delta {reg2['delta']:+.4f} " in v2.description
    assert f"[{lo:+.4f}, {hi:+.4f}], p={reg2['p_value']:.3f}" in v2.description

    # v3: better than the champion by the paired bootstrap: takes the champion alias
    assert reg3["version"] == "3" and reg3["promote"] is True and reg3["champion_version"] == "1"
    assert reg3["delta"] > 0 and reg3["p_value"] <= 0.05 and reg3["delta_ci"][0] > 0
    assert champion_after_3 == "3" and v3.run_id == run3 and v3.tags["gate.promoted"] == "true"
    assert "Gate: promoted to champion; against champion v1 on val" in v3.description

    # manual rollback through the promote component, and its listing
    assert champion_after_rollback == "1" and challenger == "3"
    assert len(listing) == 3 and "champion" in listing[0] and "challenger" in listing[2]
    assert "promoted=false" in listing[1] and f"test_mean_auc={v1.tags['test_mean_auc']}" in listing[0]
    assert unknown == 2 and "cxr-dwml v99" in unknown_err and "--list" in unknown_err


_OPENED: list[str] | None = None  # paths opened while `opened_paths` records; None: not recording
_HOOKED = False


def _record_open(event: str, args: tuple) -> None:
    if event == "open" and _OPENED is not None and isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENED.append(os.fsdecode(args[0]))


@contextlib.contextmanager
def opened_paths() -> Iterator[list[str]]:
    """Every file path this process opens meanwhile, in any thread: Python's own opens (the `open`
    audit event, raised by open() and os.open()) and parquet reads, which pyarrow does in C++."""
    global _OPENED, _HOOKED
    import pyarrow.parquet as pq

    if not _HOOKED:  # an audit hook cannot be removed: one, idle outside this block, for the session
        sys.addaudithook(_record_open)
        _HOOKED = True
    opened: list[str] = []
    read_table = pq.read_table

    def recording_read_table(source, *args, **kwargs):
        if isinstance(source, (str, os.PathLike)):
            opened.append(os.fspath(source))
        return read_table(source, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pq, "read_table", recording_read_table)  # pandas.read_parquet goes through it too
        _OPENED = opened
        try:
            yield opened
        finally:
            _OPENED = None


@contextlib.contextmanager
def registry_backend(folder: Path) -> Iterator[str]:
    """The backend store of a registry server: a throwaway PostgreSQL database (as deployments use)
    where one can be made; SQLite otherwise, except under CI=true, where PostgreSQL is required."""
    missing = postgres_missing()
    if missing is None or os.environ.get("CI", "").lower() == "true":
        with postgres_databases("mlflow") as databases:
            yield databases["mlflow"]
        return
    print(f"registry server on SQLite: no {missing}")
    folder.mkdir(parents=True, exist_ok=True)
    yield f"sqlite:///{folder / 'mlflow.db'}"


@pytest.fixture(scope="module")
def registry_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One `mlflow server` (SQLite) for the module's registration tests, as a server starts in about
    10 CPU-seconds: each test registers under a model name and an experiment of its own (`own_names`),
    so that none sees another's versions, aliases or logged models."""
    folder = tmp_path_factory.mktemp("registry-server")
    with mlflow_server(f"sqlite:///{folder / 'mlflow.db'}", folder) as url:
        yield url


def own_names(params: Path, name: str) -> str:
    """params.yaml at `params` with register.model_name and mlflow.experiment set to `name`."""
    data = yaml.safe_load(params.read_text())
    data["register"]["model_name"] = data["mlflow"]["experiment"] = name
    params.write_text(yaml.safe_dump(data, sort_keys=False))
    return name


@pytest.mark.slow
def test_register_keeps_credentials_out_of_its_output_card_and_registry(
    pipeline_run: PipelineRun, registry_server: str, tmp_path: Path
) -> None:
    """The tracking server's password (MLflow prints its "View run ... at" link with it) appears
    nowhere the register step writes: its output, the card, the registry. (A data source with
    credentials never gets this far: params validation refuses it, tests/test_config.py.)"""
    from mlflow import MlflowClient

    repo = pipeline_run.repo
    secrets = ("trk-s3cret",)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["download"]["source"] = "https://mirror.example.org/nih"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    name = own_names(tmp_path / "params.yaml", "credentials")
    reports = shutil.copytree(repo / "reports", tmp_path / "reports")  # the card is written there
    url = registry_server
    with_password = url.replace("http://", "http://alice:trk-s3cret@")
    with tracking_env(with_password, repo):
        run_id = _training_run(tmp_path / "model", repo / "artifacts/model/best.pt", "train-credentials", name)
    argv = ["--params", str(tmp_path / "params.yaml"), "--model", str(tmp_path / "model")]
    argv += ["--reports", str(reports), "--prepared", str(repo / "data/prepared")]
    done = subprocess.run(
        [sys.executable, "-m", "components.register", *argv, "--out", str(tmp_path / "registration.json")],
        cwd=repo,
        env=run_env(repo, MLFLOW_TRACKING_URI=with_password),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    client = MlflowClient(tracking_uri=url)
    version = client.get_model_version(name, "1")
    run = client.get_run(run_id)
    recorded = [
        version.description,
        json.dumps(version.tags),
        json.dumps(run.data.params),
        json.dumps(run.data.tags),
    ]
    shown = url.replace("http://", "http://***@")
    assert f"[register] MLflow run train-credentials: {shown}/#/experiments/" in done.stdout, done.stdout[-3000:]
    card = (reports / "model_card.md").read_text()
    assert "fetched from `https://mirror.example.org/nih`" in card
    written = [done.stdout, done.stderr, card, (reports / "model_card.html").read_text()]
    written.append((tmp_path / "registration.json").read_text())
    for text in written + recorded:
        assert not any(secret in text for secret in secrets), text[-3000:]


@pytest.mark.slow
def test_register_gate_on_mlflow_server(
    pipeline_run: PipelineRun, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    with registry_backend(tmp_path / "store") as backend, mlflow_server(backend, tmp_path / "server") as url:
        _registration_scenario(url, pipeline_run.repo, tmp_path / "work", capsys)


# ----------------------------------------------------------------------------- one version per weights


def _bundle(path: Path, seed: int, epoch: int = 1) -> None:
    """A model bundle as training saves it (test-sized network), its weights drawn with `seed`."""
    import torch

    from pipeline.models import build_model
    from pipeline.training.loop import model_bundle

    tiny = {"model.embed_dim": 16, "model.hidden_dim": 32, "model.backbone.name": "test_convnext"}
    cfg = settings("train", {**tiny, "augment.crop_size": 32})
    vectors = np.random.default_rng(0).normal(size=(len(CLASSES), 16)).astype(np.float32)
    torch.manual_seed(seed)
    model = build_model(cfg.model, vectors)
    path.parent.mkdir(parents=True, exist_ok=True)
    model_bundle(model, cfg, vectors, epoch=epoch, val_mean_auc=0.6, image_size=32, fingerprint="test").save(path)


@pytest.fixture
def small_workspace(tmp_path: Path) -> Path:
    """What register reads, made without a pipeline run: prepared data, evaluate's reports, params."""
    from pipeline.data.prepare import prepare
    from pipeline.data.synthetic import generate
    from pipeline.evaluation.calibration import Calibration

    repo = tmp_path / "repo"
    generate(
        repo / "data/raw",
        settings("download.synthetic", num_images=120, num_patients=60, image_size=64, seed=3),
        progress=False,
    )
    prepare(repo / "data/raw", repo / "data/prepared", settings("prepare", image_size=32, workers=1), progress=False)
    manifest = pd.read_csv(repo / "data/prepared/manifest.csv")
    val = manifest[manifest["split"] == "val"]
    scores = np.random.default_rng(1).random((len(val), len(CLASSES)))
    (repo / "reports/predictions").mkdir(parents=True)
    pd.DataFrame({"image": val["image"].to_numpy(), **dict(zip(CLASSES, scores.T))}).to_parquet(
        repo / "reports/predictions/val.parquet", index=False
    )
    metrics = {
        "val_mean_auc": 0.5,
        "mean_auc": 0.5,
        "mean_auc_ci": [0.4, 0.6],
        "test_patients": 20,
        "per_class_auc": {c: 0.5 + 0.01 * i for i, c in enumerate(CLASSES)},
        "per_class_auc_ci": {c: [0.3 + 0.01 * i, 0.7 + 0.01 * i] for i, c in enumerate(CLASSES)},
        "min_positive_patients": 1,
        "classes_in_mean": list(CLASSES),
        "excluded_classes": {},
        "val_classes_in_mean": list(CLASSES),
        "val_excluded_classes": {},
    }
    (repo / "reports/metrics.json").write_text(json.dumps(metrics))
    (repo / "reports/thresholds.json").write_text(json.dumps({"thresholds": dict.fromkeys(CLASSES, 0.5)}))
    (repo / "reports/calibration.json").write_text(json.dumps(Calibration("none", tuple(CLASSES)).to_json()))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["register"].update(min_auc=0.0, bootstrap_resamples=100)
    params["evaluate"]["min_positive_patients"] = 1  # ~9 validation patients
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    return repo


def test_register_never_makes_a_second_version_of_the_same_weights(
    small_workspace: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Weights already registered (a finished training resumed, evaluated and registered again):
    no new version, the aliases stay where they were, the record and the output name the version."""
    from mlflow import MlflowClient

    repo, work = small_workspace, tmp_path / "work"
    reports = repo / "reports"
    _bundle(work / "a" / "best.pt", seed=1)
    _bundle(work / "b" / "best.pt", seed=2)
    _bundle(work / "a-again" / "best.pt", seed=1, epoch=7)  # the same weights in another file
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    (tmp_path / "store").mkdir()
    with tracking_env(uri, repo):
        _training_run(work / "model1", work / "a" / "best.pt", "train-a")
        reg1 = _register(repo, work / "model1", reports, work / "registration1.json")
        _training_run(work / "model2", work / "b" / "best.pt", "train-b")
        reg2 = _register(repo, work / "model2", reports, work / "registration2.json")
        client = MlflowClient(tracking_uri=uri)
        aliases_before = dict(client.get_registered_model(MODEL_NAME).aliases)
        run3 = _training_run(work / "model3", work / "a-again" / "best.pt", "train-a-again")
        capsys.readouterr()
        reg3 = _register(repo, work / "model3", reports, work / "registration3.json")
        out = capsys.readouterr().out
        versions = sorted(int(v.version) for v in client.search_model_versions(f"name='{MODEL_NAME}'"))
        aliases_after = dict(client.get_registered_model(MODEL_NAME).aliases)
        v1 = client.get_model_version(MODEL_NAME, "1")
        logged3 = [a.path for a in client.list_artifacts(run3)]
    assert (reg1["version"], reg1["registered"], reg2["version"], reg2["registered"]) == ("1", True, "2", True)
    assert reg1["weights_sha256"] != reg2["weights_sha256"]
    assert v1.tags["weights_sha256"] == reg1["weights_sha256"]
    assert versions == [1, 2]  # no v3
    assert aliases_after == aliases_before and str(aliases_after["challenger"]) == "2"
    assert reg3["registered"] is False and reg3["version"] == "1"
    assert reg3["weights_sha256"] == reg1["weights_sha256"] and reg3["aliases"] == ["champion"]
    assert "cxr-dwml v1 already holds these weights" in out and "aliases unchanged" in out
    assert logged3 == []  # nothing logged into the new run: no second model, no registration artifact


def test_register_describes_the_version_and_logs_its_model_card(small_workspace: Path, tmp_path: Path) -> None:
    """Read back from the registry: each new version's description gives the test mean AUC with its
    interval, the validation figure and the gate's decision against the champion, and its run holds the
    model card under model_card/; weights registered again change no description."""
    import mlflow
    from mlflow import MlflowClient

    repo, work = small_workspace, tmp_path / "work"
    reports = repo / "reports"
    _bundle(work / "a" / "best.pt", seed=1)
    _bundle(work / "b" / "best.pt", seed=2)
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    (tmp_path / "store").mkdir()
    with tracking_env(uri, repo):
        run1 = _training_run(work / "model1", work / "a" / "best.pt", "train-a")
        reg1 = _register(repo, work / "model1", reports, work / "registration1.json")
        card1 = (reports / "model_card.md").read_text()
        client = MlflowClient(tracking_uri=uri)
        # the champion's validation predictions where its evaluate step logs them, for the gate to compare
        client.log_artifacts(run1, str(reports / "predictions"), "evaluation/predictions")
        _training_run(work / "model2", work / "b" / "best.pt", "train-b")
        reg2 = _register(repo, work / "model2", reports, work / "registration2.json")
        v1, v2 = (client.get_model_version(MODEL_NAME, v) for v in ("1", "2"))
        logged = sorted(a.path for a in client.list_artifacts(run1, "model_card"))
        logged_card = mlflow.artifacts.download_artifacts(
            run_id=run1, artifact_path="model_card/model_card.md", dst_path=str(tmp_path / "download")
        )
        _training_run(work / "model3", work / "a" / "best.pt", "train-a-again")
        reg3 = _register(repo, work / "model3", reports, work / "registration3.json")
        v1_after = client.get_model_version(MODEL_NAME, "1")
    assert (reg1["promote"], reg2["promote"], reg3["registered"]) == (True, False, False)
    # v1: the first champion
    assert v1.description.startswith("Promoted to champion: val mean AUC ")
    assert "Test mean AUC 0.500 [0.400, 0.600] (95% interval" in v1.description
    assert f"Selected on validation: val mean AUC {reg1['val_mean_auc']:.3f}" in v1.description
    assert "Gate: promoted to champion" in v1.description
    assert f"`model_card/model_card.html` (and `model_card.md`) in the artifacts of run `{run1}`" in v1.description
    experiment = client.get_run(run1).info.experiment_id
    card_link = f"#/experiments/{experiment}/runs/{run1}/artifacts/model_card/model_card.html"
    assert f"[model card]({card_link}?workflowType=machine_learning)" in v1.description
    assert "| Finding | Val AUC | Test AUC [95% CI] |" in v1.description
    # v2: the same validation predictions as the champion: no gain, kept as challenger, with the comparison
    lo, hi = reg2["delta_ci"]
    assert "Gate: kept as challenger; against champion v1 on val" in v2.description
    assert f"delta {reg2['delta']:+.4f} [{lo:+.4f}, {hi:+.4f}], p={reg2['p_value']:.3f}" in v2.description
    # the card travels with the model: what the run holds is what the step wrote
    assert logged == ["model_card/model_card.html", "model_card/model_card.md"]
    assert Path(logged_card).read_text() == card1 and v1.description.splitlines()[0] in card1
    # the same weights again: nothing registered, the description left as it was, the card still written
    assert v1_after.description == v1.description
    assert "Already registered as v1" in (reports / "model_card.md").read_text()


# ----------------------------------------------------------------------------- a registry that fails

# MLflow's client retries a 5xx for minutes by default; here once, at once, so a failure shows in seconds
FAST_RETRIES = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0",
}


def _register_args(model_dir: Path, reports: Path, out: Path) -> list[str]:
    """The register step's arguments as dvc.yaml gives them, run in the workspace."""
    args = ["--params", "params.yaml", "--model", str(model_dir), "--reports", str(reports)]
    return [*args, "--prepared", "data/prepared", "--out", str(out)]


def _start_register(repo: Path, model_dir: Path, reports: Path, out: Path, uri: str, **env: str) -> subprocess.Popen:
    """`python -m components.register` as a stage runs it, against the tracking server at `uri`."""
    env = {**os.environ, **FAST_RETRIES, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(ROOT), **env}
    env.pop("CXR_DEBUG", None)
    args = _register_args(model_dir, reports, out)
    return subprocess.Popen(
        [sys.executable, "-m", "components.register", *args],
        cwd=repo,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc: subprocess.Popen, timeout: float = 300) -> subprocess.CompletedProcess:
    stdout, stderr = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def _register_step(
    repo: Path, model_dir: Path, reports: Path, out: Path, uri: str, capsys: pytest.CaptureFixture
) -> subprocess.CompletedProcess:
    """The register step as `python -m components.register` runs it (`run_main`: its exit status and
    one-line errors), in this process, against the tracking server at `uri`; what it printed."""
    from components import register
    from components.common import run_main

    args = _register_args(model_dir, reports, out)
    capsys.readouterr()
    with tracking_env(uri, repo), pytest.MonkeyPatch.context() as mp:
        for key, value in FAST_RETRIES.items():
            mp.setenv(key, value)
        mp.delenv("CXR_DEBUG", raising=False)
        code = run_main("register", register.main, args)
    printed = capsys.readouterr()
    return subprocess.CompletedProcess(["components.register", *args], code, printed.out, printed.err)


def _better_reports(repo: Path, reports: Path, out: Path) -> Path:
    """`reports` with validation scores that follow the labels: a version the gate promotes."""
    shutil.copytree(reports, out)
    path = out / "predictions/val.parquet"
    preds = pd.read_parquet(path)
    y = labels_of(repo, preds["image"])
    preds[list(CLASSES)] = 0.2 + 0.6 * y + 0.1 * np.random.default_rng(5).random(y.shape)
    preds.to_parquet(path, index=False)
    return out


def _state(client, name: str = MODEL_NAME) -> tuple[dict[str, str], list[int]]:
    """The aliases and the version numbers of `name`, read from the server itself."""
    aliases = {a: str(v) for a, v in client.get_registered_model(name).aliases.items()}
    return aliases, sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))


def _error_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("cxr-dwml register: error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return lines[0]


@pytest.mark.slow
def test_a_registry_failure_fails_register_and_moves_no_alias(
    small_workspace: Path, registry_server: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Only "no such alias" means no champion: a champion lookup, a read of the champion's
    predictions or an alias move that the server answers with 503 fails the step in one line naming
    the model, the alias and the server, and the aliases stay where they were; the next run, with
    the server answering again, gates the version without registering it twice."""
    import mlflow
    from mlflow import MlflowClient

    repo, work = small_workspace, tmp_path / "work"
    _bundle(work / "a" / "best.pt", seed=1)
    _bundle(work / "b" / "best.pt", seed=2)
    better = _better_reports(repo, repo / "reports", work / "reports-better")
    name, url = own_names(repo / "params.yaml", "registry-failure"), registry_server
    with tracking_env(url, repo):  # v1, champion, with the predictions the gate compares against
        run1 = _training_run(work / "model1", work / "a" / "best.pt", "train-a", name)
        with mlflow.start_run(run_id=run1):
            mlflow.log_artifacts(str(repo / "reports/predictions"), artifact_path="evaluation/predictions")
        _register(repo, work / "model1", repo / "reports", work / "registration1.json")
        _training_run(work / "model2", work / "b" / "best.pt", "train-b", name)
    client = MlflowClient(tracking_uri=url)  # straight to the server, never through the proxy
    before = _state(client, name)
    assert before == ({"challenger": "1", "champion": "1"}, [1])

    outcomes = {}
    with FaultProxy(url) as proxy:  # the register commands talk to the server through it
        for fault in ("registered-models/get", "mlflow-artifacts/artifacts"):
            proxy.fail(fault, status=503, times=50)
            t0 = time.monotonic()
            result = _register_step(repo, work / "model2", better, work / "registration2.json", proxy.url, capsys)
            proxy.clear()
            outcomes[fault] = (result, time.monotonic() - t0, len(proxy.failed(fault)), _state(client, name))
        # the challenger moves, the champion move fails (both attempts): the challenger goes back
        proxy.fail("registered-models/alias", status=503, times=2, after=1)
        moved = _register_step(repo, work / "model2", better, work / "registration2.json", proxy.url, capsys)
        proxy.clear()
        after_alias_fault = _state(client, name)
        v2_tags = client.get_model_version(name, "2").tags
        retried = _register_step(repo, work / "model2", better, work / "registration2.json", proxy.url, capsys)
    final = _state(client, name)

    for fault, what in (
        ("registered-models/get", "reading its aliases (challenger, champion) failed"),
        ("mlflow-artifacts/artifacts", "reading alias champion's predictions (v1, evaluation/predictions/val.parquet)"),
    ):
        result, seconds, failed, state = outcomes[fault]
        assert state == before, (fault, state)  # nothing registered, champion and challenger where they were
        line = _error_line(result)
        assert result.returncode == 2, (fault, seconds, line)
        # one try and MLflow's one retry, both answered 503: it gave up at once (counted, not timed)
        assert failed == 2, (fault, failed)
        assert f"registered model {name} on {proxy.url}: {what}" in line, line
        assert "503" in line and "nothing registered, no alias moved" in line, line

    assert after_alias_fault == ({"challenger": "1", "champion": "1"}, [1, 2])  # the challenger went back
    line = _error_line(moved)
    assert moved.returncode == 2 and f"{proxy.url}: setting alias champion to v2 failed" in line, line
    assert "aliases left as they were (challenger -> v1, champion -> v1)" in line, line
    assert "v2 stays registered without the gate's decision" in line, line
    assert "gate.promoted" not in v2_tags and v2_tags["gate.champion_version"] == "1"

    assert retried.returncode == 0, retried.stdout[-2000:] + retried.stderr[-2000:]
    assert "v2 holds these weights but was never gated: gating it now" in retried.stdout
    assert final == ({"challenger": "2", "champion": "2"}, [1, 2])  # gated, promoted, not registered twice
    record = json.loads((work / "registration2.json").read_text())
    assert record["version"] == "2" and record["promote"] is True and record["champion_version"] == "1"


@pytest.mark.slow
def test_two_register_steps_racing_with_the_same_weights_leave_one_version(
    small_workspace: Path, registry_server: str, tmp_path: Path
) -> None:
    """Two register processes with the same weights, both past their "already registered?" look-up
    and held by the proxy until both ask to create a version: both register, and the one that got
    the later version deletes it (and its logged model) and ends as "already registered"."""
    from mlflow import MlflowClient

    from tests.servers import FaultProxy

    repo, work = small_workspace, tmp_path / "work"
    _bundle(work / "a" / "best.pt", seed=1)
    name, url = own_names(repo / "params.yaml", "registry-race"), registry_server
    with tracking_env(url, repo):  # two trainings that ended with the same weights
        runs = [_training_run(work / f"model{i}", work / "a" / "best.pt", f"train-{i}", name) for i in (1, 2)]
    with FaultProxy(url) as proxy:
        proxy.hold("model-versions/create", count=2)
        # a held request must outwait the other process's start, not time out in MLflow's client
        procs = [
            _start_register(
                repo,
                work / f"model{i}",
                repo / "reports",
                work / f"registration{i}.json",
                proxy.url,
                MLFLOW_HTTP_REQUEST_TIMEOUT="900",
            )
            for i in (1, 2)
        ]
        results = [_finish(p, timeout=900) for p in procs]
        released = list(proxy.released)
    client = MlflowClient(tracking_uri=url)
    aliases, versions = _state(client, name)
    kept = client.get_model_version(name, "1")
    live_models = client.search_logged_models(experiment_ids=[client.get_run(runs[0]).info.experiment_id])

    for result in results:
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert len(released) == 2  # both asked to create a version at once: the race happened
    assert versions == [1] and aliases == {"challenger": "1", "champion": "1"}
    records = sorted(
        (json.loads((work / f"registration{i}.json").read_text()) for i in (1, 2)), key=lambda r: not r["registered"]
    )
    assert [(r["registered"], r["version"]) for r in records] == [(True, "1"), (False, "1")]
    assert records[0]["weights_sha256"] == records[1]["weights_sha256"] == kept.tags["weights_sha256"]
    assert f"{name} v1 already holds these weights" in records[1]["reason"]
    # the withdrawn version's logged model went with it
    assert [f"models:/{m.model_id}" for m in live_models] == [records[0]["model_uri"]]
