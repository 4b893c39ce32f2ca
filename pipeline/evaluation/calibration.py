"""Are the probabilities calibrated? Expected calibration error, reliability bins, and post-hoc
calibration fitted on validation.

A score of 0.3 should mean "three in ten such images carry the finding". A network trained with a
weighted loss (the dual-weighted metric loss up-weights the positives of rare classes) is not
calibrated by construction: its scores rank well but sit above the true rates. Three post-hoc
maps, one per class, are fitted on the *validation* predictions and never on test:

- temperature: p = sigmoid(z / T_c), T_c > 0 minimising the validation negative log-likelihood
  (NLL). Strictly increasing, so every class's ranking and AUC are unchanged, and the image that a
  threshold t on the raw score calls positive is exactly the one sigmoid(logit(t) / T_c) calls
  positive on the calibrated score. It corrects over- or under-confidence, not a shifted base rate.
- platt: p = sigmoid(z / T_c + b_c) (Platt scaling): a temperature and a per-class shift, for
  scores that sit above or below the true rates, as a loss that up-weights positives leaves them.
  Also strictly increasing and rank-preserving.
- isotonic: the best non-decreasing step map of the logit to a probability (pool adjacent
  violators). More flexible, but it merges neighbouring scores into one value, so ties appear and
  a class's AUC can drop a little.

`choose_method` picks among none, temperature, platt and isotonic by their NLL on held-out validation
patients (K-fold by patient): comparing in-sample would always favour the most flexible map.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

METHODS = ("none", "temperature", "platt", "isotonic")  # simplest first: ties go to the simpler
# bounds of the fitted temperature: beyond them a class's logits carry no usable scale
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-2, 1e2


def sigmoid(z: np.ndarray) -> np.ndarray:
    """Float64 sigmoid without overflow warnings."""
    z = np.asarray(z, dtype=np.float64)
    out = np.empty_like(z)
    pos = z >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-z[pos]))
    e = np.exp(z[~pos])
    out[~pos] = e / (1.0 + e)
    return out


def logit(p: np.ndarray) -> np.ndarray:
    p = np.asarray(p, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return np.log(p) - np.log1p(-p)


def nll_from_logits(y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Per-class mean binary negative log-likelihood of labels y (N, C) under sigmoid(z) -> (C,).

    softplus(-z) for a positive, softplus(z) for a negative, exact for any logit.
    """
    y = np.asarray(y, dtype=np.float64)
    z = np.asarray(z, dtype=np.float64)
    return np.mean(np.logaddexp(0.0, np.where(y > 0, -z, z)), axis=0)


