"""The full-size rehearsal: NIH's shape (112,120 images by default) through every stage, timed.

In a copy of this repository under --workdir, composed with the `scale` profile
(conf/profile/scale.yaml: a synthetic source with NIH ChestX-ray14's exact shape, docs/scale.md),
it runs the pipeline stage by stage through `dvc repro --single-item`: download -> prepare ->
prototypes -> train -> evaluate -> register; then `components.predict` on --predict-images
images of the test list, `dvc status`, and a no-op `dvc repro`. For every stage it records the
wall seconds, the peak resident memory of the stage's whole process tree (sampled every 0.2 s, the
processes' RSS summed) and of its largest single process (the kernel's high-water mark), and the
disk the stage added to the working copy (outputs and DVC cache; a hard link counts once).

The synthetic images are drawn at the profile's 128 px (112,120 at 1024 px would be about 45 GB
and hours of drawing on a small machine); --decode-sample draws that many images at NIH's 1024 px
and times what prepare does to each (decode, convert, resize to the cache size), so that the
prepare figure can be extrapolated to the real files (docs/scale.md does).

The rehearsal resumes: a stage already measured and still up to date in --workdir is not run
again (also after other settings: `--train-steps 0` after a shorter run reruns train and what
follows it only), and the results file is rewritten after every stage. The working copy is made
once; the code it runs is the code at that time.

    .venv/bin/python benchmarks/scale.py --workdir /tmp/cxr-scale            # 112,120 images
    .venv/bin/python benchmarks/scale.py --images 3000 --workdir DIR --decode-sample 20
    .venv/bin/python benchmarks/scale.py ... --train-steps 300   # a stated fraction of an epoch

Writes benchmarks/results/scale_<machine>.json (or --out): `images`, `test_images`, `stages.<stage>`
with `seconds`, `peak_rss_mb`, `max_process_rss_mb` and `disk_mb` for the six stages and
`predict`, `noop_repro_seconds`, `status_seconds`, the settings that ran, and the decode sample.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

STAGES = ("download", "prepare", "prototypes", "train", "evaluate", "register")
NIH_IMAGES = 112_120


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--images", type=int, default=NIH_IMAGES, help="images (default: NIH's %(default)s)")
    p.add_argument("--workdir", type=Path, required=True, help="the working copy (created; reused to resume)")
    p.add_argument("--machine", default=f"cpu{os.cpu_count()}", help="name in the results file (default: %(default)s)")
    p.add_argument(
        "--out", type=Path, default=None, help="results file (default: benchmarks/results/scale_<machine>.json)"
    )
    p.add_argument("--until", choices=(*STAGES, "predict"), default="predict", help="last step to run")
    p.add_argument("--epochs", type=int, default=1, help="training epochs (default: %(default)s)")
    p.add_argument(
        "--train-steps", type=int, default=0, help="batches per epoch (train.max_steps_per_epoch); 0: all (default)"
    )
    p.add_argument("--predict-images", type=int, default=1000, help="test images predict scores (default: %(default)s)")
    p.add_argument(
        "--decode-sample", type=int, default=2000, help="1024-px images whose decoding is timed (default: %(default)s)"
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="another params override")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- measuring


class TreeMonitor:
    """Peak summed RSS of a process and its descendants, sampled in a thread."""

    def __init__(self, pid: int, interval: float = 0.2):
        self.root = psutil.Process(pid)
        self.interval, self.peak = interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            total = 0
            try:
                for proc in [self.root, *self.root.children(recursive=True)]:
                    try:
                        total += proc.memory_info().rss
                    except psutil.Error:
                        pass
            except psutil.Error:
                pass
            self.peak = max(self.peak, total)
            self._stop.wait(self.interval)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def disk_bytes(folder: Path) -> int:
    """Bytes of disk that `folder` holds (allocated blocks, each hard-linked file once)."""
    seen, total = set(), 0
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in filenames + dirnames:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except FileNotFoundError:
                continue
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512
    return total


def measured(cmd: list[str], cwd: Path, env: dict[str, str], log: Path) -> dict:
    """Run `cmd`, its output appended to `log`; seconds, peak tree RSS, largest process RSS, disk."""
    before = disk_bytes(cwd)
    start = time.perf_counter()
    with open(log, "a") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
        out.flush()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        monitor = TreeMonitor(proc.pid)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        peak = monitor.stop()
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        tail = log.read_text()[-3000:]
        raise SystemExit(f"[scale] {' '.join(cmd)} failed (exit {proc.returncode}); the end of {log}:\n{tail}")
    return {
        "seconds": round(seconds, 1),
        "peak_rss_mb": round(peak / 2**20, 1),
        # ru_maxrss: the largest single descendant's high-water mark, in KiB on Linux
        "max_process_rss_mb": round(usage.ru_maxrss / 1024, 1),
        "disk_mb": round((disk_bytes(cwd) - before) / 2**20, 1),
    }


# ----------------------------------------------------------------------------- the working copy


def make_workdir(workdir: Path) -> None:
    """This repository's files in `workdir`, as a git repo."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.split()
    for rel in files:
        src = ROOT / rel
        if src.is_file() and not rel.startswith(("benchmarks/results/", "reports/")):
            (workdir / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, workdir / rel)
    (workdir / "dvc.lock").unlink(missing_ok=True)
    subprocess.run(["git", "init", "-q"], cwd=workdir, check=True)


