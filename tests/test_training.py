"""Training: optimiser groups, schedule, the loop (resume, early stopping, EMA), DDP, the component."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from pipeline.classes import CLASSES
from pipeline.data.prepare import prepare
from pipeline.data.synthetic import generate
from pipeline.inference import predict
from pipeline.io import load_checkpoint
from pipeline.models import build_model
from pipeline.training import TrainConfig, train
from pipeline.training.optim import build_optimizer, build_scheduler, param_groups, warmup_cosine
from tests.conftest import crafted_checkpoint, settings

ROOT = Path(__file__).resolve().parents[1]
# timm's own test-sized ConvNeXt (0.2 M parameters) keeps every loop test to seconds on a CPU
TINY = {
    "epochs": 2,
    "batch_size": 16,
    "eval_batch_size": 64,
    "workers": 0,
    "seed": 3,
    "deterministic": True,
    "max_steps_per_epoch": 2,
    "log_every": 1,
    "model.embed_dim": 16,
    "model.hidden_dim": 32,
    "model.backbone.name": "test_convnext",
    "augment.crop_size": 32,
}
TIMING_KEYS = {"train_images_per_s"}
# the test data's validation split holds ~12 patients: every class it has positives of is in its mean
MIN_PATIENTS = 1


def tiny_config(**overrides) -> TrainConfig:
    return settings("train", {**TINY, **overrides})


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, np.ndarray]:
    root = tmp_path_factory.mktemp("data")
    generate(
        root / "raw",
        settings("download.synthetic", num_images=240, num_patients=100, image_size=64, seed=3),
        progress=False,
    )
    prepare(root / "raw", root / "prepared", settings("prepare", image_size=32, workers=1), progress=False)
    vectors = np.random.default_rng(0).normal(size=(len(CLASSES), 16)).astype(np.float32)  # (C, E)
    (root / "prototypes").mkdir()
    np.save(root / "prototypes" / "prototypes.npy", vectors)
    return root / "prepared", vectors


def comparable(history: list[dict]) -> list[dict]:
    """History without wall-clock figures; NaN (a class without positives in val) made comparable."""
    return [{k: None if v != v else v for k, v in rec.items() if k not in TIMING_KEYS} for rec in history]


# ----------------------------------------------------------------------------- optimiser


def test_param_groups_split_backbone_head_and_decay():
    model = build_model(tiny_config().model, np.zeros((len(CLASSES), 16), np.float32))
    cfg = settings("train.optim", lr_backbone=1e-4, lr_head=1e-3, weight_decay=0.05)
    groups = {g["name"]: g for g in param_groups(model, cfg)}
    assert set(groups) == {"backbone", "backbone_no_decay", "head", "head_no_decay"}
    names = {id(p): n for n, p in model.named_parameters()}
    for name, group in groups.items():
        assert group["lr"] == (1e-4 if name.startswith("backbone") else 1e-3)
        for p in group["params"]:
            assert names[id(p)].startswith("backbone.") == name.startswith("backbone")
            # norms, biases, the scale and the radii (ndim <= 1) are never decayed
            assert (p.ndim <= 1) == name.endswith("no_decay")
        assert group["weight_decay"] == (0.0 if name.endswith("no_decay") else 0.05)
    grouped = [names[id(p)] for g in groups.values() for p in g["params"]]
    assert sorted(grouped) == sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert "head.radius" in [names[id(p)] for p in groups["head_no_decay"]["params"]]
    assert "head.log_scale" in [names[id(p)] for p in groups["head_no_decay"]["params"]]


def test_warmup_cosine_values():
    f = warmup_cosine(total_steps=110, warmup_steps=10, min_ratio=0.1)
    assert f(0) == pytest.approx(0.1) and f(4) == pytest.approx(0.5) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the cosine
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    values = [f(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_scheduler_drives_both_learning_rates():
    net = torch.nn.Sequential(torch.nn.Linear(2, 2))
    cfg = settings("train.optim", lr_backbone=0.0, lr_head=0.2, warmup_epochs=1.0, min_lr_ratio=0.0)
    opt = build_optimizer(net, cfg)
    sched = build_scheduler(opt, cfg, steps_per_epoch=4, epochs=3)
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[-1]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.05, 0.1, 0.15, 0.2])
    assert lrs[4] == pytest.approx(0.2) and lrs[8] == pytest.approx(0.2 * 0.5 * (1 + math.cos(math.pi / 2)))


# ----------------------------------------------------------------------------- the loop


class Killed(Exception):
    """Stands in for the process dying between two optimisation steps."""


def crash_after(monkeypatch, steps: int) -> list[dict]:
    """Make training die right after its `steps`-th optimisation step; returns each step's metrics."""
    from pipeline.training import loop

    real, done = loop.train_step, []

    def step_then_die(*args, **kwargs):
        done.append(real(*args, **kwargs))
        if len(done) == steps:
            raise Killed(f"killed after step {steps}")
        return done[-1]

    monkeypatch.setattr(loop, "train_step", step_then_die)
    return done


