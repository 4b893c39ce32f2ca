"""Losses against plain references (values and gradients), edge cases and the config surface."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.config import ConfigError
from pipeline.losses import (
    TERMS,
    AsymmetricLoss,
    BinaryCrossEntropy,
    ClassWeightedBinaryCrossEntropy,
    DualWeightedMetricLoss,
    FocalLoss,
    build_loss,
    category_weights,
    image_weights,
    modulation,
    pair_terms,
    prototype_separation,
    stationary_offsets,
)
from pipeline.losses.dwml import cell_sums
from tests.conftest import ROOT, settings

DWML_KEYS = {
    "beta",
    "image_weighting",
    "category_weighting",
    "effective_number",
    "normalize_image",
    "image_weight_cap",
    "image_weight_momentum",
    "category_ratio_cap",
}
FLAT_KEYS = {
    "focal_alpha": "focal.alpha",
    "asl_gamma_neg": "asl.gamma_neg",
    "asl_gamma_pos": "asl.gamma_pos",
    "asl_clip": "asl.clip",
    "pos_weight_cap": "weighted_bce.pos_weight_cap",
}


def loss_cfg(**flat):
    """train.loss of params.yaml with settings given by their short names (gamma goes to the named family)."""
    name = flat.get("name", "dwml")
    changes = {}
    for key, value in flat.items():
        if key in DWML_KEYS:
            changes[f"dwml.{key}"] = value
        elif key in FLAT_KEYS:
            changes[FLAT_KEYS[key]] = value
        elif key == "gamma":
            changes[f"{'focal' if name == 'focal' else 'dwml'}.gamma"] = value
        elif key == "detach_modulation":
            changes["focal.detach_modulation"] = changes["asl.detach_modulation"] = value
        else:
            changes[key] = value
    return settings("train.loss", changes)


B, C, N = 6, 5, 1000
POS_COUNTS = [300, 40, 0, 999, 120]  # a class with no positives and one with a single negative
SEPARATION_KEYS = ("separation_weight", "separation_margin")


def family(name: str, pos_counts=POS_COUNTS, n: int = N, **changes):
    """Loss family `name` built as training builds it (`build_loss`): the committed train.loss
    settings, with `changes` to that family's keys (and to the separation keys of the section)."""
    dotted = {key if key in SEPARATION_KEYS else f"{name}.{key}": value for key, value in changes.items()}
    return build_loss(settings("train.loss", {"name": name, **dotted}), pos_counts, n)


def _batch(seed: int = 0, scale: float = 3.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(B, C, generator=g, dtype=dtype) * scale).requires_grad_()
    y = (torch.rand(B, C, generator=g) < 0.4).to(dtype)
    y[0] = 0  # an all-negative image
    y[1] = 1  # an all-positive image
    return z, y


def _grad(loss_fn, z, y, **kw):
    z = z.detach().clone().requires_grad_()
    loss = loss_fn(z, y, **kw)
    (grad,) = torch.autograd.grad(loss, z)
    return loss.detach(), grad


# --- plain references, written with loops --------------------------------------------------


def ref_image_weights(z, y, gamma, normalize_image, cap=float("inf")):
    """a_ic = min(m_ic / mean of m over the batch's (class, label) cell, cap): one batch, no history."""
    rows, cols = len(z), len(z[0])
    m = [[0.0] * cols for _ in range(rows)]
    for i in range(rows):
        n_pos = sum(1 for c in range(cols) if y[i][c] == 1)
        n_neg = cols - n_pos
        for c in range(cols):
            q = 1.0 / (1.0 + math.exp(-float(z[i][c])))
            if y[i][c] == 1:
                m[i][c] = (1.0 - q) ** gamma / (max(1, n_pos) if normalize_image else 1)
            else:
                m[i][c] = q**gamma / (max(1, n_neg) if normalize_image else 1)
    a = [[0.0] * cols for _ in range(rows)]
    for c in range(cols):
        for label in (0, 1):
            cell = [i for i in range(rows) if y[i][c] == label]
            mean = sum(m[i][c] for i in cell) / max(1, len(cell))
            for i in cell:
                a[i][c] = min(m[i][c] / mean, cap) if mean > 0 else 0.0
    return a


def ref_category_weights(counts, n, beta, effective_number):
    """Raw weights, then one normaliser over all n * C training pairs."""

    def raw(k):
        k = max(k, 1)
        return (1 - beta) / (1 - beta**k) if effective_number else (n / k) ** beta

    pos = [raw(k) for k in counts]
    neg = [raw(n - k) for k in counts]
    total = sum(k * wp + (n - k) * wn for k, wp, wn in zip(counts, pos, neg))
    z = total / (n * len(counts))
    return [v / z for v in pos], [v / z for v in neg]


