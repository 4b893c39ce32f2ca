"""The download step against real loopback servers: an HTTP file server and moto's S3 server.

The dataset is a miniature NIH release: a few small PNGs packed into `images_00N.tar.gz` archives
(members `images/<name>.png`), a label CSV and the two split lists, with the archives' real MD5s
passed in the config as the published ones would be.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.classes import BBOX_CSV, LABEL_CSV_HEADER, TEST_LIST, TRAIN_VAL_LIST, image_name
from pipeline.config import ConfigError
from pipeline.data import sources
from pipeline.data.archives import DamagedArchiveError, UnsafeArchiveError
from pipeline.data.download import MANIFEST, archive_name, check_source, fetch, selected_archives
from pipeline.data.sources import DownloadError
from tests.conftest import ROOT, settings
from tests.servers import FileServer, moto_s3, s3_client

LABEL_CSV = "Data_Entry_2017_v2020.csv"
METADATA = (LABEL_CSV, TRAIN_VAL_LIST, TEST_LIST, BBOX_CSV)  # the release's files beside the archives
IMAGES_PER_ARCHIVE = 3
ARCHIVES = 2


@dataclass
class Release:
    """A miniature NIH release on disk."""

    root: Path  # archives + metadata side by side, as the HTTP mirror serves them
    images: dict[str, bytes]  # image name -> PNG bytes
    members: dict[str, list[str]]  # archive name -> image names it holds
    md5: list[str]  # the archives' MD5s, archive 1 first

    def expected_manifest(self) -> dict[str, dict]:
        files = {f"images/{n}": data for n, data in self.images.items()}
        for name in METADATA:
            files[name] = (self.root / name).read_bytes()
        return {k: {"md5": hashlib.md5(v).hexdigest(), "size": len(v)} for k, v in sorted(files.items())}


def _png(rng: np.random.Generator) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (48, 48), dtype=np.uint8), mode="L").save(buf, "PNG")
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _write_archive(path: Path, files: dict[str, bytes], extra: list[tarfile.TarInfo] = ()) -> str:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            _add(tar, name, data)
        for info in extra:
            tar.addfile(info, io.BytesIO(b"x" * info.size) if info.isfile() else None)
    return hashlib.md5(path.read_bytes()).hexdigest()


def _write_metadata(folder: Path, names: list[str]) -> None:
    rows = [",".join(LABEL_CSV_HEADER)]
    rows += [f"{n},No Finding,0,{int(n[:8])},50,M,PA,1024,1024,0.143,0.143" for n in names]
    (folder / LABEL_CSV).write_text("\n".join(rows) + "\n")
    # NIH's list files have no trailing newline.
    (folder / TRAIN_VAL_LIST).write_text("\n".join(names[:-2]))
    (folder / TEST_LIST).write_text("\n".join(names[-2:]))
    # NIH's header spreads "Bbox [x,y,w,h]" over four columns and ends in empty ones
    boxes = [f"{names[-1]},Infiltrate,225.08,547.02,86.78,79.19,,,", f"{names[-2]},Mass,10,20,30,40,,,"]
    (folder / BBOX_CSV).write_text("\n".join(["Image Index,Finding Label,Bbox [x,y,w,h],,,", *boxes]) + "\n")


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Release:
    root = tmp_path_factory.mktemp("release")
    rng = np.random.default_rng(0)
    images, members, md5 = {}, {}, []
    for a in range(1, ARCHIVES + 1):
        names = [image_name(a * 10 + i, 0) for i in range(IMAGES_PER_ARCHIVE)]
        data = {n: _png(rng) for n in names}
        images.update(data)
        members[archive_name(a)] = names
        md5.append(_write_archive(root / archive_name(a), {f"images/{n}": d for n, d in data.items()}))
    _write_metadata(root, list(images))
    return Release(root, images, members, md5)


@pytest.fixture
def server(release):
    with FileServer(release.root) as s:
        yield s


def _cfg(source: str, release: Release, **kwargs):
    defaults = dict(
        nih=settings("download.nih", md5=list(release.md5)), workers=2, retries=2, backoff_s=0.01, timeout_s=5
    )
    return settings("download", source=source, **{**defaults, **kwargs})


def _manifest(out: Path) -> dict:
    return json.loads((out / MANIFEST).read_text())


def _assert_complete(out: Path, release: Release) -> None:
    """The folder holds exactly the release, byte for byte, and its manifest says so."""
    for name, data in release.images.items():
        assert (out / "images" / name).read_bytes() == data, name
    for name in METADATA:
        assert (out / name).read_bytes() == (release.root / name).read_bytes(), name
    assert _manifest(out) == release.expected_manifest()


# --- HTTP -------------------------------------------------------------------------------------


def test_http_download_verifies_and_extracts(server, release, tmp_path):
    out = tmp_path / "raw"
    summary = fetch(_cfg(server.url, release), out, progress=False)
    _assert_complete(out, release)
    assert summary["files"] == len(release.images) + len(METADATA)
    assert summary["box_file"] == BBOX_CSV
    assert summary["archives_fetched"] == [archive_name(1), archive_name(2)]
    assert summary["transferred_bytes"] >= sum((release.root / archive_name(a)).stat().st_size for a in (1, 2))
    assert "MB/s" in summary["line"]
    assert not (out / "archives").exists()  # verified, extracted, deleted


def test_http_keep_archives(server, release, tmp_path):
    out = tmp_path / "raw"
    fetch(_cfg(server.url, release, keep_archives=True), out, progress=False)
    kept = _manifest(out)[f"archives/{archive_name(1)}"]
    assert kept["md5"] == release.md5[0]


def test_interrupted_transfer_resumes_with_range(server, release, tmp_path):
    name = archive_name(1)
    cut = (release.root / name).stat().st_size // 2
    server.cut_once(name, after=cut)
    out = tmp_path / "raw"
    fetch(_cfg(server.url, release), out, progress=False)
    gets = server.gets(name)
    assert [g.range for g in gets] == [None, f"bytes={cut}-"]
    assert [g.status for g in gets] == [200, 206]
    _assert_complete(out, release)


def test_partial_file_from_a_killed_run_resumes(server, release, tmp_path):
    name = archive_name(2)
    data = (release.root / name).read_bytes()
    out = tmp_path / "raw"
    (out / "archives").mkdir(parents=True)
    (out / "archives" / f"{name}.part").write_bytes(data[:1000])
    fetch(_cfg(server.url, release), out, progress=False)
    assert [g.range for g in server.gets(name)] == ["bytes=1000-"]
    _assert_complete(out, release)


def test_transient_errors_are_retried(server, release, tmp_path):
    name = archive_name(2)
    server.fail_once(name, status=503, times=2)
    fetch(_cfg(server.url, release), tmp_path / "raw", progress=False)
    assert [g.status for g in server.gets(name)] == [503, 503, 200]


def test_retries_give_up_naming_the_url(server, release, tmp_path):
    name = archive_name(1)
    server.fail_once(name, status=502, times=10)
    with pytest.raises(DownloadError, match=rf"{server.url}/{name}: giving up after 2 retries"):
        fetch(_cfg(server.url, release, workers=1), tmp_path / "raw", progress=False)
    assert len(server.gets(name)) == 3


def test_client_errors_are_not_retried(server, release, tmp_path):
    cfg = _cfg(server.url, release, nih=settings("download.nih", md5=[*release.md5, "0" * 32]))
    with pytest.raises(DownloadError, match=rf"{archive_name(3)}: HTTP 404"):
        fetch(cfg, tmp_path / "raw", progress=False)
    assert [g.status for g in server.gets(archive_name(3))] == [404]


def test_corrupt_archive_is_rejected_and_not_extracted(server, release, tmp_path):
    bad = "0123456789abcdef0123456789abcdef"
    cfg = _cfg(server.url, release, nih=settings("download.nih", md5=[release.md5[0], bad]), workers=1)
    out = tmp_path / "raw"
    with pytest.raises(
        DownloadError,
        match=rf"{archive_name(2)}: MD5 {release.md5[1]} does not "
        rf"match the published {bad}",
    ):
        fetch(cfg, out, progress=False)
    for image in release.members[archive_name(2)]:
        assert not (out / "images" / image).exists()
    assert not (out / "archives" / archive_name(2)).exists()
    assert (out / "archives" / f"{archive_name(2)}.corrupt").exists()  # kept aside to inspect
    assert not (out / MANIFEST).exists()


def _unsafe_member(kind: str, outside: Path) -> tarfile.TarInfo:
    if kind == "dotdot":
        info = tarfile.TarInfo("images/../../../escaped.txt")
    elif kind == "absolute":
        info = tarfile.TarInfo(str(outside / "absolute.txt"))
    elif kind == "symlink":
        info = tarfile.TarInfo("images/link.png")
        info.type, info.linkname = tarfile.SYMTYPE, str(outside / "target.txt")
    elif kind == "hardlink":
        info = tarfile.TarInfo("images/hard.png")
        info.type, info.linkname = tarfile.LNKTYPE, "images/00000010_000.png"
    elif kind == "device":
        info = tarfile.TarInfo("images/dev.png")
        info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
    else:
        info = tarfile.TarInfo("images/fifo.png")
        info.type = tarfile.FIFOTYPE
    info.size = 5 if info.isfile() else 0
    return info


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink", "hardlink", "device", "fifo"])
def test_unsafe_archive_members_are_refused(release, tmp_path, kind):
    root = tmp_path / "mirror"
    root.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    for name in METADATA:
        (root / name).write_bytes((release.root / name).read_bytes())
    good = {f"images/{n}": release.images[n] for n in release.members[archive_name(1)]}
    member = _unsafe_member(kind, outside)
    md5 = _write_archive(root / archive_name(1), good, [member])
    out = tmp_path / "a" / "b" / "raw"

    def outside_target() -> list[Path]:
        return sorted(p for p in tmp_path.rglob("*") if p != out and out not in p.parents and p not in out.parents)

    before = outside_target()
    with FileServer(root) as server:
        cfg = _cfg(server.url, release, nih=settings("download.nih", md5=[md5]))
        with pytest.raises(UnsafeArchiveError, match=f"member '{member.name}'"):
            fetch(cfg, out, progress=False)
    assert outside_target() == before  # nothing written outside the target
    assert not (out / "images").exists() or not any((out / "images").iterdir())
    assert not [p for p in out.rglob("*") if "escaped" in p.name or "absolute" in p.name]
    assert not list((out / ".fetch").glob("extract-*"))  # the scratch folder is gone


# --- archives that carry metadata, collide or end early ------------------------------------------


def _tar(path: Path, members: list[tuple[str, bytes]]) -> str:
    """A tar.gz of `members` in order (a name may repeat); returns its MD5."""
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members:
            _add(tar, name, data)
    return hashlib.md5(path.read_bytes()).hexdigest()


def _mirror(release: Release, root: Path, *archives: list[tuple[str, bytes]]) -> list[str]:
    """The release's metadata files and `archives` (archive 1 first) in `root`; their MD5s."""
    root.mkdir(parents=True)
    for name in METADATA:
        (root / name).write_bytes((release.root / name).read_bytes())
    return [_tar(root / archive_name(i), members) for i, members in enumerate(archives, start=1)]


