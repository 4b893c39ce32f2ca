"""Predict: score chest X-ray files with a registered model; writes a CSV of probabilities and labels.

Run:
    python -m components.predict --model models:/cxr-dwml@champion scans/ --out predictions.csv
    python -m components.predict --model models:/cxr-dwml@3 a.png b.jpg c.dcm
The model is any MLflow model URI (`models:/<name>@<alias>`, `models:/<name>/<version>`, `runs:/...`,
a local folder); `models:/` URIs are looked up in MLFLOW_TRACKING_URI (default: sqlite:///mlflow.db).
Folders are searched recursively for .png, .jpg, .jpeg, .dcm and .dicom files. DICOM needs the
`dicom` extra (docs/dicom.md); without it DICOM files are skipped with that reason, and a DICOM
object that is not a single-frame chest radiograph is skipped as `refused`, with why.
Files that cannot be read are skipped, never fatal: each is printed with its reason and listed in
<out>.skipped.csv (file, reason, detail). The exit status is 1 when no file could be scored.

Where the model looked:
    python -m components.predict --model models:/cxr-dwml@champion scans/ --explain --explain-top 2 \
        --explain-out heatmaps/
writes, per image and for its K most probable findings, <stem>_<class>_gradcam.png and (metric head)
<stem>_<class>_prototype.png: Grad-CAM and the prototype-distance map over the network's input
(docs/evaluation.md says how to read them). The model must have been registered by a version that
serves explanations (its signature has the `explain` param).

Drift: a model trained with a drift reference adds `drift_image` and `drift_embedding` (each image's
distance from the training data), `image_width` and `image_height` (its own size, which a rule holds
to the training images' range) and `drift` (a warning, or empty) to the CSV. Every image over a
threshold is printed with its distance, and the whole set of files is checked as one batch:
"[predict] drift: batch unlike the training images: 5 of 5 images over the image statistics
distance threshold 4.6 ...". A warning does not stop the scores from being written.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from components.common import run_main
from pipeline.classes import CLASSES
from pipeline.data.images import DICOM_SUFFIXES, classify_error, decode_image
from pipeline.io import save_dataframe
from pipeline.tracking.store import TrackingStoreError, check_tracking_store

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
SKIPPED_COLUMNS = ["file", "reason", "detail"]


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    files, skipped = collect_files(args.inputs)
    model = load_model(args.model)
    top_k = args.explain_top if args.explain else None
    progress = not args.no_progress
    scored, unreadable = predict_files(model, files, args.batch_size, progress=progress, explain_top_k=top_k)
    skipped += unreadable
    for line in drift_report(model, scored):
        print(line)
    out = Path(args.out)
    if args.explain:
        from pipeline.serving.predictor import EXPLANATION_COLUMN  # loads MLflow: not before it is needed

        written = write_explanations(scored, Path(args.explain_out))
        print(f"[predict] {len(written)} heatmap(s) -> {args.explain_out}")
        scored = scored.drop(columns=EXPLANATION_COLUMN)
    save_dataframe(out, scored)
    side = skipped_path(out)
    _write_skipped(side, skipped)
    for row in skipped:
        print(f"[predict] skipped {row['file']}: {row['reason']} ({row['detail']})")
    print(
        f"[predict] {len(scored)} image(s) scored -> {out}; {len(skipped)} skipped" + (f" -> {side}" if skipped else "")
    )
    return 0 if len(scored) else 1


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", help="image files and/or folders")
    p.add_argument("--model", default="models:/cxr-dwml@champion", help="MLflow model URI (default: %(default)s)")
    p.add_argument("--out", default="predictions.csv", help="output CSV (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=16, help="images per model call (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--explain", action="store_true", help="also write heatmaps of where the model looked")
    p.add_argument(
        "--explain-top",
        type=_count,
        default=3,
        help="findings per image with --explain; 0: none (default: %(default)s)",
    )
    p.add_argument("--explain-out", default="heatmaps", help="folder for the heatmaps (default: %(default)s)")
    return p


def _count(text: str) -> int:
    """An argparse type: a whole number, 0 or more."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number, 0 or more; got {text!r}")
    return value


