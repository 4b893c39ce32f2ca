"""Models: timm backbones (by name, from a local checkpoint), the metric and linear heads."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from pipeline.classes import CLASSES
from pipeline.config import ConfigError
from pipeline.models import (
    CxrNet,
    LinearHead,
    MetricHead,
    ModelBundle,
    ModelConfig,
    ModelOutput,
    build_model,
    init_prior,
)
from pipeline.models.backbone import create_backbone
from tests.conftest import ROOT, settings

C, E = 14, 16


@pytest.fixture(scope="module")
def text_vectors() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(C, E)).astype(np.float32)  # (C, E)


def tiny_config(name: str = "convnext_atto", head: str = "metric") -> ModelConfig:
    return settings("train.model", {"head": head, "embed_dim": 16, "hidden_dim": 32, "backbone.name": name})


def images(dtype: torch.dtype, batch: int = 3, size: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (batch, 1, size, size), dtype=torch.uint8, generator=g)  # (B, 1, H, W)
    return x if dtype == torch.uint8 else x.float() / 255.0


@pytest.mark.parametrize("name", ["convnext_atto", "convnext_zepto_rms"])
@pytest.mark.parametrize("head", ["metric", "linear"])
def test_forward_shapes_and_finite(name, head, text_vectors):
    torch.manual_seed(0)
    model = build_model(tiny_config(name, head), text_vectors).eval()
    assert isinstance(model.head, MetricHead if head == "metric" else LinearHead)
    with torch.no_grad():
        logits_u8 = model(images(torch.uint8))
        logits_f = model(images(torch.float32))
        out = model(images(torch.uint8), return_embeddings=True)
    assert logits_u8.shape == (3, C) and torch.isfinite(logits_u8).all()
    # uint8 and [0, 1] float input are the same image: the model normalises both alike
    torch.testing.assert_close(logits_u8, logits_f, rtol=1e-4, atol=1e-4)
    assert isinstance(out, ModelOutput)
    torch.testing.assert_close(out.logits, logits_u8)
    if head == "metric":
        assert out.embeddings.shape == (3, 16) and out.prototypes.shape == (C, 16)
        torch.testing.assert_close(out.embeddings.norm(dim=-1), torch.ones(3))
        torch.testing.assert_close(out.prototypes.norm(dim=-1), torch.ones(C))
    else:
        assert out.embeddings is None and out.prototypes is None


def test_grayscale_stem_takes_one_channel(text_vectors):
    model = build_model(tiny_config(), text_vectors)
    assert model.backbone.stem[0].in_channels == 1
    with pytest.raises(RuntimeError):
        model(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


def test_metric_logits_equal_scale_times_radius_minus_distance(text_vectors):
    torch.manual_seed(0)
    head = MetricHead(40, torch.as_tensor(text_vectors), embed_dim=8, hidden_dim=24, init_scale=5.0)
    with torch.no_grad():
        head.radius.copy_(torch.linspace(0.5, 3.5, C))
    pooled = torch.randn(6, 40)  # (B, F)
    out = head(pooled)
    v = F.normalize(head.visual_proj(pooled), dim=-1)  # (B, D)
    s = torch.as_tensor(text_vectors)
    s_bar = F.normalize(s - s.mean(0), dim=-1)  # centred over classes, then unit length
    p = F.normalize(head.text_proj(s_bar), dim=-1)  # (C, D)
    d = ((v[:, None, :] - p[None, :, :]) ** 2).sum(-1)  # (B, C)
    expected = 5.0 * (head.radius[None, :] - d)
    torch.testing.assert_close(out.logits, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(head.scale, torch.tensor(5.0))
    # the scale is learnable and the radius per class: both receive gradients
    out.logits.sum().backward()
    assert head.log_scale.grad is not None and head.radius.grad.shape == (C,)


def test_fixed_scale_is_not_trained(text_vectors):
    head = MetricHead(40, torch.as_tensor(text_vectors), learn_scale=False)
    assert not head.log_scale.requires_grad


def _bert_like_vectors(dim: int = 384, seed: int = 0) -> torch.Tensor:
    """Label vectors sharing one large common direction, as mean-pooled BERT vectors do."""
    g = torch.Generator().manual_seed(seed)
    common = torch.randn(dim, generator=g)
    return 4.0 * common + torch.randn(C, dim, generator=g)  # (C, E), pairwise cosine ~0.9


def _pairwise_cosines(x: torch.Tensor) -> torch.Tensor:
    x = F.normalize(x.double(), dim=-1)
    i, j = torch.triu_indices(len(x), len(x), offset=1)
    return (x @ x.t())[i, j]  # (C (C - 1) / 2,)


@pytest.mark.parametrize("embed_dim,hidden_dim", [(16, 32), (128, 256), (512, 1024)])
def test_prototypes_keep_the_centred_text_geometry_at_init(embed_dim, hidden_dim):
    text = _bert_like_vectors()
    assert _pairwise_cosines(text).mean() > 0.8  # the raw vectors are nearly collinear
    torch.manual_seed(1)
    head = MetricHead(40, text, embed_dim=embed_dim, hidden_dim=hidden_dim)
    with torch.no_grad():
        protos = head.prototypes()  # (C, D)
    centred = _pairwise_cosines(text - text.mean(0))
    ours = _pairwise_cosines(protos)
    assert np.corrcoef(ours.numpy(), centred.numpy())[0, 1] >= 0.95
    assert ours.mean().item() < 0.5
    torch.testing.assert_close(ours, centred, rtol=0, atol=1e-5)  # an isometry, not only correlated


def test_prototypes_move_with_training_from_the_text_start():
    torch.manual_seed(2)
    head = MetricHead(40, _bert_like_vectors(dim=32), embed_dim=16, hidden_dim=32)
    before = head.prototypes().detach()
    loss = head(torch.randn(8, 40)).logits.pow(2).mean()
    loss.backward()
    assert head.text_proj.linear.weight.grad.abs().sum() > 0
    assert head.text_proj.residual[-1].weight.grad.abs().sum() > 0  # the residual learns too
    assert torch.equal(head.prototypes().detach(), before)


def test_distance_logits_are_exact_under_bf16_autocast():
    torch.manual_seed(3)
    head = MetricHead(40, _bert_like_vectors(dim=64), embed_dim=128, hidden_dim=64)
    v = F.normalize(torch.randn(4000, 128), dim=-1)  # (N, D) random unit embeddings
    with torch.no_grad():
        exact = head.logits(v)  # (N, C)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = head.logits(v)
            forward = head(torch.randn(4000, 40)).logits  # the whole head, MLP in bf16
    assert mixed.dtype == torch.float32 and forward.dtype == torch.float32
    torch.testing.assert_close(mixed, exact, rtol=0, atol=1e-4)
    for c in range(C):
        assert torch.unique(mixed[:, c]).numel() >= 3900
        assert torch.unique(forward[:, c]).numel() >= 3900


def test_linear_logits_are_float32_under_bf16_autocast():
    """Validation scores the linear head under autocast too: bf16 logits would tie thousands of images."""
    torch.manual_seed(4)
    head = LinearHead(40, C)
    pooled = torch.randn(4000, 40)  # (N, F)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = head(pooled).logits  # (N, C)
    exact = pooled.double() @ head.fc.weight.double().t() + head.fc.bias.double()  # float64 reference
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed.double(), exact, rtol=0, atol=1e-5)
    for c in range(C):
        assert torch.unique(mixed[:, c]).numel() >= 3900


@pytest.mark.parametrize(("kind", "width"), [("mlp", 16), ("linear", 16), ("identity", 40)])
def test_the_projector_in_front_of_each_head(kind: str, width: int, text_vectors) -> None:
    """train.model.projector: the metric head's space is embed_dim wide behind mlp or linear, the
    backbone's width behind identity; the linear head's layer reads what the projector gives."""
    torch.manual_seed(5)
    metric = MetricHead(40, torch.as_tensor(text_vectors), embed_dim=16, hidden_dim=24, projector_kind=kind)
    out = metric(torch.randn(6, 40))
    assert out.embeddings.shape == (6, width) and out.prototypes.shape == (C, width) and out.logits.shape == (6, C)
    assert torch.allclose(out.embeddings.norm(dim=1), torch.ones(6))
    linear = LinearHead(40, C, kind, hidden_dim=24, embed_dim=16)
    assert linear.fc.in_features == width and linear(torch.randn(6, 40)).logits.shape == (6, C)
    # the plain baseline has no layer in front of fc: its weights are what they were
    assert set(LinearHead(40, C).state_dict()) == {"fc.weight", "fc.bias"}
    with pytest.raises(ValueError, match="projector must be one of mlp, linear, identity"):
        LinearHead(40, C, "conv")


@pytest.mark.parametrize("head", ["metric", "linear"])
@pytest.mark.parametrize("loss_name", ["bce", "dwml"])
def test_init_prior_starts_scores_at_the_loss_stationary_point(head, loss_name, text_vectors):
    from pipeline.losses import build_loss, expected_gradient

    counts = (np.linspace(0.01, 0.4, C) * 1000).astype(int)
    prior = counts / 1000
    loss_fn = build_loss(settings("train.loss", name=loss_name), counts.tolist(), 1000)
    x = images(torch.uint8, batch=16)
    torch.manual_seed(0)
    model = build_model(tiny_config(head=head), text_vectors)
    offset = init_prior(model, loss_fn, prior, x)
    assert model.training  # the prior init must not leave the model in eval mode
    model.eval()
    with torch.no_grad():
        logits = model(x).double()  # (N, C)
    pi = torch.as_tensor(prior)
    grad = expected_gradient(loss_fn, logits, pi, torch.zeros(C, dtype=torch.float64))
    assert grad.abs().max().item() < 1e-5  # each class starts where its expected gradient vanishes
    if loss_name == "bce":  # plain BCE: the mean score is about the prevalence
        scores = torch.sigmoid(logits).mean(0).numpy()
        assert np.abs(scores - prior).mean() < 0.03
    assert offset.shape == (C,)


def test_random_prototypes_replace_the_text_vectors(text_vectors):
    cfg = tiny_config().replace(prototypes="random")
    torch.manual_seed(0)
    model = build_model(cfg, text_vectors)
    assert model.head.text_vectors.shape == text_vectors.shape
    assert not torch.allclose(model.head.text_vectors, torch.as_tensor(text_vectors))
    torch.manual_seed(0)
    again = build_model(cfg, text_vectors)
    assert torch.equal(again.head.text_vectors, model.head.text_vectors)  # drawn from the seed


def test_backbone_from_local_checkpoint_without_network(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(123)
    source = timm.create_model("convnext_atto")  # RGB stem, 1000-class classifier, as published
    path = tmp_path / "convnext_atto.pth"
    torch.save(source.state_dict(), path)
    cfg = settings("train.model.backbone", {"name": "convnext_atto", "checkpoint_path": str(path)})
    loaded = create_backbone(cfg).state_dict()
    src = source.state_dict()
    # in_chans=1: the RGB stem kernel summed over its input channels
    torch.testing.assert_close(loaded["stem.0.weight"], src["stem.0.weight"].sum(1, keepdim=True))
    shared = [k for k in loaded if k != "stem.0.weight"]
    assert shared and all(k in src for k in shared)
    for k in shared:
        torch.testing.assert_close(loaded[k], src[k], msg=k)
    assert not any(k.startswith("head.fc") for k in loaded)  # num_classes=0: no classifier
    fresh = create_backbone(settings("train.model.backbone", {"name": "convnext_atto"})).state_dict()
    assert not torch.equal(fresh["stages.0.blocks.0.conv_dw.weight"], src["stages.0.blocks.0.conv_dw.weight"])


def test_backbone_name_and_checkpoint_are_checked_where_the_backbone_is_built(tmp_path):
    """Validating the settings reads no file and needs no timm; building the backbone names the key."""
    import subprocess
    import sys

    missing = str(tmp_path / "does_not_exist.pth")
    nope = settings("train.model.backbone", {"name": "convnext_nope"})  # valid settings, until built
    with pytest.raises(ConfigError, match=r"^'train\.model\.backbone\.name': unknown timm model name 'convnext_nope'"):
        create_backbone(nope)
    gone = settings("train.model.backbone", {"checkpoint_path": missing})
    with pytest.raises(
        ConfigError, match=r"^'train\.model\.backbone\.checkpoint_path': .*does_not_exist\.pth does not"
    ):
        create_backbone(gone)
    assert settings("train.model.backbone", {"name": "convnext_atto.d2_in1k"}).name == "convnext_atto.d2_in1k"
    check = (
        "import sys; from pipeline.config import load_params; p = load_params('params.yaml'); "
        f"p.train.replace({{'model.backbone.checkpoint_path': {missing!r}}}); "
        "assert 'timm' not in sys.modules and 'torch' not in sys.modules, 'validation imported timm'"
    )
    subprocess.run([sys.executable, "-c", check], cwd=ROOT, check=True)


def bundle_of(cfg: ModelConfig, model: CxrNet, text_vectors: np.ndarray, state: dict | None = None) -> ModelBundle:
    """`model` as training saves it (`state`: other weights in its place)."""
    return ModelBundle(
        model_config=cfg,
        model_state=model.state_dict() if state is None else state,
        text_vectors=text_vectors,
        classes=tuple(CLASSES),
        image_size=32,
        crop_size=32,
        epoch=1,
        val_mean_auc=0.5,
        fingerprint="test",
    )


def test_bundle_round_trip_ignores_a_missing_checkpoint_file(tmp_path, text_vectors):
    from pipeline.models import load_bundle

    path = tmp_path / "weights.pth"
    torch.save(timm.create_model("convnext_atto").state_dict(), path)
    cfg = tiny_config().replace({"backbone.checkpoint_path": str(path)})
    model = build_model(cfg, text_vectors).eval()
    bundle_of(cfg, model, text_vectors).save(tmp_path / "best.pt")
    path.unlink()  # the serving host has only the bundle
    rebuilt, bundle = load_bundle(tmp_path / "best.pt")
    assert isinstance(rebuilt, CxrNet) and not rebuilt.training
    assert bundle.model_config == cfg and bundle.text_vectors.dtype == np.float32
    x = images(torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x))


def test_a_bundle_from_another_model_version_fails_with_its_name(tmp_path, text_vectors):
    from pipeline.models import load_bundle

    cfg = tiny_config()
    model = build_model(cfg, text_vectors)
    # the text projection of an earlier version: a two-layer MLP with other parameter names
    old = {k.replace("text_proj.linear.", "text_proj.0."): v for k, v in model.state_dict().items()}
    path = tmp_path / "best.pt"
    bundle_of(cfg, model, text_vectors, state=old).save(path)
    with pytest.raises(ValueError, match=r"best\.pt: its weights do not fit.*text_proj\.linear\.weight.*retrain"):
        load_bundle(path)