def _images_of(release: Release, number: int) -> list[tuple[str, bytes]]:
    return [(f"images/{n}", release.images[n]) for n in release.members[archive_name(number)]]


def _fetch_refused(
    release: Release, root: Path, md5: list[str], out: Path, error: type, match: str | None, workers: int = 1
):
    """Fetch from a mirror of `root`; the error must match and be one line."""
    with FileServer(root) as server, pytest.raises(error, match=match) as refused:
        fetch(_cfg(server.url, release, nih=settings("download.nih", md5=md5), workers=workers), out, progress=False)
    assert "\n" not in str(refused.value)
    assert not list((out / ".fetch").glob("extract-*"))  # the scratch folder is gone
    assert not (out / MANIFEST).exists()
    for name in METADATA:  # the metadata files are the fetched ones
        assert (out / name).read_bytes() == (release.root / name).read_bytes(), name
    return refused.value


@pytest.mark.parametrize(
    "member",
    [
        f"{LABEL_CSV}/evil.txt",  # a folder where the label file is
        LABEL_CSV,
        "Data_Entry_2017.csv",  # the other label file name: it would sit beside the fetched one
        TEST_LIST,
        f"images/{TRAIN_VAL_LIST}",
        ".fetch/images_002.tar.gz.json",  # a forged extraction marker
        MANIFEST,
        "notes/readme.txt",
    ],
)
def test_an_image_archive_member_outside_images_or_named_like_metadata_is_refused(release, tmp_path, member):
    # the images come first: a late refusal must not leave them extracted
    md5 = _mirror(release, tmp_path / "mirror", [*_images_of(release, 1), (member, b"evil")])
    out = tmp_path / "raw"
    error = _fetch_refused(release, tmp_path / "mirror", md5, out, UnsafeArchiveError, None)
    assert str(error).startswith(f"{archive_name(1)}: member '{member}' ")
    assert not (out / "images").exists() or not any((out / "images").iterdir())
    assert not [p for p in out.rglob("*") if p.name in ("evil.txt", "readme.txt", "images_002.tar.gz.json")]
    assert not (out / "Data_Entry_2017.csv").exists() and not (out / ".fetch" / f"{archive_name(1)}.json").exists()


