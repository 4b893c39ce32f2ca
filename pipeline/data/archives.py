"""Safe extraction of downloaded tar.gz archives.

A tar archive can name any path and any file type. We only trust regular files and folders whose
names stay inside the target: absolute names, `..`, links, devices and fifos are refused with an
error naming the member. Members are first written to a scratch folder inside the target and only
moved into place once the whole archive has been read, so a refused or truncated archive leaves
nothing behind, inside the target or outside it.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import shutil
import tarfile
from pathlib import Path

CHUNK = 1 << 20


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
