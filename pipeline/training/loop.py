"""The training loop: epochs of AdamW steps, validation AUC, best/last checkpoints, resume, DDP.

Determinism: the data order and every random draw of epoch e depend only on (seed, e, rank), so a
run resumed from the checkpoint of epoch e-1 replays epoch e exactly as an uninterrupted run would.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DistributedSampler
from tqdm.auto import tqdm

from ..classes import CLASSES
from ..config import TrainConfig
from ..data.dataset import CachedImageDataset, build_loader
from ..inference import autocast, autocast_dtype, predict, resolve_device
from ..io import load_checkpoint, read_json
from ..losses import build_loss
from ..metrics import mean_auc, roc_auc
from ..models import CxrNet, build_model, init_prior
from . import distributed as D
from .checkpoint import rng_state, save_checkpoint, set_rng_state, unwrap
from .optim import build_optimizer, build_scheduler

Logger = Callable[[dict, int], None]
LAST, BEST = "last.pt", "best.pt"


@dataclass
class TrainResult:
    best_auc: float
    best_epoch: int
    epochs_run: int
    stopped_early: bool
    history: list[dict]
    best_path: Path
    last_path: Path
    resumed_from: int | None = None
    model: torch.nn.Module | None = field(default=None, repr=False)  # the last weights, on every rank


class TrainingInterrupted(RuntimeError):
    """Raised by the `interrupt_after_steps` hook, standing in for a killed process in tests."""


def model_bundle(model: CxrNet, cfg: TrainConfig, text_vectors: np.ndarray, **extra) -> dict:
    """Everything inference needs, in one file: weights, architecture, label vectors, class order."""
    return {
        "model_state": unwrap(model).state_dict(),
        "model_config": cfg.model.model_dump(),
        "text_vectors": np.asarray(text_vectors, dtype=np.float32),
        "classes": list(CLASSES),
        "crop_size": cfg.augment.crop_size,
        **extra,
    }


def train(
    cfg: TrainConfig,
    prepared_dir: Path,
    text_vectors: np.ndarray,
    out_dir: Path,
    fingerprint: str = "",
    log: Logger | None = None,
    progress: bool = True,
    interrupt_after_steps: int | None = None,
) -> TrainResult:
    """Train on `prepared_dir`'s train split, select on val, write best.pt/last.pt into `out_dir`.

    Args:
        cfg: resolved training config.
        prepared_dir: output of the prepare step (manifest, class counts, image cache).
        text_vectors: (C, E) label vectors from the prototypes step.
        out_dir: checkpoint folder; a `last.pt` there with the same `fingerprint` is resumed.
        fingerprint: identifies config + inputs; a checkpoint from other settings is not resumed.
        log: called as log(metrics, step) on the main rank (MLflow in the component).
        progress: show tqdm bars.
        interrupt_after_steps: test hook, raise TrainingInterrupted after this many steps.
    """
    device = resolve_device(cfg.device)
    dist = D.init_distributed(device.type)
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    if cfg.threads and device.type == "cpu":
        torch.set_num_threads(cfg.threads)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log = log if (log and dist.is_main) else (lambda metrics, step: None)

    train_ds = CachedImageDataset(prepared_dir, "train", cfg.augment, train=True)
    val_ds = CachedImageDataset(prepared_dir, "val", cfg.augment, train=False)
    counts = read_json(Path(prepared_dir) / "class_counts.json")
    pos_counts = np.asarray(counts["positives_list"], dtype=np.int64)  # (C,) in CLASSES order
    num_images = int(counts["num_images"])
    image_size = int(read_json(Path(prepared_dir) / "cache" / "index.json")["size"])  # side before cropping
    sampler = DistributedSampler(train_ds, dist.world_size, dist.rank, shuffle=True, seed=cfg.seed, drop_last=True)
    pin = device.type == "cuda"
    train_loader = build_loader(
        train_ds,
        cfg.batch_size,
        shuffle=False,
        workers=cfg.workers,
        seed=cfg.seed,
        sampler=sampler,
        pin_memory=pin,
        drop_last=True,
    )
    val_sampler = DistributedSampler(val_ds, dist.world_size, dist.rank, shuffle=False) if dist.enabled else None
    val_loader = build_loader(
        val_ds,
        cfg.eval_batch_size,
        shuffle=False,
        workers=cfg.workers,
        seed=cfg.seed,
        sampler=val_sampler,
        pin_memory=pin,
    )
    if len(val_ds) == 0:
        raise ValueError(f"{prepared_dir}: the val split is empty; raise prepare.val_fraction and rerun prepare")
    steps_per_epoch = len(train_loader)
    if cfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
    if steps_per_epoch == 0:
        raise ValueError(
            f"{prepared_dir}: the train split has {len(train_ds)} images, fewer than one batch of "
            f"{cfg.batch_size} per process; lower train.batch_size or add data"
        )

    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, text_vectors).to(device)
    criterion = build_loss(cfg.loss, pos_counts.tolist(), num_images).to(device)
    init_prior(
        model, criterion, pos_counts / max(1, num_images), prior_sample(train_ds, cfg), batch_size=cfg.eval_batch_size
    )
    if cfg.channels_last and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, steps_per_epoch, cfg.epochs)
    amp_dtype = autocast_dtype(cfg.amp, device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    ema = _build_ema(model, cfg.ema_decay, device)

    state = {"epoch": 0, "best_auc": -math.inf, "best_epoch": 0, "bad_epochs": 0, "history": [], "step": 0}
    resumed_from = _maybe_resume(
        cfg, out_dir / LAST, fingerprint, model, criterion, optimizer, scheduler, scaler, ema, state, dist
    )

    net = model
    if dist.enabled:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if cfg.compile:
        net = torch.compile(net)

    for epoch in range(state["epoch"] + 1, cfg.epochs + 1):
        if state.get("finished"):
            break
        # every random draw of this epoch is a function of (seed, epoch, rank): see module docstring
        seed = epoch_seed(cfg.seed, epoch, dist.rank)
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        sampler.set_epoch(epoch)
        if train_loader.generator is not None:  # worker augmentation seeds come from it
            train_loader.generator.manual_seed(seed)
        train_metrics = _train_epoch(
            net,
            criterion,
            optimizer,
            scheduler,
            scaler,
            ema,
            train_loader,
            steps_per_epoch,
            device,
            amp_dtype,
            cfg,
            epoch,
            state,
            log,
            progress and dist.is_main,
            interrupt_after_steps,
            dist.world_size,
        )
        eval_model = ema.module if ema is not None else model
        val = _validate(eval_model, val_loader, device, amp_dtype, dist, progress and dist.is_main)
        improved = val["val_mean_auc"] > state["best_auc"]
        if improved:
            state.update(best_auc=val["val_mean_auc"], best_epoch=epoch, bad_epochs=0)
        else:
            state["bad_epochs"] += 1
        record = {"epoch": epoch, **train_metrics, **val}
        state["history"].append(record)
        state["epoch"] = epoch
        log({k: v for k, v in record.items() if k != "epoch" and np.isfinite(v)}, epoch)
        stop = cfg.early_stopping_patience > 0 and state["bad_epochs"] >= cfg.early_stopping_patience
        stop = D.broadcast_flag(dist, stop)
        state["finished"] = stop or epoch == cfg.epochs
        state["stopped_early"] = stop
        if dist.is_main:
            if improved:
                save_checkpoint(
                    out_dir / BEST,
                    model_bundle(
                        eval_model,
                        cfg,
                        text_vectors,
                        epoch=epoch,
                        val_mean_auc=val["val_mean_auc"],
                        image_size=image_size,
                        fingerprint=fingerprint,
                    ),
                )
            save_checkpoint(
                out_dir / LAST,
                _full_state(model, criterion, optimizer, scheduler, scaler, ema, state, cfg, fingerprint),
            )
        D.barrier(dist)
        if stop:
            break

    D.cleanup(dist)
    return TrainResult(
        best_auc=float(state["best_auc"]),
        best_epoch=state["best_epoch"],
        epochs_run=state["epoch"],
        stopped_early=bool(state.get("stopped_early")),
        history=state["history"],
        best_path=out_dir / BEST,
        last_path=out_dir / LAST,
        resumed_from=resumed_from,
        model=model,
    )


def _train_epoch(
    net,
    criterion,
    optimizer,
    scheduler,
    scaler,
    ema,
    loader,
    steps,
    device,
    amp_dtype,
    cfg: TrainConfig,
    epoch: int,
    state: dict,
    log: Logger,
    progress: bool,
    interrupt_after_steps: int | None,
    world_size: int = 1,
) -> dict:
    net.train()
    seen, loss_sum, t0 = 0, 0.0, time.perf_counter()
    bar = tqdm(total=steps, desc=f"epoch {epoch}/{cfg.epochs}", unit="batch", disable=not progress, leave=False)
    for i, (images, targets) in enumerate(loader):
        if i >= steps:
            break
        images = images.to(device, non_blocking=True)  # (B, 1, H, W) uint8
        targets = targets.to(device, non_blocking=True)  # (B, C)
        if cfg.channels_last and device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp_dtype):
            out = net(images, return_embeddings=True)
        # the loss runs in float32 whatever the autocast dtype: it owns the numerics of sigmoid/softplus
        terms = criterion(out.logits.float(), targets, prototypes=out.prototypes, return_terms=True)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(terms["loss"]).backward()
        if cfg.optim.grad_clip > 0:
            scaler.unscale_(optimizer)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.optim.grad_clip))
        else:
            grad_norm = float("nan")
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        if ema is not None:
            ema.update(unwrap(net))
        state["step"] += 1
        seen += images.shape[0]
        loss = float(terms["loss"].detach())
        loss_sum += loss * images.shape[0]
        rate = world_size * seen / max(1e-9, time.perf_counter() - t0)  # all ranks together
        bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{rate:.0f}")
        bar.update(1)
        if state["step"] % cfg.log_every == 0:
            log(_step_metrics(terms, optimizer, grad_norm, rate, device), state["step"])
        if interrupt_after_steps is not None and state["step"] >= interrupt_after_steps:
            raise TrainingInterrupted(f"interrupted after {state['step']} steps")
    bar.close()
    elapsed = time.perf_counter() - t0
    return {
        "train_loss": loss_sum / max(1, seen),
        "train_images_per_s": world_size * seen / max(1e-9, elapsed),
        # per-epoch keys differ from the per-step ones (lr/head): MLflow keeps one step axis per key
        "train_lr_head": optimizer.param_groups[-1]["lr"],
    }


def _step_metrics(terms: dict, optimizer, grad_norm: float, rate: float, device) -> dict:
    metrics = {f"loss/{k}": float(v.detach()) for k, v in terms.items() if torch.is_tensor(v) and v.numel() == 1}
    for group in optimizer.param_groups:
        metrics[f"lr/{group['name']}"] = group["lr"]
    metrics["images_per_s"] = rate
    if np.isfinite(grad_norm):
        metrics["grad_norm"] = grad_norm
    if device.type == "cuda":
        metrics["gpu_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    return metrics


def _validate(model, loader, device, amp_dtype, dist, progress: bool) -> dict:
    index, probs = predict(model, loader, device, amp_dtype, progress, desc="validate")
    index, probs = D.gather_predictions(dist, index, probs)
    targets = loader.dataset.targets[index]
    with _quiet_warnings():
        per_class = roc_auc(targets, probs)
        mean = mean_auc(per_class)
    out = {"val_mean_auc": float(mean)}
    out.update({f"val_auc/{name}": float(v) for name, v in zip(CLASSES, per_class)})
    return out


def _full_state(model, criterion, optimizer, scheduler, scaler, ema, state, cfg, fingerprint) -> dict:
    return {
        "model_state": unwrap(model).state_dict(),
        "criterion": criterion.state_dict(),  # running statistics of the loss's weights
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "ema": ema.state_dict() if ema is not None else None,
        "rng": rng_state(),
        "state": state,
        "config": cfg.model_dump(),
        "fingerprint": fingerprint,
    }


def _maybe_resume(
    cfg, path: Path, fingerprint: str, model, criterion, optimizer, scheduler, scaler, ema, state, dist: D.DistInfo
) -> int | None:
    # rank 0 decides and shares the checkpoint: other nodes may not see rank 0's disk, and ranks
    # that disagreed about the starting epoch would wait on each other forever
    ckpt = load_checkpoint(path) if (dist.is_main and cfg.resume and path.exists()) else None
    ckpt = D.broadcast_object(dist, ckpt)
    if ckpt is None:
        return None
    if ckpt.get("fingerprint") != fingerprint:
        if dist.is_main:
            print(f"[train] {path} was written with other settings or data; starting from scratch")
        return None
    model.load_state_dict(ckpt["model_state"])
    if "criterion" in ckpt:
        criterion.load_state_dict(ckpt["criterion"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    scaler.load_state_dict(ckpt["scaler"])
    if ema is not None and ckpt.get("ema") is not None:
        ema.load_state_dict(ckpt["ema"])
    set_rng_state(ckpt["rng"])
    state.update(ckpt["state"])
    done = "finished" if state.get("finished") else "continuing"
    if dist.is_main:
        print(f"[train] resumed {path} at epoch {state['epoch']} ({done})")
    return int(state["epoch"])


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of one rank's epoch: distinct per rank, so DDP ranks draw different augmentations."""
    return seed + 1000 * epoch + 1_000_003 * rank


def prior_sample(train_ds: CachedImageDataset, cfg: TrainConfig) -> torch.Tensor:
    """Up to `cfg.prior_images` training images, one each from as many random patients, centre-cropped.

    Drawn with numpy from the training seed, so no torch random draw is spent and every DDP rank
    picks the same images. One image per patient spreads the sample over the population instead
    of over a few patients' follow-up films.
    """
    rng = np.random.default_rng(cfg.seed)
    patients = np.unique(train_ds.patients)
    chosen = rng.permutation(patients)[: cfg.prior_images]
    rows = np.concatenate([rng.choice(np.flatnonzero(train_ds.patients == p), 1) for p in chosen])
    ds = CachedImageDataset(train_ds.prepared_dir, "train", cfg.augment, train=False)
    return torch.stack([ds[int(i)][0] for i in np.sort(rows)])  # (N, 1, crop, crop) uint8


def _build_ema(model, decay: float, device):
    if decay <= 0:
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(model, decay=decay, device=device)


@contextlib.contextmanager
def _quiet_warnings():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
