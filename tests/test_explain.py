"""Explanation maps and the localisation measures, on constructed inputs whose answer is known.

The quadrant tests build a network whose class evidence sits in one known quadrant: a backbone whose
first channel is the local brightness (4 x 4 average pooling) and second a constant, under the real
metric head (its visual projection set so that brightness moves an embedding towards one class's
prototype) or a linear head. The image is bright in one quadrant only.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.classes import CLASSES
from pipeline.evaluation.explain import (
    Explainer,
    box_iobb,
    box_iou,
    box_mask,
    dense_model,
    explainer,
    overlay,
    pointing_hit,
    pointing_tolerance,
)
from pipeline.evaluation.heatmaps import gallery_findings, gallery_images
from pipeline.models import CxrNet, LinearHead, MetricHead, build_model
from tests.conftest import settings

SIZE = 32
TARGET = 4  # the class whose evidence is in the bright quadrant


class BrightnessBackbone(nn.Module):
    """Two channels per 4 x 4 cell: mean brightness, and 1; timm's forward_features/forward_head."""

    num_features = 2

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        bright = F.avg_pool2d(x, 4)  # (B, 1, H/4, W/4)
        return torch.cat([bright, torch.ones_like(bright)], dim=1)  # (B, 2, h, w)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x.mean(dim=(2, 3))  # (B, 2)


def metric_head() -> MetricHead:
    """The real head, its projection sending brightness towards prototype TARGET."""
    torch.manual_seed(0)
    head = MetricHead(2, torch.randn(len(CLASSES), 8), embed_dim=6, hidden_dim=2)
    p = head.prototypes().detach()  # (C, D)
    other = torch.randn(6)
    other = F.normalize(other - (other @ p[TARGET]) * p[TARGET], dim=0)  # orthogonal to p_target
    with torch.no_grad():
        first, last = head.visual_proj[0], head.visual_proj[2]
        first.weight.copy_(torch.eye(2))
        first.bias.zero_()
        last.weight.copy_(torch.stack([p[TARGET], other], dim=1))  # (D, 2)
        last.bias.zero_()
    return head


def linear_head() -> LinearHead:
    head = LinearHead(2, len(CLASSES))
    with torch.no_grad():
        head.fc.weight.zero_()
        head.fc.weight[TARGET, 0] = 3.0
        head.fc.bias.zero_()
    return head


def quadrant_image(quadrant: int) -> torch.Tensor:
    """(1, 1, SIZE, SIZE) in [0, 1]: dim everywhere, bright in quadrant 0..3 (row-major)."""
    x = torch.full((1, 1, SIZE, SIZE), 0.1)
    half = SIZE // 2
    r, c = divmod(quadrant, 2)
    x[..., r * half : (r + 1) * half, c * half : (c + 1) * half] = 0.9
    return x


