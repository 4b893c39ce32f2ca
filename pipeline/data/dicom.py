"""A DICOM radiograph as a viewer shows it, and a reason for every file that is not one.

`pipeline.data.images.decode_image` calls `read_dicom` for DICOM input, so prepare, predict and the
served model see the same 8-bit image. The steps are the standard's grayscale pipeline (PS3.4 N.2),
each done by pydicom's own function:
    stored values -> modality LUT (Modality LUT Sequence, else Rescale Slope/Intercept)
    -> VOI LUT (VOI LUT Sequence, else the first Window Center/Width with its VOI LUT Function)
    -> 0..255: the VOI step's own output range (the window's floor and ceiling, or the LUT's lowest
       and highest entry) becomes black..white; without a VOI LUT or window, the image's own
       [min, max], as a viewer's default window does
    -> MONOCHROME1 inverted (its 0 is white).
Colour images (RGB, YBR: screenshots, secondary captures) go to luminance as colour PNGs do.

Only the tags in `TAGS_READ` are parsed (pydicom's `specific_tags`): the values of every other
element (patient, study, series, equipment, ...) are skipped unread, so no name, ID, date or UID
can reach an error, a log or a file this project writes. The file name is all that names an image.

Refused, with `DicomRefused` saying why in one line: objects without pixel data (reports,
presentation states, waveforms), multi-frame objects, modalities other than projection radiography,
a Body Part Examined other than the chest, FOR PROCESSING images (raw detector data, not meant for
display), and colour that is not 8-bit RGB/YBR. A compressed file whose codec is not installed
raises ImportError with the install hint. docs/dicom.md lists the tags read and those ignored.
"""

from __future__ import annotations

import io
import os
import re
from typing import IO, Any

import numpy as np
from PIL import UnidentifiedImageError

# The `[dicom]` extra (pyproject.toml): the served model's pip requirements name them too.
PACKAGES = ("pydicom", "pylibjpeg", "pylibjpeg-openjpeg", "pylibjpeg-rle", "python-gdcm")
INSTALL_HINT = 'pip install -c requirements.lock -e ".[dicom]"'
PYDICOM_MISSING = f"pydicom is not installed: {INSTALL_HINT} (pydicom and its JPEG plugins) to read DICOM files"

# Everything this module looks at; no other element's value is read (docs/dicom.md explains each).
TAGS_READ = (
    "SOPClassUID",
    "Modality",
    "BodyPartExamined",
    "PresentationIntentType",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "PlanarConfiguration",
    "NumberOfFrames",
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "RescaleSlope",
    "RescaleIntercept",
    "ModalityLUTSequence",
    "WindowCenter",
    "WindowWidth",
    "VOILUTFunction",
    "VOILUTSequence",
    "ExtendedOffsetTable",
    "ExtendedOffsetTableLengths",
    "PixelData",
)
# CR, DX and the film digitiser's RG are projection radiographs; DR is a common non-standard code
# for DX; OT ("other") is what secondary captures of radiographs (e.g. NIH's PNGs) carry.
RADIOGRAPHY = frozenset({"CR", "DX", "DR", "RG", "OT"})
CHEST = frozenset({"CHEST", "THORAX", "LUNG"})
GRAY = frozenset({"MONOCHROME1", "MONOCHROME2"})
COLOUR = frozenset({"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT"})
# A VOI LUT's far-away inputs: the window maps them to its floor and ceiling exactly.
_FAR = 1e30


class DicomRefused(ValueError):
    """A DICOM file that is not a chest radiograph the model can score; the message says why and
    what to send instead (the caller names the file or the request row)."""


def read_dicom(source: str | os.PathLike | bytes | bytearray | memoryview | IO[bytes]) -> np.ndarray:
    """One DICOM file or its bytes -> (H, W) uint8, as a viewer displays it (module docstring).

    Raises:
        DicomRefused: not a single-frame chest radiograph (the message says why).
        ImportError: pydicom, or the plugin for the file's compression, is not installed.
        PIL.UnidentifiedImageError: not a DICOM file.
        OSError, ValueError: a damaged file (truncated pixel data, an invalid window, ...).
    """
    pydicom, _ = _pydicom()
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(bytes(source))
    try:
        ds = pydicom.dcmread(source, specific_tags=list(TAGS_READ))
    except pydicom.errors.InvalidDicomError:
        raise UnidentifiedImageError("not a DICOM file (no 'DICM' preamble and file meta header)") from None
    check_radiograph(ds)
    _check_decoder(ds)
    pixels = _pixels(ds)
    if ds.PhotometricInterpretation in COLOUR:
        return _luminance(pixels)
    return display_values(ds, pixels)


def _pixels(ds: Any) -> np.ndarray:
    """The stored values; ImportError when every installed decoder turns the file down, which for
    12-bit JPEG Extended only the GPL-3.0 pylibjpeg-libjpeg (left out of the extra) reads."""
    try:
        return ds.pixel_array
    except RuntimeError as e:
        if "Unable to decode" not in str(e):
            raise
        syntax = ds.file_meta.TransferSyntaxUID.name
        raise ImportError(
            f"no installed decoder reads {ds.get('BitsStored', '?')}-bit {syntax} pixel data; "
            "pylibjpeg-libjpeg does (GPL-3.0, so not in the dicom extra): pip install pylibjpeg-libjpeg"
        ) from None


