"""Safe extraction of downloaded tar.gz archives.

A tar archive can name any path and any file type. We only trust regular files and folders whose
names stay inside the target: absolute names, `..`, links, devices and fifos are refused with an
error naming the member. Members are first written to a scratch folder inside the target and only
moved into place once the whole archive has been read, so a refused or truncated archive leaves
nothing behind, inside the target or outside it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import posixpath
import shutil
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipeline.data.sources import check_md5, parallel
from pipeline.io import file_digest, file_size, read_json, write_json

log = logging.getLogger(__name__)

CHUNK = 1 << 20
STATE_DIR = ".fetch"  # extraction markers and scratch folders, under the output folder
ARCHIVE_DIR = "archives"  # downloaded archives, under the output folder


class UnsafeArchiveError(ValueError):
    """An archive member would escape the target or is not a plain file or folder."""


def member_path(archive: Path, member: tarfile.TarInfo) -> str | None:
    """The safe relative POSIX path of `member`, None for the archive's root folder.

    Raises:
        UnsafeArchiveError: naming the archive and member when it is absolute, climbs out with
            `..`, or is a symlink, hardlink, device, fifo or other special file.
    """
    name = member.name
    if not (member.isfile() or member.isdir()):
        kind = "symlink" if member.issym() else "hardlink" if member.islnk() else "special file"
        raise UnsafeArchiveError(
            f"{archive.name}: member '{name}' is a {kind}; only regular files and folders are "
            "extracted. The archive is not the published one: delete it and download it again"
        )
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise UnsafeArchiveError(
            f"{archive.name}: member '{name}' has an absolute path; refusing to extract it. "
            "Delete the archive and download it again from a trusted source"
        )
    parts = name.replace("\\", "/").split("/")
    if ".." in parts:
        raise UnsafeArchiveError(
            f"{archive.name}: member '{name}' climbs out of the target with '..'; refusing to "
            "extract it. Delete the archive and download it again from a trusted source"
        )
    rel = posixpath.normpath("/".join(parts))
    return None if rel in (".", "") else rel


def safe_extract(archive: Path, target: Path, scratch: Path) -> dict[str, tuple[int, str]]:
    """Extract the regular files of a tar(.gz) `archive` under `target`.

    Args:
        archive: the verified archive.
        target: the folder the archive's relative paths are resolved against.
        scratch: an empty folder to stage into; it must be on the same file system as `target`
            (we rename out of it). It is removed on return, on success or failure.

    Returns:
        Each extracted file's path relative to `target` -> (size in bytes, md5), hashed while it
        was written so the manifest need not read the files again.

    Raises:
        UnsafeArchiveError: on the first unsafe member; nothing has been written to `target`.
    """
    files: dict[str, tuple[int, str]] = {}
    shutil.rmtree(scratch, ignore_errors=True)  # left over from a run that was killed
    scratch.mkdir(parents=True)
    try:
        # "r:*" sniffs gzip or plain tar; the stream is read once, front to back.
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                rel = member_path(archive, member)
                if rel is None or member.isdir():
                    continue
                files[rel] = _write_member(tar, member, scratch / rel)
        for rel in files:
            dest = target / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(scratch / rel, dest)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return files


def _write_member(tar: tarfile.TarFile, member: tarfile.TarInfo, dest: Path) -> tuple[int, str]:
    src = tar.extractfile(member)
    assert src is not None, member.name  # a regular file always has a data stream
    dest.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.md5()
    size = 0
    with src, open(dest, "wb") as out:
        for block in iter(lambda: src.read(CHUNK), b""):
            h.update(block)
            out.write(block)
            size += len(block)
    return size, h.hexdigest()


@dataclass
class ArchiveJob:
    """One archive to bring in: downloaded by `download`, or read in place from `local`."""

    name: str
    md5: str
    download: Callable[[Path], None] | None = None  # fills a path with the verified archive
    local: Path | None = None  # an archive already on disk (never moved or deleted)


def fetch_archives(jobs: list[ArchiveJob], out_dir: Path, workers: int, keep: bool) -> dict:
    """Download (or take), verify and extract each archive into `out_dir`, `workers` at a time.

    An archive whose marker in `.fetch/` shows it was extracted, with every file still there at
    its size, is skipped. Downloads land in `archives/` and are deleted after extraction unless
    `keep`.

    Returns:
        archives_fetched and archives_skipped (names), and hashes: (size, md5) of each file
        extracted in this run, by path relative to `out_dir`.
    """
    results = parallel(lambda job: _bring_in(job, out_dir, keep), jobs, workers)
    archive_dir = out_dir / ARCHIVE_DIR
    if archive_dir.is_dir() and not any(archive_dir.iterdir()):
        archive_dir.rmdir()
    return {
        "archives_fetched": sorted(r["name"] for r in results if not r["skipped"]),
        "archives_skipped": sorted(r["name"] for r in results if r["skipped"]),
        "hashes": {rel: v for r in results for rel, v in r["files"].items()},
    }


def _bring_in(job: ArchiveJob, out_dir: Path, keep: bool) -> dict:
    marker = out_dir / STATE_DIR / f"{job.name}.json"
    if _extracted(marker, job.md5, out_dir):
        log.info("%s: already extracted and verified, skipping", job.name)
        return {"name": job.name, "skipped": True, "files": {}}
    if job.local is not None:
        path = job.local
        check_md5(path, job.md5, path, str(path), move_aside=False)
    else:
        path = out_dir / ARCHIVE_DIR / job.name
        if path.exists() and file_digest(path) != job.md5:
            path.unlink()  # a kept archive that no longer verifies: fetch it again
        if not path.exists():
            job.download(path)
    files = safe_extract(path, out_dir, out_dir / STATE_DIR / f"extract-{job.name}")
    write_json(marker, {"md5": job.md5, "files": {rel: size for rel, (size, _) in files.items()}})
    if job.local is None and not keep:
        path.unlink()
    log.info("%s: verified and extracted %d files", job.name, len(files))
    return {"name": job.name, "skipped": False, "files": files}


def _extracted(marker: Path, md5: str, out_dir: Path) -> bool:
    """Whether `marker` says this very archive was extracted and its files are all still there."""
    if not marker.exists():
        return False
    state = read_json(marker)
    if state.get("md5") != md5:
        return False
    return all(file_size(out_dir / rel) == size for rel, size in state["files"].items())
