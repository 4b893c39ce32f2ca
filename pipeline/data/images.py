"""Decoding one chest X-ray to 8-bit grayscale: the prepare step's cache, the served model and the
predict component all read images through `decode_image`, so a file scores as it was trained.

Conversion to 8-bit single channel:
    RGBA/RGB/LA/P -> luminance ("L"; NIH's 519 RGBA images have an opaque alpha channel).
    16/32-bit (I;16, I, F) -> linearly scaled from the image's own [min, max] to [0, 255]. Many
    16-bit X-ray PNGs use 10-14 bits of the range, so a fixed `>> 8` would leave them nearly
    black; scaling the actual range keeps their contrast.
    DICOM (the `[dicom]` extra) -> as a viewer shows it: modality LUT, then VOI LUT or window,
    MONOCHROME1 inverted; anything but a single-frame chest radiograph is refused with its reason
    (`pipeline.data.dicom`).
    With a `size`: -> size x size with an antialiasing bicubic filter (Pillow first reduces by an
    integer factor with `Image.reduce`, which is fast and exact for 1024 -> 256). Non-square images
    are stretched, as the NIH images are all square.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.data.dicom import DicomRefused, dicom_size, read_dicom

DICOM_SUFFIXES = frozenset({".dcm", ".dicom"})

ImageSource = str | os.PathLike | bytes | bytearray | memoryview | IO[bytes] | np.ndarray


def decode_image(source: ImageSource, size: int | None = None) -> np.ndarray:
    """One image -> (H, W) uint8 grayscale, or (size, size) when `size` is given.

    Args:
        source: a file path; PNG/JPEG/DICOM bytes or a binary file object; or a uint8 array
            (H, W) / (H, W, 3|4). DICOM is recognised by its `.dcm`/`.dicom` suffix or its `DICM`
            preamble.
        size: side of the square output; None keeps the image's own size.

    Raises:
        ImportError: DICOM input without pydicom, or without the plugin for its compression,
            installed (the message says how to install them).
        DicomRefused: a DICOM file that is not a single-frame chest radiograph (says why).
        OSError, ValueError: an unreadable, truncated or unsupported image (see `classify_error`).
    """
    if isinstance(source, np.ndarray):
        image = _from_array(source)
    elif _is_dicom(source):
        image = Image.fromarray(read_dicom(source))
    else:
        if isinstance(source, (bytes, bytearray, memoryview)):
            source = io.BytesIO(bytes(source))
        with Image.open(source) as img:
            img.load()  # decode now so truncation is raised here, not on first use
            image = to_uint8_gray(img)
            if size is None or image.size == (size, size):
                return np.array(image, dtype=np.uint8)  # a writable copy, independent of the file
    if size is not None and image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=2.0)
    # a writable copy: torch.from_numpy warns on read-only memory
    return np.array(image, dtype=np.uint8)


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) of a PNG/JPEG/DICOM file, from its header: no pixel is decoded."""
    if _is_dicom(path):
        return dicom_size(path)
    with Image.open(path) as img:
        return img.size


def to_uint8_gray(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> mode "L" (see the module docstring for 16-bit scaling)."""
    if img.mode == "L":
        return img
    if img.mode.startswith("I") or img.mode == "F":
        scaled = _own_range(np.asarray(img, dtype=np.float64))
        return Image.fromarray(np.rint(scaled).astype(np.uint8), mode="L")
    if img.mode in ("1", "P", "PA"):
        img = img.convert("RGBA" if "transparency" in img.info or img.mode == "PA" else "RGB")
    return img.convert("L")  # ITU-R 601 luminance; alpha is dropped


def classify_error(exc: BaseException) -> tuple[str, str]:
    """(reason, detail) for a decode failure: missing, unreadable, refused, unsupported, too_large, truncated
    or corrupt."""
    detail = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, DicomRefused):
        return "refused", str(exc)
    if isinstance(exc, ImportError):  # a readable file whose decoder is not installed: not corrupt
        return "unsupported", str(exc)
    if isinstance(exc, FileNotFoundError):
        return "missing", detail
    if isinstance(exc, UnidentifiedImageError):
        return "unreadable", detail
    if isinstance(exc, Image.DecompressionBombError):
        return "too_large", detail
    if isinstance(exc, OSError) and "truncated" in str(exc):
        return "truncated", detail
    return "corrupt", detail


def _from_array(array: np.ndarray) -> Image.Image:
    if array.ndim == 3 and array.shape[-1] in (3, 4):
        return to_uint8_gray(Image.fromarray(array.astype(np.uint8)))
    if array.ndim == 2:
        return to_uint8_gray(Image.fromarray(array))
    raise ValueError(f"an image array must be (H, W) or (H, W, 3|4), got shape {array.shape}")


def _is_dicom(source: ImageSource) -> bool:
    if isinstance(source, (str, os.PathLike)):
        return Path(source).suffix.lower() in DICOM_SUFFIXES
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source[128:132]) == b"DICM"
    return False


def _own_range(a: np.ndarray) -> np.ndarray:
    """Float pixels mapped linearly from their own [min, max] onto [0, 255] (all zeros when flat)."""
    lo, hi = float(a.min()), float(a.max())
    return (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