@pytest.mark.parametrize(
    ("members", "named", "problem"),
    [
        ([("images/a.png", b"one"), ("images/a.png", b"two")], "images/a.png", "appears twice"),
        ([("images/a.png", b"one"), ("images/./a.png", b"two")], "images/./a.png", "appears twice"),
        ([("images/x.png", b"one"), ("images/x.png/y.png", b"two")], "images/x.png/y.png", "needs the folder"),
        ([("images/x/y.png", b"one"), ("images/x", b"two")], "images/x", "is a file where other members"),
    ],
)
def test_archive_members_colliding_with_each_other_are_refused(release, tmp_path, members, named, problem):
    md5 = _mirror(release, tmp_path / "mirror", [*_images_of(release, 1), *members])
    out = tmp_path / "raw"
    error = _fetch_refused(release, tmp_path / "mirror", md5, out, UnsafeArchiveError, None)
    assert str(error).startswith(f"{archive_name(1)}: member '{named}' {problem}"), error
    assert not (out / "images").exists() or not any((out / "images").iterdir())


@pytest.mark.parametrize("existing", ["folder", "file at images", "other bytes"])
def test_archive_members_colliding_with_the_output_folder_are_refused(release, tmp_path, existing):
    md5 = _mirror(release, tmp_path / "mirror", _images_of(release, 1))
    first, *others = release.members[archive_name(1)]
    out = tmp_path / "raw"
    out.mkdir()
    if existing == "folder":
        (out / "images" / first).mkdir(parents=True)
        problem = "would replace the folder"
    elif existing == "file at images":
        (out / "images").write_bytes(b"not a folder")
        problem = "needs .* to be a folder, but it is a file"
    else:  # a file no extraction wrote, e.g. a synthetic image under a NIH name
        (out / "images").mkdir()
        (out / "images" / first).write_bytes(b"another image")
        problem = "would overwrite .*, which no earlier extraction of this archive wrote"
    _fetch_refused(
        release, tmp_path / "mirror", md5, out, UnsafeArchiveError, rf"^{archive_name(1)}: member 'images/.*' {problem}"
    )
    assert (out / "images").is_file() or not [p for p in (out / "images").iterdir() if p.name in others]
    if existing == "other bytes":
        assert (out / "images" / first).read_bytes() == b"another image"  # what was there is kept


