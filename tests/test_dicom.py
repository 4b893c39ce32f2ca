"""DICOM input on real files: DX files written by pydicom from NIH-style PNGs (8/12/16-bit,
MONOCHROME1/2, rescale, window, VOI LUT; uncompressed, RLE, JPEG 2000 lossless and lossy), the test
files inside the pydicom wheel (JPEG-LS, JPEG Lossless, JPEG baseline and extended, deflate, reports,
waveforms, multi-frame objects), and a folder of DICOMs through the download and prepare steps.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import yaml
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000, MPEG2MPML, ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless

from pipeline.classes import BBOX_CSV, LABEL_CSV_NAMES, TEST_LIST, TRAIN_VAL_LIST
from pipeline.data import dicom
from pipeline.data.images import classify_error, decode_image
from pipeline.data.layout import CACHE_DIR, MANIFEST, QUARANTINE, RAW_IMAGES
from pipeline.data.prepare import prepare
from tests.conftest import (
    ROOT,
    TINY_PARAMS,
    assert_no_identifier,
    deep_update,
    dicom_twins,
    run_env,
    settings,
    write_dicom,
)

BUNDLED = Path(pydicom.__file__).parent / "data" / "test_files"
# what pydicom's plugins encode without loss (pylibjpeg-openjpeg, pylibjpeg-rle); the other
# syntaxes are decode-only there and are tested on the wheel's own files below
LOSSLESS = [ExplicitVRLittleEndian, RLELossless, JPEG2000Lossless]
SIZE = TINY_PARAMS["prepare"]["image_size"]


@pytest.fixture(scope="module")
def films(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small NIH-layout folder of synthetic PNG films (the demo data's generator)."""
    from pipeline.data.synthetic import generate

    raw = tmp_path_factory.mktemp("films")
    generate(raw, settings("download.synthetic", num_images=24, num_patients=8, image_size=64), progress=False)
    return raw


def pngs(films: Path) -> list[Path]:
    return sorted((films / RAW_IMAGES).glob("*.png"))


# ----------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("syntax", LOSSLESS, ids=lambda uid: uid.name)
@pytest.mark.parametrize(
    "twin", ["8-bit window", "12-bit window", "16-bit MONOCHROME1 rescale window", "12-bit VOI LUT"]
)
def test_a_dicom_twin_of_a_png_decodes_to_the_same_pixels(films: Path, tmp_path: Path, twin: str, syntax: str):
    x = decode_image(pngs(films)[0])
    stored, header = dicom_twins(x)[twin]
    path = write_dicom(tmp_path / "film.dcm", stored, syntax, **header)
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == syntax
    np.testing.assert_array_equal(decode_image(path), x)
    np.testing.assert_array_equal(decode_image(path.read_bytes()), x)  # as the served model gets it
    np.testing.assert_array_equal(decode_image(path, SIZE), decode_image(pngs(films)[0], SIZE))


def test_lossy_jpeg_2000_decodes_like_its_uncompressed_twin_within_the_codecs_loss(films: Path, tmp_path: Path):
    x = decode_image(pngs(films)[1])
    stored, header = dicom_twins(x)["12-bit window"]
    plain = decode_image(write_dicom(tmp_path / "plain.dcm", stored, **header)).astype(float)
    lossy_path = write_dicom(tmp_path / "lossy.dcm", stored, JPEG2000, j2k_psnr=[50], **header)
    lossy = decode_image(lossy_path).astype(float)
    mse = np.mean((lossy - plain) ** 2)
    assert mse > 0, "the file should really be lossy"
    # the codec aims at 50 dB on the stored 12-bit values; the window maps them linearly onto 8 bits
    assert 10 * np.log10(255**2 / mse) >= 47
    assert lossy_path.stat().st_size < (tmp_path / "plain.dcm").stat().st_size


@pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT", "SIGMOID"])
@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_a_windowed_file_matches_the_hand_computation(tmp_path: Path, function: str, photometric: str):
    stored = np.random.default_rng(3).integers(0, 4096, (48, 40), dtype=np.uint16)
    slope, intercept, c, w = 1.5, -200.0, 2600.0, 1800.0
    path = write_dicom(
        tmp_path / "w.dcm",
        stored,
        BitsStored=12,
        PhotometricInterpretation=photometric,
        RescaleSlope=slope,
        RescaleIntercept=intercept,
        WindowCenter=c,
        WindowWidth=w,
        VOILUTFunction=function,
    )
    x = stored * slope + intercept  # modality LUT
    if function == "LINEAR":  # PS3.3 C.11.2.1.2.1
        fraction = np.clip((x - (c - 0.5)) / (w - 1) + 0.5, 0, 1)
        fraction[x <= c - 0.5 - (w - 1) / 2] = 0
        fraction[x > c - 0.5 + (w - 1) / 2] = 1
    elif function == "LINEAR_EXACT":  # C.11.2.1.3.2
        fraction = np.clip((x - c) / w + 0.5, 0, 1)
    else:  # SIGMOID, C.11.2.1.3.1
        fraction = 1 / (1 + np.exp(-4 * (x - c) / w))
    expected = 255 * fraction if photometric == "MONOCHROME2" else 255 * (1 - fraction)
    got = decode_image(path).astype(float)
    assert np.abs(got - expected).max() <= 0.5 + 1e-9  # rounding only
    if function != "SIGMOID":
        assert got.min() == 0 and got.max() == 255  # the window clips both ends of this image


def test_without_a_window_the_image_spans_its_own_range(tmp_path: Path):
    stored = np.random.default_rng(4).integers(1000, 1400, (30, 30), dtype=np.uint16)
    got = decode_image(write_dicom(tmp_path / "raw.dcm", stored, BitsStored=12, RescaleSlope=1, RescaleIntercept=0))
    expected = np.rint((stored - 1000.0) * 255 / (stored.max() - 1000.0))
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize(
    ("compressed", "plain", "syntax"),
    [
        ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm", "JPEG-LS Lossless Image Compression"),
        ("MR_small_jp2klossless.dcm", "MR_small.dcm", "JPEG 2000 Image Compression (Lossless Only)"),
        ("MR_small_RLE.dcm", "MR_small.dcm", "RLE Lossless"),
        ("SC_rgb_jpeg_gdcm.dcm", "SC_rgb_rle.dcm", "First-Order Prediction (Process 14 [Selection Value 1])"),
    ],
)
def test_pydicoms_lossless_files_decode_like_their_uncompressed_dicom_twins(
    tmp_path: Path, compressed: str, plain: str, syntax: str
):
    a, b = as_radiograph(compressed, tmp_path), as_radiograph(plain, tmp_path)
    assert syntax in pydicom.dcmread(a).file_meta.TransferSyntaxUID.name
    np.testing.assert_array_equal(decode_image(a), decode_image(b))


def test_pydicoms_jpeg_baseline_file_decodes_like_its_lossless_twin_within_the_codecs_loss():
    lossy = decode_image(BUNDLED / "SC_rgb_jpeg_dcmtk.dcm").astype(float)  # JPEG Baseline, YBR
    exact = decode_image(BUNDLED / "SC_rgb_rle.dcm").astype(float)
    assert 0 < np.mean(np.abs(lossy - exact)) < 2


@pytest.mark.parametrize(
    ("name", "syntax"),
    [
        ("JPEGLSNearLossless_16.dcm", "JPEG-LS Lossy (Near-Lossless) Image Compression"),
        ("image_dfl.dcm", "Deflated Explicit VR Little Endian"),
    ],
)
def test_pydicoms_other_syntaxes_decode(tmp_path: Path, name: str, syntax: str):
    path = as_radiograph(name, tmp_path)
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID.name == syntax
    image = decode_image(path)
    assert image.shape == (ds.Rows, ds.Columns) and image.dtype == np.uint8
    assert image.min() < 64 and image.max() > 192  # stretched over the display range


