"""The CUDA paths at paper scale: precision, memory format and compile, side by side in one run.

ConvNeXt-T at 224 px with the metric head and the dual-weighted metric loss (params.yaml's `train`
with the paper profile's backbone and crop), stepped by the training loop's own `train_step`:
    fp32                      autocast off
    bf16                      autocast bf16 (the default `amp: auto` on a bf16 GPU)
    bf16_channels_last        + NHWC memory format (`train.channels_last`)
    bf16_channels_last_compile + torch.compile (`train.compile`)
and the linear head + BCE under bf16 + channels_last for the cost of the method. For each: images/s
(median over interleaved repetitions) and peak GPU memory. Then the distance check: under bf16
autocast the head's logits come out float32 and equal an fp32 computation, while the same
distances computed in bf16 would be quantised (the size of that error is printed).

    python benchmarks/cuda_check.py --batch 128 --reps 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from train_step import SETUPS, Step, time_steps  # noqa: E402

from pipeline.config import load_params  # noqa: E402

RUNS = {  # name -> changes to params.yaml's `train`
    "fp32": {**SETUPS["metric_dwml"], "amp": "off", "channels_last": False, "compile": False},
    "bf16": {**SETUPS["metric_dwml"], "amp": "bf16", "channels_last": False, "compile": False},
    "bf16_channels_last": {**SETUPS["metric_dwml"], "amp": "bf16", "channels_last": True, "compile": False},
    "bf16_channels_last_compile": {**SETUPS["metric_dwml"], "amp": "bf16", "channels_last": True, "compile": True},
    "bce_bf16_channels_last": {**SETUPS["bce"], "amp": "bf16", "channels_last": True, "compile": False},
}


def build(train, changes: dict, device: torch.device) -> Step:
    cfg = train.replace(changes, at="train")
    step = Step(cfg, device)
    if cfg.compile:
        step.ctx.net = torch.compile(step.model)
    return step


def distance_check(train, device: torch.device) -> None:
    """bf16 autocast: float32 logits equal to fp32's; what bf16 distances would have cost."""
    cfg = train.replace({**SETUPS["metric_dwml"], "amp": "bf16"}, at="train")
    step = Step(cfg, device)
    model = step.model.eval()
    with torch.no_grad():
        pooled = model.backbone.forward_head(model.forward_features(step.images).float(), pre_logits=True)  # (B, F)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            head_mixed = model.head(pooled).logits  # the whole head as training runs it
            v, p = model.head.embed(pooled), model.head.prototypes()  # (B, D), (C, D): float32 unit vectors
            mixed = model.head.logits(v, p)  # distances and logits under autocast
        exact = model.head.scale * (model.head.radius - (2 - 2 * v.double() @ p.double().T).float())  # fp64 reference
        head_fp32 = model.head(pooled).logits
        d32 = 2 - 2 * v.double() @ p.double().T
        d16 = (2 - 2 * v.bfloat16() @ p.bfloat16().T).double()
    print(
        f"distance check: logits under bf16 autocast are {mixed.dtype}; max |logit - fp64 reference| "
        f"{float((mixed.double() - exact.double()).abs().max()):.2e}; distances computed in bf16 would be off by "
        f"up to {float((d16 - d32).abs().max()):.2e} (range [0, 4]; bf16 step near 2 is {2**-7:.2e}), i.e. "
        f"{float(model.head.scale.detach()) * float((d16 - d32).abs().max()):.2e} in logits; the visual "
        f"projection MLP runs in bf16 by design: whole head bf16-autocast vs fp32 max |diff| "
        f"{float((head_mixed - head_fp32).abs().max()):.2e}"
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default=str(ROOT / "params.yaml"))
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--crop", type=int, default=224)
    p.add_argument("--backbone", default="convnext_tiny")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--device", default="cuda", help="cuda; cpu only to try the script (no compile run there)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("cuda_check: no CUDA device")
    cuda = device.type == "cuda"
    torch.backends.cudnn.benchmark = True
    train = load_params(args.params).train.replace(
        {"batch_size": args.batch, "augment.crop_size": args.crop, "model.backbone.name": args.backbone}, at="train"
    )
    runs = {k: v for k, v in RUNS.items() if cuda or not v["compile"]}
    name = torch.cuda.get_device_name(device) if cuda else "CPU"
    print(
        f"torch {torch.__version__}, {name}; {args.backbone} {args.crop}px, "
        f"batch {args.batch}, {args.reps} reps x {args.steps} steps (+{args.warmup} warm-up)",
        flush=True,
    )
    steps, memory = {}, {}
    for name, changes in runs.items():
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        steps[name] = build(train, changes, device)
        time_steps(steps[name], args.warmup)  # compile happens here
        memory[name] = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else float("nan")
        print(f"  built {name}: peak {memory[name]:.2f} GiB", flush=True)
    times = {name: [] for name in steps}
    for r in range(args.reps):
        names = list(steps)
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(time_steps(steps[name], args.steps))
    base = statistics.median(times["bf16_channels_last"])
    for name, t in times.items():
        s = statistics.median(t)
        print(
            f"{name:>28}: {args.batch / s:8.1f} images/s  {1000 * s:7.1f} ms/step  peak {memory[name]:6.2f} GiB  "
            f"x{s / base:.3f} of bf16_channels_last"
        )
    ratio = statistics.median(times["bf16_channels_last"]) / statistics.median(times["bce_bf16_channels_last"])
    print(f"dwml_step_cost_ratio_cuda {ratio:.3f}")
    distance_check(train, device)


if __name__ == "__main__":
    main()