def skipped_path(out: Path) -> Path:
    """Where the list of skipped files goes: predictions.csv -> predictions.skipped.csv."""
    return out.with_name(f"{out.stem}.skipped.csv")


def collect_files(inputs: list[str]) -> tuple[list[Path], list[dict[str, str]]]:
    """Files to score, in a stable order, and the inputs that do not exist (as skipped rows).

    A file named on the command line is taken whatever its suffix (a decoder error then skips it);
    a folder contributes its image and DICOM files, recursively.
    """
    files: list[Path] = []
    missing: list[dict[str, str]] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files += sorted(
                p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES | DICOM_SUFFIXES
            )
        elif path.is_file():
            files.append(path)
        else:
            missing.append({"file": str(path), "reason": "missing", "detail": "no such file or folder"})
    return list(dict.fromkeys(files)), missing  # a file named twice is scored once


def load_model(uri: str):
    import mlflow
    from mlflow.exceptions import MlflowException

    from pipeline import tracking

    mlflow.set_tracking_uri(tracking.default_tracking_uri())
    if uri.startswith(("models:/", "runs:/")):  # looked up in the tracking store: fail fast if it is down
        try:
            check_tracking_store(tracking.default_tracking_uri(), write=False)
        except TrackingStoreError as e:
            raise RuntimeError(f"cannot load model {tracking.redact_uri(uri)!r} from {e.store}: {e.detail}") from None

    try:
        return mlflow.pyfunc.load_model(uri)
    except MlflowException as e:
        raise RuntimeError(
            f"cannot load model {tracking.redact_uri(uri)!r} from {tracking.redacted_uri()}: "
            f"{tracking.redact_text(e.message)}. Check --model "
            f"and MLFLOW_TRACKING_URI (python -m components.promote --list shows the versions)"
        ) from e


def predict_files(
    model, files: list[Path], batch_size: int = 16, progress: bool = True, explain_top_k: int | None = None
):
    """Score `files` with a loaded pyfunc.

    Args:
        explain_top_k: when not None, ask the model for the maps of each image's top findings too
            (0: an `explanation` column without maps).

    Returns:
        (scored, skipped): a DataFrame with `file`, the 14 class probabilities and `labels` (and
        `explanation` when asked), one row per readable file; and a list of {file, reason, detail}
        for the others.
    """
    import pandas as pd

    from pipeline.progress import progress_bar

    # imports mlflow: not at module import (--help stays fast)
    from pipeline.serving.predictor import DRIFT_COLUMNS, EXPLANATION_COLUMN, SIZE_COLUMNS

    frames, skipped = [], []
    bar = progress_bar(total=len(files), unit="img", desc="predict", disable=not progress)
    for names, images, failures in _batches(files, batch_size):
        skipped += failures
        if images:
            explain = explain_top_k is not None
            params = {"explain": True, "explain_top_k": explain_top_k} if explain else None
            out = model.predict(pd.DataFrame({"image": images}), params=params).reset_index(drop=True)
            if explain and EXPLANATION_COLUMN not in out.columns:
                raise RuntimeError(
                    "the model returned no explanations: it was registered by a version without them "
                    "(its signature lacks the `explain` param); register it again to use --explain"
                )
            out.insert(0, "file", names)
            if "error" in out.columns:  # a row the model could not score is skipped, with its reason
                failed = out["error"].notna()
                skipped += [_model_error(f, e) for f, e in zip(out.loc[failed, "file"], out.loc[failed, "error"])]
                numeric = {c: float for c in (*CLASSES, *DRIFT_COLUMNS) if c in out.columns}
                numeric |= {c: int for c in SIZE_COLUMNS if c in out.columns}
                out = out.loc[~failed].drop(columns="error").astype(numeric)
            frames.append(out)
        bar.update(len(names) + len(failures))
    bar.close()
    columns = ["file", *CLASSES, "labels"] + ([EXPLANATION_COLUMN] if explain_top_k is not None else [])
    scored = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)
    return scored, skipped