def test_files_a_killed_extraction_already_moved_are_taken_as_they_are(release, tmp_path):
    """The same bytes under the same name (moved before a kill, no marker yet) are no collision."""
    md5 = _mirror(release, tmp_path / "mirror", _images_of(release, 1), _images_of(release, 2))
    out = tmp_path / "raw"
    first = release.members[archive_name(1)][0]
    (out / "images").mkdir(parents=True)
    (out / "images" / first).write_bytes(release.images[first])
    with FileServer(tmp_path / "mirror") as server:
        fetch(_cfg(server.url, release, nih=settings("download.nih", md5=md5)), out, progress=False)
    _assert_complete(out, release)


@pytest.mark.parametrize("workers", [1, 2])
def test_two_archives_writing_one_file_are_refused(release, tmp_path, workers):
    shared = release.members[archive_name(1)][0]
    second = [*_images_of(release, 2), (f"images/{shared}", b"the same name, other bytes")]
    md5 = _mirror(release, tmp_path / "mirror", _images_of(release, 1), second)
    out = tmp_path / "raw"
    error = _fetch_refused(
        release, tmp_path / "mirror", md5, out, UnsafeArchiveError, "is also extracted from", workers=workers
    )
    pattern = rf"images_00[12]\.tar\.gz: member 'images/{shared}' is also extracted from images_00[12]"
    assert re.match(pattern, str(error)), error
    # the file, if there, holds the bytes of the archive that claimed it first, not the refused one's
    other = {archive_name(1): b"the same name, other bytes", archive_name(2): release.images[shared]}
    if (out / "images" / shared).exists():
        assert (out / "images" / shared).read_bytes() == other[str(error).split(":")[0]]


def test_rerun_refuses_a_member_another_archive_extracted_before(release, tmp_path):
    md5 = _mirror(release, tmp_path / "mirror", _images_of(release, 1))
    out = tmp_path / "raw"
    with FileServer(tmp_path / "mirror") as server:
        fetch(_cfg(server.url, release, nih=settings("download.nih", md5=md5)), out, progress=False)
    shared = release.members[archive_name(1)][0]
    md5 += [_tar(tmp_path / "mirror" / archive_name(2), [*_images_of(release, 2), (f"images/{shared}", b"x")])]
    error = _fetch_refused(release, tmp_path / "mirror", md5, out, UnsafeArchiveError, "is also extracted from")
    named = f"{archive_name(2)}: member 'images/{shared}' is also extracted from {archive_name(1)}"
    assert str(error).startswith(named), error
    assert (out / "images" / shared).read_bytes() == release.images[shared]
    assert not [n for n in release.members[archive_name(2)] if (out / "images" / n).exists()]