def compose(workdir: Path, overrides: list[str]) -> None:
    """params.yaml in `workdir` composed with the scale profile and the overrides, committed."""
    sets = [a for o in overrides for a in ("--set", o)]
    subprocess.run(
        [sys.executable, "-m", "components.params", "--profile", "scale", *sets],
        cwd=workdir,
        env=env_for(workdir),
        check=True,
    )
    git = ["git", "-c", "user.email=scale@example.invalid", "-c", "user.name=scale"]
    subprocess.run([*git, "add", "-A"], cwd=workdir, check=True)
    subprocess.run([*git, "commit", "-qm", "scale rehearsal", "--allow-empty"], cwd=workdir, check=True)


def env_for(workdir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(workdir)
    env["MLFLOW_TRACKING_URI"] = "sqlite:///mlflow.db"
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def up_to_date(stage: str, workdir: Path, env: dict[str, str]) -> bool:
    done = subprocess.run(
        ["dvc", "status", "--json", stage], cwd=workdir, env=env, capture_output=True, text=True, check=False
    )
    try:
        return done.returncode == 0 and not json.loads(done.stdout or "{}")
    except json.JSONDecodeError:
        return False


# ----------------------------------------------------------------------------- the 1024-px sample


def decode_sample(workdir: Path, count: int, cache_size: int, seed: int) -> dict:
    """Draw `count` NIH-shape images at 1024 px and time prepare's per-image work on them."""
    from concurrent.futures import ProcessPoolExecutor

    import numpy as np

    from pipeline.data.cache import decode_or_reason
    from pipeline.data.synthetic import sample_labels

    folder = workdir / "decode_sample_1024"
    folder.mkdir(exist_ok=True)
    labels = sample_labels(count, np.random.default_rng([seed, 99]))
    paths = [folder / f"{i:05d}.png" for i in range(count)]
    start = time.perf_counter()
    todo = [(str(p), labels[i], seed, i) for i, p in enumerate(paths) if not p.exists()]
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        list(pool.map(_draw_1024, todo, chunksize=16))
    draw_s = time.perf_counter() - start
    sizes = [p.stat().st_size for p in paths]
    start = time.perf_counter()
    for path in paths:
        image, reason = decode_or_reason(path, cache_size)
        if image is None:
            raise SystemExit(f"[scale] {path}: {reason}")
    decode_s = time.perf_counter() - start
    return {
        "images": count,
        "size_px": 1024,
        "mean_file_kb": round(sum(sizes) / len(sizes) / 1024, 1),
        "draw_seconds": round(draw_s, 1),
        "decode_resize_ms_per_image": round(decode_s / count * 1000, 2),
        "to_cache_px": cache_size,
    }


def _draw_1024(item: tuple) -> None:
    import numpy as np

    from pipeline.data.synthetic import _save_png, render_image, sample_anatomy

    path, labels, seed, i = item
    rng = np.random.default_rng([seed, 98, i])
    _save_png(Path(path), render_image(labels, sample_anatomy(rng), rng, 1024))


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    out = args.out or ROOT / "benchmarks" / "results" / f"scale_{args.machine}.json"
    overrides = [
        f"download.synthetic.num_images={args.images}",
        f"train.epochs={args.epochs}",
        f"train.max_steps_per_epoch={args.train_steps}",
        *args.set,
    ]
    progress_file = workdir / "scale_progress.json"
    results = json.loads(progress_file.read_text()) if progress_file.exists() else {}
    if not (workdir / ".git").exists():
        make_workdir(workdir)
    if results.get("overrides") != overrides:
        # stages the new settings leave up to date keep their figures; DVC reruns the others
        compose(workdir, overrides)
        results = {"overrides": overrides, "stages": results.get("stages", {})}
    env = env_for(workdir)
    log = workdir / "scale.log"
    last = (*STAGES, "predict").index(args.until)
    for stage in STAGES[: last + 1]:
        if stage in results["stages"] and up_to_date(stage, workdir, env):
            print(f"[scale] {stage}: measured before and up to date, kept", flush=True)
            continue
        print(f"[scale] {stage} ...", flush=True)
        results["stages"][stage] = measured(["dvc", "repro", "--single-item", stage], workdir, env, log)
        print(f"[scale] {stage}: {results['stages'][stage]}", flush=True)
        progress_file.write_text(json.dumps(results, indent=2))
    if last == len(STAGES):
        results["stages"]["predict"] = predict(workdir, env, log, args.predict_images)
        print(f"[scale] predict: {results['stages']['predict']}", flush=True)
        results["status_seconds"] = timed(["dvc", "status"], workdir, env, log)
        results["noop_repro_seconds"] = timed(["dvc", "repro"], workdir, env, log)
        print(f"[scale] dvc status {results['status_seconds']} s, no-op dvc repro {results['noop_repro_seconds']} s")
    if args.decode_sample:
        params = read_params(workdir)
        results["decode_sample"] = decode_sample(
            workdir, args.decode_sample, params["prepare"]["image_size"], params["download"]["synthetic"]["seed"]
        )
        print(f"[scale] decode sample: {results['decode_sample']}", flush=True)
    progress_file.write_text(json.dumps(results, indent=2))
    report = summary(workdir, results, args)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"[scale] wrote {out}")
    return 0