# workers = 2: persistent worker processes keep their random state from epoch to epoch, so a seed
# set in the main process after the first epoch must still reach them
@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_equals_uninterrupted(data, tmp_path, monkeypatch, workers):
    prepared, vectors = data
    cfg = tiny_config(workers=workers)
    straight = train(
        cfg, prepared, vectors, tmp_path / "a", fingerprint="fp", progress=False, min_patients=MIN_PATIENTS
    )
    assert straight.epochs_run == 2 and straight.resumed_from is None and len(straight.history) == 2

    logged: list[tuple[dict, int]] = []
    with monkeypatch.context() as mp:
        steps = crash_after(mp, 3)
        with pytest.raises(Killed):  # a kill in the middle of epoch 2 (two steps per epoch)
            train(cfg, prepared, vectors, tmp_path / "b", fingerprint="fp", progress=False, min_patients=MIN_PATIENTS)
    assert len(steps) == 3 and all(math.isfinite(s["loss/loss"]) for s in steps)
    assert load_checkpoint(tmp_path / "b" / "last.pt")["state"]["epoch"] == 1
    resumed = train(
        cfg,
        prepared,
        vectors,
        tmp_path / "b",
        fingerprint="fp",
        progress=False,
        log=lambda m, s: logged.append((m, s)),
        min_patients=MIN_PATIENTS,
    )
    assert resumed.resumed_from == 1 and resumed.epochs_run == 2
    assert comparable(resumed.history) == comparable(straight.history)
    assert resumed.best_auc == straight.best_auc and resumed.best_epoch == straight.best_epoch
    a = load_checkpoint(tmp_path / "a" / "last.pt")["model_state"]
    b = load_checkpoint(tmp_path / "b" / "last.pt")["model_state"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the loss's running cell means travel with the checkpoint, so the replayed steps weigh alike
    loss_a = load_checkpoint(tmp_path / "a" / "last.pt")["criterion"]
    loss_b = load_checkpoint(tmp_path / "b" / "last.pt")["criterion"]
    assert loss_a["cell_seen"].any() and torch.equal(loss_a["cell_mean"], loss_b["cell_mean"])
    assert [s for m, s in logged if "loss/loss" in m] == [3, 4]  # only the replayed epoch's steps

    # a finished run with the same settings does nothing
    mtime = (tmp_path / "b" / "last.pt").stat().st_mtime_ns
    again = train(cfg, prepared, vectors, tmp_path / "b", fingerprint="fp", progress=False, min_patients=MIN_PATIENTS)
    assert again.resumed_from == 2 and comparable(again.history) == comparable(straight.history)
    assert (tmp_path / "b" / "last.pt").stat().st_mtime_ns == mtime

    # other settings or inputs (another fingerprint): the old state is ignored
    shutil.copytree(tmp_path / "b", tmp_path / "c")
    fresh = train(
        tiny_config(epochs=1, max_steps_per_epoch=1),
        prepared,
        vectors,
        tmp_path / "c",
        fingerprint="other",
        progress=False,
        min_patients=MIN_PATIENTS,
    )
    assert fresh.resumed_from is None and len(fresh.history) == 1
    assert load_checkpoint(tmp_path / "c" / "last.pt")["fingerprint"] == "other"


def test_early_stopping_with_patience(data, tmp_path):
    prepared, vectors = data
    # a learning rate below float32 resolution: weights, hence the validation AUC, never change
    cfg = tiny_config(
        epochs=5, max_steps_per_epoch=1, early_stopping_patience=2, **{"optim.lr_backbone": 0.0, "optim.lr_head": 1e-30}
    )
    result = train(cfg, prepared, vectors, tmp_path, fingerprint="es", progress=False, min_patients=MIN_PATIENTS)
    assert result.stopped_early and result.epochs_run == 3 and result.best_epoch == 1
    assert len({rec["val_mean_auc"] for rec in result.history}) == 1
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == 1
    again = train(cfg, prepared, vectors, tmp_path, fingerprint="es", progress=False, min_patients=MIN_PATIENTS)
    assert again.stopped_early and again.epochs_run == 3 and again.resumed_from == 3


def test_ema_weights_are_validated_and_saved(data, tmp_path):
    prepared, vectors = data
    cfg = tiny_config(epochs=1, ema_decay=0.5)
    result = train(cfg, prepared, vectors, tmp_path, fingerprint="ema", progress=False, min_patients=MIN_PATIENTS)
    last = load_checkpoint(tmp_path / "last.pt")
    best = load_checkpoint(tmp_path / "best.pt")
    assert last["ema"] is not None and result.history[0]["val_mean_auc"] > 0
    ema_state = {k.removeprefix("module."): v for k, v in last["ema"].items()}
    key = "head.radius"
    torch.testing.assert_close(best["model_state"][key], ema_state[key])  # best.pt holds the EMA
    assert not torch.equal(best["model_state"][key], last["model_state"][key])


def test_predict_refuses_a_shuffled_loader(data):
    from pipeline.data.dataset import CachedImageDataset, build_loader

    prepared, vectors = data
    ds = CachedImageDataset(prepared, "val", settings("train.augment", crop_size=32))
    model = build_model(tiny_config().model, vectors)
    index, probs = predict(model, build_loader(ds, 64, shuffle=False, workers=0, seed=0), torch.device("cpu"))
    assert np.array_equal(index, np.arange(len(ds))) and probs.shape == (len(ds), len(CLASSES))
    with pytest.raises(ValueError, match="shuffle=False"):
        predict(model, build_loader(ds, 64, shuffle=True, workers=0, seed=0), torch.device("cpu"))


def test_train_step_updates_the_weights_and_reports_its_metrics(data):
    from pipeline.losses import build_loss
    from pipeline.training.loop import StepContext, train_step

    _, vectors = data
    cfg = tiny_config()
    torch.manual_seed(0)
    model = build_model(cfg.model, vectors)
    criterion = build_loss(cfg.loss, [10] * len(CLASSES), 100)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, steps_per_epoch=4, epochs=2)
    ctx = StepContext(model, criterion, optimizer, scheduler, grad_clip=1e-3)
    images = torch.randint(0, 256, (8, 1, 32, 32), dtype=torch.uint8)
    targets = (torch.rand(8, len(CLASSES)) < 0.3).float()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    metrics = train_step(ctx, images, targets)
    assert {"loss/loss", "loss/bce", "grad_norm", "lr/head", "lr/backbone"} <= set(metrics)
    assert metrics["grad_norm"] > 1e-3  # the norm before clipping
    assert metrics["lr/head"] == optimizer.param_groups[-1]["lr"] == pytest.approx(cfg.optim.lr_head * 2 / 4)
    assert not torch.equal(before["head.radius"], model.state_dict()["head.radius"])
    ctx.grad_clip = 0.0
    assert "grad_norm" not in train_step(ctx, images, targets)