@pytest.mark.parametrize("keep", [1 / 2, 1 / 8])
def test_a_truncated_archive_whose_md5_matches_is_refused_naming_it(release, tmp_path, keep):
    data = (release.root / archive_name(1)).read_bytes()
    root = tmp_path / "mirror"
    _mirror(release, root)
    (root / archive_name(1)).write_bytes(data[: int(len(data) * keep)])
    md5 = [hashlib.md5((root / archive_name(1)).read_bytes()).hexdigest()]  # a checksum of the cut copy
    out = tmp_path / "raw"
    error = _fetch_refused(release, root, md5, out, DamagedArchiveError, rf"^{archive_name(1)}: the archive ends early")
    assert "member 'images/" in str(error) and "EOFError" in str(error)
    assert not (out / "images").exists() or not any((out / "images").iterdir())


def _params_file(folder: Path, md5: list[str]) -> Path:
    """The committed params.yaml with `download.nih.md5` set to `md5`, written in `folder`."""
    import yaml

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["download"]["nih"]["md5"] = md5
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def _download_component(params: Path, out: Path, source: str, monkeypatch) -> int:
    from components.common import run_main
    from components.download import main

    monkeypatch.delenv("CXR_DEBUG", raising=False)
    return run_main("download", main, ["--params", str(params), "--out", str(out), "--source", source, "--no-mlflow"])


def test_the_download_component_reports_a_refused_member_in_one_line(release, tmp_path, capsys, monkeypatch):
    md5 = _mirror(release, tmp_path / "mirror", [*_images_of(release, 1), (f"{LABEL_CSV}/evil.txt", b"evil")])
    with FileServer(tmp_path / "mirror") as server:
        code = _download_component(_params_file(tmp_path, md5), tmp_path / "raw", server.url, monkeypatch)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("cxr-dwml download: error: ")]
    assert code == 2 and "Traceback" not in err
    assert len(errors) == 1 and errors[0].startswith(
        f"cxr-dwml download: error: {archive_name(1)}: member '{LABEL_CSV}/evil.txt' "
    ), err


@pytest.mark.parametrize("secret", ["http://reader:s3cr@t@", "token"])
def test_credentials_in_the_source_url_are_refused_without_being_shown(
    server, release, tmp_path, capsys, monkeypatch, secret
):
    """params.yaml and dvc.lock are committed, so a password or token in download.source would be in
    every clone: the step refuses it in one line that masks it, and writes nothing."""
    if secret == "token":
        source = f"{server.url}?token=s3cr@t"
    else:
        source = server.url.replace("http://", secret)
    out = tmp_path / "raw"
    code = _download_component(_params_file(tmp_path, list(release.md5)), out, source, monkeypatch)
    printed = capsys.readouterr()
    errors = [line for line in printed.err.splitlines() if line.startswith("cxr-dwml download: error: ")]
    assert code == 2 and len(errors) == 1 and "download.source" in errors[0] and "~/.netrc" in errors[0]
    assert "s3cr" not in printed.out + printed.err
    assert not out.exists() and server.requests == []


def test_rerun_skips_completed_and_refetches_what_is_missing(server, release, tmp_path):
    out = tmp_path / "raw"
    cfg = _cfg(server.url, release)
    fetch(cfg, out, progress=False)
    first = (out / MANIFEST).read_bytes()
    n = len(server.requests)

    summary = fetch(cfg, out, progress=False)
    assert server.requests[n:] == []  # nothing asked of the server
    assert summary["archives_skipped"] == [archive_name(1), archive_name(2)]
    assert summary["transferred_bytes"] == 0
    assert (out / MANIFEST).read_bytes() == first

    # A file gone since: its archive is fetched and extracted again, the other one is not.
    (out / "images" / release.members[archive_name(2)][0]).unlink()
    summary = fetch(cfg, out, progress=False)
    assert summary["archives_fetched"] == [archive_name(2)]
    assert [g.path for g in server.requests[n:]] == [archive_name(2)]
    _assert_complete(out, release)


def test_a_mirror_without_the_box_file_still_downloads(release, tmp_path):
    """The box file is optional: asked for once, its absence logged, and the rest is complete."""
    root = tmp_path / "mirror"
    root.mkdir()
    for path in release.root.iterdir():
        if path.name != BBOX_CSV:
            os.link(path, root / path.name)
    out = tmp_path / "raw"
    with FileServer(root) as server:
        summary = fetch(_cfg(server.url, release), out, progress=False)
        assert [g.path for g in server.requests].count(BBOX_CSV) == 1
    assert summary["box_file"] is None and not (out / BBOX_CSV).exists()
    assert set(_manifest(out)) == set(release.expected_manifest()) - {BBOX_CSV}


def test_nih_source_needs_metadata_url(tmp_path):
    with pytest.raises(
        DownloadError,
        match=r"download.nih.metadata_url is empty.*set "
        r"download.nih.metadata_url",
    ):
        fetch(settings("download", {"source": "nih"}), tmp_path / "raw", progress=False)
    assert not (tmp_path / "raw").exists()