def as_radiograph(name: str, folder: Path) -> Path:
    """A test file of the pydicom wheel, relabelled DX when it is from another modality (MR, NM):
    the same encoded pixel data, from other encoders than ours (CharLS, GDCM, DCMTK)."""
    ds = pydicom.dcmread(BUNDLED / name)
    if ds.get("Modality", "OT") in dicom.RADIOGRAPHY:
        return BUNDLED / name
    ds.Modality = "DX"
    ds.BodyPartExamined = "CHEST"
    path = folder / name
    ds.save_as(path)
    return path


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("test-SR.dcm", "holds no image (Comprehensive SR Storage): send the radiograph itself"),
        ("reportsi.dcm", "holds no image (Basic Text SR Storage)"),
        ("waveform_ecg.dcm", "holds no image (12-lead ECG Waveform Storage)"),
        ("rtplan.dcm", "holds no image (RT Plan Storage)"),
        ("examples_ybr_color.dcm", "a multi-frame object (30 frames): send one single-frame radiograph per file"),
        ("SC_rgb_rle_2frame.dcm", "a multi-frame object (2 frames)"),
        ("CT_small.dcm", "Modality is CT, not a radiograph (CR, DR, DX, OT, RG): send a chest X-ray"),
        ("liver_1frame.dcm", "Modality is SEG, not a radiograph"),
        ("SC_rgb_rle_16bit.dcm", "16-bit colour: send the grayscale radiograph"),
    ],
)
def test_pydicoms_non_radiographs_are_refused_with_their_reason(name: str, reason: str):
    with pytest.raises(dicom.DicomRefused) as refused:
        decode_image(BUNDLED / name)
    assert str(refused.value).startswith(reason) and "\n" not in str(refused.value)
    assert classify_error(refused.value) == ("refused", str(refused.value))


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        ({"BodyPartExamined": "KNEE"}, "Body Part Examined is KNEE, not the chest (CHEST, LUNG, THORAX)"),
        pytest.param(
            {"BodyPartExamined": "Doe^John 1970"},
            "Body Part Examined is (not a code string), not the chest",
            marks=pytest.mark.filterwarnings("ignore:Invalid value for VR CS"),  # pydicom, writing it
        ),
        ({"Modality": "MG"}, "Modality is MG, not a radiograph"),
        ({"PresentationIntentType": "FOR PROCESSING"}, "a FOR PROCESSING image (raw detector data)"),
        ({"PhotometricInterpretation": "PALETTE COLOR"}, "Photometric Interpretation PALETTE COLOR is not grayscale"),
        ({"NumberOfFrames": 2}, "a multi-frame object (2 frames)"),
    ],
)
def test_a_dx_file_that_is_not_a_single_chest_image_for_display_is_refused(tmp_path: Path, header: dict, reason: str):
    frames = int(header.get("NumberOfFrames", 1))
    path = write_dicom(tmp_path / "x.dcm", np.zeros((8 * frames, 8), np.uint8), **header, Rows=8)
    with pytest.raises(dicom.DicomRefused) as refused:
        decode_image(path)
    assert str(refused.value).startswith(reason)
    assert "Doe" not in str(refused.value)  # free text in a damaged header is never quoted


def test_a_chest_file_without_body_part_or_modality_is_read(tmp_path: Path):
    stored = np.arange(64, dtype=np.uint8).reshape(8, 8)
    path = write_dicom(tmp_path / "x.dcm", stored, BodyPartExamined=None, Modality=None)
    np.testing.assert_array_equal(decode_image(path), np.rint(stored * (255 / 63)))


def test_pixel_data_no_decoder_reads_is_refused(tmp_path: Path):
    path = write_dicom(tmp_path / "video.dcm", np.zeros((8, 8), np.uint8))
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = MPEG2MPML  # a video syntax: no pydicom plugin decodes it
    ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" + bytes(60)])
    ds.save_as(path)
    with pytest.raises(dicom.DicomRefused, match=r"^pixel data in MPEG2 .*, which no DICOM decoder reads$"):
        decode_image(path)


def test_12_bit_jpeg_extended_names_the_decoder_left_out(tmp_path: Path):
    """Only the GPL-3.0 pylibjpeg-libjpeg reads it; the extra leaves it out, so the file is refused
    as unsupported in one line that names it (and is skipped where libjpeg is installed)."""
    if importlib.util.find_spec("libjpeg") is not None:
        pytest.skip("pylibjpeg-libjpeg is installed here: the file decodes")
    with pytest.raises(ImportError, match=r"12-bit JPEG Extended .*pip install pylibjpeg-libjpeg$") as e:
        decode_image(as_radiograph("JPGExtended.dcm", tmp_path))
    assert classify_error(e.value)[0] == "unsupported"


def test_a_file_that_is_not_dicom_is_unreadable(tmp_path: Path):
    (tmp_path / "x.dcm").write_bytes(b"not a DICOM file at all" * 10)
    with pytest.raises(OSError) as e:
        decode_image(tmp_path / "x.dcm")
    assert classify_error(e.value)[0] == "unreadable"


@pytest.mark.parametrize(
    ("blocked", "name", "message"),
    [
        # pydicom not installed at all
        (
            "pydicom",
            "JPEGLSNearLossless_16.dcm",
            'pydicom is not installed: pip install -c requirements.lock -e ".[dicom]"',
        ),
        # pydicom without its JPEG plugins (what `pip install pydicom` alone gives)
        (
            "pylibjpeg,gdcm",
            "JPEGLSNearLossless_16.dcm",
            "no decoder for JPEG-LS Lossy (Near-Lossless) Image Compression",
        ),
    ],
)
def test_a_missing_package_is_named_with_the_install_that_brings_it(blocked: str, name: str, message: str):
    code = (
        "import sys\n"
        f"for name in {blocked!r}.split(','):\n"
        "    sys.modules[name] = None  # as if it were not installed\n"
        "from pipeline.data.images import decode_image\n"
        "try:\n"
        f"    decode_image({str(BUNDLED / name)!r})\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True
    )
    assert message in result.stdout and '".[dicom]"' in result.stdout, result.stdout + result.stderr


