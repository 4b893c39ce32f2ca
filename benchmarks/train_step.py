"""Images/s of one training step: BCE linear head against the metric head + dual-weighted metric loss.

The model, loss, optimiser and batch of params.yaml's `train` (the demo: convnext_atto, embed_dim 128,
hidden_dim 256, crop 56, batch 64) run the training loop's own step,
`pipeline.training.loop.train_step` (autocast where CUDA, forward, float32 loss with its logged
terms, backward, gradient clipping, AdamW, the warmup-cosine schedule), in three set-ups:
    bce:         linear head + BCE                             (the baseline)
    metric_bce:  metric head + plain BCE on distance logits    (what the head costs)
    metric_dwml: metric head + dual-weighted metric loss       (the method)
Repetitions interleave the set-ups, in a rotating order, so that machine noise hits each alike;
warm-up steps are excluded and each set-up's figure is the median over repetitions. The last line
is `dwml_step_cost_ratio <r>`: metric_dwml step time over bce step time (goal: < 1.05).
With CUDA it also reports ConvNeXt-T at 224 px with AMP (bf16) and channels_last.

    python benchmarks/train_step.py                    # CPU or the first GPU
    python benchmarks/train_step.py --threads 1      # steadier on a busy, shared CPU
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.config import TrainConfig, load_params  # noqa: E402
from pipeline.data.synthetic import real_prevalence  # noqa: E402
from pipeline.inference import autocast_dtype, resolve_device  # noqa: E402
from pipeline.losses import build_loss  # noqa: E402
from pipeline.models import build_model, init_prior  # noqa: E402
from pipeline.training.loop import StepContext, train_step  # noqa: E402
from pipeline.training.optim import build_optimizer, build_scheduler  # noqa: E402

C, E = 14, 384  # classes; text vector width of the demo encoder (MiniLM-L6)
SETUPS = {  # changes to params.yaml's `train`
    "bce": {"model.head": "linear", "loss.name": "bce"},
    "metric_bce": {"model.head": "metric", "loss.name": "bce"},
    "metric_dwml": {"model.head": "metric", "loss.name": "dwml"},  # the method, with params.yaml's dwml settings
}


class Step:
    """One set-up: model, loss, optimiser and a fixed batch, stepped by the training loop's `train_step`."""

    def __init__(self, cfg: TrainConfig, device: torch.device):
        rng = np.random.default_rng(0)
        prevalence = real_prevalence()  # (C,) ChestX-ray14 rates, so the loss weights are realistic
        counts = (prevalence * 86_524).astype(int)
        batch, crop = cfg.batch_size, cfg.augment.crop_size
        torch.manual_seed(0)
        self.model = build_model(cfg.model, rng.normal(size=(C, E)).astype(np.float32)).to(device)
        loss_fn = build_loss(cfg.loss, counts.tolist(), 86_524).to(device)
        images = torch.from_numpy(rng.integers(0, 256, (batch, 1, crop, crop), dtype=np.uint8))  # (B, 1, H, W)
        self.images = images.to(device)
        init_prior(self.model, loss_fn, prevalence, self.images)  # as training starts
        channels_last = cfg.channels_last and device.type == "cuda"
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        optimizer = build_optimizer(self.model, cfg.optim)
        amp_dtype = autocast_dtype(cfg.amp, device)
        # as `train` builds them: the schedule of a long run, loss scaling for float16 only
        self.ctx = StepContext(
            self.model,
            loss_fn,
            optimizer,
            build_scheduler(optimizer, cfg.optim, steps_per_epoch=1000, epochs=8),
            torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16),
            None,
            device,
            amp_dtype,
            cfg.optim.grad_clip,
            channels_last,
        )
        self.device = device
        self.targets = torch.from_numpy((rng.random((batch, C)) < prevalence).astype(np.float32)).to(device)

    def __call__(self) -> None:
        train_step(self.ctx, self.images, self.targets)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Step, n: int) -> float:
    """Seconds per step over `n` steps."""
    sync(step.device)
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    sync(step.device)
    return (time.perf_counter() - t0) / n


def interleaved(steps: dict[str, Step], reps: int, n: int, warmup: int) -> dict[str, float]:
    """Median seconds per step of each set-up, repetitions interleaved in rotating order."""
    for step in steps.values():
        time_steps(step, warmup)
    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(reps):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(time_steps(steps[name], n))
    return {name: statistics.median(t) for name, t in times.items()}


def convnext_t_cuda(train: TrainConfig, device: torch.device, batch: int, steps: int, warmup: int) -> float:
    """Images/s of ConvNeXt-T at 224 px, metric head + DWML, AMP bf16 and channels_last."""
    cfg = train.replace(
        {
            **SETUPS["metric_dwml"],
            "model.backbone.name": "convnext_tiny",
            "augment.crop_size": 224,
            "batch_size": batch,
            "amp": "bf16",
            "channels_last": True,
        },
        at="train",
    )
    step = Step(cfg, device)
    time_steps(step, warmup)
    return batch / time_steps(step, steps)


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default=str(ROOT / "params.yaml"), help="settings file (default: %(default)s)")
    p.add_argument("--batch-size", type=int, help="images per step (default: train.batch_size)")
    p.add_argument("--crop", type=int, help="image side (default: train.augment.crop_size)")
    p.add_argument("--backbone", help="timm model name (default: train.model.backbone.name)")
    p.add_argument("--reps", type=int, default=15, help="interleaved repetitions per set-up")
    p.add_argument("--steps", type=int, default=2, help="timed steps per repetition")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per set-up first")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--cuda-batch", type=int, default=128, help="batch of the ConvNeXt-T 224 px run")
    args = p.parse_args(argv)
    train = load_params(args.params).train
    changes = {"batch_size": args.batch_size, "augment.crop_size": args.crop, "model.backbone.name": args.backbone}
    train = train.replace({k: v for k, v in changes.items() if v is not None}, at="train")
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU, {torch.get_num_threads()} threads"
    batch = train.batch_size
    print(
        f"torch {torch.__version__} on {name}; {train.model.backbone.name}, batch {batch}, "
        f"crop {train.augment.crop_size}, {args.reps} reps x {args.steps} steps (+{args.warmup} warm-up)"
    )
    steps = {name: Step(train.replace(changes, at="train"), device) for name, changes in SETUPS.items()}
    seconds = interleaved(steps, args.reps, args.steps, args.warmup)
    for name, s in seconds.items():
        print(f"{name:>12}: {batch / s:9.1f} images/s   {1000 * s:8.2f} ms/step   x{s / seconds['bce']:.3f} of bce")
    if device.type == "cuda":
        rate = convnext_t_cuda(train, device, args.cuda_batch, steps=10, warmup=5)
        print(f"convnext_tiny 224px bf16 channels_last, batch {args.cuda_batch}: {rate:.0f} images/s")
    ratio = seconds["metric_dwml"] / seconds["bce"]
    print(f"dwml_step_cost_ratio {ratio:.3f}")
    return ratio


if __name__ == "__main__":
    main()