def test_a_missing_or_damaged_checkpoint_is_named(tmp_path):
    from pipeline.io import file_size
    from pipeline.models import load_bundle

    path = tmp_path / "best.pt"
    assert file_size(path) == -1 and file_size(path, missing=0) == 0
    for load in (load_checkpoint, load_bundle):
        with pytest.raises(FileNotFoundError, match=rf"checkpoint {path} not found: run the train step"):
            load(path)
    torch.save({"fingerprint": "x", "weights": torch.arange(1000)}, path)
    size = file_size(path)
    assert size == path.stat().st_size > 0
    assert load_checkpoint(path, mmap=True)["fingerprint"] == "x"
    path.write_bytes(path.read_bytes()[: size // 2])  # a copy cut short
    for load in (load_checkpoint, load_bundle):
        with pytest.raises(RuntimeError, match=rf"checkpoint {path} cannot be read .*delete it and rerun"):
            load(path)
    torch.save([1, 2], path)
    with pytest.raises(RuntimeError, match=rf"checkpoint {path} holds a list, not a training checkpoint"):
        load_checkpoint(path)


def test_epoch_seeds_differ_between_ranks_and_epochs():
    from pipeline.training.loop import epoch_seed

    seeds = {epoch_seed(42, epoch, rank) for epoch in range(1, 200) for rank in range(64)}
    assert len(seeds) == 199 * 64
    assert epoch_seed(42, 3, 0) == 42 + 3000  # rank 0 keeps the single-process seeds


def test_prior_sample_takes_one_random_image_per_patient(data):
    from pipeline.data.dataset import CachedImageDataset
    from pipeline.training.loop import prior_sample

    prepared, _ = data
    cfg = tiny_config(prior_images=20)
    ds = CachedImageDataset(prepared, "train", cfg.augment, train=False)
    sample = prior_sample(ds, cfg)
    assert sample.shape == (20, 1, 32, 32) and sample.dtype == torch.uint8
    pixels = {bytes(ds[i][0].numpy()): ds.patients[i] for i in range(len(ds))}
    patients = [pixels[bytes(x.numpy())] for x in sample]
    assert len(set(patients)) == 20  # twenty different patients
    assert torch.equal(prior_sample(ds, cfg), sample)  # fixed by the training seed
    first = torch.stack([ds[i][0] for i in range(20)])
    assert not torch.equal(sample, first)  # not the first images by name
    everyone = prior_sample(ds, tiny_config(prior_images=10_000))
    assert len(everyone) == len(set(ds.patients))


CELL_MEAN_WORKER = """
import os, sys, torch, torch.distributed as dist
from pipeline.losses import DualWeightedMetricLoss
LOSS = dict(beta=0.5, image_weighting=True, category_weighting=True, effective_number=False, normalize_image=False,
            image_weight_cap=10.0, image_weight_momentum=0.9, category_ratio_cap=None, separation_weight=0.0,
            separation_margin=1.0)
rank = int(sys.argv[1])
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2])
dist.init_process_group("gloo", rank=rank, world_size=2)
g = torch.Generator().manual_seed(rank)
y = (torch.rand(8 + 8 * rank, 3, generator=g) < 0.5).double()
z = torch.randn(8 + 8 * rank, 3, generator=g, dtype=torch.float64)
loss = DualWeightedMetricLoss([10, 10, 10], 100, gamma=1.0, **LOSS)
loss.get_weights(z, y, update=True)
torch.save({"y": y, "z": z, "cell_mean": loss.cell_mean}, sys.argv[3] + f"/rank{rank}.pt")
dist.destroy_process_group()
"""


def test_running_cell_means_are_all_reduced_across_ranks(tmp_path):
    from pipeline.losses import modulation
    from pipeline.losses.dwml import cell_sums
    from tests.servers import free_port

    port = str(free_port())
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen([sys.executable, "-c", CELL_MEAN_WORKER, str(r), port, str(tmp_path)], env=env)
        for r in range(2)
    ]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    parts = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    torch.testing.assert_close(parts[0]["cell_mean"], parts[1]["cell_mean"], rtol=0, atol=0)
    y = torch.cat([p["y"] for p in parts])
    m = modulation(torch.cat([p["z"] for p in parts]), y, gamma=1.0)
    sums, counts = cell_sums(m, y)
    torch.testing.assert_close(parts[0]["cell_mean"], sums / counts)  # the mean over both ranks' pairs


# ----------------------------------------------------------------------------- DDP

DDP_WORKER = """
import os, sys, numpy as np, torch
from pathlib import Path
from tests.conftest import crafted_checkpoint, settings
from pipeline.training import train
cfg = settings("train", {config!r})
rank = int(os.environ["RANK"])
out = Path(sys.argv[1])
result = train(cfg, Path({prepared!r}), np.load({vectors!r}), out / f"rank{{rank}}", fingerprint="ddp",
               progress=False, min_patients=1)
torch.save(result.model.state_dict(), out / f"weights{{rank}}.pt")
torch.save(result.history, out / f"history{{rank}}.pt")
"""


def test_ddp_two_processes_on_cpu(data, tmp_path):
    prepared, vectors = data
    vectors_path = prepared.parent / "prototypes" / "prototypes.npy"
    config = {**TINY, "epochs": 1, "max_steps_per_epoch": 2}
    script = tmp_path / "ddp_worker.py"
    script.write_text(DDP_WORKER.format(config=config, prepared=str(prepared), vectors=str(vectors_path)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(
        [*torchrun, str(script), str(tmp_path)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    w0, w1 = (torch.load(tmp_path / f"weights{r}.pt") for r in (0, 1))
    assert all(torch.equal(w0[k], w1[k]) for k in w0)  # gradients were averaged across ranks
    init = build_model(settings("train", config).model, vectors).state_dict()
    assert not torch.equal(w0["head.radius"], init["head.radius"])  # and they did train
    # rank 0 alone writes checkpoints; both ranks saw the same (gathered) validation metrics
    assert (tmp_path / "rank0" / "last.pt").exists() and (tmp_path / "rank0" / "best.pt").exists()
    assert list((tmp_path / "rank1").iterdir()) == []
    h0, h1 = (torch.load(tmp_path / f"history{r}.pt") for r in (0, 1))
    assert h0[0]["val_mean_auc"] == h1[0]["val_mean_auc"]


# ----------------------------------------------------------------------------- component


def mlflow_workspace(tmp_path: Path, monkeypatch, experiment: str, train: dict) -> str:
    """params.yaml with `train` in tmp_path, MLflow on a SQLite file there, cwd there; returns the URI."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["mlflow"]["experiment"] = experiment
    params["train"] = settings("train", train).model_dump()
    params["evaluate"]["min_positive_patients"] = MIN_PATIENTS
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    return uri


def train_argv(tmp_path: Path, prepared: Path, *extra: str) -> list[str]:
    """The train component's command line on `prepared`, writing model/ and reports/ in tmp_path."""
    return [
        "--params",
        str(tmp_path / "params.yaml"),
        "--prepared",
        str(prepared),
        "--prototypes",
        str(prepared.parent / "prototypes"),
        "--out",
        "model",
        "--reports",
        "reports",
        "--no-progress",
        *extra,
    ]


def test_train_component_logs_to_mlflow(data, tmp_path, monkeypatch):
    import mlflow
    from mlflow.tracking import MlflowClient

    from components.train import main

    prepared, _ = data
    uri = mlflow_workspace(tmp_path, monkeypatch, "train-test", {**TINY, "epochs": 2, "max_steps_per_epoch": 2})
    argv = train_argv(tmp_path, prepared)
    assert main(argv) == 0
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("train-test")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.data.params["train.model.embed_dim"] == "16" and run.data.params["profile"] == "demo"
    assert run.data.tags["cxr.step"] == "train"
    loss = client.get_metric_history(run.info.run_id, "loss_loss")
    assert sorted(m.step for m in loss) == [1, 2, 3, 4] and all(math.isfinite(m.value) for m in loss)
    for key in ("loss_bce", "loss_pair", "lr_backbone", "lr_head", "images_per_s", "grad_norm"):
        assert len(client.get_metric_history(run.info.run_id, key)) == 4, key
    history = pd.read_csv(tmp_path / "reports" / "history.csv")
    # a class without positives in this tiny val split has no AUC, and no metric
    defined = [c for c in CLASSES if history[f"val_auc/{c}"].notna().all()]
    assert len(defined) >= 8
    for key in ("epoch_val_mean_auc", *(f"epoch_val_auc_{c}" for c in defined)):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [1, 2], key
    # one name for the selection figure: the per-epoch curve has its own, and no last epoch's
    # value sits under `val_mean_auc` (evaluate's figure of the selected checkpoint)
    assert run.data.metrics["best_val_mean_auc"] == max(
        m.value for m in client.get_metric_history(run.info.run_id, "epoch_val_mean_auc")
    )
    assert "val_mean_auc" not in run.data.metrics
    for path in (
        "model/best.pt",
        "model/last.pt",
        "model/train_summary.json",
        "model/resolved_config.json",
        "reports/history.csv",
    ):
        assert (tmp_path / path).exists(), path
    # a second call resumes the finished run: same MLflow run, no new steps
    assert main(argv) == 0
    assert len(client.search_runs([exp.experiment_id])) == 1
    assert len(client.get_metric_history(run.info.run_id, "loss_loss")) == 4


def test_train_component_rewrites_a_finished_run_byte_for_byte(data, tmp_path, monkeypatch, capsys):
    """`dvc repro` deletes the cache: false reports of a stage before rerunning it (e.g. after a run
    that failed on a wrong key): train then resumes its finished run, and must give the same bytes,
    or DVC sees a changed model folder and evaluate and register run (and register a version) again."""
    from components.train import main

    prepared, _ = data
    mlflow_workspace(tmp_path, monkeypatch, "train-bytes", {**TINY, "epochs": 2, "max_steps_per_epoch": 2})
    argv = train_argv(tmp_path, prepared, "--no-mlflow")
    outputs = [
        "model/best.pt",
        "model/last.pt",
        "model/train_summary.json",
        "model/resolved_config.json",
        "reports/history.csv",
        "reports/training_curves.png",
    ]
    assert main(argv) == 0
    first = {path: (tmp_path / path).read_bytes() for path in outputs}
    shutil.rmtree(tmp_path / "reports")  # what DVC does to the stage's cache: false plots before a rerun
    capsys.readouterr()
    assert main(argv) == 0
    assert "the run had finished, nothing trained" in capsys.readouterr().out
    again = {path: (tmp_path / path).read_bytes() for path in outputs}
    assert [p for p in outputs if again[p] != first[p]] == []
    # no tool version in the figure: a matplotlib upgrade alone does not change the plot's bytes
    assert b"Matplotlib" not in first["reports/training_curves.png"]


def test_train_refuses_a_crafted_last_pt_in_one_line_and_runs_nothing(data, tmp_path, monkeypatch, capsys):
    """Resume reads last.pt: a file whose unpickling would run a command stops the step in one
    line naming it (delete it to start again), and the command never runs."""
    from components.common import run_main
    from components.train import main

    prepared, _ = data
    mlflow_workspace(tmp_path, monkeypatch, "train-crafted", {**TINY, "epochs": 1, "max_steps_per_epoch": 1})
    marker = tmp_path / "marker"
    crafted_checkpoint(tmp_path / "model" / "last.pt", marker, fingerprint="any")
    capsys.readouterr()
    assert run_main("train", main, train_argv(tmp_path, prepared, "--no-mlflow")) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("cxr-dwml train: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert f"{Path('model') / 'last.pt'} was not loaded" in lines[0] and "nothing in it was run" in lines[0]
    assert "delete it and rerun the train step" in lines[0]
    assert not marker.exists() and not (tmp_path / "model" / "best.pt").exists()


# ----------------------------------------------------------------------------- ablation


def test_a_cuda_device_the_machine_lacks_is_named_by_its_key(data, tmp_path, monkeypatch, capsys):
    from components.common import run_main
    from components.train import main

    prepared, _ = data
    # plain "cuda" where there is none; else an index past the last GPU
    absent = f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"
    mlflow_workspace(tmp_path, monkeypatch, "device-test", {**TINY, "device": absent})
    assert run_main("train", main, train_argv(tmp_path, prepared, "--no-mlflow")) == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
    assert f"'train.device' is '{absent}' but torch finds" in line and "set train.device to auto" in line, line
    assert not (tmp_path / "model").exists()


def test_ablation_runs_variants_and_seeds_as_nested_mlflow_runs(data, tmp_path, monkeypatch, capsys):
    import json

    from mlflow.tracking import MlflowClient

    from components.ablate import main, parse_variants

    prepared, _ = data
    uri = mlflow_workspace(tmp_path, monkeypatch, "ablation-test", {**TINY, "epochs": 3, "max_steps_per_epoch": 1})
    argv = [
        "--params",
        "params.yaml",
        "--prepared",
        str(prepared),
        "--prototypes",
        str(prepared.parent / "prototypes"),
        "--out",
        "ablation",
        "--reports",
        "reports",
        "--variants",
        "bce_head,dual,dual_random_prototypes",
        "--variants-dir",
        str(ROOT / "conf" / "ablation"),
        "--seeds",
        "2",
        "--epochs",
        "1",
        "--bootstrap",
        "50",
        "--no-progress",
    ]
    assert main(argv) == 0
    reports = tmp_path / "reports"
    table = pd.read_csv(reports / "ablation_runs.csv")
    # seed by seed: an ablation stopped early has every variant over the same seeds
    assert table["variant"].tolist() == ["bce_head", "dual", "dual_random_prototypes"] * 2
    assert table["seed"].tolist() == [TINY["seed"]] * 3 + [TINY["seed"] + 1] * 3
    assert table["prototypes"].tolist() == ["text", "text", "random"] * 2
    assert table["val_mean_auc"].between(0, 1).all() and table["test_mean_auc"].between(0, 1).all()
    assert (table["best_epoch"] == 1).all()  # --epochs 1 overrode train.epochs

    summary = json.loads((reports / "ablation.json").read_text())
    assert summary["baseline"] == "bce_head" and summary["bootstrap_unit"] == "patient"
    assert summary["seeds"] == [TINY["seed"], TINY["seed"] + 1] and summary["epochs"] == 1
    assert all(v["runs_at_last_epoch"] == 2 for v in summary["variants"])  # one epoch: always the last
    per_class = summary["variants"][1]["test_per_class_delta_vs_bce_head"]
    assert list(per_class) == list(CLASSES) and any(d is not None for d in per_class.values())
    # every mean and delta of a split is over that split's one class set, the others named
    assert summary["min_positive_patients"] == MIN_PATIENTS
    for split in ("val", "test"):
        named = summary[f"{split}_classes_in_mean"] + list(summary[f"{split}_excluded_classes"])
        assert sorted(named, key=CLASSES.index) == list(CLASSES)
    entries = {v["variant"]: v for v in summary["variants"]}
    dual = entries["dual"]
    runs_of = table.set_index(["variant", "seed"])
    assert dual["test_mean_auc"] == pytest.approx(runs_of.loc["dual", "test_mean_auc"].mean())
    assert dual["test_mean_auc_std"] == pytest.approx(runs_of.loc["dual", "test_mean_auc"].std(ddof=1))
    delta = dual["test_delta_vs_bce_head"]
    # the full-data delta is the seed-averaged difference of the runs' test mean AUCs
    assert delta["delta"] == pytest.approx(
        runs_of.loc["dual", "test_mean_auc"].mean() - runs_of.loc["bce_head", "test_mean_auc"].mean(), abs=1e-9
    )
    assert delta["low"] <= delta["high"]
    assert "test_delta_vs_bce_head" not in entries["bce_head"]
    # the factor comparisons among the variants that ran: here the metric head's weighting is not
    # measured (no metric_unweighted), so only comparisons of pairs that both ran appear
    assert summary["comparisons"] == []
    markdown = (reports / "ablation.md").read_text()
    assert "| dual_random_prototypes |" in markdown and "patients" in markdown
    assert "The val mean AUC is over" in markdown and "The test mean AUC is over" in markdown
    assert "| dual |" in capsys.readouterr().out
    assert (reports / "ablation.png").read_bytes()[:4] == b"\x89PNG"
    bundle = load_checkpoint(tmp_path / "ablation" / "bce_head" / f"seed_{TINY['seed']}" / "best.pt")
    assert bundle["model_config"]["head"] == "linear"
    random = load_checkpoint(tmp_path / "ablation" / "dual_random_prototypes" / f"seed_{TINY['seed']}" / "best.pt")
    assert random["model_config"]["prototypes"] == "random"

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("ablation-test")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    names = {
        f"{v}-seed{s}" for v in ("bce_head", "dual", "dual_random_prototypes") for s in (TINY["seed"], TINY["seed"] + 1)
    }
    assert set(runs) == {"ablation"} | names
    parent = runs["ablation"].info.run_id
    for name in names:
        assert runs[name].data.tags["mlflow.parentRunId"] == parent
        assert "loss_loss" in runs[name].data.metrics
    dual_run = runs[f"dual-seed{TINY['seed']}"]
    assert dual_run.data.tags["cxr.ablation"] == "dual"
    assert dual_run.data.metrics["test_mean_auc"] == pytest.approx(runs_of.loc[("dual", TINY["seed"]), "test_mean_auc"])
    assert dual_run.data.params["train.loss.dwml.image_weighting"] == "True"
    assert runs[f"bce_head-seed{TINY['seed']}"].data.params["train.model.head"] == "linear"

    with pytest.raises(ValueError, match="unknown nope; choose from bce_head, "):
        parse_variants("dual,nope", ROOT / "conf" / "ablation")

    # the score files alone finish an ablation elsewhere: without any checkpoint, the same report
    for checkpoint in (tmp_path / "ablation").rglob("*.pt"):
        checkpoint.unlink()
    capsys.readouterr()
    first = (reports / "ablation_runs.csv").read_text()
    assert main([*argv, "--no-mlflow"]) == 0
    out = capsys.readouterr().out
    assert out.count("finished earlier, its scores read from") == 6, out
    assert (reports / "ablation_runs.csv").read_text() == first
    assert not list((tmp_path / "ablation").rglob("*.pt"))  # nothing trained again
    # scores of other settings are not taken for this run's: one epoch more trains every run again
    assert main([*argv[:-4], "2", *argv[-3:], "--variants", "bce_head", "--seeds", "1", "--no-mlflow"]) == 0
    out = capsys.readouterr().out
    assert "from other settings or data than this run's; training again" in out and "finished earlier" not in out
    assert list((tmp_path / "ablation" / "bce_head").rglob("best.pt"))


def test_ablation_compares_each_factor_over_the_seeds_both_variants_ran() -> None:
    """summarize's comparisons: variant minus reference, paired over shared seeds and patients."""
    from components.ablate import RunScores, summarize
    from pipeline.evaluation.scoring import SplitScores
    from pipeline.metrics import class_set, mean_auc, roc_auc

    rng = np.random.default_rng(0)
    n, c = 240, len(CLASSES)
    y = (rng.random((n, c)) < 0.3).astype(float)
    patients = np.repeat(np.arange(n // 2), 2).astype(str)
    images = [f"{i}.png" for i in range(n)]

    def run(variant: str, seed: int, signal: float) -> RunScores:
        logits = signal * (2 * y - 1) + rng.normal(size=(n, c))
        split = SplitScores(images=images, y=y, logits=logits, patients=patients)
        return RunScores(variant, seed, "linear", "bce", "text", 3, split, split)

    runs = [run("bce_head", 1, 0.5), run("bce_head", 2, 0.5), run("linear_dual", 1, 1.0), run("linear_dual", 2, 1.0)]
    runs.append(run("linear_dual", 3, 5.0))  # a seed the reference lacks: left out of the pair
    summary = summarize(runs, 200, 2, 3)
    (comparison,) = summary["comparisons"]
    assert (comparison["variant"], comparison["reference"]) == ("linear_dual", "bce_head")

    def mean(r: RunScores) -> float:
        return mean_auc(roc_auc(r.val.y, r.val.probs), class_set(r.val.y, r.val.patients, 2))

    expected = np.mean([mean(r) for r in runs[2:4]]) - np.mean([mean(r) for r in runs[:2]])
    assert comparison["val"]["delta"] == pytest.approx(expected, abs=1e-9)
    assert comparison["val"]["low"] < comparison["val"]["delta"] < comparison["val"]["high"]