def dicom_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) of a DICOM file from its Rows and Columns: no pixel is read."""
    pydicom, _ = _pydicom()
    ds = pydicom.dcmread(path, specific_tags=["Rows", "Columns"], stop_before_pixels=True)
    return int(ds.Columns), int(ds.Rows)


def check_radiograph(ds: Any) -> None:
    """Raise DicomRefused unless `ds` is a single-frame chest radiograph for presentation."""
    if "PixelData" not in ds:
        raise DicomRefused(f"holds no image ({_sop_class(ds)}): send the radiograph itself")
    frames = int(ds.get("NumberOfFrames") or 1)
    if frames > 1:
        raise DicomRefused(f"a multi-frame object ({frames} frames): send one single-frame radiograph per file")
    modality = _term(ds.get("Modality"))
    if modality and modality not in RADIOGRAPHY:
        raise DicomRefused(f"Modality is {modality}, not a radiograph ({_listed(RADIOGRAPHY)}): send a chest X-ray")
    body = _term(ds.get("BodyPartExamined"))
    if body and body not in CHEST:
        raise DicomRefused(f"Body Part Examined is {body}, not the chest ({_listed(CHEST)}): send a chest X-ray")
    if _term(ds.get("PresentationIntentType")) == "FOR PROCESSING":
        raise DicomRefused("a FOR PROCESSING image (raw detector data): send the FOR PRESENTATION image")
    photometric = _term(ds.get("PhotometricInterpretation"))
    if photometric not in GRAY | COLOUR:
        raise DicomRefused(f"Photometric Interpretation {photometric or 'missing'} is not grayscale, RGB or YBR")
    if photometric in COLOUR and int(ds.get("BitsAllocated", 8)) != 8:
        raise DicomRefused(f"{ds.BitsAllocated}-bit colour: send the grayscale radiograph")


def display_values(ds: Any, pixels: np.ndarray) -> np.ndarray:
    """Stored grayscale values (H, W) -> (H, W) uint8 through the modality and VOI LUTs of `ds`."""
    _, lut = _pydicom()
    values = lut.apply_modality_lut(pixels, ds)
    if _has_voi_lut(ds):
        values = np.rint(values).astype(np.int64)  # a LUT is indexed by whole input values
        _declare_16bit_entries(ds.VOILUTSequence[0])
    black, white = _display_range(ds, values)
    values = lut.apply_voi_lut(values, ds)
    scaled = np.zeros(values.shape) if white == black else (values - black) * (255.0 / (white - black))
    scaled = np.clip(scaled, 0.0, 255.0)
    if ds.PhotometricInterpretation == "MONOCHROME1":  # 0 is white there
        scaled = 255.0 - scaled
    return np.rint(scaled).astype(np.uint8)


def _display_range(ds: Any, values: np.ndarray) -> tuple[float, float]:
    """The VOI step's outputs for black and for white: pydicom's own function applied to the inputs
    at both ends of its domain, so the range is the one pydicom windows into."""
    _, lut = _pydicom()
    if _has_voi_lut(ds):
        entries, first, _ = ds.VOILUTSequence[0].LUTDescriptor
        out = lut.apply_voi_lut(np.arange(first, first + (entries or 2**16)), ds)
        return float(out.min()), float(out.max())
    if "WindowCenter" in ds and "WindowWidth" in ds:
        with np.errstate(over="ignore"):  # a sigmoid's exp overflows to its exact floor
            black, white = lut.apply_voi_lut(np.array([-_FAR, _FAR]), ds)
        return float(black), float(white)
    return float(values.min()), float(values.max())


def _has_voi_lut(ds: Any) -> bool:
    """As pydicom's `apply_voi_lut` decides: a VOI LUT Sequence with a descriptor and data wins."""
    seq = ds.get("VOILUTSequence")
    return bool(seq) and None not in (seq[0].get("LUTDescriptor"), seq[0].get("LUTData"))


def _declare_16bit_entries(item: Any) -> None:
    """pydicom 3.0.2's `apply_voi` indexes a LUT of 8-bit entries with 8-bit indices, which wrap
    past 255; declared 16-bit, the same entry values are looked up at the right index."""
    descriptor = list(item.LUTDescriptor)
    if descriptor[2] == 8:
        item.LUTDescriptor = [*descriptor[:2], 16]


def _luminance(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (H, W) uint8, as `pipeline.data.images.to_uint8_gray` converts colour PNGs."""
    from PIL import Image

    from pipeline.data.images import to_uint8_gray

    return np.asarray(to_uint8_gray(Image.fromarray(rgb, mode="RGB")))


def _check_decoder(ds: Any) -> None:
    """ImportError naming the install when the file's compression has no decoder installed."""
    _, pixels = _pydicom()
    syntax = ds.file_meta.TransferSyntaxUID
    try:
        decoder = pixels.get_decoder(syntax)
    except NotImplementedError:
        raise DicomRefused(f"pixel data in {syntax.name}, which no DICOM decoder reads") from None
    if not decoder.is_available:
        raise ImportError(f"no decoder for {syntax.name} pixel data is installed: {INSTALL_HINT}")


def _listed(terms: frozenset[str]) -> str:
    return ", ".join(sorted(terms))


def _sop_class(ds: Any) -> str:
    uid = ds.get("SOPClassUID")
    return uid.name if uid is not None and uid.is_valid and uid.name != str(uid) else "an object of unknown class"


def _term(value: Any) -> str:
    """A code string (CS) value, upper-cased, or "" when absent; shown only when it is a plain code,
    so a damaged header cannot put free text into a message."""
    text = str(value or "").strip().upper()
    return text if re.fullmatch(r"[A-Z0-9 _]{0,16}", text) else "(not a code string)"


def _pydicom():
    """(pydicom, pydicom.pixels), or ImportError with the install hint."""
    try:
        import pydicom
        import pydicom.errors
        import pydicom.pixels
    except ImportError as e:
        raise ImportError(PYDICOM_MISSING) from e
    return pydicom, pydicom.pixels