# ----------------------------------------------------------------------------- what is read


def test_the_docs_list_every_tag_read():
    text = (ROOT / "docs" / "dicom.md").read_text()
    read = text.split("### Tags read", 1)[1].split("\n### ", 1)[0]
    listed = set(re.findall(r"^\| ([A-Za-z]+) \| \(", read, re.MULTILINE))
    assert listed == set(dicom.TAGS_READ)


# ----------------------------------------------------------------------------- a DICOM source


def dicom_source(films: Path, folder: Path, refused: str) -> Path:
    """`films` as a DICOM source folder: each PNG as one of its DICOM twins (cycling through the
    encodings and the lossless transfer syntaxes), the label and list files naming the .dcm files,
    and the image `refused` written as a knee."""
    (folder / RAW_IMAGES).mkdir(parents=True)
    kinds = [(twin, syntax) for twin in dicom_twins(np.zeros((1, 1), np.uint8)) for syntax in LOSSLESS]
    for i, png in enumerate(pngs(films)):
        stored, header = dicom_twins(decode_image(png))[kinds[i % len(kinds)][0]]
        if png.name == refused:
            header = {**header, "BodyPartExamined": "KNEE"}
        write_dicom(folder / RAW_IMAGES / f"{png.stem}.dcm", stored, kinds[i % len(kinds)][1], instance=i, **header)
    for name in (LABEL_CSV_NAMES[0], TRAIN_VAL_LIST, TEST_LIST, BBOX_CSV):
        (folder / name).write_text((films / name).read_text().replace(".png", ".dcm"))
    return folder


def test_a_dicom_source_prepares_like_its_pngs_and_nothing_written_holds_an_identifier(films: Path, tmp_path: Path):
    refused = pngs(films)[5].name
    source = dicom_source(films, tmp_path / "dicom-source", refused)
    # the PNG twin of the source, with the refused image unreadable there, so both quarantine it
    png_raw = Path(shutil.copytree(films, tmp_path / "png-raw"))
    (png_raw / RAW_IMAGES / refused).write_bytes(b"not a PNG")
    prepare(png_raw, tmp_path / "png-prepared", settings("prepare", image_size=SIZE, workers=1), progress=False)

    work = tmp_path / "work"  # everything the two steps write: data, MLflow store and artifacts
    work.mkdir()
    params = deep_update(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY_PARAMS)
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    env = run_env(work, PYTHONPATH=str(ROOT))
    logs = ""
    for step in (
        ["download", "--source", str(source), "--out", "raw"],
        ["prepare", "--raw", "raw", "--out", "prepared"],
    ):
        cmd = [sys.executable, "-m", f"components.{step[0]}", *step[1:], "--params", "params.yaml", "--no-progress"]
        result = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        logs += result.stdout + result.stderr

    dcm_cache = (work / "prepared" / CACHE_DIR / f"images_{SIZE}.u8").read_bytes()
    assert dcm_cache == (tmp_path / "png-prepared" / CACHE_DIR / f"images_{SIZE}.u8").read_bytes()
    manifest = pd.read_csv(work / "prepared" / MANIFEST)
    assert manifest["image"].str.endswith(".dcm").all()
    png_manifest = pd.read_csv(tmp_path / "png-prepared" / MANIFEST)
    pd.testing.assert_frame_equal(manifest.assign(image=manifest["image"].str.replace(".dcm", ".png")), png_manifest)
    quarantine = pd.read_csv(work / "prepared" / QUARANTINE)
    assert quarantine.to_dict("records") == [
        {
            "image": refused.replace(".png", ".dcm"),
            "reason": "refused",
            "detail": "Body Part Examined is KNEE, not the chest (CHEST, LUNG, THORAX): send a chest X-ray",
        }
    ]
    # the MLflow store and the artifacts the two steps logged are among the files read
    assert (work / "mlflow.db").is_file() and list((work / "mlartifacts").rglob(QUARANTINE))
    assert_no_identifier(work, logs, inputs=source / RAW_IMAGES)