def ref_separation(p, margin):
    total, pairs = 0.0, 0
    for c in range(len(p)):
        for d in range(c + 1, len(p)):
            total += max(0.0, margin - float(((p[c] - p[d]) ** 2).sum()))
            pairs += 1
    return total / pairs


# --- DWML ------------------------------------------------------------------------------------


def test_pair_terms_are_softplus():
    z, y = _batch()
    z = z.detach()
    expected = torch.where(y > 0.5, F.softplus(-z), F.softplus(z))
    torch.testing.assert_close(pair_terms(z, y), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "kw",
    [
        dict(image_weighting=False, category_weighting=False, gamma=2.0, beta=1.0),
        dict(gamma=0.0, beta=0.0),
        dict(gamma=0.0, beta=0.0, effective_number=True),
        dict(gamma=0.0, beta=0.0, image_weight_cap=1.0, image_weight_momentum=0.0),
    ],
    ids=["weights_off", "neutral_params", "neutral_effective_number", "neutral_tight_cap"],
)
@pytest.mark.parametrize("seed", [0, 1])
def test_unweighted_dwml_equals_bce(kw, seed):
    z, y = _batch(seed)
    loss_fn = family("dwml", **kw)
    value, grad = _grad(loss_fn, z, y)
    ref_value, ref_grad = _grad(F.binary_cross_entropy_with_logits, z, y)
    assert value.dtype == torch.float64
    torch.testing.assert_close(value, ref_value, rtol=1e-13, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-15)


# NIH ChestX-ray14 train_val positives (86,524 images), canonical class order (DESIGN.md)
NIH_N = 86_524
NIH_POS = [8280, 1707, 8659, 13782, 4034, 4708, 876, 2637, 2852, 1378, 1423, 1251, 2242, 141]


@pytest.mark.parametrize("beta", [0.25, 0.5, 1.0])
def test_category_weight_ratio_is_exact_on_nih_counts(beta):
    b_pos, b_neg = category_weights(NIH_POS, NIH_N, beta, False, None)
    assert b_pos.dtype == torch.float64 and b_neg.dtype == torch.float64
    pos = torch.tensor(NIH_POS, dtype=torch.float64)
    expected = ((NIH_N - pos) / pos) ** beta
    torch.testing.assert_close(b_pos / b_neg, expected, rtol=1e-12, atol=0)
    # the mean of b over the training split's (image, class) pairs is 1
    pair_mean = (pos * b_pos + (NIH_N - pos) * b_neg).sum() / (NIH_N * len(NIH_POS))
    assert abs(pair_mean.item() - 1.0) < 1e-12
    # every class weighs its (rarer) positives above its negatives
    assert bool((b_pos > b_neg).all())


def test_category_ratio_cap_bounds_every_class():
    b_pos, b_neg = category_weights(NIH_POS, NIH_N, 1.0, False, 20.0)
    ratio = b_pos / b_neg
    assert ratio.max().item() == pytest.approx(20.0)  # Hernia (1 in 614) is capped
    pos = torch.tensor(NIH_POS, dtype=torch.float64)
    uncapped = (NIH_N - pos) / pos
    torch.testing.assert_close(ratio[uncapped < 20], uncapped[uncapped < 20], rtol=1e-12, atol=0)
    pair_mean = (pos * b_pos + (NIH_N - pos) * b_neg).sum() / (NIH_N * len(NIH_POS))
    assert abs(pair_mean.item() - 1.0) < 1e-12


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("normalize_image", [True, False])
def test_first_batch_image_weights_match_reference(gamma, normalize_image):
    z, y = _batch(seed=3)
    z = z.detach()
    loss_fn = family("dwml", gamma=gamma, normalize_image=normalize_image, image_weight_cap=1e9)
    a, _ = loss_fn.get_weights(z, y, update=True)  # the first batch sets the running means
    expected = ref_image_weights(z.tolist(), y.tolist(), gamma, normalize_image)
    torch.testing.assert_close(a, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-15)
    assert not a.requires_grad
    # each (class, label) cell of this batch averages 1
    sums, counts = cell_sums(a, y)
    torch.testing.assert_close(
        sums[counts > 0] / counts[counts > 0], torch.ones(int((counts > 0).sum()), dtype=torch.float64)
    )


