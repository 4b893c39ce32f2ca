"""The model bundle (`best.pt`): one typed, versioned file from training to serving.

Training writes it; evaluation, the drift check, the registry's packaging and the served pyfunc
read it, all through `ModelBundle`. On disk it is a torch file holding only tensors and plain
Python values (dicts, lists, str, int, float, bool, None): numpy arrays are stored as tensors and
turned back into arrays when read, so the file loads with `torch.load(weights_only=True)` and
torch's default allow-list (`pipeline.io.load_checkpoint`), and loading it never runs code.

`FORMAT_VERSION` changes whenever the layout does. A file of another version, or one written
before the bundle was versioned, is refused in one line naming the file: retrain it with this
version, or load it with the version that wrote it.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..config import ConfigError, ModelConfig, validate
from ..io import arrays, load_checkpoint, save_checkpoint, storable

FORMAT = "cxr-dwml model bundle"
# 2: the first versioned layout (tensors only, image_size required); unversioned files were 1
# 3: train.model.projector in model_config; a version-2 file is read as the network it was: the
#    metric head with its MLP projection, the linear head on the pooled features
FORMAT_VERSION = 3
READABLE_VERSIONS = (2, 3)
_V2_PROJECTOR = {"metric": "mlp", "linear": "identity"}
RETRAIN = "retrain it with this version (rerun the train step), or load it with the version of cxr-dwml that wrote it"


class BundleError(RuntimeError):
    """A model bundle that this version cannot use; the message names the file and what to do."""


@dataclass(frozen=True)
class ModelBundle:
    """Everything inference needs, in one file.

    Attributes:
        model_config: the `train.model` settings the network was built with.
        model_state: the network's weights (`state_dict`), by parameter name.
        text_vectors: (C, E) float32 label vectors the prototypes are mapped from.
        classes: the class names, in the order of the network's outputs.
        image_size: side of the training cache images: every input is resized to it first.
        crop_size: side of the centre crop the network sees.
        epoch: the training epoch the weights come from.
        val_mean_auc: that epoch's validation mean AUC.
        fingerprint: the settings and inputs of the training run (`components.common.fingerprint`).
        drift_reference: the drift check's reference (`pipeline.serving.drift.Reference.to_dict`
            plus its `settings`), None until the train step attaches it.
    """

    model_config: ModelConfig
    model_state: dict[str, torch.Tensor]
    text_vectors: np.ndarray
    classes: tuple[str, ...]
    image_size: int
    crop_size: int
    epoch: int
    val_mean_auc: float
    fingerprint: str
    drift_reference: dict[str, Any] | None = None

    def replace(self, **changes: Any) -> ModelBundle:
        return dataclasses.replace(self, **changes)

    def to_file(self) -> dict[str, Any]:
        """The dict saved on disk: tensors and plain values only (see the module docstring)."""
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model_config": self.model_config.model_dump(),
            "model_state": self.model_state,
            "text_vectors": torch.from_numpy(np.asarray(self.text_vectors, dtype=np.float32).copy()),
            "classes": list(self.classes),
            "image_size": int(self.image_size),
            "crop_size": int(self.crop_size),
            "epoch": int(self.epoch),
            "val_mean_auc": float(self.val_mean_auc),
            "fingerprint": str(self.fingerprint),
            "drift_reference": storable(self.drift_reference),
        }

    @classmethod
    def from_file(cls, data: dict[str, Any], source: str) -> ModelBundle:
        """The bundle saved by `to_file`; `source` names the file in errors.

        Raises:
            BundleError: another format version, a missing or mistyped field, or settings this
                version does not accept.
        """
        _check_format(data, source)
        try:
            model_config = dict(data["model_config"])
            if data["format_version"] == 2 and "projector" not in model_config:
                model_config["projector"] = _V2_PROJECTOR.get(model_config.get("head"), "mlp")
            config = validate(ModelConfig, model_config, where=f"{source}: model_config")
            bundle = cls(
                model_config=config,
                model_state=_state(data["model_state"]),
                text_vectors=_array(data["text_vectors"]).astype(np.float32),
                classes=tuple(str(c) for c in data["classes"]),
                image_size=_positive(data["image_size"], "image_size"),
                crop_size=_positive(data["crop_size"], "crop_size"),
                epoch=int(data["epoch"]),
                val_mean_auc=float(data["val_mean_auc"]),
                fingerprint=str(data["fingerprint"]),
                drift_reference=arrays(data["drift_reference"]),
            )
        except KeyError as e:
            raise BundleError(f"{source}: model bundle without {e.args[0]!r}; {RETRAIN}") from None
        except ConfigError as e:
            first = str(e).splitlines()[0]
            raise BundleError(f"{first}; the bundle does not fit this version: {RETRAIN}") from None
        except (TypeError, ValueError) as e:
            raise BundleError(f"{source}: model bundle with a malformed field ({e}); {RETRAIN}") from None
        return bundle

    def save(self, path: str | os.PathLike) -> None:
        """Write the bundle atomically: a kill mid-save leaves the old file."""
        save_checkpoint(path, self.to_file())

    @classmethod
    def load(cls, path: str | os.PathLike, map_location: Any = "cpu", mmap: bool = False) -> ModelBundle:
        """Read a bundle without running anything in it (see the module docstring).

        Raises:
            FileNotFoundError: naming `path` when it does not exist.
            RuntimeError: naming `path` when it is damaged, unsafe, of another version or malformed.
        """
        return cls.from_file(load_checkpoint(path, map_location=map_location, mmap=mmap), str(path))


def _check_format(data: dict[str, Any], source: str) -> None:
    if data.get("format") != FORMAT:
        raise BundleError(
            f"{source} is not a versioned model bundle (written before bundles had a format version, "
            f"or not a best.pt at all); {RETRAIN}"
        )
    version = data.get("format_version")
    if version not in READABLE_VERSIONS:
        readable = " and ".join(str(v) for v in READABLE_VERSIONS)
        raise BundleError(
            f"{source} is a model bundle of format version {version!r}; this version of cxr-dwml reads "
            f"versions {readable}: {RETRAIN}"
        )


def _positive(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _state(value: Any) -> dict[str, torch.Tensor]:
    # kept as saved (an OrderedDict with its `_metadata`), which load_state_dict reads
    if not isinstance(value, dict) or not all(isinstance(v, torch.Tensor) for v in value.values()):
        raise TypeError("model_state must map parameter names to tensors")
    return value


def _array(value: Any) -> np.ndarray:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"expected a tensor, got {type(value).__name__}")
    return value.detach().cpu().numpy()