def write_explanations(scored, folder: Path) -> list[Path]:
    """<stem>_<class>_{gradcam,prototype}.png for every map in `scored`'s `explanation` column.

    Two inputs with the same file stem (from different folders) get `<stem>-2`, ... for the second on.
    """
    import base64
    import json

    from pipeline.io import atomic_open
    from pipeline.serving.predictor import EXPLANATION_COLUMN

    written: list[Path] = []
    seen: dict[str, int] = {}
    for file, text in zip(scored["file"], scored[EXPLANATION_COLUMN]):
        stem = Path(file).stem
        seen[stem] = seen.get(stem, 0) + 1
        stem = stem if seen[stem] == 1 else f"{stem}-{seen[stem]}"
        for finding in json.loads(text):
            for method in ("gradcam", "prototype"):
                if finding[method] is not None:
                    path = folder / f"{stem}_{finding['class']}_{method}.png"
                    with atomic_open(path, "wb") as f:
                        f.write(base64.b64decode(finding[method]))
                    written.append(path)
    return written


def drift_report(model, scored) -> list[str]:
    """Lines naming each image unlike the training data and, when the scored files as a whole look
    unlike it, the batch; empty when the model has no drift reference or nothing was scored."""
    from pipeline.serving.predictor import DRIFT_COLUMNS, DRIFT_WARNING_COLUMN, SIZE_COLUMNS

    reference = getattr(getattr(model.unwrap_python_model(), "predictor", None), "drift", None)
    if reference is None or DRIFT_WARNING_COLUMN not in scored.columns or not len(scored):
        return []
    lines = [
        f"[predict] drift: {f}: {w}" for f, w in zip(scored["file"], scored[DRIFT_WARNING_COLUMN]) if isinstance(w, str)
    ]
    image, embedding = (scored[c].to_numpy(float) for c in DRIFT_COLUMNS)
    sizes = scored[list(SIZE_COLUMNS)].to_numpy(float) if set(SIZE_COLUMNS) <= set(scored.columns) else None
    batch = reference.batch_check({"image": image, "embedding": embedding}, sizes)
    if batch["warning"]:
        lines.append(f"[predict] drift: {batch['warning']}")
    return lines


def _batches(files: list[Path], size: int) -> Iterator[tuple[list[str], list[np.ndarray], list[dict[str, Any]]]]:
    """Decoded images in batches of `size` readable files, with the failures met on the way."""
    names: list[str] = []
    images: list[np.ndarray] = []
    failures: list[dict[str, Any]] = []
    for path in files:
        try:
            # at the file's own size, decoded as the training cache decodes (the model resizes)
            images.append(decode_image(path))
            names.append(str(path))
        except Exception as e:  # one bad file must not stop the others
            failures.append({"file": str(path), **_reason(e)})
        if len(images) == size:
            yield names, images, failures
            names, images, failures = [], [], []
    if images or failures:
        yield names, images, failures


def _reason(exc: BaseException) -> dict[str, str]:
    if isinstance(exc, ImportError):
        return {"reason": "unsupported", "detail": str(exc)}
    reason, detail = classify_error(exc)
    return {"reason": reason, "detail": detail}


def _model_error(file: str, error: str) -> dict[str, str]:
    """A skipped row from the model's `error`, "row <i>: <reason>: <detail>"."""
    _, reason, detail = (error.split(": ", 2) + ["", ""])[:3]
    return {"file": file, "reason": reason or "corrupt", "detail": detail or error}


def _write_skipped(path: Path, rows: list[dict[str, str]]) -> None:
    import pandas as pd

    if rows:
        save_dataframe(path, pd.DataFrame(rows, columns=SKIPPED_COLUMNS))
    else:
        path.unlink(missing_ok=True)  # a stale list from an earlier run would mislead


if __name__ == "__main__":
    raise SystemExit(run_main("predict", main))