def nll_from_probabilities(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Per-class mean NLL (C,) of probabilities p (N, C); p of exactly 0 or 1 on the wrong side is inf."""
    y = np.asarray(y, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return -np.mean(np.where(y > 0, np.log(p), np.log1p(-p)), axis=0)


# ----------------------------------------------------------------------------- reliability and ECE


def reliability_bins(y: np.ndarray, p: np.ndarray, bins: int) -> dict[str, np.ndarray]:
    """Equal-width bins of [0, 1], per class: counts, mean predicted probability and positive rate.

    A probability of exactly 1 falls into the last bin.

    Args:
        y: (N, C) labels in {0, 1}.
        p: (N, C) probabilities.
        bins: number of bins.

    Returns:
        "edges" (bins + 1,); "count" (C, bins); "mean_predicted" and "fraction_positive" (C, bins),
        NaN in an empty bin.
    """
    y = np.asarray(y, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    if y.shape != p.shape or y.ndim != 2:
        raise ValueError(f"labels and probabilities must both be (N, C), got {y.shape} and {p.shape}")
    index = np.clip(np.floor(p * bins).astype(np.int64), 0, bins - 1)  # (N, C)
    count = np.zeros((p.shape[1], bins))
    sum_p = np.zeros_like(count)
    sum_y = np.zeros_like(count)
    for c in range(p.shape[1]):
        count[c] = np.bincount(index[:, c], minlength=bins)
        sum_p[c] = np.bincount(index[:, c], weights=p[:, c], minlength=bins)
        sum_y[c] = np.bincount(index[:, c], weights=y[:, c], minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {
            "edges": np.linspace(0.0, 1.0, bins + 1),
            "count": count,
            "mean_predicted": np.where(count > 0, sum_p / count, np.nan),
            "fraction_positive": np.where(count > 0, sum_y / count, np.nan),
        }


def expected_calibration_error(y: np.ndarray, p: np.ndarray, bins: int) -> np.ndarray:
    """Per-class ECE (C,): sum over bins of (bin share of images) * |positive rate - mean probability|.

    NaN for a class when there are no rows.
    """
    table = reliability_bins(y, p, bins)
    n = table["count"].sum(axis=1)  # (C,)
    gap = np.nan_to_num(np.abs(table["fraction_positive"] - table["mean_predicted"]))  # (C, bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, (table["count"] * gap).sum(axis=1) / n, np.nan)


# ----------------------------------------------------------------------------- the calibration maps


@dataclass(frozen=True)
class Calibration:
    """A fitted per-class map from logits to probabilities, stored in `calibration.json`.

    Attributes:
        method: "none", "temperature", "platt" or "isotonic".
        classes: class order of the columns it maps.
        temperature: (C,) T_c for "temperature" and "platt" (1.0 for a class that could not be fitted).
        bias: (C,) b_c for "platt" (0.0 for a class that could not be fitted).
        knots: for "isotonic", per class the (logit, probability) points of the step map, linearly
            interpolated between and held flat beyond; None for a class that could not be fitted
            (its probabilities stay sigmoid(z)).
        unfitted: classes left as they were, because validation had no positive or no negative.
    """

    method: str
    classes: tuple[str, ...]
    temperature: np.ndarray | None = None
    bias: np.ndarray | None = None
    knots: tuple[tuple[np.ndarray, np.ndarray] | None, ...] | None = None
    unfitted: tuple[str, ...] = field(default=())

    @property
    def calibrated(self) -> bool:
        return self.method != "none"

    def probabilities(self, z: np.ndarray) -> np.ndarray:
        """Calibrated probabilities (N, C) of logits z (N, C)."""
        z = np.asarray(z, dtype=np.float64)
        if z.ndim != 2 or z.shape[1] != len(self.classes):
            raise ValueError(f"logits must be (N, {len(self.classes)}), got {z.shape}")
        if self.method in ("temperature", "platt"):
            return sigmoid(self._affine(z))
        p = sigmoid(z)
        if self.method == "isotonic":
            for c, knot in enumerate(self.knots):
                if knot is not None:
                    p[:, c] = np.interp(z[:, c], knot[0], knot[1])
        return p

    def _affine(self, z: np.ndarray) -> np.ndarray:
        return z / self.temperature + (self.bias if self.bias is not None else 0.0)

    def thresholds(self, raw: np.ndarray) -> np.ndarray:
        """The calibrated-scale thresholds (C,) equivalent to raw-score thresholds (C,) (not isotonic).

        Exact for a strictly increasing map; isotonic maps merge scores, so their thresholds are
        re-chosen on calibrated validation probabilities instead (see `pipeline.evaluation.scoring`).
        """
        if self.method == "isotonic":
            raise ValueError("isotonic calibration merges scores: choose thresholds on calibrated probabilities")
        if self.method == "none":
            return np.asarray(raw, dtype=np.float64)
        return sigmoid(self._affine(logit(raw)))

    def to_json(self) -> dict[str, Any]:
        params: dict[str, Any] = {}
        if self.method in ("temperature", "platt"):
            params["temperature"] = {c: float(t) for c, t in zip(self.classes, self.temperature)}
        if self.method == "platt":
            params["bias"] = {c: float(b) for c, b in zip(self.classes, self.bias)}
        elif self.method == "isotonic":
            params["isotonic_knots"] = {
                c: None if k is None else {"logit": k[0].tolist(), "probability": k[1].tolist()}
                for c, k in zip(self.classes, self.knots)
            }
        return {"method": self.method, "classes": list(self.classes), "unfitted": list(self.unfitted), **params}

    @classmethod
    def from_json(cls, data: dict[str, Any], source: str = "calibration.json") -> Calibration:
        """The calibration saved by `to_json`; a ValueError naming `source` when it is not one."""
        method = data.get("method")
        if method not in METHODS or "classes" not in data:
            raise ValueError(
                f"{source}: no calibration 'method' ({', '.join(METHODS)}) and 'classes': rerun the evaluate step"
            )
        classes = tuple(data["classes"])
        unfitted = tuple(data.get("unfitted", ()))
        try:
            if method in ("temperature", "platt"):
                temps = np.array([float(data["temperature"][c]) for c in classes])
                bias = np.array([float(data["bias"][c]) for c in classes]) if method == "platt" else None
                if not (np.isfinite(temps).all() and (temps > 0).all()):
                    raise ValueError("temperatures must be finite and > 0")
                return cls(method, classes, temperature=temps, bias=bias, unfitted=unfitted)
            if method == "isotonic":
                stored = [data["isotonic_knots"][c] for c in classes]
                knots = tuple(None if k is None else (np.array(k["logit"]), np.array(k["probability"])) for k in stored)
                return cls(method, classes, knots=knots, unfitted=unfitted)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{source}: its {method} parameters are incomplete ({e}); rerun evaluate") from None
        return cls("none", classes, unfitted=unfitted)


def _both_labels(y: np.ndarray) -> np.ndarray:
    """(C,) True where a class has at least one positive and one negative."""
    pos = y.sum(axis=0)
    return (pos > 0) & (pos < y.shape[0])


def fit_temperature(y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Per-class temperatures (C,) minimising the mean NLL of sigmoid(z / T) on (y, z).

    The NLL is convex in a = 1 / T (a logistic regression on z without intercept), so a bounded
    scalar search finds the optimum; a class without both labels keeps T = 1.
    """
    from scipy.optimize import minimize_scalar

    y = np.asarray(y, dtype=np.float64)
    z = np.asarray(z, dtype=np.float64)
    temps = np.ones(z.shape[1])
    for c in np.flatnonzero(_both_labels(y)):
        sign = np.where(y[:, c] > 0, -1.0, 1.0) * z[:, c]  # softplus(sign * a) is the pair NLL at scale a

        def nll(a: float, sign: np.ndarray = sign) -> float:
            return float(np.mean(np.logaddexp(0.0, a * sign)))

        best = minimize_scalar(
            nll, bounds=(1 / MAX_TEMPERATURE, 1 / MIN_TEMPERATURE), method="bounded", options={"xatol": 1e-8}
        )
        temps[c] = 1.0 / best.x
    return temps


def fit_platt(y: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-class temperatures (C,) and shifts (C,) minimising the mean NLL of sigmoid(z / T + b).

    A two-parameter logistic regression on z per class (convex), with 1 / T kept within the
    temperature bounds so that the map stays increasing; a class without both labels keeps T = 1, b = 0.
    """
    from scipy.optimize import minimize

    y = np.asarray(y, dtype=np.float64)
    z = np.asarray(z, dtype=np.float64)
    temps, bias = np.ones(z.shape[1]), np.zeros(z.shape[1])
    for c in np.flatnonzero(_both_labels(y)):
        t = np.where(y[:, c] > 0, 1.0, 0.0)
        x = z[:, c]

        def nll(params: np.ndarray, t: np.ndarray = t, x: np.ndarray = x) -> tuple[float, np.ndarray]:
            u = params[0] * x + params[1]
            residual = sigmoid(u) - t  # d NLL / d u
            value = np.mean(np.logaddexp(0.0, np.where(t > 0, -u, u)))
            return float(value), np.array([np.mean(residual * x), np.mean(residual)])

        best = minimize(
            nll,
            np.array([1.0, 0.0]),
            jac=True,
            method="L-BFGS-B",
            bounds=[(1 / MAX_TEMPERATURE, 1 / MIN_TEMPERATURE), (None, None)],
            options={"ftol": 1e-12, "gtol": 1e-9, "maxiter": 500},
        )
        temps[c], bias[c] = 1.0 / best.x[0], best.x[1]
    return temps, bias


def fit_isotonic(y: np.ndarray, z: np.ndarray) -> tuple[tuple[np.ndarray, np.ndarray] | None, ...]:
    """Per-class isotonic maps of the logit to a probability, as interpolation knots.

    Outputs are kept within [1 / (n + 2), 1 - 1 / (n + 2)] for n validation images: a bin whose
    validation images were all negative does not promise a probability of exactly 0.
    """
    from sklearn.isotonic import IsotonicRegression

    y = np.asarray(y, dtype=np.float64)
    z = np.asarray(z, dtype=np.float64)
    eps = 1.0 / (len(y) + 2)
    knots: list[tuple[np.ndarray, np.ndarray] | None] = []
    for c in range(z.shape[1]):
        if not _both_labels(y)[c]:
            knots.append(None)
            continue
        iso = IsotonicRegression(y_min=eps, y_max=1 - eps, out_of_bounds="clip").fit(z[:, c], y[:, c])
        knots.append((np.asarray(iso.X_thresholds_, dtype=np.float64), np.asarray(iso.y_thresholds_, dtype=np.float64)))
    return tuple(knots)


def fit(method: str, y: np.ndarray, z: np.ndarray, classes: Sequence[str]) -> Calibration:
    """Fit `method` (one of METHODS) on validation labels y (N, C) and logits z (N, C)."""
    if method not in METHODS:
        raise ValueError(f"calibration method must be one of {', '.join(METHODS)}, got {method!r}")
    classes = tuple(classes)
    unfitted = tuple(c for c, ok in zip(classes, _both_labels(np.asarray(y))) if not ok) if method != "none" else ()
    if method == "temperature":
        return Calibration(method, classes, temperature=fit_temperature(y, z), unfitted=unfitted)
    if method == "platt":
        temps, bias = fit_platt(y, z)
        return Calibration(method, classes, temperature=temps, bias=bias, unfitted=unfitted)
    if method == "isotonic":
        return Calibration(method, classes, knots=fit_isotonic(y, z), unfitted=unfitted)
    return Calibration("none", classes)


def cross_validated_nll(
    y: np.ndarray, z: np.ndarray, groups: np.ndarray, folds: int, methods: Sequence[str] = METHODS
) -> dict[str, float]:
    """Mean NLL over all (image, class) cells of each method fitted on K-1 patient folds and
    scored on the held-out fold (every validation image is held out once).

    An isotonic map whose held-out fold reaches a probability its fit never allowed is still finite:
    its outputs are bounded away from 0 and 1 (`fit_isotonic`).
    """
    from sklearn.model_selection import GroupKFold

    y = np.asarray(y, dtype=np.float64)
    z = np.asarray(z, dtype=np.float64)
    k = min(folds, len(np.unique(groups)))
    if k < 2:
        raise ValueError(f"cross-validation needs at least 2 validation patients, got {len(np.unique(groups))}")
    held_out = {m: np.empty_like(z) for m in methods}
    for train_idx, test_idx in GroupKFold(n_splits=k).split(z, groups=groups):
        for m in methods:
            cal = fit(m, y[train_idx], z[train_idx], [str(i) for i in range(z.shape[1])])
            held_out[m][test_idx] = cal.probabilities(z[test_idx])
    return {m: float(np.mean(nll_from_probabilities(y, held_out[m]))) for m in methods}


def choose_method(y: np.ndarray, z: np.ndarray, groups: np.ndarray, folds: int) -> tuple[str, dict[str, float]]:
    """The method with the lowest cross-validated validation NLL, and every method's NLL.

    Ties go to the simpler map, in the order of METHODS.
    """
    scores = cross_validated_nll(y, z, groups, folds, METHODS)
    return min(scores, key=scores.get), scores  # min keeps the first of equal values


# ----------------------------------------------------------------------------- the report


def _finite(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


def calibration_report(
    cal: Calibration,
    chosen_by: dict[str, Any],
    val: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    thresholds: np.ndarray,
    bins: int,
) -> dict[str, Any]:
    """What `reports/calibration.json` holds besides the fitted map: ECE on test before and after,
    validation NLL before and after, and per class the positive rate at the validation thresholds.

    Args:
        cal: the fitted calibration.
        chosen_by: how the method was chosen: {"setting": ..., "cross_validated_nll": {...} or None}.
        val: validation labels (N, C) and logits (N, C).
        test: test labels (M, C) and logits (M, C).
        thresholds: (C,) thresholds on the calibrated scale, chosen on validation.
        bins: equal-width bins of the ECE.
    """
    (y_val, z_val), (y_test, z_test) = val, test
    raw_test, cal_test = sigmoid(z_test), cal.probabilities(z_test)
    ece_raw = expected_calibration_error(y_test, raw_test, bins)
    ece_cal = expected_calibration_error(y_test, cal_test, bins)
    nll_raw = nll_from_logits(y_val, z_val)
    nll_cal = nll_from_probabilities(y_val, cal.probabilities(z_val))
    flagged = cal_test >= thresholds  # (M, C); a NaN threshold flags nothing
    per_class = {
        c: {
            "ece_raw": _finite(ece_raw[i]),
            "ece_calibrated": _finite(ece_cal[i]),
            "val_nll_raw": _finite(nll_raw[i]),
            "val_nll_calibrated": _finite(nll_cal[i]),
            "threshold": _finite(thresholds[i]),
            "test_positive_rate": _finite(y_test[:, i].mean()) if len(y_test) else None,
            "test_flagged_rate": _finite(flagged[:, i].mean()) if len(y_test) else None,
        }
        for i, c in enumerate(cal.classes)
    }
    return {
        **cal.to_json(),
        "calibrated": cal.calibrated,
        "chosen_by": chosen_by,
        "fitted_on": "val",
        "bins": bins,
        "mean_ece_raw": _finite(np.nanmean(ece_raw)),
        "mean_ece_calibrated": _finite(np.nanmean(ece_cal)),
        "val_nll_raw": _finite(np.mean(nll_raw)),
        "val_nll_calibrated": _finite(np.mean(nll_cal)),
        "per_class": per_class,
    }