def test_image_weights_average_one_per_cell_and_respect_the_cap():
    """Over many batches from one distribution, the running means make every cell average ~1."""
    cap, batches = 4.0, 400
    loss_fn = family("dwml", gamma=1.0, image_weight_cap=cap, image_weight_momentum=0.9)
    g = torch.Generator().manual_seed(21)
    prevalence = torch.tensor([0.3, 0.1, 0.5, 0.7, 0.2])
    totals, counts = torch.zeros(2, C, dtype=torch.float64), torch.zeros(2, C, dtype=torch.float64)
    for step in range(batches):
        y = (torch.rand(64, C, generator=g) < prevalence).double()
        z = torch.randn(64, C, generator=g, dtype=torch.float64) * 1.5 + (y - 0.5)  # a half-trained model
        a, _ = loss_fn.get_weights(z, y, update=True)
        assert a.max().item() <= cap
        if step >= 50:  # past the running mean's warm-up
            sums, n = cell_sums(a, y)
            totals += sums
            counts += n
    cell_means = totals / counts
    # within the running mean's tolerance (momentum 0.9 averages ~10 batches) and the cap's bite
    assert (cell_means - 1).abs().max().item() < 0.03, cell_means
    capped = family("dwml", gamma=1.0, image_weight_cap=1.0)
    a, _ = capped.get_weights(z, y, update=True)
    assert a.max().item() <= 1.0


def test_running_cell_means_keep_their_history_and_skip_absent_cells():
    loss_fn = family("dwml", [1] * C, N, gamma=1.0, image_weight_momentum=0.5)
    y = torch.zeros(4, C, dtype=torch.float64)
    y[0, 0] = 1
    loss_fn.get_weights(torch.zeros(4, C, dtype=torch.float64), y, update=True)  # q = 0.5: m = 0.5
    torch.testing.assert_close(loss_fn.cell_mean[0], torch.full((C,), 0.5, dtype=torch.float64))
    assert loss_fn.cell_seen[1, 0] and not loss_fn.cell_seen[1, 1:].any()
    z = torch.full((4, C), math.log(3.0), dtype=torch.float64)  # q = 0.75 for every pair
    loss_fn.get_weights(z, torch.zeros(4, C, dtype=torch.float64), update=True)  # no positives at all
    torch.testing.assert_close(loss_fn.cell_mean[0], torch.full((C,), 0.625, dtype=torch.float64))
    assert loss_fn.cell_mean[1, 0].item() == pytest.approx(0.5)  # a cell without pairs keeps its mean


def test_image_normalisation_option_balances_each_image():
    z, y = _batch(seed=4)
    m = modulation(z.detach(), y, gamma=0.0, normalize_image=True)
    mixed = (y.sum(1) > 0) & (y.sum(1) < C)
    torch.testing.assert_close((m * y).sum(1)[mixed], (m * (1 - y)).sum(1)[mixed])


@pytest.mark.parametrize("effective_number,beta", [(False, 0.5), (False, 1.0), (True, 0.99)])
def test_category_weights_match_reference(effective_number, beta):
    b_pos, b_neg = category_weights(POS_COUNTS, N, beta, effective_number, None)
    ref_pos, ref_neg = ref_category_weights(POS_COUNTS, N, beta, effective_number)
    torch.testing.assert_close(b_pos, torch.tensor(ref_pos, dtype=torch.float64))
    torch.testing.assert_close(b_neg, torch.tensor(ref_neg, dtype=torch.float64))
    # rarer positives weigh more: class 1 (40 positives) above class 0 (300)
    assert b_pos[1] > b_pos[0]


def test_category_weights_zero_beta_is_uniform():
    for effective_number in (False, True):
        b_pos, b_neg = category_weights(POS_COUNTS, N, 0.0, effective_number, None)
        assert torch.equal(b_pos, torch.ones(C, dtype=torch.float64))
        assert torch.equal(b_neg, torch.ones(C, dtype=torch.float64))


@pytest.mark.parametrize("gamma,beta,normalize_image", [(1.0, 0.5, False), (2.0, 1.0, True)])
def test_dwml_matches_reference_with_detached_weights(gamma, beta, normalize_image):
    z, y = _batch(seed=5)
    g = torch.Generator().manual_seed(0)
    p = F.normalize(torch.randn(C, 8, dtype=torch.float64, generator=g), dim=1)  # (C, D)
    p[1] = p[0]  # one coincident pair so the separation term is active
    loss_fn = family(
        "dwml",
        gamma=gamma,
        beta=beta,
        normalize_image=normalize_image,
        image_weight_cap=3.0,
        separation_weight=0.3,
        separation_margin=1.5,
    )
    value, grad = _grad(loss_fn, z, y, prototypes=p)

    # reference: weights are constants, so autograd sees only the pair terms
    a = torch.tensor(ref_image_weights(z.tolist(), y.tolist(), gamma, normalize_image, cap=3.0), dtype=torch.float64)
    ref_pos, ref_neg = ref_category_weights(POS_COUNTS, N, beta, False)
    b = [[ref_pos[c] if y[i, c] else ref_neg[c] for c in range(C)] for i in range(B)]
    b = torch.tensor(b, dtype=torch.float64)

    def reference(zz, yy, prototypes):
        pair = yy * torch.log1p(torch.exp(-zz)) + (1 - yy) * torch.log1p(torch.exp(zz))
        return (a * b * pair).mean() + 0.3 * ref_separation(prototypes, 1.5)

    ref_value, ref_grad = _grad(reference, z, y, prototypes=p)
    torch.testing.assert_close(value, ref_value, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)