def test_nih_source_fetches_box_urls_and_local_metadata(server, release, tmp_path):
    """NIH's archives come from a URL template with ids; here the template points at loopback."""
    for a in (1, 2):  # serve each archive under an id, as Box does
        os.link(release.root / archive_name(a), server.root / f"id{a}.gz")
    try:
        nih = settings(
            "download.nih",
            box_ids=["id1", "id2"],
            md5=list(release.md5),
            base_url=f"{server.url}/{{id}}.gz",
            metadata_url=str(release.root),
        )
        out = tmp_path / "raw"
        fetch(_cfg("nih", release, nih=nih), out, progress=False)
        _assert_complete(out, release)
        assert {g.path for g in server.requests} == {"id1.gz", "id2.gz"}
    finally:
        for a in (1, 2):
            (server.root / f"id{a}.gz").unlink()


def test_config_from_params_mapping(tmp_path):
    cfg = settings(
        "download",
        {
            "source": "s3://bucket/prefix",
            "workers": 8,
            "s3.endpoint_url": "http://127.0.0.1:9000",
            "s3.anonymous": True,
            "nih.archives": [1, 2],
        },
    )
    assert cfg.s3 == settings("download.s3", endpoint_url="http://127.0.0.1:9000", anonymous=True)
    assert [name for _, name, _ in selected_archives(cfg.nih)] == [archive_name(1), archive_name(2)]
    with pytest.raises(ConfigError, match=r"'download.nih' archives \[13\] outside 1..12"):
        settings("download", {"nih.archives": [13]})
    with pytest.raises(ConfigError, match="'download.nih.md5' holds 'xyz', not a 32-digit hex MD5"):
        settings("download", {"nih.md5": ["xyz"] * 12})
    with pytest.raises(DownloadError, match="neither synthetic, nih"):
        check_source(settings("download", source=str(tmp_path / "nowhere")))
    with pytest.raises(DownloadError, match="download.nih.metadata_url is empty"):
        check_source(settings("download", source="nih"))


# --- S3 ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3_endpoint():
    with moto_s3() as endpoint:
        yield endpoint