def timed(cmd: list[str], cwd: Path, env: dict[str, str], log: Path) -> float:
    return measured(cmd, cwd, env, log)["seconds"]


def predict(workdir: Path, env: dict[str, str], log: Path, count: int) -> dict:
    """`components.predict` on the first `count` test-list images, with the registered version."""
    registration = json.loads((workdir / "reports" / "registration.json").read_text())
    version = registration["version"]
    names = (workdir / "data" / "raw" / "test_list.txt").read_text().split("\n")[:count]
    folder = workdir / "predict_inputs"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    for name in names:
        os.link(workdir / "data" / "raw" / "images" / name, folder / name)
    cmd = [
        sys.executable, "-m", "components.predict", "--model", f"models:/cxr-dwml/{version}",
        str(folder), "--out", str(workdir / "predict.csv"), "--batch-size", "64", "--no-progress",
    ]  # fmt: skip
    result = measured(cmd, workdir, env, log)
    result["images"] = len(names)
    result["images_per_second"] = round(len(names) / result["seconds"], 1)
    return result


def read_params(workdir: Path) -> dict:
    """The working copy's params.yaml as plain data (its own code validated it; this checkout's
    code may be newer)."""
    import yaml

    return yaml.safe_load((workdir / "params.yaml").read_text())


def summary(workdir: Path, results: dict, args: argparse.Namespace) -> dict:
    params = read_params(workdir)
    train = params["train"]
    raw = workdir / "data" / "raw"
    test_list = raw / "test_list.txt"
    train_log = workdir / "artifacts" / "model" / "train_summary.json"
    return {
        "machine": args.machine,
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(["benchmarks/scale.py", *(argv_display(args))]),
        "images": args.images,
        "test_images": len(test_list.read_text().split("\n")) if test_list.exists() else None,
        "image_size_px": params["download"]["synthetic"]["image_size"],
        "cache_size_px": params["prepare"]["image_size"],
        "backbone": train["model"]["backbone"]["name"],
        "crop_px": train["augment"]["crop_size"],
        "batch_size": train["batch_size"],
        "epochs": train["epochs"],
        "max_steps_per_epoch": train["max_steps_per_epoch"],
        "train_summary": json.loads(train_log.read_text()) if train_log.exists() else None,
        "overrides": results["overrides"],
        "stages": results["stages"],
        "status_seconds": results.get("status_seconds"),
        "noop_repro_seconds": results.get("noop_repro_seconds"),
        "decode_sample": results.get("decode_sample"),
        "self_max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def argv_display(args: argparse.Namespace) -> list[str]:
    shown = [f"--images {args.images}", f"--epochs {args.epochs}", f"--train-steps {args.train_steps}"]
    shown += [f"--predict-images {args.predict_images}", f"--decode-sample {args.decode_sample}"]
    return shown + [f"--set {s}" for s in args.set]


if __name__ == "__main__":
    raise SystemExit(main())