def test_running_means_update_only_in_training_steps():
    z, y = _batch(seed=6)
    loss_fn = family("dwml")
    with torch.no_grad():
        loss_fn(z, y)  # e.g. a validation loss: no update
    assert not loss_fn.cell_seen.any()
    loss_fn.eval()
    loss_fn(z, y)
    assert not loss_fn.cell_seen.any()
    loss_fn.train()
    loss_fn(z, y)
    assert loss_fn.cell_seen.any()
    assert "cell_mean" in loss_fn.state_dict()  # saved with the checkpoint for exact resume


# --- rank preservation -------------------------------------------------------------------------
#
# A fixed-feature problem: K feature bins, each with a known joint distribution of C = 3 labels,
# written as 20 equally likely label rows per bin. One free logit per (bin, class) is trained to
# the loss's fixed point (weights recomputed and detached at every step, as in training). A loss
# that preserves the ranking gives, for every class, scores in the order of the true P(y_c | bin).

RANK_BINS = [
    # (P(y_0 = 1), whether the other two findings come with y_0 = 1, P(y_1), P(y_2)) per bin;
    # bins 0/1 and 2/3 differ in y_0's prevalence *and* in how many other findings an image has
    (0.30, True, 0.30, 0.20),
    (0.20, False, 0.10, 0.05),
    (0.60, True, 0.60, 0.40),
    (0.50, False, 0.15, 0.10),
    (0.10, False, 0.05, 0.35),
    (0.85, True, 0.85, 0.70),
]


def _rank_problem():
    rows, bins = [], []
    for k, (p0, together, p1, p2) in enumerate(RANK_BINS):
        n0 = round(20 * p0)
        for r in range(20):
            pos0 = r < n0
            if together:  # the other findings co-occur exactly with y_0
                y1 = pos0 if r < round(20 * p1) or pos0 else False
                y = [pos0, pos0, pos0 and r < round(20 * p2)]
            else:  # the other findings fall on the images without y_0
                y1 = (not pos0) and r >= 20 - round(20 * p1)
                y = [pos0, y1, (not pos0) and r >= 20 - round(20 * p2)]
            rows.append([float(v) for v in y])
            bins.append(k)
    y = torch.tensor(rows, dtype=torch.float64)  # (20 K, 3)
    return y, torch.tensor(bins)


def _fixed_point_scores(loss_fn, y, bins, steps=3000, lr=1.0):
    k = int(bins.max()) + 1
    logits = torch.zeros(k, y.shape[1], dtype=torch.float64, requires_grad=True)
    loss_fn.train()
    for _ in range(steps):
        loss = loss_fn(logits[bins], y)
        (grad,) = torch.autograd.grad(loss, logits)
        with torch.no_grad():
            logits -= lr * grad * y.numel() / 20  # per-bin gradient on the scale of one pair
    return logits.detach(), grad.abs().max().item()


RANK_PRESERVING = {
    "bce": dict(name="bce"),
    "dual": dict(name="dwml"),
    "dual_gamma2_beta1": dict(name="dwml", gamma=2.0, beta=1.0),
    "image_only": dict(name="dwml", category_weighting=False),
    "category_only": dict(name="dwml", image_weighting=False),
    "dual_capped": dict(name="dwml", image_weight_cap=1.2, category_ratio_cap=2.0),
    "weighted_bce": dict(name="weighted_bce"),
    "focal_detached": dict(name="focal", gamma=2.0, focal_alpha=0.25, detach_modulation=True),
}


def _true_prevalence(y, bins):
    k = int(bins.max()) + 1
    return torch.stack([y[bins == b].mean(0) for b in range(k)])  # (K, C)


@pytest.mark.parametrize("variant", list(RANK_PRESERVING))
def test_loss_optimal_scores_are_monotone_in_the_true_probability(variant):
    y, bins = _rank_problem()
    loss_fn = build_loss(loss_cfg(**RANK_PRESERVING[variant]), [30, 20, 15], 120)
    scores, grad = _fixed_point_scores(loss_fn, y, bins)
    assert grad < 1e-7, f"not at a fixed point: max gradient {grad}"
    truth = _true_prevalence(y, bins)
    for c in range(y.shape[1]):
        order = torch.argsort(truth[:, c])
        p, s = truth[order, c], scores[order, c]
        distinct = p[1:] > p[:-1] + 1e-9
        assert bool((s[1:][distinct] > s[:-1][distinct]).all()), (c, p.tolist(), s.tolist())


