"""The training loop: epochs of AdamW steps, validation AUC, best/last checkpoints, resume, DDP.

Determinism: the data order and every random draw of epoch e depend only on (seed, e, rank), so a
run resumed from the checkpoint of epoch e-1 replays epoch e exactly as an uninterrupted run would.
The augmentations' seeds travel with the sampler's indices (`SeededSampler`), so this holds with
persistent loader workers too, which never see a reseed of the main process.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from pipeline.progress import progress_bar

from ..classes import CLASSES
from ..config import TrainConfig
from ..data.dataset import CachedImageDataset, SeededSampler, build_loader
from ..data.layout import CACHE_DIR, CACHE_INDEX, CLASS_COUNTS
from ..inference import autocast, autocast_dtype, predict, resolve_device
from ..io import load_checkpoint, read_json, save_checkpoint
from ..losses import build_loss
from ..metrics import ClassSet, class_set, describe_class_set, mean_auc, roc_auc
from ..models import CxrNet, ModelBundle, build_model, init_prior
from . import distributed as D
from .checkpoint import rng_state, set_rng_state, unwrap
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


@dataclass
class TrainState:
    """Where a run stands; `last.pt` holds it as a plain dict under "state", and resume restores it."""

    epoch: int = 0  # the last completed epoch
    step: int = 0  # optimisation steps over all epochs: the step axis of the logged metrics
    best_auc: float = -math.inf  # best validation mean AUC so far
    best_epoch: int = 0
    bad_epochs: int = 0  # epochs since the validation mean AUC last improved
    history: list[dict] = field(default_factory=list)  # one record per completed epoch
    finished: bool = False  # the last epoch ran, or early stopping ended the run
    stopped_early: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainState:
        """The state saved by `as_dict`; keys a checkpoint lacks keep their defaults."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


@dataclass
class StepContext:
    """What one optimisation step (`train_step`) reads and updates."""

    net: torch.nn.Module  # the module called: the model, or its DDP / torch.compile wrapper
    criterion: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any = None  # an LR scheduler stepped after every optimiser step, or None
    scaler: torch.amp.GradScaler | None = None  # float16 loss scaling; None: a disabled scaler
    ema: Any = None  # timm's ModelEmaV3, updated after every step, or None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    amp_dtype: torch.dtype | None = None  # autocast dtype of the forward pass; None = float32
    grad_clip: float = 0.0  # max global gradient norm; 0 turns clipping off
    channels_last: bool = False  # images in channels_last memory format (CUDA)

    def __post_init__(self) -> None:
        if self.scaler is None:
            self.scaler = torch.amp.GradScaler("cuda", enabled=False)


def train_step(ctx: StepContext, images: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """One optimisation step: forward, loss, backward, clipping, optimiser, scheduler, scaler and EMA.

    Args:
        ctx: the network, loss, optimiser and their companions.
        images: (B, 1, H, W) uint8 batch, on any device.
        targets: (B, C) 0/1 labels.

    Returns:
        `loss/<term>` for each scalar term of the loss (`loss/loss` is the optimised total),
        `lr/<group>` of each parameter group after the scheduler step, and `grad_norm` (before
        clipping) when clipping is on.
    """
    images = images.to(ctx.device, non_blocking=True)  # (B, 1, H, W) uint8
    targets = targets.to(ctx.device, non_blocking=True)  # (B, C)
    if ctx.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with autocast(ctx.device, ctx.amp_dtype):
        out = ctx.net(images, return_embeddings=True)
    # the loss runs in float32 whatever the autocast dtype: it owns the numerics of sigmoid/softplus
    terms = ctx.criterion(out.logits.float(), targets, prototypes=out.prototypes, return_terms=True)
    scaler, optimizer = ctx.scaler, ctx.optimizer
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(terms["loss"]).backward()
    grad_norm = math.nan
    if ctx.grad_clip > 0:
        scaler.unscale_(optimizer)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(ctx.net.parameters(), ctx.grad_clip))
    scaler.step(optimizer)
    scaler.update()
    if ctx.scheduler is not None:
        ctx.scheduler.step()
    if ctx.ema is not None:
        ctx.ema.update(unwrap(ctx.net))
    metrics = {f"loss/{k}": float(v.detach()) for k, v in terms.items() if torch.is_tensor(v) and v.numel() == 1}
    for i, group in enumerate(optimizer.param_groups):
        metrics[f"lr/{group.get('name', i)}"] = group["lr"]
    if math.isfinite(grad_norm):
        metrics["grad_norm"] = grad_norm
    return metrics


