"""Losses against plain references (values and gradients), edge cases and the config surface."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.config import ConfigError, build
from pipeline.losses import (
    ABLATIONS,
    TERMS,
    AsymmetricLoss,
    BinaryCrossEntropy,
    ClassWeightedBinaryCrossEntropy,
    DualWeightedMetricLoss,
    FocalLoss,
    LossConfig,
    ablation_config,
    build_loss,
    category_weights,
    image_weights,
    pair_terms,
    prototype_separation,
)

B, C, N = 6, 5, 1000
POS_COUNTS = [300, 40, 0, 999, 120]  # a class with no positives and one with a single negative


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


def ref_image_weights(z, y, gamma, normalize_image):
    rows, cols = len(z), len(z[0])
    w = [[0.0] * cols for _ in range(rows)]
    for i in range(rows):
        n_pos = sum(1 for c in range(cols) if y[i][c] == 1)
        n_neg = cols - n_pos
        for c in range(cols):
            q = 1.0 / (1.0 + math.exp(-float(z[i][c])))
            if y[i][c] == 1:
                w[i][c] = (1.0 - q) ** gamma / (max(1, n_pos) if normalize_image else 1)
            else:
                w[i][c] = q**gamma / (max(1, n_neg) if normalize_image else 1)
    mean = sum(sum(row) for row in w) / (rows * cols)
    return [[v / mean for v in row] for row in w]


def ref_category_weights(counts, n, beta, effective_number):
    def raw(k):
        k = max(k, 1)
        return (1 - beta) / (1 - beta**k) if effective_number else (n / k) ** beta

    pos = [raw(k) for k in counts]
    neg = [raw(n - k) for k in counts]
    return [v * len(pos) / sum(pos) for v in pos], [v * len(neg) / sum(neg) for v in neg]


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
        dict(gamma=0.0, beta=0.0, normalize_image=False),
        dict(gamma=0.0, beta=0.0, normalize_image=False, effective_number=True),
    ],
    ids=["weights_off", "neutral_params", "neutral_effective_number"],
)
@pytest.mark.parametrize("seed", [0, 1])
def test_unweighted_dwml_equals_bce(kw, seed):
    z, y = _batch(seed)
    loss_fn = DualWeightedMetricLoss(POS_COUNTS, N, **kw)
    value, grad = _grad(loss_fn, z, y)
    ref_value, ref_grad = _grad(F.binary_cross_entropy_with_logits, z, y)
    assert value.dtype == torch.float64
    torch.testing.assert_close(value, ref_value, rtol=1e-13, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("normalize_image", [True, False])
def test_image_weights_match_reference(gamma, normalize_image):
    z, y = _batch(seed=3)
    z = z.detach()
    got = image_weights(z, y, gamma, normalize_image)
    expected = ref_image_weights(z.tolist(), y.tolist(), gamma, normalize_image)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=0)
    assert not got.requires_grad
    assert got.mean().item() == pytest.approx(1.0)


def test_image_normalisation_balances_each_image():
    z, y = _batch(seed=4)
    w = image_weights(z.detach(), y, gamma=0.0, normalize_image=True)
    mixed = (y.sum(1) > 0) & (y.sum(1) < C)
    pos_total = (w * y).sum(1)[mixed]
    neg_total = (w * (1 - y)).sum(1)[mixed]
    torch.testing.assert_close(pos_total, neg_total)


@pytest.mark.parametrize("effective_number,beta", [(False, 0.5), (False, 1.0), (True, 0.99)])
def test_category_weights_match_reference(effective_number, beta):
    b_pos, b_neg = category_weights(POS_COUNTS, N, beta, effective_number)
    ref_pos, ref_neg = ref_category_weights(POS_COUNTS, N, beta, effective_number)
    torch.testing.assert_close(b_pos, torch.tensor(ref_pos, dtype=torch.float64))
    torch.testing.assert_close(b_neg, torch.tensor(ref_neg, dtype=torch.float64))
    assert b_pos.mean().item() == pytest.approx(1.0) and b_neg.mean().item() == pytest.approx(1.0)
    # rarer positives weigh more: class 1 (40 positives) above class 0 (300)
    assert b_pos[1] > b_pos[0]


def test_category_weights_zero_beta_is_uniform():
    for effective_number in (False, True):
        b_pos, b_neg = category_weights(POS_COUNTS, N, 0.0, effective_number)
        assert torch.equal(b_pos, torch.ones(C, dtype=torch.float64))
        assert torch.equal(b_neg, torch.ones(C, dtype=torch.float64))


@pytest.mark.parametrize("gamma,beta,normalize_image", [(1.0, 0.5, True), (2.0, 1.0, False)])
def test_dwml_matches_reference_with_detached_weights(gamma, beta, normalize_image):
    z, y = _batch(seed=5)
    g = torch.Generator().manual_seed(0)
    p = F.normalize(torch.randn(C, 8, dtype=torch.float64, generator=g), dim=1)  # (C, D)
    p[1] = p[0]  # one coincident pair so the separation term is active
    loss_fn = DualWeightedMetricLoss(
        POS_COUNTS,
        N,
        gamma=gamma,
        beta=beta,
        normalize_image=normalize_image,
        separation_weight=0.3,
        separation_margin=1.5,
    )
    value, grad = _grad(loss_fn, z, y, prototypes=p)

    # reference: weights are constants, so autograd sees only the pair terms
    a = ref_image_weights(z.tolist(), y.tolist(), gamma, normalize_image)
    a = torch.tensor(a, dtype=torch.float64)
    ref_pos, ref_neg = ref_category_weights(POS_COUNTS, N, beta, False)
    b = [[ref_pos[c] if y[i, c] else ref_neg[c] for c in range(C)] for i in range(B)]
    b = torch.tensor(b, dtype=torch.float64)

    def reference(zz, yy, prototypes):
        l = yy * torch.log1p(torch.exp(-zz)) + (1 - yy) * torch.log1p(torch.exp(zz))
        return (a * b * l).mean() + 0.3 * ref_separation(prototypes, 1.5)

    ref_value, ref_grad = _grad(reference, z, y, prototypes=p)
    torch.testing.assert_close(value, ref_value, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)


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
    loss_fn = DualWeightedMetricLoss(POS_COUNTS, N, separation_weight=0.5)
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
    loss_fn = DualWeightedMetricLoss(POS_COUNTS, N)
    with pytest.raises(ValueError, match="pos_counts"):
        loss_fn(torch.zeros(2, C + 1), torch.zeros(2, C + 1))
    with pytest.raises(ValueError, match="num_images"):
        DualWeightedMetricLoss([5, 2000], N)


# --- baselines -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "loss_fn",
    [BinaryCrossEntropy(), AsymmetricLoss(0.0, 0.0, 0.0), FocalLoss(0.0, None)],
    ids=["bce", "asl_neutral", "focal_neutral"],
)
def test_neutral_baselines_equal_bce(loss_fn):
    z, y = _batch(seed=7)
    value, grad = _grad(loss_fn, z, y)
    ref_value, ref_grad = _grad(F.binary_cross_entropy_with_logits, z, y)
    torch.testing.assert_close(value, ref_value, rtol=1e-13, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize(
    "gamma_neg,gamma_pos,clip", [(4.0, 0.0, 0.05), (2.0, 1.0, 0.0), (0.5, 0.0, 0.2)]
)
def test_asl_matches_reference(gamma_neg, gamma_pos, clip):
    z, y = _batch(seed=8, scale=2.0)

    def reference(zz, yy):
        p = torch.sigmoid(zz)
        p_m = (p - clip).clamp_min(0)
        pos = -((1 - p) ** gamma_pos) * torch.log(p)
        neg = -(p_m**gamma_neg) * torch.log(1 - p_m)
        return (yy * pos + (1 - yy) * neg).mean()

    value, grad = _grad(AsymmetricLoss(gamma_neg, gamma_pos, clip), z, y)
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

    value, grad = _grad(FocalLoss(gamma, alpha), z, y)
    ref_value, ref_grad = _grad(reference, z, y)
    torch.testing.assert_close(value, ref_value)
    torch.testing.assert_close(grad, ref_grad)


@pytest.mark.parametrize("cap", [None, 5.0])
def test_weighted_bce_pos_weight(cap):
    loss_fn = ClassWeightedBinaryCrossEntropy(POS_COUNTS, N, cap=cap)
    expected = [max(N - k, 1) / max(k, 1) for k in POS_COUNTS]
    if cap is not None:
        expected = [min(w, cap) for w in expected]
    torch.testing.assert_close(loss_fn.pos_weight, torch.tensor(expected, dtype=torch.float32))
    z, y = _batch(seed=10)
    ref = F.binary_cross_entropy_with_logits(z, y, pos_weight=torch.tensor(expected, dtype=z.dtype))
    torch.testing.assert_close(loss_fn(z, y), ref, rtol=1e-6, atol=1e-6)


# --- numerics, shared by every loss ----------------------------------------------------------


LOSS_NAMES = ["dwml", "bce", "weighted_bce", "focal", "asl"]


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
    cfg = LossConfig(name=name, gamma=0.5, asl_gamma_neg=0.5, asl_gamma_pos=0.5, pos_weight_cap=50)
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
    w = image_weights(z.detach(), y, gamma=1.0)
    assert torch.equal(w, torch.zeros(B, C))  # nothing left to learn, and no 0 / 0
    loss = DualWeightedMetricLoss(POS_COUNTS, N)(z, y)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(z.grad).all()


@pytest.mark.parametrize("clip", [0.0, 0.05])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 4.0])
def test_asl_finite_at_saturation(clip, gamma):
    z = _extreme_logits().requires_grad_()
    y = (torch.rand(B, C, generator=torch.Generator().manual_seed(17)) < 0.5).float()
    loss = AsymmetricLoss(gamma_neg=gamma, gamma_pos=gamma, clip=clip)(z, y)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all()


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_half_logits_are_upcast(name):
    z, y = _batch(seed=13, dtype=torch.float32)
    loss_fn = build_loss(LossConfig(name=name), POS_COUNTS, N)
    full = loss_fn(z.detach(), y)
    half = loss_fn(z.detach().half(), y)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, full, rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_return_terms_of_every_loss(name):
    z, y = _batch(seed=14)
    terms = build_loss(LossConfig(name=name), POS_COUNTS, N)(z, y, return_terms=True)
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
    cfg = build(LossConfig, {"name": name}, where="train.loss")
    loss_fn = build_loss(cfg, POS_COUNTS, N)
    assert type(loss_fn) is EXPECTED_TYPES[name]


def test_default_config_is_full_dual_loss():
    loss_fn = build_loss(LossConfig(), POS_COUNTS, N)
    assert isinstance(loss_fn, DualWeightedMetricLoss)
    assert loss_fn.image_weighting and loss_fn.category_weighting and loss_fn.normalize_image
    assert loss_fn.gamma == 1.0 and loss_fn.beta == 0.5


@pytest.mark.parametrize("variant", list(ABLATIONS))
def test_build_loss_each_ablation(variant):
    cfg, head = ablation_config(variant)
    assert head == ABLATIONS[variant]["head"]
    assert head in ("linear", "metric")
    loss_fn = build_loss(cfg, POS_COUNTS, N)
    z, y = _batch(seed=15)
    protos = None
    if head == "metric":
        protos = F.normalize(torch.randn(C, 8, dtype=torch.float64), dim=1)  # (C, D)
    assert torch.isfinite(loss_fn(z, y, prototypes=protos))


def test_ablation_variants_differ_as_named():
    assert ablation_config("bce_head") == (LossConfig(name="bce"), "linear")
    unweighted, _ = ablation_config("metric_unweighted")
    assert not unweighted.image_weighting and not unweighted.category_weighting
    image_only, _ = ablation_config("image_only")
    assert image_only.image_weighting and not image_only.category_weighting
    category_only, _ = ablation_config("category_only")
    assert category_only.category_weighting and not category_only.image_weighting
    assert ablation_config("dual")[0] == LossConfig()
    with pytest.raises(ValueError, match="unknown ablation"):
        ablation_config("nope")


@pytest.mark.parametrize(
    "values,key",
    [
        ({"name": "hinge"}, "train.loss.name"),
        ({"gamma": -1.0}, "gamma"),
        ({"effective_number": True, "beta": 1.0}, "effective_number"),
        ({"separation_margin": 5.0}, "separation_margin"),
        ({"focal_alpha": 1.5}, "focal_alpha"),
        ({"asl_clip": 1.0}, "asl_clip"),
        ({"pos_weight_cap": 0.0}, "pos_weight_cap"),
    ],
)
def test_config_errors_name_the_key(values, key):
    with pytest.raises(ConfigError, match=key):
        build(LossConfig, values, where="train.loss")
