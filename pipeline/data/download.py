"""Fetch ChestX-ray14 (or a synthetic stand-in) into the NIH layout.

Every source ends in the same folder::

    out_dir/
      images/*.png                   (or DICOM: *.dcm, *.dicom, named so in the label CSV)
      Data_Entry_2017_v2020.csv      (or Data_Entry_2017.csv)
      train_val_list.txt, test_list.txt
      BBox_List_2017.csv             NIH's lesion boxes, when the source has them (optional)
      archives/                      the verified tar.gz files, only with keep_archives
      checksums.json                 every file's relative path -> md5 and size, written last
      .fetch/                        resume state: extraction markers, S3 ETags, hash cache, and
                                     source.json, the source that filled the folder

`DownloadConfig.source` picks where the files come from:

- `synthetic`: `pipeline.data.synthetic.generate` draws a small dataset (no network).
- `nih`: the 12 archives from NIH Box, verified against the published MD5s, plus the label CSV
  and split lists from `nih.metadata_url` (NIH serves those from a folder page, not links).
- `s3://bucket/prefix`: a mirror holding the archives, or `images/*.png` (or `.dcm`), plus the
  metadata files.
- `http(s)://host/path`: a mirror laid out like NIH (archives and metadata files side by side).
- a local folder laid out like NIH: copied into `out_dir`, never hard-linked (`sources.copy_file`);
  a link to outside the folder is refused (`inside`).

A rerun skips what is complete and verified; an interrupted transfer resumes where it stopped.

Example::

    summary = fetch(DownloadConfig(source="s3://my-bucket/chestxray14"), Path("data/raw"))
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from pipeline.classes import BBOX_CSV, LABEL_CSV_NAMES, TEST_LIST, TRAIN_VAL_LIST
from pipeline.config import DownloadConfig, NIHConfig
from pipeline.data.archives import ARCHIVE_DIR, STATE_DIR, ArchiveJob, fetch_archives
from pipeline.data.layout import RAW_IMAGES, RAW_SUFFIXES
from pipeline.data.sources import (
    DownloadError,
    HttpRemote,
    NotFound,
    S3Object,
    S3Remote,
    Transfer,
    copy_file,
    parallel,
)
from pipeline.data.synthetic import generate
from pipeline.io import file_digest, file_size, read_json, write_json
from pipeline.progress import progress_bar
from pipeline.tracking import redact_uri

log = logging.getLogger(__name__)

MANIFEST = "checksums.json"
SOURCE_RECORD = "source.json"  # in STATE_DIR: which source filled the folder
# written beside the data by the download component (its settings and MLflow run), not data
STEP_RECORDS = ("download_config.json", "mlflow_run.json")
LIST_FILES = (TRAIN_VAL_LIST, TEST_LIST)
# Part of the NIH release but not needed to train: a source without them is not an error.
OPTIONAL_FILES = (BBOX_CSV,)
NIH_METADATA_PAGE = "https://nihcc.app.box.com/v/ChestXray-NIHCC"
# NIH Box ids and published MD5s of images_001.tar.gz .. images_012.tar.gz, in order.
NIH_BOX_IDS = (
    "vfk49d74nhbxq3nqjg0900w5nvkorp5c",
    "i28rlmbvmfjbl8p2n3ril0pptcmcu9d1",
    "f1t00wrtdk94satdfb9olcolqx20z2jp",
    "0aowwzs5lhjrceb3qp67ahp0rd1l1etg",
    "v5e3goj22zr6h8tzualxfsqlqaygfbsn",
    "asi7ikud9jwnkrnkj99jnpfkjdes7l6l",
    "jn1b4mw4n6lnh74ovmcjb8y48h8xj07n",
    "tvpxmn7qyrgl0w8wfh9kqfjskv6nmm1j",
    "upyy3ml7qdumlgk2rfcvlb9k6gvqq2pj",
    "l6nilvfa9cg3s28tqv1qc1olm3gnz54p",
    "hhq8fkdgvcari67vfhs7ppg2w6ni4jze",
    "ioqwiy20ihqwyr8pf4c24eazhh281pbu",
)
NIH_MD5 = (
    "fe8ed0a6961412fddcbb3603c11b3698",
    "ab07a2d7cbe6f65ddd97b4ed7bde10bf",
    "2301d03bde4c246388bad3876965d574",
    "9f1b7f5aae01b13f4bc8e2c44a4b8ef6",
    "1861f3cd0ef7734df8104f2b0309023b",
    "456b53a8b351afd92a35bc41444c58c8",
    "1075121ea20a137b87f290d6a4a5965e",
    "b61f34cec3aa69f295fbb593cbd9d443",
    "442a3caa61ae9b64e61c561294d1e183",
    "09ec81c4c31e32858ad8cf965c494b74",
    "499aefc67207a5a97692424cf5dbeed5",
    "dc9fda1757c2de0032b63347a7d2895c",
)


def archive_name(number: int) -> str:
    """1 -> 'images_001.tar.gz'."""
    return f"images_{number:03d}.tar.gz"


def selected_archives(nih: NIHConfig) -> list[tuple[int, str, str]]:
    """(number, file name, md5) of each archive `nih` asks for; all when `archives` is empty."""
    numbers = nih.archives or range(1, len(nih.md5) + 1)
    return [(i, archive_name(i), nih.md5[i - 1].lower()) for i in numbers]


def check_source(cfg: DownloadConfig) -> None:
    """Raise DownloadError when `cfg.source` cannot be fetched as configured."""
    if cfg.source == "nih" and not cfg.nih.metadata_url:
        raise DownloadError(
            "download.nih.metadata_url is empty. NIH serves Data_Entry_2017_v2020.csv, "
            f"{TRAIN_VAL_LIST} and {TEST_LIST} from the folder page {NIH_METADATA_PAGE}, "
            "not from direct links: download them into a folder (or to a URL prefix) and "
            "set download.nih.metadata_url to it"
        )
    if source_kind(cfg.source) == "dir" and not Path(cfg.source).is_dir():
        raise DownloadError(
            f"download.source {redact_uri(cfg.source)!r} is neither synthetic, nih, an s3:// or http(s):// URL, "
            "nor an existing folder"
        )


def source_kind(source: str) -> str:
    """'synthetic', 'nih', 's3', 'http' or 'dir'."""
    if source in ("synthetic", "nih"):
        return source
    if source.startswith("s3://"):
        return "s3"
    if source.startswith(("http://", "https://")):
        return "http"
    return "dir"


def fetch(cfg: DownloadConfig, out_dir: Path, progress: bool = True) -> dict[str, Any]:
    """Bring the dataset from `cfg.source` into `out_dir` (NIH layout) and write its manifest.

    Args:
        cfg: the download config.
        out_dir: the output folder; what a previous run from the same source completed there is
            verified and kept. A folder another source filled is emptied first (`claim_folder`).
        progress: show a tqdm bar (bytes and rate) and print the summary line.

    Returns:
        A summary: source, files, bytes, transferred bytes, seconds, MB/s, archives fetched and
        skipped, the source whose files were removed first (or None), and the summary line.

    Raises:
        DownloadError: naming the file, URL or key that failed and what to do.
        UnsafeArchiveError: naming the archive member that was refused (unsafe, outside images/,
            a label or list file, or colliding with another member or a file already there).
        DamagedArchiveError: naming the archive that ends early or is corrupt.
    """
    check_source(cfg)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    replaced = claim_folder(out_dir, dataset_id(cfg))
    (out_dir / MANIFEST).unlink(missing_ok=True)  # present only when the folder is complete
    start = time.perf_counter()
    kind = source_kind(cfg.source)
    bar = progress_bar(
        total=0, unit="B", unit_scale=True, desc=f"fetch {kind}", disable=not progress, dynamic_ncols=True
    )
    xfer = Transfer(cfg.retries, cfg.backoff_s, cfg.timeout_s, bar.update, lambda n: _grow(bar, n))
    fetchers = {
        "synthetic": _fetch_synthetic,
        "nih": _fetch_http,
        "http": _fetch_http,
        "s3": _fetch_s3,
        "dir": _fetch_dir,
    }
    try:
        report = fetchers[kind](cfg, out_dir, xfer, progress)
    finally:
        bar.close()
    _check_layout(out_dir, cfg.source)
    report["box_file"] = BBOX_CSV if (out_dir / BBOX_CSV).is_file() else None
    report["replaced_source"] = replaced
    manifest = write_manifest(out_dir, cfg.workers, report.pop("hashes", {}))
    return _summary(cfg.source, manifest, xfer.bytes, time.perf_counter() - start, report, progress)


def source_id(source: str) -> str:
    """How a source is recorded and compared: a local folder by its real path, a URL without the
    credentials or tokens in it (the same data whoever reads it)."""
    if source_kind(source) == "dir":
        return str(Path(source).resolve())
    return redact_uri(source)


def dataset_id(cfg: DownloadConfig) -> str:
    """What fills the folder: `source_id` of the source; for the synthetic source, every setting
    that changes its files (another shape, size or seed is another dataset, whose names overlap)."""
    if source_kind(cfg.source) != "synthetic":
        return source_id(cfg.source)
    return "synthetic " + " ".join(f"{k}={v}" for k, v in cfg.synthetic.model_dump().items())


def claim_folder(out_dir: Path, source: str) -> str | None:
    """Record in `out_dir` that `source` (a `dataset_id`) fills it; empty it first when another did.

    Files are kept between runs so that a download resumes; but a label file or an image left by
    another source would be taken as this one's (a label file present is not fetched again), and
    pair one dataset's images with the other's labels. The record (`.fetch/source.json`) lies in
    the folder, so a versioned copy of the folder carries its own. A folder from before the record
    existed is recognised by the `download_config.json` the download step writes; one with neither
    is kept.

    Returns:
        The other source, whose files were removed; None when there was none.
    """
    record = out_dir / STATE_DIR / SOURCE_RECORD
    new = source
    old = _recorded_source(out_dir)
    if old is not None and old != new:
        log.warning(
            "%s held the dataset from %s; download.source is now %s: removing those files first (a "
            "versioned copy stays in its cache)",
            out_dir,
            old,
            new,
        )
        _remove_dataset(out_dir)
    write_json(record, {"source": new})
    return old if old != new else None


def _recorded_source(out_dir: Path) -> str | None:
    record, legacy = out_dir / STATE_DIR / SOURCE_RECORD, out_dir / STEP_RECORDS[0]
    if record.is_file():
        return read_json(record).get("source")
    if legacy.is_file():
        source = read_json(legacy).get("download", {}).get("source")
        return source_id(source) if isinstance(source, str) else None
    return None


def _remove_dataset(out_dir: Path) -> None:
    """Remove what a download writes in `out_dir` (the NIH layout, its state and records); any
    other file there is left alone."""
    for name in (RAW_IMAGES, STATE_DIR, ARCHIVE_DIR):
        shutil.rmtree(out_dir / name, ignore_errors=True)
    for name in (*LABEL_CSV_NAMES, *LIST_FILES, *OPTIONAL_FILES, MANIFEST, *STEP_RECORDS):
        (out_dir / name).unlink(missing_ok=True)


def _grow(bar, n: int) -> None:
    bar.total += n
    bar.refresh()


def _fetch_synthetic(cfg: DownloadConfig, out_dir: Path, xfer: Transfer, progress: bool) -> dict:
    workers = max(1, min(cfg.workers, os.cpu_count() or 1))
    return {"synthetic": generate(out_dir, cfg.synthetic, progress=progress, workers=workers)}


def _fetch_http(cfg: DownloadConfig, out_dir: Path, xfer: Transfer, progress: bool) -> dict:
    """NIH's own Box links (source 'nih') or a mirror's base URL, plus the metadata files."""
    nih = cfg.nih
    remote = HttpRemote(nih.base_url if cfg.source == "nih" else cfg.source, xfer)
    fetch_metadata(_getter(nih.metadata_url or cfg.source, cfg, xfer), out_dir)
    jobs = []
    for i, name, md5 in selected_archives(nih):
        box = cfg.source == "nih"
        url = nih.base_url.format(id=nih.box_ids[i - 1]) if box else remote.url(name)
        jobs.append(ArchiveJob(name, md5, functools.partial(remote.fetch_url, url, md5=md5)))
    return fetch_archives(jobs, out_dir, cfg.workers, cfg.keep_archives)


# --- metadata ---------------------------------------------------------------------------------

Getter = Callable[[str, Path], None]  # copies one named file to a path, or raises NotFound


def fetch_metadata(get: Getter, out_dir: Path) -> list[str]:
    """Fetch the label CSV (v2020, else 2017), both list files and the box file unless already present.

    The box file (BBox_List_2017.csv) is optional: a source without it is logged, not refused.
    """
    fetched = []
    if not any((out_dir / name).exists() for name in LABEL_CSV_NAMES):
        for name in LABEL_CSV_NAMES:
            try:
                get(name, out_dir / name)
                fetched.append(name)
                break
            except NotFound as e:
                missing = e
        else:
            raise DownloadError(f"no label CSV ({' or '.join(LABEL_CSV_NAMES)}): {missing}")
    for name in LIST_FILES:
        if not (out_dir / name).exists():
            get(name, out_dir / name)
            fetched.append(name)
    for name in OPTIONAL_FILES:
        if not (out_dir / name).exists():
            try:
                get(name, out_dir / name)
                fetched.append(name)
            except NotFound:
                log.warning("%s is not at the source: the localisation check will report it as not available", name)
    return fetched


def _getter(location: str, cfg: DownloadConfig, xfer: Transfer) -> Getter:
    kind = source_kind(location)
    if kind == "http":
        return HttpRemote(location, xfer).fetch
    if kind == "s3":
        remote = _s3_remote(location, cfg, xfer)
        return _s3_getter(remote, remote.list())
    folder = Path(location)
    if not folder.is_dir():
        raise DownloadError(
            f"metadata location {redact_uri(location)!r} is not a URL or an existing folder; "
            "set download.nih.metadata_url"
        )

    def get(name: str, dest: Path) -> None:
        if not (folder / name).exists():
            raise NotFound(f"{folder / name} does not exist")
        copy_file(inside(folder, folder / name), dest)

    return get


# --- S3 ---------------------------------------------------------------------------------------


def _s3_remote(url: str, cfg: DownloadConfig, xfer: Transfer) -> S3Remote:
    s3 = cfg.s3
    return S3Remote(url, xfer, s3.endpoint_url, s3.anonymous, s3.region, s3.profile)


def _s3_getter(remote: S3Remote, objects: dict[str, S3Object]) -> Getter:
    def get(name: str, dest: Path) -> None:
        if name not in objects:
            raise NotFound(f"{remote.where(name)} does not exist")
        remote.fetch(objects[name], dest)

    return get


def _fetch_s3(cfg: DownloadConfig, out_dir: Path, xfer: Transfer, progress: bool) -> dict:
    """A bucket prefix holding the NIH archives, or the images already extracted."""
    remote = _s3_remote(cfg.source, cfg, xfer)
    objects = remote.list()
    if cfg.nih.metadata_url:
        fetch_metadata(_getter(cfg.nih.metadata_url, cfg, xfer), out_dir)
    else:
        fetch_metadata(_s3_getter(remote, objects), out_dir)
    wanted = selected_archives(cfg.nih)
    if any(name in objects for _, name, _ in wanted):
        missing = [name for _, name, _ in wanted if name not in objects]
        if missing:
            raise DownloadError(
                f"{redact_uri(cfg.source)}: missing {', '.join(missing)}; upload them or list the archives "
                "the bucket holds in download.nih.archives"
            )
        jobs = [
            ArchiveJob(name, md5, functools.partial(remote.fetch, objects[name], md5=md5)) for _, name, md5 in wanted
        ]
        return fetch_archives(jobs, out_dir, cfg.workers, cfg.keep_archives)
    images = {rel: o for rel, o in objects.items() if rel.startswith(f"{RAW_IMAGES}/") and _is_image(rel)}
    if not images:
        raise DownloadError(
            f"{redact_uri(cfg.source)}: holds neither NIH archives ({wanted[0][1]} ...) nor "
            f"{RAW_IMAGES}/*.png (or .dcm); check download.source"
        )
    return _fetch_s3_images(remote, images, out_dir, cfg)


def _fetch_s3_images(remote: S3Remote, images: dict[str, S3Object], out_dir: Path, cfg: DownloadConfig) -> dict:
    """Copy extracted images object by object; one whose size and ETag match is skipped."""
    etag_file = out_dir / STATE_DIR / "s3_etags.json"
    etags: dict[str, str] = read_json(etag_file) if etag_file.exists() else {}

    def one(item: tuple[str, S3Object]) -> bool:
        rel, obj = item
        dest = out_dir / rel
        if file_size(dest) == obj.size and etags.get(rel) == obj.etag:
            return False
        remote.fetch(obj, dest)
        etags[rel] = obj.etag  # dict item assignment is atomic under the GIL
        return True

    try:
        done = parallel(one, images.items(), cfg.workers)
    finally:
        write_json(etag_file, etags)
    return {"objects_fetched": sum(done), "objects_skipped": len(done) - sum(done)}


# --- local folder -----------------------------------------------------------------------------


def _fetch_dir(cfg: DownloadConfig, out_dir: Path, xfer: Transfer, progress: bool) -> dict:
    """A local folder laid out like NIH: images copied, or archives extracted in place.

    Every file is checked before anything is copied: one that is, or lies under, a link to outside
    the source folder is refused (`inside`).
    """
    src = Path(cfg.source)
    # NIH's extracted layout, Kaggle's images_001/images/*.png, and a hospital's images/*.dcm.
    images = [p for p in (*src.glob(f"{RAW_IMAGES}/*"), *src.glob(f"images_*/{RAW_IMAGES}/*")) if _is_image(p.name)]
    files = {p.name: inside(src, p) for p in images}
    if files:
        fetch_metadata(_getter(cfg.nih.metadata_url or str(src), cfg, xfer), out_dir)
        return _copy_images(files, out_dir, cfg.workers, xfer)
    archives = [(name, md5, src / name) for _, name, md5 in selected_archives(cfg.nih) if (src / name).exists()]
    jobs = [ArchiveJob(name, md5, local=inside(src, path)) for name, md5, path in archives]
    if not jobs:
        raise DownloadError(
            f"{src}: holds neither {RAW_IMAGES}/*.png (or .dcm) nor NIH archives ({archive_name(1)} ...); "
            "check download.source"
        )
    fetch_metadata(_getter(cfg.nih.metadata_url or str(src), cfg, xfer), out_dir)
    return fetch_archives(jobs, out_dir, cfg.workers, cfg.keep_archives)


def inside(root: Path, path: Path) -> Path:
    """`path` with its links resolved, which must be a regular file inside the folder `root`.

    A link inside a local source may point anywhere on the machine (a private key, another
    user's data): copying what it points at would put that file into the output folder, and from
    there into every copy made of it.

    Raises:
        DownloadError: naming `path` when it, or a folder on its way, links outside `root`, or
            it is not a regular file.
    """
    real = path.resolve()
    if not real.is_relative_to(root.resolve()):
        raise DownloadError(
            f"{path}: a link to outside the source folder {root}; only files inside it are copied. "
            "Replace the link by the file itself, or remove it"
        )
    if not real.is_file():
        raise DownloadError(f"{path}: not a regular file; a local source holds only files and folders")
    return real


def _copy_images(files: dict[str, Path], out_dir: Path, workers: int, xfer: Transfer) -> dict:
    """Copy each image (name -> its real path in the source); a copy already there is skipped."""

    def one(item: tuple[str, Path]) -> str:
        name, src = item
        dest = out_dir / RAW_IMAGES / name
        if dest.exists() and (os.path.samefile(src, dest) or _same_copy(src, dest)):
            return "skipped"
        copy_file(src, dest)
        xfer.count(src.stat().st_size)
        return "copied"

    xfer.add_total(sum(p.stat().st_size for p in files.values()))
    done = parallel(one, files.items(), workers)
    return {f"images_{k}": done.count(k) for k in ("copied", "skipped")}


def _is_image(name: str) -> bool:
    """A PNG or DICOM file name (`pipeline.data.layout.RAW_SUFFIXES`)."""
    return name.lower().endswith(RAW_SUFFIXES)


def _same_copy(a: Path, b: Path) -> bool:
    sa, sb = a.stat(), b.stat()
    return sa.st_size == sb.st_size and sa.st_mtime_ns == sb.st_mtime_ns  # copy_file keeps mtime


# --- layout check, manifest, summary ----------------------------------------------------------


def _check_layout(out_dir: Path, source: str) -> None:
    missing = [name for name in LIST_FILES if not (out_dir / name).is_file()]
    if not any((out_dir / name).is_file() for name in LABEL_CSV_NAMES):
        missing.append(" or ".join(LABEL_CSV_NAMES))
    if not any(_is_image(p.name) for p in (out_dir / RAW_IMAGES).glob("*")):
        missing.append(f"{RAW_IMAGES}/*.png (or .dcm)")
    if missing:
        raise DownloadError(
            f"{out_dir}: after fetching from {redact_uri(source)!r}, missing "
            f"{', '.join(missing)}; check that the source is laid out like NIH"
        )


def write_manifest(out_dir: Path, workers: int = 4, known: dict[str, tuple[int, str]] | None = None) -> dict[str, dict]:
    """Write `checksums.json`: every file's relative path -> {md5, size}.

    Args:
        out_dir: the dataset folder.
        workers: threads hashing files (hashlib releases the GIL on large reads).
        known: (size, md5) of files hashed while they were written, e.g. during extraction.

    A cache in `.fetch/hashes.json` keyed on size and mtime spares a rerun from hashing 45 GB
    again; state, partial and corrupt files are left out.
    """
    known = known or {}
    cache_file = out_dir / STATE_DIR / "hashes.json"
    cache: dict[str, list] = read_json(cache_file) if cache_file.exists() else {}
    entries: dict[str, list] = {}
    todo = []
    for path in _dataset_files(out_dir):
        rel = path.relative_to(out_dir).as_posix()
        st = path.stat()
        if rel in known and known[rel][0] == st.st_size:
            entries[rel] = [st.st_size, st.st_mtime_ns, known[rel][1]]
        elif cache.get(rel, [None, None])[:2] == [st.st_size, st.st_mtime_ns]:
            entries[rel] = cache[rel]
        else:
            todo.append((rel, path, st))
    for rel, md5, st in parallel(lambda t: (t[0], file_digest(t[1]), t[2]), todo, workers):
        entries[rel] = [st.st_size, st.st_mtime_ns, md5]
    write_json(cache_file, entries)
    manifest = {rel: {"md5": e[2], "size": e[0]} for rel, e in sorted(entries.items())}
    write_json(out_dir / MANIFEST, manifest)
    return manifest


def _dataset_files(out_dir: Path) -> Iterable[Path]:
    for root, dirs, files in os.walk(out_dir):
        if Path(root) == out_dir:
            dirs[:] = [d for d in dirs if d != STATE_DIR]
        for name in files:
            if Path(root) == out_dir and name in (MANIFEST, *STEP_RECORDS):
                continue
            if name.endswith((".part", ".corrupt", ".tmp")):
                continue
            yield Path(root) / name


def _summary(
    source: str, manifest: dict, transferred: int, seconds: float, report: dict, progress: bool
) -> dict[str, Any]:
    source = redact_uri(source)  # the line is printed and logged; the summary may be recorded
    total = sum(e["size"] for e in manifest.values())
    images = sum(rel.startswith(f"{RAW_IMAGES}/") for rel in manifest)
    rate = transferred / 1e6 / max(seconds, 1e-9)
    size = functools.partial(tqdm.format_sizeof, suffix="B")
    line = (
        f"fetch {source}: {len(manifest)} files ({images} images, {size(total)}); "
        f"transferred {size(transferred)} in {seconds:.1f} s ({rate:.2f} MB/s)"
    )
    log.info(line)
    if progress:
        print(line, flush=True)
    return {
        "source": source,
        "files": len(manifest),
        "images": images,
        "bytes": total,
        "transferred_bytes": transferred,
        "seconds": round(seconds, 3),
        "mb_per_s": round(rate, 3),
        **report,
        "line": line,
    }
