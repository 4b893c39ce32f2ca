"""Safe extraction of downloaded tar.gz archives.

A tar archive can name any path and any file type. We only trust regular files and folders whose
names stay inside the target: absolute names, `..`, links, devices and fifos are refused with an
error naming the member. An image archive holds images only: a member outside `images/`, or one
named like the label CSV or a split list (those come only from the metadata files), is refused.
So is a member that collides with another member (the same path twice, a file where another
member needs a folder), with a folder or non-folder in the target, with a file another archive
extracted, or with a file already there that this archive did not write. An archive that ends
early (truncated or damaged, whatever its MD5) is refused naming the member it broke off in.

Members are first written to a scratch folder inside the target, every path is checked against
the target, and only then is anything moved into place, so a refused or truncated archive leaves
nothing behind, inside the target or outside it.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import posixpath
import shutil
import tarfile
import threading
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from pipeline.classes import BBOX_CSV, LABEL_CSV_NAMES, TEST_LIST, TRAIN_VAL_LIST
from pipeline.data.layout import RAW_IMAGES
from pipeline.data.sources import check_md5, parallel
from pipeline.io import file_digest, file_size, read_json, write_json

log = logging.getLogger(__name__)

CHUNK = 1 << 20
STATE_DIR = ".fetch"  # extraction markers and scratch folders, under the output folder
ARCHIVE_DIR = "archives"  # downloaded archives, under the output folder
# the label CSV and split lists come from the metadata files, never from an image archive
METADATA_FILES = frozenset(name.casefold() for name in (*LABEL_CSV_NAMES, TRAIN_VAL_LIST, TEST_LIST, BBOX_CSV))
REFETCH = "Delete the archive and download it again from a trusted source"


class UnsafeArchiveError(ValueError):
    """An archive member would escape the target, is not a plain file or folder, lies outside
    `images/`, or collides with another member or with what the target already holds."""


class DamagedArchiveError(ValueError):
    """An archive cannot be read to its end: truncated or corrupt, although its MD5 matched."""


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
            f"{archive.name}: member '{name}' has an absolute path; refusing to extract it. {REFETCH}"
        )
    parts = name.replace("\\", "/").split("/")
    if ".." in parts:
        raise UnsafeArchiveError(
            f"{archive.name}: member '{name}' climbs out of the target with '..'; refusing to extract it. {REFETCH}"
        )
    rel = posixpath.normpath("/".join(parts))
    return None if rel in (".", "") else rel


def check_image_member(archive: Path, name: str, rel: str) -> None:
    """Refuse a file member that is a label or list file, or lies outside `images/`.

    Raises:
        UnsafeArchiveError: naming the archive and the member.
    """
    parts = rel.split("/")
    metadata = [p for p in parts if p.casefold() in METADATA_FILES]
    if metadata:
        raise UnsafeArchiveError(
            f"{archive.name}: member '{name}' would write '{metadata[0]}', which comes only from the "
            "metadata files (download.nih.metadata_url, or beside the archives), never from an image "
            f"archive; refusing to extract the archive. {REFETCH}"
        )
    if len(parts) < 2 or parts[0] != RAW_IMAGES:
        raise UnsafeArchiveError(
            f"{archive.name}: member '{name}' lies outside {RAW_IMAGES}/, and an image archive holds "
            f"only {RAW_IMAGES}/; refusing to extract the archive. {REFETCH}"
        )


class Owners:
    """Which archive put each file in the output folder: earlier runs' markers, this run's claims.

    Shared by the archives of one fetch, so two archives extracted at the same time cannot both
    write one path.
    """

    def __init__(self, state_dir: Path | None = None) -> None:
        self._lock = threading.Lock()
        self._owner: dict[str, str] = {}
        for marker in sorted(state_dir.glob("*.json")) if state_dir and state_dir.is_dir() else []:
            try:
                state = read_json(marker)
            except ValueError:
                continue  # not a marker we can read; the archive it belonged to is extracted again
            if isinstance(state, dict) and "md5" in state and isinstance(state.get("files"), dict):
                for rel in state["files"]:
                    self._owner.setdefault(rel, marker.name.removesuffix(".json"))

    def claim(self, archive: Path, name: str, paths: Iterable[str]) -> set[str]:
        """Record that archive `name` writes `paths`; returns those it had written before.

        Raises:
            UnsafeArchiveError: naming both archives when another one holds one of the paths.
        """
        paths = list(paths)
        with self._lock:
            for rel in paths:
                other = self._owner.get(rel)
                if other not in (None, name):
                    raise UnsafeArchiveError(
                        f"{archive.name}: member '{rel}' is also extracted from {other}; two archives "
                        f"cannot write one file. {REFETCH}"
                    )
            before = {rel for rel in paths if self._owner.get(rel) == name}
            self._owner.update(dict.fromkeys(paths, name))
        return before


def safe_extract(
    archive: Path, target: Path, scratch: Path, owners: Owners | None = None, name: str | None = None
) -> dict[str, tuple[int, str]]:
    """Extract the regular files of a tar(.gz) `archive` under `target`.

    Args:
        archive: the verified archive.
        target: the folder the archive's relative paths are resolved against.
        scratch: an empty folder to stage into; it must be on the same file system as `target`
            (we rename out of it). It is removed on return, on success or failure.
        owners: which archive wrote each file already in `target`; a member may replace a file
            only when this archive wrote it before (or it holds the very same bytes).
        name: the archive's name in `owners` (default: the file name of `archive`).

    Returns:
        Each extracted file's path relative to `target` -> (size in bytes, md5), hashed while it
        was written so the manifest need not read the files again.

    Raises:
        UnsafeArchiveError: on the first unsafe or colliding member; nothing has been written to
            `target`.
        DamagedArchiveError: when the archive ends early or is corrupt; nothing has been written.
    """
    owners = owners or Owners()
    files: dict[str, tuple[int, str]] = {}
    shutil.rmtree(scratch, ignore_errors=True)  # left over from a run that was killed
    scratch.mkdir(parents=True)
    try:
        files = _stage(archive, scratch)
        before = owners.claim(archive, name or archive.name, files)
        for rel, (size, md5) in files.items():
            _check_target(archive, target, rel, size, md5, owned=rel in before)
        for rel in files:  # every member checked: only now does anything move
            dest = target / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(scratch / rel, dest)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return files


def _stage(archive: Path, scratch: Path) -> dict[str, tuple[int, str]]:
    """Every file member written under `scratch` after its checks: relative path -> (size, md5)."""
    files: dict[str, tuple[int, str]] = {}
    folders: set[str] = set()  # the folders the file members need
    current = None
    try:
        # "r:*" sniffs gzip or plain tar; the stream is read once, front to back.
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                current = member.name
                rel = member_path(archive, member)
                if rel is None or member.isdir():
                    continue
                check_image_member(archive, member.name, rel)
                _check_members(archive, member.name, rel, files, folders)
                files[rel] = _write_member(tar, member, scratch / rel)
                parts = rel.split("/")
                folders.update("/".join(parts[:i]) for i in range(1, len(parts)))
    except (EOFError, tarfile.TarError, zlib.error, gzip.BadGzipFile) as e:
        where = f"inside or after member '{current}'" if current else "before its first member"
        reason = " ".join(f"{type(e).__name__}: {e}".split())
        raise DamagedArchiveError(
            f"{archive.name}: the archive ends early or is damaged {where} ({reason}), although its "
            f"MD5 matched the configured one (check download.nih.md5); nothing was extracted. Delete "
            f"{archive} and download it again"
        ) from None
    return files


def _check_members(archive: Path, name: str, rel: str, files: dict, folders: set[str]) -> None:
    """Refuse a member whose path another member already took, as a file or as a folder."""
    if rel in files:
        raise UnsafeArchiveError(
            f"{archive.name}: member '{name}' appears twice in the archive (as '{rel}'); refusing to "
            f"extract it. {REFETCH}"
        )
    if rel in folders:
        raise UnsafeArchiveError(
            f"{archive.name}: member '{name}' is a file where other members need the folder '{rel}'; "
            f"refusing to extract it. {REFETCH}"
        )
    parts = rel.split("/")
    clash = next(("/".join(parts[:i]) for i in range(1, len(parts)) if "/".join(parts[:i]) in files), None)
    if clash:
        raise UnsafeArchiveError(
            f"{archive.name}: member '{name}' needs the folder '{clash}', which another member is a "
            f"file at; refusing to extract it. {REFETCH}"
        )


def _check_target(archive: Path, target: Path, rel: str, size: int, md5: str, owned: bool) -> None:
    """Refuse a member that would replace a folder, need a folder where a file is, or overwrite a
    file this archive did not write before (unless that file holds the same bytes)."""
    parts = rel.split("/")
    for i in range(1, len(parts)):
        folder = target.joinpath(*parts[:i])
        if (folder.exists() or folder.is_symlink()) and not folder.is_dir():
            raise UnsafeArchiveError(
                f"{archive.name}: member '{rel}' needs {folder} to be a folder, but it is a file; "
                "nothing was extracted. Move that file away or use an empty output folder"
            )
    dest = target / rel
    if dest.is_dir():
        raise UnsafeArchiveError(
            f"{archive.name}: member '{rel}' would replace the folder {dest}; nothing was extracted. "
            "Move that folder away or use an empty output folder"
        )
    if (dest.exists() or dest.is_symlink()) and not owned:
        if not (dest.is_file() and file_size(dest) == size and file_digest(dest) == md5):
            raise UnsafeArchiveError(
                f"{archive.name}: member '{rel}' would overwrite {dest}, which no earlier extraction "
                "of this archive wrote (another source, such as the synthetic demo, or a file put "
                "there by hand); nothing was extracted. Move it away or use an empty output folder"
            )


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
    owners = Owners(out_dir / STATE_DIR)
    results = parallel(lambda job: _bring_in(job, out_dir, keep, owners), jobs, workers)
    archive_dir = out_dir / ARCHIVE_DIR
    if archive_dir.is_dir() and not any(archive_dir.iterdir()):
        archive_dir.rmdir()
    return {
        "archives_fetched": sorted(r["name"] for r in results if not r["skipped"]),
        "archives_skipped": sorted(r["name"] for r in results if r["skipped"]),
        "hashes": {rel: v for r in results for rel, v in r["files"].items()},
    }


def _bring_in(job: ArchiveJob, out_dir: Path, keep: bool, owners: Owners) -> dict:
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
    files = safe_extract(path, out_dir, out_dir / STATE_DIR / f"extract-{job.name}", owners, job.name)
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