def test_image_count_normalisation_breaks_the_ranking():
    y, bins = _rank_problem()
    loss_fn = build_loss(loss_cfg(name="dwml", normalize_image=True), [30, 20, 15], 120)
    scores, grad = _fixed_point_scores(loss_fn, y, bins)
    assert grad < 1e-7
    truth = _true_prevalence(y, bins)
    # bin 0 has the higher P(y_0) (0.30 vs 0.20) but its positives carry two other findings
    assert truth[0, 0] > truth[1, 0]
    assert scores[0, 0] < scores[1, 0], scores[:, 0].tolist()


# --- prior init: the loss's stationary point ----------------------------------------------------


@pytest.mark.parametrize(
    "cfg,expected",
    [
        (dict(name="bce"), lambda pi, b_ratio, pw: torch.logit(pi)),
        (dict(name="dwml"), lambda pi, b_ratio, pw: torch.logit(pi) + torch.log(b_ratio)),
        (dict(name="dwml", gamma=3.0, beta=1.0), lambda pi, b_ratio, pw: torch.logit(pi) + torch.log(b_ratio)),
        (dict(name="weighted_bce"), lambda pi, b_ratio, pw: torch.logit(pi) + torch.log(pw)),
        (
            dict(name="focal", gamma=2.0, focal_alpha=0.25, detach_modulation=True),
            lambda pi, b_ratio, pw: (torch.logit(pi) + math.log(0.25 / 0.75)) / 3.0,
        ),
    ],
    ids=["bce", "dwml", "dwml_g3_b1", "weighted_bce", "focal_detached"],
)
def test_stationary_offsets_match_closed_forms_without_features(cfg, expected):
    counts = [300, 40, 10, 600, 120]
    loss_fn = build_loss(loss_cfg(**cfg), counts, N)
    if cfg["name"] == "dwml":
        b_pos, b_neg = category_weights(counts, N, loss_fn.beta, False, None)
    else:
        b_pos = b_neg = torch.ones(C, dtype=torch.float64)
    pi = torch.tensor(counts, dtype=torch.float64) / N
    pw = (N - pi * N) / (pi * N)
    offsets = stationary_offsets(loss_fn, torch.zeros(32, C, dtype=torch.float64), pi)
    # 1e-6: weighted BCE keeps its pos_weight in float32
    torch.testing.assert_close(offsets, expected(pi, b_pos / b_neg, pw), rtol=1e-6, atol=1e-6)