@pytest.fixture
def aws_credentials(monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def _bucket(endpoint: str, name: str, files: dict[str, bytes], public: bool = False) -> None:
    s3 = s3_client(endpoint)
    s3.create_bucket(Bucket=name)
    if public:
        s3.put_bucket_policy(
            Bucket=name,
            Policy=json.dumps(
                {
                    "Version": "2012-10-17",
                    "Statement": [
                        {
                            "Effect": "Allow",
                            "Principal": "*",
                            "Action": ["s3:GetObject", "s3:ListBucket"],
                            "Resource": [f"arn:aws:s3:::{name}", f"arn:aws:s3:::{name}/*"],
                        }
                    ],
                }
            ),
        )
    for key, data in files.items():
        s3.put_object(Bucket=name, Key=key, Body=data)


def _metadata(release: Release) -> dict[str, bytes]:
    return {n: (release.root / n).read_bytes() for n in METADATA}


def test_s3_archives_with_credentials(s3_endpoint, aws_credentials, release, tmp_path):
    files = {f"mirrors/nih/{n}": d for n, d in _metadata(release).items()}
    for a in (1, 2):
        files[f"mirrors/nih/{archive_name(a)}"] = (release.root / archive_name(a)).read_bytes()
    _bucket(s3_endpoint, "archive-mirror", files)
    out = tmp_path / "raw"
    cfg = _cfg("s3://archive-mirror/mirrors/nih", release, s3=settings("download.s3", endpoint_url=s3_endpoint))
    summary = fetch(cfg, out, progress=False)
    _assert_complete(out, release)
    assert summary["archives_fetched"] == [archive_name(1), archive_name(2)]


def test_s3_partial_archive_resumes_with_range(s3_endpoint, aws_credentials, release, tmp_path):
    files = {f"nih/{n}": d for n, d in _metadata(release).items()}
    for a in (1, 2):
        files[f"nih/{archive_name(a)}"] = (release.root / archive_name(a)).read_bytes()
    _bucket(s3_endpoint, "resume-mirror", files)
    out = tmp_path / "raw"
    (out / "archives").mkdir(parents=True)
    data = (release.root / archive_name(1)).read_bytes()
    (out / "archives" / f"{archive_name(1)}.part").write_bytes(data[:1000])
    summary = fetch(
        _cfg("s3://resume-mirror/nih", release, s3=settings("download.s3", endpoint_url=s3_endpoint)),
        out,
        progress=False,
    )
    _assert_complete(out, release)
    metadata_bytes = sum(len(d) for d in _metadata(release).values())
    archive_bytes = sum((release.root / archive_name(a)).stat().st_size for a in (1, 2))
    assert summary["transferred_bytes"] == metadata_bytes + archive_bytes - 1000


def test_s3_anonymous_extracted_images(s3_endpoint, aws_credentials, monkeypatch, release, tmp_path):
    files = {f"public/{n}": d for n, d in _metadata(release).items()}
    files.update({f"public/images/{n}": d for n, d in release.images.items()})
    _bucket(s3_endpoint, "public-mirror", files, public=True)
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(var)
    out = tmp_path / "raw"
    signed = _cfg("s3://public-mirror/public", release, s3=settings("download.s3", endpoint_url=s3_endpoint))
    with pytest.raises(DownloadError, match="set download.s3.anonymous: true"):
        fetch(signed, out, progress=False)

    cfg = _cfg(
        "s3://public-mirror/public", release, s3=settings("download.s3", endpoint_url=s3_endpoint, anonymous=True)
    )
    summary = fetch(cfg, out, progress=False)
    _assert_complete(out, release)
    assert summary["objects_fetched"] == len(release.images)
    again = fetch(cfg, out, progress=False)  # size and ETag match: nothing is fetched
    assert (again["objects_fetched"], again["objects_skipped"]) == (0, len(release.images))


def test_s3_missing_bucket_is_a_clear_error(s3_endpoint, aws_credentials, release, tmp_path):
    cfg = _cfg("s3://no-such-bucket/nih", release, s3=settings("download.s3", endpoint_url=s3_endpoint))
    with pytest.raises(DownloadError, match=r"bucket 'no-such-bucket' does not exist"):
        fetch(cfg, tmp_path / "raw", progress=False)


# --- local folder and synthetic ---------------------------------------------------------------


def _local_release(release: Release, src: Path) -> Path:
    """The release's images and metadata as a local folder in NIH layout."""
    (src / "images").mkdir(parents=True)
    for name, data in release.images.items():
        (src / "images" / name).write_bytes(data)
    _write_metadata(src, list(release.images))
    return src


def test_local_folder_is_copied_never_linked_so_dvc_leaves_its_modes_alone(release, tmp_path):
    src = _local_release(release, tmp_path / "nih")
    (src / "images").chmod(0o755)
    modes = {p: p.stat().st_mode for p in src.rglob("*")}
    out = tmp_path / "project" / "raw"
    summary = fetch(_cfg(str(src), release), out, progress=False)
    # what `dvc repro` does with the output: into the DVC cache as hard links, made read-only
    dvc = [str(Path(sys.executable).parent / "dvc"), "--cd", str(out.parent)]
    for args in (["init", "--no-scm", "-q"], ["config", "cache.type", "hardlink,symlink"], ["add", "-q", "raw"]):
        subprocess.run([*dvc, *args], check=True, capture_output=True, timeout=300)
    assert (out / "images" / next(iter(release.images))).stat().st_mode & 0o777 == 0o444
    assert {p: p.stat().st_mode for p in src.rglob("*")} == modes
    _assert_complete(out, release)
    assert summary["images_copied"] == len(release.images)
    again = fetch(_cfg(str(src), release), out, progress=False)
    assert again["images_skipped"] == len(release.images)


def _outside_link(src: Path, secret: Path, where: str) -> Path:
    """Make `where` in the local source a symbolic link to the private file `secret` (or its folder)."""
    if where == "images folder":
        images = secret.parent / "images"
        images.mkdir()
        os.rename(secret, images / "00000099_000.png")
        shutil.rmtree(src / "images")
        (src / "images").symlink_to(images)
        return src / "images" / "00000099_000.png"
    link = src / ("images/00000099_000.png" if where == "image" else LABEL_CSV)
    link.unlink(missing_ok=True)
    link.symlink_to(secret)
    return link


@pytest.mark.parametrize("where", ["image", "images folder", "label file"])
def test_a_link_out_of_a_local_source_is_refused_and_its_target_untouched(release, tmp_path, where):
    secret = tmp_path / "home" / "id_rsa"
    secret.parent.mkdir()
    secret.write_bytes(b"-----BEGIN PRIVATE KEY-----\n" + os.urandom(64))
    secret.chmod(0o600)
    content = secret.read_bytes()
    src = _local_release(release, tmp_path / "nih")
    link = _outside_link(src, secret, where)
    target = link.resolve()
    out = tmp_path / "project" / "raw"
    with pytest.raises(DownloadError) as refused:
        fetch(_cfg(str(src), release), out, progress=False)
    assert str(refused.value).startswith(f"{link}: a link to outside the source folder {src}")
    assert "\n" not in str(refused.value)
    assert target.stat().st_mode & 0o777 == 0o600 and target.read_bytes() == content
    copied = [p for p in out.rglob("*") if p.is_file() and p.read_bytes() == content]
    assert copied == [] and not (out / "images").exists()


def test_a_link_inside_a_local_source_is_copied_by_content(release, tmp_path):
    src = _local_release(release, tmp_path / "nih")
    first = sorted(release.images)[0]
    (src / "spare").mkdir()
    os.rename(src / "images" / first, src / "spare" / first)
    (src / "images" / first).symlink_to(Path("..") / "spare" / first)
    out = tmp_path / "raw"
    fetch(_cfg(str(src), release), out, progress=False)
    _assert_complete(out, release)
    assert not (out / "images" / first).is_symlink()


def test_copy_file_never_follows_a_link_put_in_place_of_the_file(tmp_path):
    """`inside` resolves links first; a link that appears after that is refused, never followed."""
    (tmp_path / "secret").write_text("private")
    (tmp_path / "a.png").symlink_to(tmp_path / "secret")
    with pytest.raises(DownloadError, match=r"a.png: is a link; only regular files are copied"):
        sources.copy_file(tmp_path / "a.png", tmp_path / "out" / "a.png")
    assert not (tmp_path / "out" / "a.png").exists()


def test_switching_the_source_never_mixes_two_datasets(release, tmp_path, caplog):
    out = tmp_path / "raw"
    (out / "images").mkdir(parents=True)
    (tmp_path / "raw" / "notes.txt").write_text("mine")
    synthetic = settings("download.synthetic", num_images=12, num_patients=6, image_size=32)
    fetch(settings("download", synthetic=synthetic), out, progress=False)
    recorded = json.loads((out / ".fetch" / "source.json").read_text())["source"]
    assert recorded.startswith("synthetic shape=demo num_images=12 ") and "image_size=32" in recorded
    src = _local_release(release, tmp_path / "nih")
    summary = fetch(_cfg(str(src), release), out, progress=False)
    # the release alone, image for image and label for label: nothing of the synthetic set is left
    assert _manifest(out) == {
        **release.expected_manifest(),
        "notes.txt": {"md5": hashlib.md5(b"mine").hexdigest(), "size": 4},
    }
    assert summary["replaced_source"] == recorded and (out / "notes.txt").read_text() == "mine"
    assert f"{out} held the dataset from {recorded}; download.source is now {src}" in caplog.text
    assert json.loads((out / ".fetch" / "source.json").read_text()) == {"source": str(src)}
    # back to the synthetic source: its own set again, none of the release
    fetch(settings("download", synthetic=synthetic), out, progress=False)
    names = {p.name for p in (out / "images").iterdir()}
    assert len(names) == 12 and not names & set(release.images)


def test_another_synthetic_set_never_mixes_with_the_last(tmp_path):
    """The synthetic source's names overlap between sets: a larger set's extra images would stay
    beside a smaller one's, listed in the manifest and tracked by DVC. Another shape, size or seed
    empties the folder first."""
    out = tmp_path / "raw"
    large = settings("download.synthetic", shape="nih", num_images=300, image_size=32, seed=3)
    fetch(settings("download", synthetic=large), out, progress=False)
    small = settings("download.synthetic", num_images=12, num_patients=6, image_size=32)
    summary = fetch(settings("download", synthetic=small), out, progress=False)
    assert summary["replaced_source"].startswith("synthetic shape=nih num_images=300 ")
    assert len(list((out / "images").iterdir())) == 12
    assert sum(1 for k in _manifest(out) if k.startswith("images/")) == 12


def test_local_folder_of_archives_is_verified_and_extracted(release, tmp_path):
    out = tmp_path / "raw"
    summary = fetch(_cfg(str(release.root), release), out, progress=False)
    _assert_complete(out, release)
    assert summary["archives_fetched"] == [archive_name(1), archive_name(2)]
    assert (release.root / archive_name(1)).exists()  # the source is never moved or deleted


def test_synthetic_source_calls_the_generator(tmp_path, capsys):
    cfg = settings("download", synthetic=settings("download.synthetic", num_images=12, num_patients=6, image_size=32))
    out = tmp_path / "raw"
    summary = fetch(cfg, out, progress=True)
    pngs = sorted(p.name for p in (out / "images").glob("*.png"))
    assert len(pngs) == 12 and summary["synthetic"]["images"] == 12
    manifest = _manifest(out)
    assert set(manifest) == {f"images/{n}" for n in pngs} | set(METADATA)
    for rel, entry in manifest.items():
        assert entry == {
            "md5": hashlib.md5((out / rel).read_bytes()).hexdigest(),
            "size": (out / rel).stat().st_size,
        }, rel
    assert "fetch synthetic: 16 files (12 images" in capsys.readouterr().out