def model_bundle(
    model: CxrNet,
    cfg: TrainConfig,
    text_vectors: np.ndarray,
    *,
    epoch: int,
    val_mean_auc: float,
    image_size: int,
    fingerprint: str,
) -> ModelBundle:
    """Everything inference needs, in one file: weights, architecture, label vectors, class order,
    the input size (`image_size`: the side of the cached training images) and where it came from."""
    return ModelBundle(
        model_config=cfg.model,
        model_state=unwrap(model).state_dict(),
        text_vectors=np.asarray(text_vectors, dtype=np.float32),
        classes=tuple(CLASSES),
        image_size=image_size,
        crop_size=cfg.augment.crop_size,
        epoch=epoch,
        val_mean_auc=val_mean_auc,
        fingerprint=fingerprint,
    )


@dataclass
class _Data:
    """The splits as training reads them, and the training split's label counts."""

    train: CachedImageDataset
    sampler: SeededSampler  # a DistributedSampler's order, each index with its augmentation seed
    train_loader: DataLoader
    val_loader: DataLoader
    steps_per_epoch: int
    pos_counts: np.ndarray  # (C,) positives per class, CLASSES order
    num_images: int
    image_size: int  # side of the cached images, before cropping
    val_classes: ClassSet  # the classes every epoch's validation mean AUC is over


@dataclass
class _Run:
    """What `train` sets up once and every epoch uses."""

    cfg: TrainConfig
    dist: D.DistInfo
    data: _Data
    step: StepContext
    model: CxrNet  # the plain network under any wrapper: validated (without EMA) and saved
    out_dir: Path
    text_vectors: np.ndarray
    fingerprint: str
    log: Logger
    progress: bool  # show bars (the main rank only)


