"""Where the network looked: Grad-CAM and the metric head's prototype-distance map.

Two maps per (image, class), both on the backbone's last feature map (the last ConvNeXt stage):

- **Grad-CAM** (Selvaraju et al. 2017): the last stage's channels weighted by the spatial mean of
  the class logit's gradient, summed, ReLU. Works with either head.
- **Prototype map** (metric head only; the method's own explanation): every location's feature is
  passed through the same pooling head, visual projection and normalisation the pooled feature
  goes through, as if the image were that one location, and scored against the class prototype
  with the head's own logit `k (r_c - ||v - p_c||^2)`. Hot = close to the class prototype.

Both are upsampled (bilinear) to the input size and scaled to [0, 1] per map (min to max); a flat
map is all zeros, and points nowhere in the pointing game. They show *where*, not how much: the
probabilities say how much.

Resolution: a ConvNeXt's last stage has stride 32, 7 x 7 cells at its native 224 px but a single
cell at the demo's 56 px crops, where no map could point anywhere. `explainer` therefore runs the
backbone at the coarsest output stride (32, 16 or 8) that gives at least `MIN_MAP_CELLS` cells per
side: timm's `output_stride` dilates the last stages instead of striding, with the same weights, so
the features on the coarser grid are exactly the network's own (checked in tests) and the cells in
between are the same filters evaluated at the in-between positions. The pooled logit of that dense
network averages more positions than the network's, so the maps explain a close relative of the
scored logit whenever the stride is below 32; `Explainer.output_stride` records which one ran.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..models import CxrNet, MetricHead

# ConvNeXt's last-stage grid at its native 224 px input: maps at least this fine, per side.
MIN_MAP_CELLS = 7
METHODS = ("gradcam", "prototype")
DISPLAY_SIZE = 224  # overlays are drawn at least this large, so a 56 px crop is legible


@dataclass
class Explainer:
    """The network whose last feature map the maps are computed on.

    Attributes:
        model: the network (sharing head and weights with the scored one), eval mode.
        output_stride: the backbone's stride at its last feature map (32: the scored network itself).
    """

    model: CxrNet
    output_stride: int

    @property
    def has_prototypes(self) -> bool:
        return isinstance(self.model.head, MetricHead)

    def maps(self, images: torch.Tensor, classes: torch.Tensor) -> dict[str, torch.Tensor | None]:
        """Grad-CAM and prototype maps of `classes` (B, K) class indices for images (B, 1, H, W).

        Returns:
            {"gradcam": (B, K, H, W), "prototype": (B, K, H, W) or None for a linear head}, in [0, 1].
        """
        with torch.no_grad():  # gradients are taken from the last feature map onwards only
            feats = self.model.forward_features(images.to(self.model.mean.device))  # (B, F, h, w)
        size = tuple(images.shape[-2:])
        cam = normalise(upsample(gradcam(self.model, feats, classes), size))
        proto = prototype_scores(self.model, feats.detach(), classes) if self.has_prototypes else None
        return {"gradcam": cam, "prototype": None if proto is None else normalise(upsample(proto, size))}


def explainer(model: CxrNet, crop_size: int) -> Explainer:
    """An `Explainer` for `model` at inputs of `crop_size` px (see the module docstring on stride)."""
    for stride in (32, 16, 8):
        if _cells(crop_size, stride) >= MIN_MAP_CELLS:
            break
    if stride == 32:
        return Explainer(model, 32)
    return Explainer(dense_model(model, stride), stride)


def _cells(size: int, stride: int) -> int:
    """Side of a ConvNeXt's last map at `size` px: the stem divides by 4, each later stride-2 stage by 2."""
    cells = size // 4
    for _ in range(int(np.log2(stride // 4))):
        cells //= 2
    return cells


def dense_model(model: CxrNet, output_stride: int) -> CxrNet:
    """`model` with its timm backbone rebuilt at `output_stride` (dilated), same weights, same head."""
    import timm

    backbone = model.backbone
    arch = backbone.pretrained_cfg["architecture"]
    dense = timm.create_model(arch, pretrained=False, num_classes=0, in_chans=1, output_stride=output_stride)
    dense.load_state_dict(backbone.state_dict())
    net = CxrNet(dense, model.head, float(model.mean.flatten()[0]), float(model.std.flatten()[0]))
    return net.to(model.mean.device).eval()


def gradcam(model: nn.Module, feats: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Grad-CAM (B, K, h, w) of the logits of `classes` (B, K) on the last feature map feats (B, F, h, w)."""
    feats = feats.detach().float().requires_grad_(True)
    with torch.enable_grad():
        logits = model.forward_head(feats).float()  # (B, C)
        chosen = logits.gather(1, classes.to(logits.device))  # (B, K)
        cams = []
        for k in range(chosen.shape[1]):
            (grad,) = torch.autograd.grad(chosen[:, k].sum(), feats, retain_graph=k + 1 < chosen.shape[1])
            weights = grad.mean(dim=(2, 3), keepdim=True)  # (B, F, 1, 1): each channel's importance
            cams.append(F.relu((weights * feats).sum(dim=1)))  # (B, h, w)
    return torch.stack(cams, dim=1).detach()  # (B, K, h, w)


@torch.no_grad()
def prototype_scores(model: CxrNet, feats: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """The metric head's logit k (r_c - ||v - p_c||^2) of each location alone: (B, K, h, w).

    Each location's feature (F,) goes through the backbone's pooling head as a 1 x 1 map (pooling a
    single cell is the identity, the norm is the same), then through the head's visual projection.
    """
    b, f, h, w = feats.shape
    cells = feats.float().permute(0, 2, 3, 1).reshape(b * h * w, f, 1, 1)  # (B h w, F, 1, 1)
    pooled = model.backbone.forward_head(cells, pre_logits=True)  # (B h w, F)
    head: MetricHead = model.head
    v = head.embed(pooled)  # (B h w, D)
    z = head.logits(v)  # (B h w, C), the head's own k (r - d)
    z = z.reshape(b, h, w, -1).permute(0, 3, 1, 2)  # (B, C, h, w)
    index = classes.to(z.device)[:, :, None, None].expand(-1, -1, h, w)
    return z.gather(1, index)  # (B, K, h, w)


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, K, h, w) -> (B, K, H, W), bilinear (cells are centred on their receptive fields)."""
    return F.interpolate(maps.float(), size=size, mode="bilinear", align_corners=False)


def normalise(maps: torch.Tensor) -> torch.Tensor:
    """Each map (.., H, W) scaled to [0, 1], min to max; a flat map becomes zeros."""
    lo = maps.amin(dim=(-2, -1), keepdim=True)
    span = maps.amax(dim=(-2, -1), keepdim=True) - lo
    return torch.where(span > 0, (maps - lo) / span.clamp_min(1e-12), torch.zeros_like(maps))


# --- rendering --------------------------------------------------------------------------------


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """A jet colormap of heat (H, W) in [0, 1] over a grey image (H, W) uint8: (H', W', 3) uint8.

    Drawn at least `DISPLAY_SIZE` px (an integer multiple, bicubic for the image, bilinear for the map).
    """
    from PIL import Image

    factor = max(1, -(-DISPLAY_SIZE // max(image.shape)))
    size = (image.shape[1] * factor, image.shape[0] * factor)
    grey = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BICUBIC), dtype=np.float32) / 255.0
    hot = np.asarray(Image.fromarray(heat.astype(np.float32), mode="F").resize(size, Image.Resampling.BILINEAR))
    colour = jet(hot)  # (H', W', 3)
    mixed = (1 - alpha) * grey[..., None] + alpha * colour
    return np.clip(mixed * 255 + 0.5, 0, 255).astype(np.uint8)


def jet(x: np.ndarray) -> np.ndarray:
    """A jet colormap (blue, cyan, yellow, red) of x in [0, 1]: (...) -> (..., 3) floats in [0, 1].

    Piecewise linear, in numpy: the served model draws overlays without matplotlib.
    """
    x = np.clip(x, 0.0, 1.0)[..., None]
    return np.clip(1.5 - np.abs(4.0 * x - np.array([3.0, 2.0, 1.0])), 0.0, 1.0)


def png_bytes(rgb: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def overlay_base64(image: np.ndarray, heat: np.ndarray) -> str:
    """`overlay` as base64 text of a PNG, as the served model returns it."""
    return base64.b64encode(png_bytes(overlay(image, heat))).decode("ascii")


# --- localisation -----------------------------------------------------------------------------


def box_mask(shape: tuple[int, int], boxes: np.ndarray) -> np.ndarray:
    """(H, W) bool: the union of boxes (n, 4) x, y, w, h in pixels; a pixel is in when its centre is."""
    h, w = shape
    ys, xs = np.arange(h)[:, None] + 0.5, np.arange(w)[None, :] + 0.5
    mask = np.zeros(shape, dtype=bool)
    for x0, y0, bw, bh in np.asarray(boxes, dtype=np.float64).reshape(-1, 4):
        mask |= (xs >= x0) & (xs <= x0 + bw) & (ys >= y0) & (ys <= y0 + bh)
    return mask


# The pointing game's tolerance (Zhang et al. 2016, "Top-down neural attention by excitation
# backprop"): a hit within 15 pixels of a box at 224 px, scaled with the crop (`pointing_tolerance`).
POINTING_REFERENCE_SIDE = 224


def pointing_tolerance(crop_size: int, px_at_224: float) -> float:
    """The pointing game's tolerance in pixels of a `crop_size` image, from pixels at 224 px."""
    return px_at_224 * crop_size / POINTING_REFERENCE_SIDE


def pointing_hit(heat: np.ndarray, boxes: np.ndarray, tolerance: float) -> bool:
    """Pointing game: is the map's maximum (the first, in row-major order) within `tolerance` pixels
    of a box (distance from the pixel centre to the nearest box edge; 0 inside)?

    A flat map (no variation, or not finite) points nowhere and is a miss: its "maximum" would be
    pixel (0, 0), which says nothing about the image.
    """
    if not np.isfinite(heat).all() or heat.max() <= heat.min():
        return False
    row, col = np.unravel_index(int(np.argmax(heat)), heat.shape)
    cx, cy = col + 0.5, row + 0.5
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)  # (n, 4) x, y, w, h
    dx = np.maximum.reduce([b[:, 0] - cx, np.zeros(len(b)), cx - (b[:, 0] + b[:, 2])])
    dy = np.maximum.reduce([b[:, 1] - cy, np.zeros(len(b)), cy - (b[:, 1] + b[:, 3])])
    return bool((np.hypot(dx, dy) <= tolerance).any())


def box_iou(heat: np.ndarray, boxes: np.ndarray, threshold: float) -> float:
    """IoU of {heat >= threshold} with the union of boxes; 0 when both are empty."""
    active, inside = heat >= threshold, box_mask(heat.shape, boxes)
    union = int((active | inside).sum())
    return float((active & inside).sum() / union) if union else 0.0


def detected_boxes(heat: np.ndarray, threshold: float) -> np.ndarray:
    """(H, W) bool: the union of the bounding boxes of the connected regions of {heat >= threshold},
    as Wang et al. 2017 turn a heatmap into boxes (8-connected regions)."""
    from scipy import ndimage

    labels, _ = ndimage.label(heat >= threshold, structure=np.ones((3, 3), dtype=bool))
    mask = np.zeros(heat.shape, dtype=bool)
    for rows, cols in ndimage.find_objects(labels):
        mask[rows, cols] = True
    return mask


def box_iobb(heat: np.ndarray, boxes: np.ndarray, threshold: float) -> float:
    """IoBB (Wang et al. 2017, ChestX-ray8): the share of the detected boxes' area that lies in the
    ground-truth boxes, |detected & truth| / |detected|; 0 when the map detects nothing.

    Unlike IoU it does not punish a detection for being smaller than the box: Wang et al. count a
    localisation correct when IoBB exceeds T(IoBB) (0.1 to 0.9).
    """
    detected = detected_boxes(heat, threshold)
    area = int(detected.sum())
    return float((detected & box_mask(heat.shape, boxes)).sum() / area) if area else 0.0