def test_stationary_offsets_zero_the_expected_gradient_on_spread_logits():
    counts = [300, 40, 10, 600, 120]
    loss_fn = build_loss(loss_cfg(name="dwml", gamma=2.0), counts, N)
    logits = torch.randn(64, C, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2
    pi = torch.tensor(counts, dtype=torch.float64) / N
    offsets = stationary_offsets(loss_fn, logits, pi)
    from pipeline.losses import expected_gradient

    assert expected_gradient(loss_fn, logits, pi, offsets).abs().max().item() < 1e-10
    assert not loss_fn.cell_seen.any()  # finding the prior changes no running statistics


def test_separation_zero_when_apart_positive_when_coincident():
    p = torch.eye(C, 16, dtype=torch.float64)  # orthonormal: squared distance 2 between all
    assert prototype_separation(p, margin=1.0).item() == 0.0
    same = p[:1].repeat(C, 1).requires_grad_()
    sep = prototype_separation(same, margin=1.0)
    assert sep.item() == pytest.approx(1.0)
    expected = torch.tensor(ref_separation(same.detach(), 1.0), dtype=sep.dtype)
    torch.testing.assert_close(sep, expected)
    assert prototype_separation(p[:1], margin=1.0).item() == 0.0  # one class: no pairs


def test_separation_gradient_pushes_prototypes_apart():
    p = torch.tensor([[1.0, 0.0], [0.9, 0.1]], requires_grad=True)
    prototype_separation(p, margin=1.0).backward()
    # descending the gradient must increase the distance
    moved = p.detach() - 0.1 * p.grad
    assert (moved[0] - moved[1]).pow(2).sum() > (p[0] - p[1]).detach().pow(2).sum()


def test_dwml_return_terms():
    z, y = _batch()
    p = F.normalize(torch.randn(C, 8, dtype=torch.float64), dim=1)
    loss_fn = family("dwml", separation_weight=0.5)
    terms = loss_fn(z, y, prototypes=p, return_terms=True)
    assert tuple(terms) == TERMS
    assert terms["loss"].requires_grad
    assert all(not terms[k].requires_grad for k in TERMS if k != "loss")
    torch.testing.assert_close(terms["loss"], terms["pair"] + 0.5 * terms["separation"])
    torch.testing.assert_close(terms["loss"], loss_fn(z, y, prototypes=p))
    torch.testing.assert_close(terms["bce"], F.binary_cross_entropy_with_logits(z, y).detach())
    # no prototypes: no separation term
    assert loss_fn(z, y, return_terms=True)["separation"].item() == 0.0


def test_dwml_rejects_wrong_class_count():
    loss_fn = family("dwml")
    with pytest.raises(ValueError, match="pos_counts"):
        loss_fn(torch.zeros(2, C + 1), torch.zeros(2, C + 1))
    with pytest.raises(ValueError, match="num_images"):
        family("dwml", [5, 2000], N)


# --- baselines -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "loss_fn",
    [family("bce"), family("asl", gamma_neg=0.0, gamma_pos=0.0, clip=0.0), family("focal", gamma=0.0, alpha=None)],
    ids=["bce", "asl_neutral", "focal_neutral"],
)
def test_neutral_baselines_equal_bce(loss_fn):
    z, y = _batch(seed=7)
    value, grad = _grad(loss_fn, z, y)
    ref_value, ref_grad = _grad(F.binary_cross_entropy_with_logits, z, y)
    torch.testing.assert_close(value, ref_value, rtol=1e-13, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("gamma_neg,gamma_pos,clip", [(4.0, 0.0, 0.05), (2.0, 1.0, 0.0), (0.5, 0.0, 0.2)])
def test_asl_matches_reference(gamma_neg, gamma_pos, clip):
    z, y = _batch(seed=8, scale=2.0)

    def reference(zz, yy):
        p = torch.sigmoid(zz)
        p_m = (p - clip).clamp_min(0)
        pos = -((1 - p) ** gamma_pos) * torch.log(p)
        neg = -(p_m**gamma_neg) * torch.log(1 - p_m)
        return (yy * pos + (1 - yy) * neg).mean()

    value, grad = _grad(family("asl", gamma_neg=gamma_neg, gamma_pos=gamma_pos, clip=clip), z, y)
    ref_value, ref_grad = _grad(reference, z, y)
    torch.testing.assert_close(value, ref_value)
    torch.testing.assert_close(grad, ref_grad)


@pytest.mark.parametrize("gamma,alpha", [(2.0, 0.25), (1.0, None)])
def test_focal_matches_reference(gamma, alpha):
    z, y = _batch(seed=9, scale=2.0)

    def reference(zz, yy):
        p = torch.sigmoid(zz)
        p_t = yy * p + (1 - yy) * (1 - p)
        alpha_t = 1.0 if alpha is None else yy * alpha + (1 - yy) * (1 - alpha)
        return (-alpha_t * (1 - p_t) ** gamma * torch.log(p_t)).mean()

    value, grad = _grad(family("focal", gamma=gamma, alpha=alpha), z, y)
    ref_value, ref_grad = _grad(reference, z, y)
    torch.testing.assert_close(value, ref_value)
    torch.testing.assert_close(grad, ref_grad)


@pytest.mark.parametrize("cap", [None, 5.0])
def test_weighted_bce_pos_weight(cap):
    loss_fn = family("weighted_bce", pos_weight_cap=cap)
    expected = [max(N - k, 1) / max(k, 1) for k in POS_COUNTS]
    if cap is not None:
        expected = [min(w, cap) for w in expected]
    torch.testing.assert_close(loss_fn.pos_weight, torch.tensor(expected, dtype=torch.float32))
    z, y = _batch(seed=10)
    ref = F.binary_cross_entropy_with_logits(z, y, pos_weight=torch.tensor(expected, dtype=z.dtype))
    torch.testing.assert_close(loss_fn(z, y), ref, rtol=1e-6, atol=1e-6)


# --- numerics, shared by every loss ----------------------------------------------------------


LOSS_NAMES = ["dwml", "bce", "weighted_bce", "focal", "asl"]
ABLATION_VARIANTS = sorted(p.stem for p in (ROOT / "conf" / "ablation").glob("*.yaml"))


def _extreme_logits():
    g = torch.Generator().manual_seed(11)
    z = torch.randn(B, C, generator=g) * 1e4
    z[2, :] = 1e4  # saturated everywhere
    z[3, :] = -1e4
    z[4, 0] = 0.0
    return z


@pytest.mark.parametrize("name", LOSS_NAMES)
@pytest.mark.parametrize("labels", ["mixed", "all_negative", "all_positive", "solved"])
@pytest.mark.parametrize("scale", [1.0, 1e4])
def test_finite_under_bf16_autocast(name, labels, scale):
    z0 = _extreme_logits() if scale > 1 else torch.randn(B, C)
    y = {
        "mixed": (torch.rand(B, C, generator=torch.Generator().manual_seed(12)) < 0.3).float(),
        "all_negative": torch.zeros(B, C),
        "all_positive": torch.ones(B, C),
        "solved": (z0 > 0).float(),  # every pair right: saturated image weights are all 0
    }[labels]
    # exponents below 1: pow's gradient at 0 is infinite, the hardest case
    cfg = loss_cfg(name=name, gamma=0.5, asl_gamma_neg=0.5, asl_gamma_pos=0.5, pos_weight_cap=50)
    loss_fn = build_loss(cfg, POS_COUNTS, N)
    weight = torch.ones(C, requires_grad=True)
    protos = torch.randn(C, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = (z0 * weight).to(torch.bfloat16)  # (B, C) half-precision, as from a model
        p = F.normalize(protos, dim=1) @ torch.eye(8)  # bf16 under autocast
        loss = loss_fn(logits, y, prototypes=p)
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(weight.grad).all()
    if name == "dwml":  # only the metric loss uses the prototypes
        assert torch.isfinite(protos.grad).all()


def test_image_weights_when_every_pair_is_solved():
    y = (torch.rand(B, C, generator=torch.Generator().manual_seed(16)) < 0.5).float()
    z = torch.where(y > 0.5, 1e4, -1e4).requires_grad_()  # sigmoid saturates to exactly 0 / 1
    m = modulation(z.detach(), y, gamma=1.0)
    w = image_weights(m, y, torch.zeros(2, C, dtype=torch.float64), cap=10.0)
    assert torch.equal(w, torch.zeros(B, C))  # nothing left to learn, and no 0 / 0
    loss = family("dwml")(z, y)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(z.grad).all()


@pytest.mark.parametrize("clip", [0.0, 0.05])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 4.0])
def test_asl_finite_at_saturation(clip, gamma):
    z = _extreme_logits().requires_grad_()
    y = (torch.rand(B, C, generator=torch.Generator().manual_seed(17)) < 0.5).float()
    loss = family("asl", gamma_neg=gamma, gamma_pos=gamma, clip=clip)(z, y)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all()


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_half_logits_are_upcast(name):
    z, y = _batch(seed=13, dtype=torch.float32)
    loss_fn = build_loss(loss_cfg(name=name), POS_COUNTS, N)
    full = loss_fn(z.detach(), y)
    half = loss_fn(z.detach().half(), y)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, full, rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_return_terms_of_every_loss(name):
    z, y = _batch(seed=14)
    terms = build_loss(loss_cfg(name=name), POS_COUNTS, N)(z, y, return_terms=True)
    assert {"loss", "bce"} <= set(terms)
    assert terms["loss"].ndim == 0 and terms["loss"].requires_grad
    torch.testing.assert_close(terms["bce"], F.binary_cross_entropy_with_logits(z, y).detach())


