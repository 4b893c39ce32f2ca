"""Atomic file writes, checksums, file sizes and the checkpoints training writes and reads.

Every output is written to a temporary file beside its destination and renamed into place, so a
crash or a bad input never leaves a half-written file where a complete one is expected. The file
gets the mode a plain `open()` would give it (0666 less the process umask: 0644 under umask 022,
0664 under 002), not the 0600 of `tempfile.mkstemp`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """Open a temporary file next to `path`; on success it replaces `path`, on error it vanishes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = create_temp(path)
    try:
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def create_temp(path: Path) -> tuple[int, str]:
    """Create and open (read-write) a new temporary file beside `path`: (descriptor, its path).

    Like `tempfile.mkstemp` (a fresh name, created exclusively), but with the mode a plain
    `open()` gives, 0666 less the umask, so the file keeps it once renamed to `path`.
    """
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            return os.open(tmp, flags, 0o666), str(tmp)
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {path} after 100 tries; remove its .*.tmp files")


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=False, default=_json_default)
        f.write("\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist: run the step that writes it first") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); delete it and rerun its step") from None


def save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    with atomic_open(path, "wb") as f:
        np.save(f, array)


def save_dataframe(path: str | os.PathLike, df: Any) -> None:
    """Write a pandas DataFrame as CSV or parquet, chosen by the suffix."""
    path = Path(path)
    with atomic_open(path, "wb") as f:
        if path.suffix == ".parquet":
            df.to_parquet(f, index=False)
        else:
            f.write(df.to_csv(index=False, lineterminator="\n").encode("utf-8"))


def file_digest(path: str | os.PathLike, algorithm: str = "md5", chunk: int = 1 << 20) -> str:
    """Hex digest of a file's bytes (MD5 unless `algorithm` names another hashlib algorithm)."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def file_size(path: str | os.PathLike, missing: int = -1) -> int:
    """Size of a file in bytes; `missing` when there is no such file (-1 equals no real size)."""
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return missing


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """torch.save into a temporary file, then rename: a kill mid-save leaves the old checkpoint.

    `state` must hold only what `load_checkpoint` reads back: tensors and plain Python values.
    """
    import torch

    with atomic_open(path, "wb") as f:
        torch.save(state, f)


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu", mmap: bool = False) -> dict[str, Any]:
    """A checkpoint or model bundle that training wrote (`last.pt`, `best.pt`): a dict.

    Read with `weights_only=True` and torch's own allow-list (tensors, dicts, lists, tuples, str,
    int, float, bool, None), which is everything these files hold: a file that needs any other
    type (numpy arrays of an older version, or a crafted object whose unpickling would run code)
    is refused before anything in it runs.

    Args:
        path: the file.
        map_location: where tensors land (torch.load's argument).
        mmap: map the file instead of reading it, for a quick look at a few keys of a big file.

    Raises:
        FileNotFoundError: naming `path` when it does not exist.
        RuntimeError: naming `path` when it is damaged, truncated, unsafe or not a checkpoint.
    """
    import pickle

    import torch

    path = Path(path)
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint {path} not found: run the train step first") from None
    except pickle.UnpicklingError as e:
        raise RuntimeError(_unsafe_message(path, e)) from None
    except Exception as e:  # torch raises several types for a damaged file
        raise RuntimeError(
            f"checkpoint {path} cannot be read ({type(e).__name__}: {_first_line(e)}); "
            "delete it and rerun the train step"
        ) from None
    if not isinstance(obj, dict):
        raise RuntimeError(
            f"checkpoint {path} holds a {type(obj).__name__}, not a training checkpoint; "
            "point to the train step's best.pt or last.pt"
        )
    return obj


def _unsafe_message(path: Path, error: Exception) -> str:
    """One line for a file that the weights-only loader refused, naming what it asked for."""
    import re

    found = re.search(r"GLOBAL ([\w.]+)", str(error))
    needs = f"it needs {found.group(1)}, which" if found else "it holds something that"
    return (
        f"checkpoint {path} was not loaded: {needs} a model file of this version never holds (it was "
        "written by an older version of cxr-dwml, or crafted); nothing in it was run. Retrain with this "
        "version: delete it and rerun the train step"
    )


def _first_line(error: Exception) -> str:
    return next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)


def storable(obj: Any) -> Any:
    """`obj` with every numpy array turned into a tensor and every numpy scalar into a Python one,
    through dicts, lists and tuples: what `torch.load(weights_only=True)` reads back."""
    import torch

    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj).copy())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: storable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(storable(v) for v in obj)
    return obj


def arrays(obj: Any) -> Any:
    """The inverse of `storable`: every tensor in `obj` back to a numpy array."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().numpy()
    if isinstance(obj, dict):
        return {k: arrays(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(arrays(v) for v in obj)
    return obj


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__} to JSON")