def peak_quadrant(heat: torch.Tensor) -> int:
    row, col = np.unravel_index(int(torch.argmax(heat)), heat.shape)
    return int(row >= SIZE // 2) * 2 + int(col >= SIZE // 2)


@pytest.mark.parametrize("quadrant", range(4))
@pytest.mark.parametrize("head", ["metric", "linear"])
def test_maps_peak_in_the_quadrant_holding_the_evidence(quadrant: int, head: str) -> None:
    model = CxrNet(BrightnessBackbone(), metric_head() if head == "metric" else linear_head(), 0.0, 1.0).eval()
    maps = Explainer(model, 32).maps(quadrant_image(quadrant), torch.tensor([[TARGET]]))
    cam = maps["gradcam"][0, 0]  # (H, W)
    assert cam.shape == (SIZE, SIZE) and float(cam.min()) == 0.0 and float(cam.max()) == 1.0
    assert peak_quadrant(cam) == quadrant
    if head == "metric":
        proto = maps["prototype"][0, 0]
        assert proto.shape == (SIZE, SIZE) and float(proto.max()) == 1.0
        assert peak_quadrant(proto) == quadrant
    else:
        assert maps["prototype"] is None


def test_prototype_map_is_the_heads_own_score_of_each_location() -> None:
    """A uniform image: every location is the whole image, so each cell scores the image's logit."""
    model = CxrNet(BrightnessBackbone(), metric_head(), 0.0, 1.0).eval()
    from pipeline.evaluation.explain import prototype_scores

    x = torch.full((1, 1, SIZE, SIZE), 0.6)
    cells = prototype_scores(model, model.forward_features(x), torch.tensor([[TARGET, 0]]))  # (1, 2, 8, 8)
    logits = model(x)[0, [TARGET, 0]]
    torch.testing.assert_close(cells[0, :, 3, 5], logits.detach())


def test_dense_backbone_keeps_the_networks_features_on_its_grid() -> None:
    """Output stride 16: the same weights, dilated, give the network's own features at every other cell."""
    torch.manual_seed(0)
    cfg = settings("train.model", {"embed_dim": 16, "hidden_dim": 32, "backbone.name": "convnext_atto"})
    model = build_model(cfg, np.random.default_rng(0).normal(size=(len(CLASSES), 16))).eval()
    dense = dense_model(model, 16)
    x = torch.rand(1, 1, 128, 128)
    with torch.no_grad():
        coarse, fine = model.forward_features(x), dense.forward_features(x)  # (1, F, 4, 4), (1, F, 8, 8)
    assert fine.shape[-1] == 2 * coarse.shape[-1]
    torch.testing.assert_close(fine[..., ::2, ::2], coarse, atol=1e-4, rtol=1e-4)
    assert explainer(model, 224).output_stride == 32  # 7 x 7 at ConvNeXt's native size: the network itself
    small = explainer(model, 56)
    assert small.output_stride == 8 and small.model.forward_features(torch.rand(1, 1, 56, 56)).shape[-1] == 7


def test_pointing_game_and_iou_by_hand() -> None:
    heat = np.zeros((6, 6))
    heat[1, 2] = 1.0  # the peak: row 1, column 2
    heat[1, 3] = heat[2, 2] = heat[2, 3] = 0.6
    assert pointing_hit(heat, np.array([[2, 1, 1, 1]]), 0.0)  # x 2..3, y 1..2 holds pixel centre (2.5, 1.5)
    assert not pointing_hit(heat, np.array([[3, 1, 2, 2]]), 0.0)
    assert pointing_hit(heat, np.array([[4, 4, 1, 1], [1.9, 0.9, 1, 1]]), 0.0)  # any of several boxes
    # active = the 2 x 2 block at rows 1-2, columns 2-3; box = rows 2-3, columns 1-3 (6 px); overlap 2
    box = np.array([[1, 2, 3, 2]])
    assert box_mask(heat.shape, box).sum() == 6
    assert box_iou(heat, box, 0.5) == pytest.approx(2 / 8)
    assert box_iou(heat, box, 1.0) == pytest.approx(0 / 7)


def _nearest_box_distance(point: tuple[float, float], boxes: np.ndarray) -> float:
    """Brute force: the least distance from `point` (x, y) to a fine grid of points in the boxes."""
    best = np.inf
    for x0, y0, w, h in boxes:
        xs, ys = np.meshgrid(np.linspace(x0, x0 + w, 401), np.linspace(y0, y0 + h, 401))
        best = min(best, float(np.hypot(xs - point[0], ys - point[1]).min()))
    return best


def test_pointing_game_tolerance_is_15_px_at_224_scaled_to_the_crop() -> None:
    assert pointing_tolerance(224, 15.0) == 15.0 and pointing_tolerance(56, 15.0) == pytest.approx(3.75)
    tolerance = pointing_tolerance(56, 15.0)
    boxes = np.array([[30.0, 20.0, 10.0, 8.0]])
    rng = np.random.default_rng(0)
    for _ in range(200):  # peaks anywhere: a hit exactly when the brute-force distance is within it
        row, col = rng.integers(0, 56, 2)
        heat = rng.random((56, 56)) * 0.5
        heat[row, col] = 1.0
        distance = _nearest_box_distance((col + 0.5, row + 0.5), boxes)
        if abs(distance - tolerance) > 0.05:  # the grid's resolution
            assert pointing_hit(heat, boxes, tolerance) == (distance <= tolerance), (row, col, distance)
    heat = np.zeros((56, 56))
    heat[24, 26] = 1.0  # 3.5 px left of the box: a hit within 3.75 px, a miss without tolerance
    assert pointing_hit(heat, boxes, tolerance) and not pointing_hit(heat, boxes, 0.0)


def test_a_flat_map_points_nowhere() -> None:
    """A flat map's argmax is pixel (0, 0): it must not score a hit for a box in the corner."""
    corner = np.array([[0.0, 0.0, 10.0, 10.0]])
    for flat in (np.zeros((32, 32)), np.full((32, 32), 0.7), np.full((32, 32), np.nan)):
        assert not pointing_hit(flat, corner, pointing_tolerance(32, 15.0))
    peaked = np.zeros((32, 32))
    peaked[3, 4] = 1.0
    assert pointing_hit(peaked, corner, 0.0)


def test_iobb_is_the_share_of_the_detected_boxes_inside_the_truth() -> None:
    """Wang et al.'s IoBB against a hand count: two regions, each replaced by its bounding box."""
    heat = np.zeros((20, 20))
    heat[2, 2] = heat[4, 5] = heat[3, 3] = heat[3, 4] = 0.9  # one 8-connected region: box rows 2-4, cols 2-5
    heat[12:14, 15:18] = 0.8  # a second region: rows 12-13, cols 15-17
    truth = np.array([[2.0, 2.0, 2.0, 3.0]])  # pixel centres in cols 2-3, rows 2-4: 6 px
    detected = 3 * 4 + 2 * 3  # the two bounding boxes: 12 + 6 px
    assert box_iobb(heat, truth, 0.5) == pytest.approx(6 / detected)
    assert box_iou(heat, truth, 0.5) == pytest.approx(2 / (6 + 10 - 2))  # IoU counts the map's own pixels
    whole = np.array([[0.0, 0.0, 20.0, 20.0]])
    assert box_iobb(heat, whole, 0.5) == 1.0  # every detected pixel is inside: small detections are not punished
    assert box_iobb(np.zeros((20, 20)), whole, 0.5) == 0.0  # nothing detected


def test_gallery_is_drawn_at_random_by_seed_whatever_the_model_predicted() -> None:
    names = [f"{i:03d}.png" for i in range(40)]
    boxed = {"005.png", "017.png", "033.png"}
    rows = gallery_images(names, boxed, 6, seed=1)
    assert {names[i] for i in rows[:3]} == boxed and len(set(rows)) == 6  # boxed first, in a random order
    assert rows == gallery_images(names, boxed, 6, seed=1) and rows != gallery_images(names, boxed, 6, seed=2)
    draws = [gallery_images(names, set(), 4, seed) for seed in range(300)]
    counts = np.bincount(np.concatenate(draws), minlength=40)
    assert counts.min() > 10  # every image is drawn now and then, not only the model's surest


def test_gallery_findings_show_false_positives_and_misses() -> None:
    target = np.zeros(len(CLASSES))
    target[[0, 3, 9]] = 1.0
    probs = np.full(len(CLASSES), 0.05)
    probs[[0, 2, 3, 9]] = [0.9, 0.8, 0.1, 0.45]
    thresholds = np.full(len(CLASSES), 0.5)
    findings = gallery_findings(target, probs, thresholds, top_k=2)
    assert findings == [(0, "true positive"), (2, "false positive"), (9, "missed"), (3, "missed")]
    thresholds[2] = np.nan  # validation could not choose one: no outcome, only the label
    assert gallery_findings(target, probs, thresholds, top_k=2)[1] == (2, "negative")


def test_overlay_is_colour_on_the_grey_image() -> None:
    image = np.full((56, 56), 128, np.uint8)
    heat = np.zeros((56, 56), np.float32)
    heat[:28, :28] = 1.0
    rgb = overlay(image, heat)
    assert rgb.shape == (224, 224, 3) and rgb.dtype == np.uint8
    hot, cold = rgb[20, 20].astype(int), rgb[200, 200].astype(int)
    assert hot[0] > hot[2] and cold[2] > cold[0]  # jet: red where the map is 1, blue where it is 0