def train(
    cfg: TrainConfig,
    prepared_dir: Path,
    text_vectors: np.ndarray,
    out_dir: Path,
    fingerprint: str = "",
    log: Logger | None = None,
    progress: bool = True,
    *,
    min_patients: int,
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
        min_patients: evaluate.min_positive_patients: the best epoch is chosen on the validation
            mean AUC over the classes with this many positive and negative validation patients,
            the class set the registry gate decides on.
    """
    device, dist = _init_device(cfg)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = _load_data(cfg, Path(prepared_dir), device, dist, min_patients)
    if dist.is_main and progress:
        kept, excluded = data.val_classes.names(), data.val_classes.excluded()
        print(f"[train] {describe_class_set('val', kept, excluded, min_patients)}")
    model, ctx = _build(cfg, data, text_vectors, device)
    state = _maybe_resume(cfg, out_dir / LAST, fingerprint, ctx, dist)
    resumed_from = None if state is None else state.epoch
    state = state or TrainState()
    ctx.net = _wrap(model, cfg, dist, device)
    run = _Run(
        cfg,
        dist,
        data,
        ctx,
        model,
        out_dir,
        text_vectors,
        fingerprint,
        log if (log and dist.is_main) else (lambda metrics, step: None),
        progress and dist.is_main,
    )

    for epoch in range(state.epoch + 1, cfg.epochs + 1):
        if state.finished:
            break
        _seed_epoch(run, epoch)
        train_metrics = _train_epoch(run, epoch, state)
        if _end_epoch(run, epoch, state, train_metrics):
            break

    D.cleanup(dist)
    return TrainResult(
        best_auc=float(state.best_auc),
        best_epoch=state.best_epoch,
        epochs_run=state.epoch,
        stopped_early=state.stopped_early,
        history=state.history,
        best_path=out_dir / BEST,
        last_path=out_dir / LAST,
        resumed_from=resumed_from,
        model=model,
    )


def _init_device(cfg: TrainConfig) -> tuple[torch.device, D.DistInfo]:
    """This process's device (its own GPU under DDP), the process group, threads and cuDNN modes."""
    device = resolve_device(cfg.device, "train.device")
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
    return device, dist


def _load_data(
    cfg: TrainConfig, prepared_dir: Path, device: torch.device, dist: D.DistInfo, min_patients: int
) -> _Data:
    train_ds = CachedImageDataset(prepared_dir, "train", cfg.augment, train=True)
    val_ds = CachedImageDataset(prepared_dir, "val", cfg.augment, train=False)
    counts = read_json(prepared_dir / CLASS_COUNTS)
    image_size = int(read_json(prepared_dir / CACHE_DIR / CACHE_INDEX)["size"])
    sampler = SeededSampler(
        DistributedSampler(train_ds, dist.world_size, dist.rank, shuffle=True, seed=cfg.seed, drop_last=True)
    )
    loader = functools.partial(
        build_loader, shuffle=False, workers=cfg.workers, seed=cfg.seed, pin_memory=device.type == "cuda"
    )
    train_loader = loader(train_ds, cfg.batch_size, sampler=sampler, drop_last=True)
    val_sampler = DistributedSampler(val_ds, dist.world_size, dist.rank, shuffle=False) if dist.enabled else None
    val_loader = loader(val_ds, cfg.eval_batch_size, sampler=val_sampler)
    if len(val_ds) == 0:
        raise ValueError(f"{prepared_dir}: the val split is empty; raise prepare.val_fraction and rerun prepare")
    val_classes = class_set(val_ds.targets, val_ds.patients, min_patients)
    if not val_classes.included.any():
        raise ValueError(
            f"{prepared_dir}: no finding has {min_patients} positive and {min_patients} negative patients in "
            "the val split, so no epoch can be chosen; lower evaluate.min_positive_patients or raise "
            "prepare.val_fraction"
        )
    steps_per_epoch = len(train_loader)
    if cfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
    if steps_per_epoch == 0:
        raise ValueError(
            f"{prepared_dir}: the train split has {len(train_ds)} images, fewer than one batch of "
            f"{cfg.batch_size} per process; lower train.batch_size or add data"
        )
    return _Data(
        train_ds,
        sampler,
        train_loader,
        val_loader,
        steps_per_epoch,
        pos_counts=np.asarray(counts["positives_list"], dtype=np.int64),
        num_images=int(counts["num_images"]),
        image_size=image_size,
        val_classes=val_classes,
    )


def _build(cfg: TrainConfig, data: _Data, text_vectors: np.ndarray, device: torch.device) -> tuple[CxrNet, StepContext]:
    """The network (seeded, prior-initialised), its loss and optimiser, before any wrapper."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, text_vectors).to(device)
    criterion = build_loss(cfg.loss, data.pos_counts.tolist(), data.num_images).to(device)
    init_prior(
        model,
        criterion,
        data.pos_counts / max(1, data.num_images),
        prior_sample(data.train, cfg),
        batch_size=cfg.eval_batch_size,
    )
    channels_last = cfg.channels_last and device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, data.steps_per_epoch, cfg.epochs)
    amp_dtype = autocast_dtype(cfg.amp, device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    ema = _build_ema(model, cfg.ema_decay, device)
    ctx = StepContext(
        model, criterion, optimizer, scheduler, scaler, ema, device, amp_dtype, cfg.optim.grad_clip, channels_last
    )
    return model, ctx


def _wrap(model: CxrNet, cfg: TrainConfig, dist: D.DistInfo, device: torch.device) -> torch.nn.Module:
    """The module the steps call: DDP across processes, torch.compile when asked."""
    net: torch.nn.Module = model
    if dist.enabled:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if cfg.compile:
        net = torch.compile(net)
    return net


def _seed_epoch(run: _Run, epoch: int) -> None:
    # every random draw of this epoch is a function of (seed, epoch, rank): see module docstring
    seed = epoch_seed(run.cfg.seed, epoch, run.dist.rank)
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    run.data.sampler.set_epoch(epoch, seed)  # the augmentations' seeds travel with the indices


def _train_epoch(run: _Run, epoch: int, state: TrainState) -> dict:
    """One pass over the training split, capped at `steps_per_epoch` batches; the epoch's figures."""
    ctx, steps, world_size = run.step, run.data.steps_per_epoch, run.dist.world_size
    ctx.net.train()
    seen, loss_sum, t0 = 0, 0.0, time.perf_counter()
    bar = progress_bar(
        total=steps, desc=f"epoch {epoch}/{run.cfg.epochs}", unit="batch", disable=not run.progress, leave=False
    )
    for i, (images, targets) in enumerate(run.data.train_loader):
        if i >= steps:
            break
        metrics = train_step(ctx, images, targets)
        state.step += 1
        seen += images.shape[0]
        loss = metrics["loss/loss"]
        loss_sum += loss * images.shape[0]
        rate = world_size * seen / max(1e-9, time.perf_counter() - t0)  # all ranks together
        bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{rate:.0f}")
        bar.update(1)
        if state.step % run.cfg.log_every == 0:
            metrics["images_per_s"] = rate
            if ctx.device.type == "cuda":
                metrics["gpu_mem_gb"] = torch.cuda.max_memory_allocated(ctx.device) / 2**30
            run.log(metrics, state.step)
    bar.close()
    elapsed = time.perf_counter() - t0
    return {
        "train_loss": loss_sum / max(1, seen),
        "train_images_per_s": world_size * seen / max(1e-9, elapsed),
        # per-epoch keys differ from the per-step ones (lr/head): MLflow keeps one step axis per key
        "train_lr_head": ctx.optimizer.param_groups[-1]["lr"],
    }


def _end_epoch(run: _Run, epoch: int, state: TrainState, train_metrics: dict) -> bool:
    """Validate, record the epoch in `state`, log it and write the checkpoints; True when training stops."""
    cfg, ctx = run.cfg, run.step
    eval_model = ctx.ema.module if ctx.ema is not None else run.model
    val = _validate(eval_model, run.data, ctx.device, ctx.amp_dtype, run.dist, run.progress)
    improved = val["val_mean_auc"] > state.best_auc
    if improved:
        state.best_auc, state.best_epoch, state.bad_epochs = val["val_mean_auc"], epoch, 0
    else:
        state.bad_epochs += 1
    record = {"epoch": epoch, **train_metrics, **val}
    state.history.append(record)
    state.epoch = epoch
    # the per-epoch validation curve is `epoch_val_*` in MLflow: `val_mean_auc` is evaluate's figure
    # of the selected checkpoint, and `best_val_mean_auc` the selection figure, never a last epoch's
    run.log({_epoch_key(k): v for k, v in record.items() if k != "epoch" and np.isfinite(v)}, epoch)
    stop = cfg.early_stopping_patience > 0 and state.bad_epochs >= cfg.early_stopping_patience
    stop = D.broadcast_flag(run.dist, stop)
    state.finished = stop or epoch == cfg.epochs
    state.stopped_early = stop
    if run.dist.is_main:
        if improved:
            model_bundle(
                eval_model,
                cfg,
                run.text_vectors,
                epoch=epoch,
                val_mean_auc=val["val_mean_auc"],
                image_size=run.data.image_size,
                fingerprint=run.fingerprint,
            ).save(run.out_dir / BEST)
        save_checkpoint(run.out_dir / LAST, _full_state(ctx, state, cfg, run.fingerprint))
    D.barrier(run.dist)
    return stop


def _epoch_key(key: str) -> str:
    return f"epoch_{key}" if key.startswith("val_") else key


def _validate(model, data: _Data, device, amp_dtype, dist, progress: bool) -> dict:
    index, probs = predict(model, data.val_loader, device, amp_dtype, progress, desc="validate")
    index, probs = D.gather_predictions(dist, index, probs)
    per_class = roc_auc(data.val_loader.dataset.targets[index], probs)
    out = {"val_mean_auc": mean_auc(per_class, data.val_classes)}
    out.update({f"val_auc/{name}": float(v) for name, v in zip(CLASSES, per_class)})
    return out


def _full_state(ctx: StepContext, state: TrainState, cfg: TrainConfig, fingerprint: str) -> dict:
    return {
        "model_state": unwrap(ctx.net).state_dict(),
        "criterion": ctx.criterion.state_dict(),  # running statistics of the loss's weights
        "optimizer": ctx.optimizer.state_dict(),
        "scheduler": ctx.scheduler.state_dict(),
        "scaler": ctx.scaler.state_dict(),
        "ema": ctx.ema.state_dict() if ctx.ema is not None else None,
        "rng": rng_state(),
        "state": state.as_dict(),
        "config": cfg.model_dump(),
        "fingerprint": fingerprint,
    }


def _maybe_resume(
    cfg: TrainConfig, path: Path, fingerprint: str, ctx: StepContext, dist: D.DistInfo
) -> TrainState | None:
    """Restore `ctx` and the RNGs from `path`; the saved state, or None when there is nothing to resume."""
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
    unwrap(ctx.net).load_state_dict(ckpt["model_state"])
    if "criterion" in ckpt:
        ctx.criterion.load_state_dict(ckpt["criterion"])
    ctx.optimizer.load_state_dict(ckpt["optimizer"])
    ctx.scheduler.load_state_dict(ckpt["scheduler"])
    ctx.scaler.load_state_dict(ckpt["scaler"])
    if ctx.ema is not None and ckpt.get("ema") is not None:
        ctx.ema.load_state_dict(ckpt["ema"])
    set_rng_state(ckpt["rng"])
    state = TrainState.from_dict(ckpt["state"])
    if dist.is_main:
        print(f"[train] resumed {path} at epoch {state.epoch} ({'finished' if state.finished else 'continuing'})")
    return state


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