# --- config and factory ----------------------------------------------------------------------


EXPECTED_TYPES = {
    "dwml": DualWeightedMetricLoss,
    "bce": BinaryCrossEntropy,
    "weighted_bce": ClassWeightedBinaryCrossEntropy,
    "focal": FocalLoss,
    "asl": AsymmetricLoss,
}


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_build_loss_each_name(name):
    cfg = settings("train.loss", {"name": name})
    loss_fn = build_loss(cfg, POS_COUNTS, N)
    assert type(loss_fn) is EXPECTED_TYPES[name]


def test_default_config_is_full_dual_loss():
    loss_fn = build_loss(settings("train.loss"), POS_COUNTS, N)
    assert isinstance(loss_fn, DualWeightedMetricLoss)
    assert loss_fn.image_weighting and loss_fn.category_weighting
    assert not loss_fn.normalize_image  # rank-distorting: an option, off by default
    assert loss_fn.gamma == 1.0 and loss_fn.beta == 0.5


def _variant(name: str):
    from components.ablate import variant_config

    return variant_config(settings("train"), name, folder=ROOT / "conf" / "ablation")


@pytest.mark.parametrize("variant", ABLATION_VARIANTS)
def test_build_loss_each_ablation(variant):
    cfg = _variant(variant)
    assert cfg.model.head in ("linear", "metric") and cfg.model.prototypes in ("text", "random")
    loss_fn = build_loss(cfg.loss, POS_COUNTS, N)
    z, y = _batch(seed=15)
    protos = None
    if cfg.model.head == "metric":
        protos = F.normalize(torch.randn(C, 8, dtype=torch.float64), dim=1)  # (C, D)
    assert torch.isfinite(loss_fn(z, y, prototypes=protos))


def _differences(a, b) -> set[str]:
    from pipeline.tracking import flatten

    fa, fb = flatten(a.model_dump()), flatten(b.model_dump())
    return {k for k in fa if fa[k] != fb[k]}


