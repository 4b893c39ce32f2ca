"""The promotion gate: pure statistics on validation predictions, no MLflow call.

A new version becomes champion only if (a) its *validation* mean AUC clears an absolute floor and
(b) a paired bootstrap over validation *patients*, on both models' validation predictions, says it
beats the current champion by at least `margin` (p-value of "not better by margin" <=
max_p_value). A failed gate is a decision, not an error.

Selection uses validation only. The test split is reported and never decides anything: choosing
the champion on test would make the reported test AUC of the champion an optimistic, selected
number. The bootstrap resamples patients because images of one patient are not independent
(ChestX-ray14 has several images per patient). Both mean AUCs are over one class set, the classes
with at least `evaluate.min_positive_patients` positive and negative validation patients, the same
in every resample (`pipeline.metrics.ClassSet`); the decision names the classes left out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from ..classes import CLASSES
from ..config import RegisterConfig
from ..metrics import class_set, mean_auc, paired_bootstrap_delta, roc_auc

SELECTION_SPLIT = "val"  # the only split the gate ever reads


# The champion's predictions, logged into its run by its evaluate step.
PREDICTIONS_ARTIFACT = f"evaluation/predictions/{SELECTION_SPLIT}.parquet"


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
    cfg: RegisterConfig,
    ours: SelectionSet,
    champ_predictions: pd.DataFrame | None,
    champ_version: str | None,
    *,
    min_patients: int,
) -> dict[str, Any]:
    """The promotion decision and its numbers, all on `ours.split` (pure: no MLflow calls).

    Args:
        cfg: the register settings (floor, margin, max_p_value, resamples, seed).
        ours: the new version's validation predictions with labels and patients.
        champ_predictions: the champion's predictions on the same split (`image` and class columns),
            or None when they could not be found.
        champ_version: the champion's version, or None when there is no champion yet.
        min_patients: evaluate.min_positive_patients, the class set's rule.
    """
    classes = class_set(ours.y, ours.patients, min_patients)
    val_mean_auc = _finite_or_none(mean_auc(roc_auc(ours.y, ours.scores), classes))
    decision: dict[str, Any] = {
        "selected_on": ours.split,
        "val_mean_auc": val_mean_auc,
        "min_positive_patients": min_patients,
        "val_classes_in_mean": classes.names(),
        "val_excluded_classes": classes.excluded(),
        "floor": cfg.min_auc,
        "margin": cfg.margin,
        "max_p_value": cfg.max_p_value,
        "bootstrap_unit": "patient",
        "n_patients": int(pd.unique(ours.patients).size),
        "champion_version": champ_version,
    }
    if val_mean_auc is None:
        return {
            **decision,
            "promote": False,
            "reason": f"no finding has {min_patients} positive and {min_patients} negative {ours.split} patients "
            "(evaluate.min_positive_patients): there is no validation mean AUC to decide on",
        }
    if not val_mean_auc >= cfg.min_auc:
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
    return {**decision, **_compare(cfg, ours, champ_predictions, champ_version, min_patients)}


def _compare(
    cfg: RegisterConfig, ours: SelectionSet, champ_predictions: pd.DataFrame, champ_version: str, min_patients: int
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
        min_patients=min_patients,
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
        "bootstrap_dropped_resamples": paired["mean_dropped"],
        "champion_val_mean_auc": paired["mean_auc_a"],
        "promote": bool(better),
        "reason": reason,
    }
