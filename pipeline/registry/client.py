"""Model registration and the gated promotion (aliases `challenger` and `champion`, never stages).

Every new version gets `challenger`. `champion` moves to it only if (a) its *validation* mean AUC
clears an absolute floor and (b) a paired bootstrap over validation *patients*, on both models'
validation predictions, says it beats the current champion by at least `margin` (p-value of "not
better by margin" <= max_p_value). A failed gate is a decision, not an error: it is recorded in
tags and in registration.json.

Selection uses validation only. The test split is reported (version tags `test_mean_auc`, ...) and
never decides anything: choosing the champion on test would make the reported test AUC of the
champion an optimistic, selected number. The bootstrap resamples patients because images of one
patient are not independent (ChestX-ray14 has several images per patient).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..classes import CLASSES
from ..config import RegisterConfig
from ..metrics import mean_auc, paired_bootstrap_delta, roc_auc

CHALLENGER, CHAMPION = "challenger", "champion"
# version tag: sha256 of the network's weights; no two versions of a model hold the same weights
WEIGHTS_TAG = "weights_sha256"
SELECTION_SPLIT = "val"  # the only split the gate ever reads
# version tag written last when the gate has set the aliases: a version without it is gated again
GATE_TAG = "gate.promoted"
# the decision's numbers recorded as `gate.<key>` version tags
GATE_KEYS = (
    "selected_on",
    "val_mean_auc",
    "floor",
    "margin",
    "max_p_value",
    "bootstrap_unit",
    "n_patients",
    "champion_version",
    "champion_val_mean_auc",
    "delta",
    "delta_ci",
    "p_value",
)
# The champion's predictions, logged into its run by its evaluate step.
PREDICTIONS_ARTIFACT = f"evaluation/predictions/{SELECTION_SPLIT}.parquet"


def version_tags(metrics: Mapping[str, Any], training_run_id: str, provenance: Mapping[str, str]) -> dict[str, str]:
    """The tags of a new model version: `provenance`, the training run, and the evaluation numbers.

    Args:
        metrics: evaluate's metrics.json (`val_mean_auc`, `mean_auc`, `mean_auc_ci`, `per_class_auc`).
        training_run_id: the MLflow run that trained the model.
        provenance: what the model was made from (code version, data hash, settings hash, profile), as
            name -> value; set on the version first, unchanged.
    """
    tags = {
        **{str(k): str(v) for k, v in provenance.items()},
        "training_run_id": training_run_id,
        "val_mean_auc": str(metrics.get("val_mean_auc")),
        "test_mean_auc": str(metrics.get("mean_auc")),
        "test_mean_auc_ci": json.dumps(metrics.get("mean_auc_ci")),
    }
    tags.update({f"test_auc.{c}": str(v) for c, v in metrics.get("per_class_auc", {}).items()})
    return tags


def example_png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def log_pyfunc(
    bundle_path: Path, thresholds_path: Path, example: bytes, name: str = "model", calibration_path: Path | None = None
):
    """Log the pyfunc into the active run; returns MLflow's ModelInfo.

    With `calibration_path` (evaluate's calibration.json) the model serves calibrated
    probabilities; the thresholds file must say which probabilities its thresholds apply to, and
    that must match. The model's metadata records `calibration` (the method) and `calibrated`.
    """
    import mlflow

    from ..io import load_checkpoint
    from ..serving import predictor as serving

    calibration = serving.read_calibration(None if calibration_path is None else str(calibration_path))
    _check_threshold_scale(thresholds_path, calibration, calibration_path)
    bundle = load_checkpoint(bundle_path)
    predictor = serving.Predictor(bundle, _read_thresholds(thresholds_path), calibration=calibration)
    example_in = pd.DataFrame({"image": [example]})
    example_out = predictor.score([example])
    artifacts = {serving.BUNDLE: str(bundle_path), serving.THRESHOLDS: str(thresholds_path)}
    if calibration_path is not None:
        artifacts[serving.CALIBRATION] = str(calibration_path)
    method = calibration.method if calibration is not None else "none"
    code = Path(__file__).resolve().parents[1]  # the pipeline package travels with the model
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=str(Path(__file__).with_name("pyfunc_model.py")),  # models from code: no pickle
        artifacts=artifacts,
        code_paths=[str(code)],
        signature=serving.signature(example_in, example_out),
        input_example=example_in,
        pip_requirements=_requirements(),
        metadata={"calibration": method, "calibrated": method != "none", "drift_check": predictor.drift is not None},
    )


def _check_threshold_scale(thresholds_path: Path, calibration, calibration_path: Path | None) -> None:
    """The thresholds must be on the scale the model will serve: calibrated by this calibration, or raw."""
    data = json.loads(Path(thresholds_path).read_text())
    expected = calibration.method if calibration is not None else "none"
    stated = data.get("calibration", "none")  # a thresholds file from before calibration: raw scores
    if stated != expected:
        raise ValueError(
            f"{thresholds_path} holds thresholds for {stated!r}-calibrated probabilities, but the model would "
            f"serve {expected!r} ({calibration_path or 'no calibration file'}): pass the calibration.json "
            "written by the same evaluate run"
        )


def weights_digest(bundle_path: Path) -> str:
    """sha256 of the network's weights in a model bundle (`best.pt`): every tensor of its
    `model_state` by name, with its dtype and shape. The same weights give the same digest whatever
    else the file holds (the epoch, the settings fingerprint) and however torch laid the file out."""
    import torch

    from ..io import load_checkpoint

    state = load_checkpoint(bundle_path, mmap=True)["model_state"]
    h = hashlib.sha256()
    for name in sorted(state):
        value = state[name]
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous().reshape(-1)
            h.update(f"{name}|{t.dtype}|{tuple(value.shape)}|".encode())
            h.update(t.view(torch.uint8).numpy().tobytes())
        else:  # a module's extra state
            h.update(f"{name}|{value!r}|".encode())
    return h.hexdigest()


def version_with_weights(client, name: str, digest: str):
    """The oldest version of `name` tagged with these weights (`WEIGHTS_TAG`), or None.

    Versions registered before the tag existed carry no digest and are never matched.
    """
    with _failing_clearly(f"looking for a version with these weights ({WEIGHTS_TAG})", name):
        try:
            found = client.search_model_versions(f"name = '{name}' AND tags.{WEIGHTS_TAG} = '{digest}'")
        except Exception as e:
            if _missing(e):  # no such registered model yet
                return None
            raise
    return min(found, key=lambda v: int(v.version)) if found else None


def register(model_uri: str, cfg: RegisterConfig, tags: dict[str, str]):
    """A new version of `cfg.model_name` with `tags`; no alias moves here (see `apply_decision`)."""
    import mlflow

    return mlflow.register_model(model_uri, cfg.model_name, tags=tags)


class RegistryError(RuntimeError):
    """A registry call failed for a reason other than "no such model or alias": the step stops
    without moving an alias, and the message names the model, the alias and the server."""


def _error(action: str, name: str, e: BaseException, after: str = "") -> RegistryError:
    """One line: what was being done (`action`, naming the alias) to which model, on which server,
    the cause, and `after` (what state that leaves)."""
    from .. import tracking

    cause = tracking.redact_text(tracking.one_line(getattr(e, "message", None) or e, 400))
    return RegistryError(
        f"registered model {name} on {tracking.redacted_uri()}: {action} failed ({type(e).__name__}: {cause})"
        + (f"; {after}" if after else "")
    )


@contextlib.contextmanager
def _failing_clearly(action: str, name: str) -> Iterator[None]:
    """Any failure of the registry calls in the body becomes one RegistryError line (`_error`)."""
    try:
        yield
    except RegistryError:
        raise
    except Exception as e:  # a server error, a lost connection, an unreadable file: all the same to the caller
        raise _error(action, name, e) from e


def _missing(e: Exception) -> bool:
    """Whether `e` is MLflow's "no such resource" answer (the registered model does not exist)."""
    return getattr(e, "error_code", None) == "RESOURCE_DOES_NOT_EXIST"


def aliases(client, name: str) -> dict[str, str]:
    """Alias -> version of registered model `name`; {} when the model does not exist yet.

    Only MLflow's RESOURCE_DOES_NOT_EXIST means "no model"; any other failure raises
    RegistryError, so a registry that does not answer is never mistaken for an empty one.
    """
    with _failing_clearly(f"reading its aliases ({CHALLENGER}, {CHAMPION})", name):
        try:
            model = client.get_registered_model(name)
        except Exception as e:
            if _missing(e):
                return {}
            raise
    return {str(alias): str(version) for alias, version in model.aliases.items()}


def champion(client, name: str, held: Mapping[str, str]):
    """The version `held` (from `aliases`) names `champion`, or None when no version holds it.

    An alias absent from `held` is the only "no champion"; failing to read the version it names
    raises RegistryError.
    """
    version = held.get(CHAMPION)
    if version is None:
        return None
    with _failing_clearly(f"reading alias {CHAMPION} (v{version})", name):
        return client.get_model_version(name, version)


def gated(version) -> bool:
    """Whether the gate finished for `version`: its aliases were set and `gate.promoted` recorded last.

    A version registered by a step that failed before that (the registry stopped answering) is
    gated by the next run of the step instead of being registered again.
    """
    return GATE_TAG in (version.tags or {})


def model_description(name: str) -> str:
    """What registered model `name` is, for its description in the registry (Markdown, one line per
    paragraph: the registry shows line breaks as they are)."""
    paragraphs = [
        "Multi-label chest X-ray classifier: the 14 findings of ChestX-ray14 from one frontal radiograph.",
        "**Method.** ConvNeXt image embeddings scored by their distance to 14 label prototypes (the class "
        "names encoded by the text encoder of `prototypes.encoder`: BioBERT in the paper profile), trained "
        "with a dual-weighted metric loss (the project's formulation of Jin et al., Comput Biol Med "
        "2023;157:106683).",
        "**Input.** A DataFrame with one column `image`: PNG, JPEG or DICOM bytes (base64 text over REST), "
        "any size; the model converts it to 8-bit grayscale, resizes and centre-crops it as training did.",
        "**Output.** One row per image: a probability per class, `labels` (the classes at or above their "
        "threshold chosen on validation, joined by `|`, or `No Finding`) and `error` (null, or why that "
        "row could not be read).",
        f"**Classes.** {', '.join(CLASSES)}.",
        f"**Aliases.** `{CHAMPION}` is the version to serve (`models:/{name}@{CHAMPION}`); `{CHALLENGER}` "
        f"is the latest registered. A version becomes {CHAMPION} only when it clears a floor on validation "
        f"mean AUC and beats the current {CHAMPION} on the same validation patients (paired bootstrap); "
        "test AUC is reported in the version tags, never used to choose.",
        "**More.** Each version's description summarises its model card (`model_card/` in the version's "
        "run); the promotion gate, the version tags and how to promote by hand are documented in "
        "docs/registry.md of the project.",
    ]
    return "\n\n".join(paragraphs)


def describe_model(client, name: str, description: str) -> bool:
    """Set the registered model's description when it differs; returns whether it changed."""
    with _failing_clearly("setting its description", name):
        if (client.get_registered_model(name).description or "") == description:
            return False
        client.update_registered_model(name, description=description)
    return True


@dataclass(frozen=True)
class SelectionSet:
    """The predictions the gate decides on, row by row with their labels and patients.

    Attributes:
        predictions: (N, 1 + C) or wider: `image`, then one score column per class (CLASSES order).
        y: (N, C) labels in {0, 1}.
        patients: (N,) patient id of each row: the unit the paired bootstrap resamples.
        split: the manifest split every row belongs to.
    """

    predictions: pd.DataFrame
    y: np.ndarray
    patients: np.ndarray
    split: str = SELECTION_SPLIT

    @property
    def scores(self) -> np.ndarray:
        """(N, C) scores in CLASSES order."""
        return self.predictions[list(CLASSES)].to_numpy()


def selection_set(predictions: pd.DataFrame, manifest: pd.DataFrame, source: str) -> SelectionSet:
    """Validation predictions aligned with their labels and patients from the prepared manifest.

    Args:
        predictions: evaluate's `predictions/val.parquet`: `image` and one score column per class.
        manifest: `data/prepared/manifest.csv`: `image`, `patient`, `split` and one label column per class.
        source: where the predictions came from, named in errors.

    Raises:
        ValueError: a column is missing, an image is not in the manifest, or not in the validation split.
    """
    missing = [c for c in ("image", *CLASSES) if c not in predictions.columns]
    if missing:
        raise ValueError(f"{source} has no column {', '.join(missing)}: rerun the evaluate step")
    indexed = manifest.set_index("image")
    unknown = predictions["image"][~predictions["image"].isin(indexed.index)]
    if len(unknown):
        raise ValueError(
            f"{len(unknown)} images of {source} are not in the prepared manifest (e.g. "
            f"{unknown.iloc[0]}): rerun evaluate on the current prepared data"
        )
    rows = indexed.loc[predictions["image"]]
    outside = rows[rows["split"] != SELECTION_SPLIT]
    if len(outside):
        raise ValueError(
            f"{len(outside)} images of {source} are not in the {SELECTION_SPLIT} split (e.g. "
            f"{outside.index[0]} in {outside['split'].iloc[0]}): the gate selects on validation "
            f"only; pass evaluate's predictions/{SELECTION_SPLIT}.parquet"
        )
    return SelectionSet(predictions.reset_index(drop=True), rows[list(CLASSES)].to_numpy(), rows["patient"].to_numpy())


def _finite_or_none(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


def decide(
    cfg: RegisterConfig, ours: SelectionSet, champ_predictions: pd.DataFrame | None, champ_version: str | None
) -> dict[str, Any]:
    """The promotion decision and its numbers, all on `ours.split` (pure: no MLflow calls).

    Args:
        cfg: the register settings (floor, margin, max_p_value, resamples, seed).
        ours: the new version's validation predictions with labels and patients.
        champ_predictions: the champion's predictions on the same split (`image` and class columns),
            or None when they could not be found.
        champ_version: the champion's version, or None when there is no champion yet.
    """
    val_mean_auc = _finite_or_none(mean_auc(roc_auc(ours.y, ours.scores)))
    decision: dict[str, Any] = {
        "selected_on": ours.split,
        "val_mean_auc": val_mean_auc,
        "floor": cfg.min_auc,
        "margin": cfg.margin,
        "max_p_value": cfg.max_p_value,
        "bootstrap_unit": "patient",
        "n_patients": int(pd.unique(ours.patients).size),
        "champion_version": champ_version,
    }
    if val_mean_auc is None or not val_mean_auc >= cfg.min_auc:
        return {
            **decision,
            "promote": False,
            "reason": f"validation mean AUC {val_mean_auc} is below the floor {cfg.min_auc}",
        }
    if champ_version is None:
        return {**decision, "promote": True, "reason": "no champion yet and the floor is met on validation"}
    if champ_predictions is None:  # never replace a champion without comparing against it
        return {
            **decision,
            "promote": False,
            "reason": f"champion v{champ_version} has no {PREDICTIONS_ARTIFACT} in its run to compare "
            "against; promote manually if intended",
        }
    return {**decision, **_compare(cfg, ours, champ_predictions, champ_version)}


def _compare(
    cfg: RegisterConfig, ours: SelectionSet, champ_predictions: pd.DataFrame, champ_version: str
) -> dict[str, Any]:
    """Paired patient bootstrap of our mean AUC minus the champion's, on the images both scored."""
    # the champion's scores in our row order; NaN rows for images it never scored
    champ = champ_predictions.set_index("image").reindex(ours.predictions["image"])[list(CLASSES)]  # (N, C)
    shared = int(champ.notna().all(axis=1).sum())
    if shared != len(champ):
        return {
            "promote": False,
            "reason": f"champion v{champ_version} was evaluated on another {ours.split} set "
            f"({shared} of {len(champ)} images shared); promote manually if intended",
        }
    paired = paired_bootstrap_delta(
        ours.y,
        champ.to_numpy(),
        ours.scores,
        cfg.bootstrap_resamples,
        seed=cfg.seed,
        margin=cfg.margin,
        groups=ours.patients,
    )
    delta, p_value = paired["delta"], paired["p_value"]
    better = delta > cfg.margin and p_value <= cfg.max_p_value
    on = f"on {ours.split} ({paired['n_groups']} patients)"
    reason = (
        f"beats champion v{champ_version} by {delta:+.4f} {on} (p={p_value:.3f})"
        if better
        else f"does not beat champion v{champ_version} by > {cfg.margin} with p <= {cfg.max_p_value} {on} "
        f"(delta {delta:+.4f}, p={p_value:.3f})"
    )
    return {
        "delta": delta,
        "delta_ci": [paired["low"], paired["high"]],
        "p_value": p_value,
        "champion_val_mean_auc": paired["mean_auc_a"],
        "promote": bool(better),
        "reason": reason,
    }


def champion_predictions(client, version) -> pd.DataFrame | None:
    """The champion's validation predictions, logged by its evaluate step into its run; None if
    its run has no such file (or no longer exists). A failure to list or read them raises
    RegistryError: an unreadable champion is not an absent one."""
    import tempfile

    import mlflow

    action = f"reading alias {CHAMPION}'s predictions (v{version.version}, {PREDICTIONS_ARTIFACT})"
    with _failing_clearly(action, version.name):
        if not version.run_id or not _has_artifact(client, version.run_id, PREDICTIONS_ARTIFACT):
            return None
        with tempfile.TemporaryDirectory() as tmp:
            path = mlflow.artifacts.download_artifacts(
                run_id=version.run_id, artifact_path=PREDICTIONS_ARTIFACT, dst_path=tmp
            )
            return pd.read_parquet(path)


def _has_artifact(client, run_id: str, artifact_path: str) -> bool:
    """Whether the run logged `artifact_path`; False also for a run that no longer exists."""
    folder = artifact_path.rsplit("/", 1)[0]
    try:
        return artifact_path in {f.path for f in client.list_artifacts(run_id, folder)}
    except Exception as e:
        if _missing(e):  # the champion's run was deleted
            return False
        raise


def apply_decision(client, name: str, version: str, decision: dict[str, Any], held: Mapping[str, str]) -> None:
    """Record `decision` on `version` (its `gate.*` tags), then move the aliases: `challenger` to
    it, and `champion` when it is promoted; `gate.promoted` is written last, as the mark that the
    gate finished (`gated`).

    Args:
        held: alias -> version before this registration (`aliases`), to put back on failure.

    Raises:
        RegistryError: a tag or an alias could not be set. Every alias this call touched is put
            back where `held` had it (or removed, when it did not exist), and the message says so.
    """
    with _failing_clearly(f"recording the gate's decision on v{version}", name):
        for key, value in _gate_tags(decision).items():
            client.set_model_version_tag(name, version, key, value)
    targets = [CHALLENGER, *([CHAMPION] if decision["promote"] else [])]
    touched: list[str] = []
    action = ""
    try:
        for alias in targets:
            action = f"setting alias {alias} to v{version}"
            touched.append(alias)  # before the call: a request can succeed on the server and fail here
            client.set_registered_model_alias(name, alias, version)
        action = f"recording {GATE_TAG} on v{version}"
        client.set_model_version_tag(name, version, GATE_TAG, str(decision["promote"]).lower())
    except Exception as e:
        raise _error(action, name, e, _put_back(client, name, touched, held)) from e


def _gate_tags(decision: dict[str, Any]) -> dict[str, str]:
    """The decision's `gate.*` version tags, all but GATE_TAG (written last, by `apply_decision`)."""
    tags = {"gate.reason": decision["reason"][:5000]}
    for key in GATE_KEYS:
        value = decision.get(key)
        if value is not None:
            tags[f"gate.{key}"] = json.dumps(value) if isinstance(value, list) else str(value)
    return tags


def _put_back(client, name: str, touched: list[str], held: Mapping[str, str]) -> str:
    """Point every alias in `touched` back where `held` had it (remove it where it did not exist);
    returns what that leaves, for the error message."""
    failed = []
    for alias in touched:
        try:
            if alias in held:
                client.set_registered_model_alias(name, alias, held[alias])
            else:
                client.delete_registered_model_alias(name, alias)
        except Exception as e:
            if not (alias not in held and _missing(e)):  # an alias that was never set needs no removal
                failed.append(f"{alias} (was {_shown(held, alias)}: {type(e).__name__})")
    before = ", ".join(f"{a} -> v{v}" for a, v in sorted(held.items())) or "none"
    if failed:
        return f"could not put back {', '.join(failed)}: set them by hand; before this step: {before}"
    return f"aliases left as they were ({before})"


def _shown(held: Mapping[str, str], alias: str) -> str:
    return f"v{held[alias]}" if alias in held else "unset"


def set_alias(name: str, alias: str, version: str) -> None:
    """Manual promotion or rollback: point `alias` at `version`."""
    from mlflow import MlflowClient

    client = MlflowClient()
    client.get_model_version(name, version)  # raises a clear MLflow error for a missing version
    client.set_registered_model_alias(name, alias, version)


def _read_thresholds(path: Path) -> dict[str, float]:
    return json.loads(Path(path).read_text())["thresholds"]


def _requirements() -> list[str]:
    from importlib.metadata import version

    names = ["torch", "torchvision", "timm", "numpy", "pandas", "pillow", "pyarrow", "mlflow"]
    pins = []
    for n in names:
        try:
            pins.append(f"{n}=={version(n).split('+')[0]}")
        except Exception:
            pins.append(n)
    return pins