def test_ablation_variants_differ_as_named():
    """Each variant of conf/ablation/ differs from dual in what its name says, and only that."""
    base = settings("train")
    dual = _variant("dual")
    assert dual == base  # the committed settings are the method
    assert _differences(_variant("bce_head"), dual) == {"model.head", "model.projector", "loss.name"}
    assert _variant("bce_head").model.head == "linear" and _variant("bce_head").loss.name == "bce"
    assert _variant("bce_head").model.projector == "identity"
    # the head x weighting 2 x 2 (bce_head, linear_dual, metric_unweighted, dual), the projector
    # variants of dual, and the MLP + BCE control
    assert _differences(_variant("linear_dual"), dual) == {"model.head", "model.projector"}
    assert _differences(_variant("dual_linear_projector"), dual) == {"model.projector"}
    assert _variant("dual_linear_projector").model.projector == "linear"
    assert _differences(_variant("dual_identity_projector"), dual) == {"model.projector"}
    assert _differences(_variant("mlp_bce_head"), dual) == {"model.head", "loss.name"}
    assert _variant("mlp_bce_head").model.projector == "mlp"
    assert _differences(_variant("metric_unweighted"), dual) == {
        "loss.dwml.image_weighting",
        "loss.dwml.category_weighting",
    }
    assert _differences(_variant("image_only"), dual) == {"loss.dwml.category_weighting"}
    assert _differences(_variant("category_only"), dual) == {"loss.dwml.image_weighting"}
    assert _differences(_variant("dual_random_prototypes"), dual) == {"model.prototypes"}
    # focal and ASL: their own weighting, detached like DWML's, on the same head and separation term
    for name in ("focal", "asl"):
        variant = _variant(name)
        changed = _differences(variant, dual)
        assert changed and all(k == "loss.name" or k.startswith(f"loss.{name}.") for k in changed), changed
        assert getattr(variant.loss, name).detach_modulation
        assert variant.loss.separation_weight == dual.loss.separation_weight > 0
    # the values the variant names, written in its file (Lin et al.'s gamma 2, alpha 0.25)
    assert (_variant("focal").loss.focal.gamma, _variant("focal").loss.focal.alpha) == (2.0, 0.25)


def test_unknown_ablation_names_the_folder():
    from components.ablate import parse_variants

    with pytest.raises(ValueError, match="conf/ablation"):
        parse_variants("dual,nope", ROOT / "conf" / "ablation")
    assert parse_variants("bce_head,dual", ROOT / "conf" / "ablation") == ["bce_head", "dual"]


@pytest.mark.parametrize("name", ["focal", "asl"])
def test_focal_and_asl_add_the_separation_term_on_the_metric_head(name):
    z, y = _batch(seed=16)
    p = torch.eye(C, 8, dtype=torch.float64)
    p[1] = p[0]  # one coincident pair
    loss_fn = build_loss(_variant(name).loss, POS_COUNTS, N)
    terms = loss_fn(z, y, prototypes=p, return_terms=True)
    assert terms["separation"].item() > 0
    torch.testing.assert_close(terms["loss"], terms["pair"] + loss_fn.separation_weight * terms["separation"])


def test_detached_focal_modulation_is_a_weight_not_a_direction():
    z, y = _batch(seed=17, scale=2.0)
    value, grad = _grad(family("focal", gamma=2.0, alpha=0.25, detach_modulation=True), z, y)
    p = torch.sigmoid(z.detach())
    p_t = y * p + (1 - y) * (1 - p)
    weight = (1 - p_t) ** 2 * (y * 0.25 + (1 - y) * 0.75)  # constants

    def reference(zz, yy):
        return (weight * F.binary_cross_entropy_with_logits(zz, yy, reduction="none")).mean()

    ref_value, ref_grad = _grad(reference, z, y)
    torch.testing.assert_close(value, ref_value)
    torch.testing.assert_close(grad, ref_grad)
    _, attached = _grad(family("focal", gamma=2.0, alpha=0.25), z, y)
    assert not torch.allclose(grad, attached)


@pytest.mark.parametrize(
    "values,key",
    [
        ({"name": "hinge"}, "train.loss.name"),
        ({"dwml.gamma": -1.0}, "train.loss.dwml.gamma"),
        ({"dwml.effective_number": True, "dwml.beta": 1.0}, "effective_number"),
        ({"separation_margin": 5.0}, "train.loss.separation_margin"),
        ({"focal.alpha": 1.5}, "train.loss.focal.alpha"),
        ({"asl.clip": 1.0}, "train.loss.asl.clip"),
        ({"weighted_bce.pos_weight_cap": 0.0}, "train.loss.weighted_bce.pos_weight_cap"),
        ({"dwml.image_weight_cap": 0.5}, "train.loss.dwml.image_weight_cap"),
        ({"dwml.image_weight_momentum": 1.0}, "train.loss.dwml.image_weight_momentum"),
        ({"dwml.category_ratio_cap": 0.5}, "train.loss.dwml.category_ratio_cap"),
    ],
)
def test_config_errors_name_the_key(values, key):
    with pytest.raises(ConfigError, match=key):
        settings("train.loss", values)
