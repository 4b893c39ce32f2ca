"""The resized uint8 image cache: every PNG decoded once, then read by memory map every epoch.

Layout under `cache_dir`:
    images_<size>.u8     raw uint8 array (N, size, size), row i = `index.json["images"][i]`
    index.json           size, count, dtype, shape, file order, fingerprint, complete, failures
    chunks_<size>/<k>.json  done-marker of chunk k (rows k*chunk_size ...), with its failures

Decoding a 1024 px PNG costs tens of milliseconds, far more than a GPU step needs per image, so
training reads this cache instead. A build is skipped when the fingerprint (file names, sizes and
modification times, the target size and the conversion version) matches a complete cache, and an
interrupted build resumes: chunks with a done-marker are kept, the rest are decoded again. A chunk's
marker is written only after its rows are flushed, so a crash never marks unwritten rows done.

Rows are written through a memory map, where a full disk kills the writing process (SIGBUS)
instead of raising: so the data file's blocks are allocated before any row is written, and a full
disk (ENOSPC, or a quota) ends the build in a NoSpaceError that names the folder, the space still
needed and the space free; a rerun resumes.

A build writes rows in place, so it first replaces a data file that is shared (a hard link, e.g.
into a content-addressed store) or read-only by a private copy: it never writes through a link.
`publish_cache` puts a complete cache elsewhere as hard links to its files: the prepare step builds
(and resumes) its cache in a work folder that outlives the step's output folder, then publishes
it there.

Conversion to 8-bit single channel at size x size: `pipeline.data.images.decode_image` (16-bit
images scaled from their own range, DICOM as a viewer windows it, colour to luminance, antialiased
bicubic resize).
Unreadable or truncated files are quarantined with their reason (never raise); their rows stay zero.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import errno
import hashlib
import json
import os
import shutil
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from pipeline.data.images import classify_error, decode_image
from pipeline.data.layout import CACHE_INDEX
from pipeline.io import file_size, read_json, write_json
from pipeline.progress import progress_bar

# Bump when the conversion changes, so existing caches are rebuilt.
CONVERSION_VERSION = 2  # 2: DICOM through its modality and VOI LUTs
DTYPE = "uint8"


@dataclass
class CacheResult:
    """What `build_cache` did: the rows it failed on and whether it decoded anything."""

    path: Path
    size: int
    count: int
    failures: dict[int, tuple[str, str]] = field(default_factory=dict)  # row -> (reason, detail)
    skipped: bool = False
    complete: bool = True
    chunks_built: int = 0


def cache_file(cache_dir: Path, size: int) -> Path:
    return Path(cache_dir) / f"images_{size}.u8"


def decode_or_reason(path: Path, size: int) -> tuple[np.ndarray | None, tuple[str, str] | None]:
    try:
        if path.stat().st_size == 0:
            return None, ("empty", "file has 0 bytes")
        return decode_image(path, size), None
    except Exception as e:  # any decoder error quarantines one file instead of failing the run
        return None, classify_error(e)


def fingerprint(paths: list[Path], size: int) -> str:
    """Hash of the target size, conversion version and each file's name, size and mtime."""
    h = hashlib.sha256(f"v{CONVERSION_VERSION}|size={size}|n={len(paths)}".encode())
    for p in paths:
        try:
            st = p.stat()
            h.update(f"|{p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
        except FileNotFoundError:
            h.update(f"|{p.name}:missing".encode())
    return h.hexdigest()


def build_cache(
    paths: list[Path],
    cache_dir: Path,
    size: int,
    workers: int = 2,
    chunk_size: int = 256,
    progress: bool = True,
    max_chunks: int | None = None,
) -> CacheResult:
    """Decode `paths` once into `cache_dir/images_<size>.u8`, in order.

    Args:
        paths: image files; row i of the cache is paths[i].
        cache_dir: folder of the cache (created).
        size: output side length in pixels.
        workers: processes decoding chunks in parallel (1 decodes in this process).
        chunk_size: images per task and per done-marker.
        progress: show a tqdm bar.
        max_chunks: stop after building this many chunks, leaving the cache incomplete but
            resumable (to bound a run's time, and to test resumption).

    Returns:
        A CacheResult; `failures` maps a row to its (reason, detail).
    """
    cache_dir = Path(cache_dir)
    paths = [Path(p) for p in paths]
    fp = fingerprint(paths, size)
    data_path = cache_file(cache_dir, size)
    marker_dir = cache_dir / f"chunks_{size}"
    index = _read_index(cache_dir)
    expected_bytes = len(paths) * size * size
    with _disk_full_named(cache_dir, lambda: _still_needed(data_path, len(paths), size, chunk_size)):
        if not (index and index.get("fingerprint") == fp and file_size(data_path) == expected_bytes):
            _start_fresh(cache_dir, data_path, marker_dir, paths, size, fp, chunk_size)
            index = _read_index(cache_dir)
        chunk_size = int(index["chunk_size"])  # resume with the chunking the build began with
        num_chunks = -(-len(paths) // chunk_size)
        all_marked = all(_marker_path(marker_dir, k).exists() for k in range(num_chunks))
        if index.get("complete") and all_marked:
            failures = _failures_from_json(index["failures"])
            return CacheResult(data_path, size, len(paths), failures, skipped=True)
        if index.get("complete"):  # markers were removed: say so before rebuilding those chunks
            _write_index(cache_dir, paths, size, fp, chunk_size, False, _failures_from_json(index["failures"]))
        return _fill(paths, data_path, marker_dir, size, fp, chunk_size, workers, progress, max_chunks)


class NoSpaceError(OSError):
    """The disk holding the image cache is full; the message names the folder and the space needed."""


@contextlib.contextmanager
def _disk_full_named(folder: Path, needed: Callable[[], int]) -> Iterator[None]:
    """Turn a full disk (ENOSPC, or a quota: EDQUOT) into a NoSpaceError naming `folder`, the space
    the cache still `needed` there and what is free."""
    try:
        yield
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        free = shutil.disk_usage(_existing(folder)).free
        raise NoSpaceError(
            f"{folder}: no space left on the device for the image cache: it needs about {_size(needed())} more "
            f"there, {_size(free)} is free. Free space on that disk (or build the cache on another one) and "
            "rerun: the chunks already built are kept"
        ) from None


def _still_needed(data_path: Path, count: int, size: int, chunk_size: int) -> int:
    """Bytes the cache has yet to take on its disk: the data file's blocks not yet allocated, plus
    room for the index (a line per image) and a block per done-marker."""
    try:
        held = os.stat(data_path).st_blocks * 512
    except FileNotFoundError:
        held = 0
    return max(count * size * size - held, 0) + count * 64 + -(-count // chunk_size) * 4096


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _size(n: int) -> str:
    return tqdm.format_sizeof(n, suffix="B")


def _start_fresh(
    cache_dir: Path, data_path: Path, marker_dir: Path, paths: list[Path], size: int, fp: str, chunk_size: int
) -> None:
    cache_dir.mkdir(parents=True, exist_ok=True)
    # a cache of another size or input set is stale; at full scale each one is gigabytes
    for old in cache_dir.glob("images_*.u8"):
        old.unlink()
    for old in cache_dir.glob("chunks_*"):
        shutil.rmtree(old, ignore_errors=True)
    with open(data_path, "wb") as f:
        f.truncate(len(paths) * size * size)  # sparse zeros; rows are filled in place
    marker_dir.mkdir(parents=True)
    _write_index(cache_dir, paths, size, fp, chunk_size, complete=False, failures={})


def _fill(
    paths: list[Path],
    data_path: Path,
    marker_dir: Path,
    size: int,
    fp: str,
    chunk_size: int,
    workers: int,
    progress: bool,
    max_chunks: int | None,
) -> CacheResult:
    n = len(paths)
    starts = list(range(0, n, chunk_size))
    _own(data_path)
    _reserve(data_path, n * size * size)
    failures: dict[int, tuple[str, str]] = {}
    todo = []
    for k, start in enumerate(starts):
        done = _read_marker(marker_dir, k)
        if done is None:
            todo.append((k, start))
        else:
            failures.update(done)
    if max_chunks is not None:
        todo = todo[:max_chunks]
    bar = progress_bar(
        total=n,
        initial=n - sum(min(chunk_size, n - s) for _, s in todo),
        unit="img",
        desc=f"cache {size}px",
        disable=not progress,
    )
    jobs = [(str(data_path), n, size, start, [str(p) for p in paths[start : start + chunk_size]]) for _, start in todo]
    for (k, start), chunk_failures in zip(todo, _run(jobs, workers)):
        failures.update(chunk_failures)
        _write_marker(marker_dir, k, chunk_failures)
        bar.update(min(chunk_size, n - start))
    bar.close()
    complete = all(_read_marker(marker_dir, k) is not None for k in range(len(starts)))
    _write_index(data_path.parent, paths, size, fp, chunk_size, complete, failures)
    return CacheResult(data_path, size, n, dict(sorted(failures.items())), False, complete, len(todo))


def _own(path: Path) -> None:
    """Make `path` safe to write in place: a file with other names (a hard link into a
    content-addressed store, or a published copy) or without write permission is replaced by a
    private, writable copy."""
    st = path.stat()
    if st.st_nlink == 1 and st.st_mode & stat.S_IWUSR:
        return
    tmp = path.with_name(f".{path.name}.own")
    shutil.copyfile(path, tmp)  # a new file: its own inode, this process's default mode
    os.replace(tmp, path)


def _reserve(path: Path, nbytes: int) -> None:
    """Allocate the data file's blocks before any row is written. Rows go in through a memory map,
    and a write into a page the disk has no room for kills the writing process (SIGBUS) instead of
    raising ENOSPC; allocated up front, a full disk is an error here, with the folder named."""
    if os.stat(path).st_blocks * 512 >= nbytes or not hasattr(os, "posix_fallocate"):
        return
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a file system that cannot: write as before
            raise
    finally:
        os.close(fd)


def publish_cache(cache_dir: str | Path, dest: str | Path) -> None:
    """Put the complete cache of `cache_dir` at `dest`: its index, data file and done-markers, as
    hard links (copies where the file system has none), gathered beside `dest`, then renamed into
    place. Nothing else in `cache_dir` (a half-written temporary file, another size) goes along.

    Raises:
        RuntimeError: the cache in `cache_dir` is missing or incomplete.
    """
    cache_dir, dest = Path(cache_dir), Path(dest)
    index = _read_index(cache_dir)
    if index is None or not index.get("complete"):
        raise RuntimeError(f"{cache_dir}: image cache missing or incomplete; run the prepare step")
    markers = cache_dir / f"chunks_{index['size']}"
    files = [cache_dir / CACHE_INDEX, cache_dir / index["file"]]
    files += sorted(p for p in markers.glob("*.json") if not p.name.startswith("."))
    staging = dest.with_name(f".{dest.name}.publish")
    shutil.rmtree(staging, ignore_errors=True)
    for src in files:
        target = staging / src.relative_to(cache_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, target)
        except OSError:  # no hard links here (or across these folders): a copy
            shutil.copy2(src, target)
    if dest.exists():
        shutil.rmtree(dest)
    os.rename(staging, dest)


def _run(jobs: list[tuple], workers: int):
    """Yield each job's failures in job order, decoding in `workers` processes."""
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            yield _decode_chunk(*job)
        return
    with cf.ProcessPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(_decode_chunk, *job) for job in jobs]
        try:
            for fut in futures:
                yield fut.result()
        except cf.process.BrokenProcessPool:
            folder = Path(jobs[0][0]).parent
            free = shutil.disk_usage(folder).free
            raise RuntimeError(
                f"{folder}: a process decoding images into the cache died; the system kills one that runs "
                f"out of memory (lower prepare.workers) or writes to a full disk ({_size(free)} free there). "
                "Rerun to resume from the chunks already built"
            ) from None
        finally:
            for fut in futures:
                fut.cancel()


def _decode_chunk(data_path: str, n: int, size: int, start: int, paths: list[str]) -> dict[int, tuple[str, str]]:
    """Decode one chunk straight into the shared memory map; returns {row: (reason, detail)}."""
    images = np.memmap(data_path, dtype=np.uint8, mode="r+", shape=(n, size, size))
    failures = {}
    for i, p in enumerate(paths):
        arr, reason = decode_or_reason(Path(p), size)
        if arr is None:
            images[start + i] = 0
            failures[start + i] = reason
        else:
            images[start + i] = arr
    images.flush()  # rows reach the file before the caller writes this chunk's done-marker
    del images
    return failures


def _read_index(cache_dir: Path) -> dict | None:
    path = Path(cache_dir) / CACHE_INDEX
    if not path.exists():
        return None
    try:
        return read_json(path)
    except ValueError:
        return None  # a damaged index only means a rebuild


def _write_index(
    cache_dir: Path, paths: list[Path], size: int, fp: str, chunk_size: int, complete: bool, failures: dict
) -> None:
    write_json(
        Path(cache_dir) / CACHE_INDEX,
        {
            "file": cache_file(cache_dir, size).name,
            "size": size,
            "count": len(paths),
            "dtype": DTYPE,
            "shape": [len(paths), size, size],
            "conversion_version": CONVERSION_VERSION,
            "fingerprint": fp,
            "chunk_size": chunk_size,
            "complete": complete,
            "failures": [
                {"row": r, "image": paths[r].name, "reason": rs, "detail": d} for r, (rs, d) in sorted(failures.items())
            ],
            "images": [p.name for p in paths],
        },
    )


def _failures_from_json(items: list[dict]) -> dict[int, tuple[str, str]]:
    return {int(f["row"]): (f["reason"], f["detail"]) for f in items}


def _marker_path(marker_dir: Path, k: int) -> Path:
    return marker_dir / f"{k:06d}.json"


def _read_marker(marker_dir: Path, k: int) -> dict[int, tuple[str, str]] | None:
    path = _marker_path(marker_dir, k)
    if not path.exists():
        return None
    try:
        return {int(r): tuple(v) for r, v in json.loads(path.read_text()).items()}
    except (ValueError, OSError):
        return None


def _write_marker(marker_dir: Path, k: int, failures: dict[int, tuple[str, str]]) -> None:
    write_json(_marker_path(marker_dir, k), {str(r): list(v) for r, v in failures.items()})


def open_cache(cache_dir: str | Path, mode: str = "r") -> np.memmap:
    """Memory-map a complete cache as (N, size, size) uint8.

    Raises:
        RuntimeError: the cache is missing or incomplete (rerun the prepare step).
    """
    cache_dir = Path(cache_dir)
    index = _read_index(cache_dir)
    if index is None or not index.get("complete"):
        raise RuntimeError(f"{cache_dir}: image cache missing or incomplete; run the prepare step")
    path = cache_dir / index["file"]
    return np.memmap(path, dtype=index["dtype"], mode=mode, shape=tuple(index["shape"]))


class CacheRows:
    """Rows of a complete cache read with pread into fresh arrays: (N, size, size) uint8 by index.

    A memory map of the cache (`open_cache`) keeps every page it has touched mapped, and those pages
    count in the process's resident memory: scoring the validation and test images of a 256-px
    cache of NIH's size would hold about 2.8 GB of it per process. A row read here is a copy the
    caller owns and frees; the file's pages stay in the kernel's page cache, shared and reclaimable.
    Opened lazily, once per process (a data-loader worker reopens it after fork or spawn).

    Raises:
        RuntimeError: the cache is missing or incomplete (rerun the prepare step).
    """

    def __init__(self, cache_dir: str | Path):
        cache_dir = Path(cache_dir)
        index = _read_index(cache_dir)
        if index is None or not index.get("complete"):
            raise RuntimeError(f"{cache_dir}: image cache missing or incomplete; run the prepare step")
        self.path = cache_dir / index["file"]
        self.shape = tuple(int(n) for n in index["shape"])
        self.dtype = np.dtype(index["dtype"])
        self._row_bytes = int(np.prod(self.shape[1:])) * self.dtype.itemsize
        self._fd: int | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, i: int) -> np.ndarray:
        i = int(i)
        if not 0 <= i < self.shape[0]:
            raise IndexError(f"{self.path}: row {i} of {self.shape[0]}")
        if self._fd is None or self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        data = os.pread(self._fd, self._row_bytes, i * self._row_bytes)
        if len(data) != self._row_bytes:
            raise RuntimeError(f"{self.path}: row {i} is cut short; rerun the prepare step")
        return np.frombuffer(bytearray(data), dtype=self.dtype).reshape(self.shape[1:])

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None

    def __del__(self) -> None:
        try:
            self.close()
        except OSError:
            pass

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_fd"] = state["_pid"] = None  # a descriptor does not travel to another process
        return state


def remove_marker(cache_dir: str | Path, size: int, k: int) -> None:
    """Forget that chunk k was built, so the next build decodes it again."""
    os.unlink(_marker_path(Path(cache_dir) / f"chunks_{size}", k))
