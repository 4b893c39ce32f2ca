"""Where the raw files come from: HTTP(S) URLs, S3 buckets and local folders.

Each remote copies one named file to a local path through `<path>.part`, resuming an interrupted
transfer with a ranged request, retrying transient failures (connection resets, timeouts, 5xx)
with exponential backoff and failing at once on 4xx. A file appears under its final name only once
it is complete (and, when its MD5 is known, verified).
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import requests
from urllib3.exceptions import HTTPError

from pipeline.io import file_digest, file_size
from pipeline.tracking import redact_text, redact_uri

log = logging.getLogger(__name__)

CHUNK = 1 << 20
MAX_BACKOFF_S = 60.0
# Opens the file's bytes from an offset: (first byte actually served, total size or None, chunks).
Opener = Callable[[int], tuple[int, int | None, Iterator[bytes]]]


class DownloadError(RuntimeError):
    """A file could not be fetched or verified; the message names it and says what to do."""


class TransientError(Exception):
    """A failure worth retrying (reset connection, timeout, 5xx)."""


@dataclass
class Transfer:
    """Retry policy and shared byte counter for every file of one fetch."""

    retries: int = 5
    backoff_s: float = 1.0
    timeout_s: float = 60.0
    on_bytes: Callable[[int], None] | None = None
    on_total: Callable[[int], None] | None = None

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self.bytes = 0

    def count(self, n: int) -> None:
        with self._lock:
            self.bytes += n
            if self.on_bytes is not None:
                self.on_bytes(n)

    def add_total(self, n: int) -> None:
        if self.on_total is not None:
            with self._lock:
                self.on_total(n)


def part_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def resumable_copy(open_at: Opener, dest: Path, what: str, xfer: Transfer, md5: str | None) -> None:
    """Fill `dest` from `open_at`, resuming `<dest>.part` and retrying transient errors.

    Args:
        open_at: opens the source at a byte offset; raises TransientError or DownloadError.
        dest: the final path, written only once the file is complete and verified.
        what: the URL or key, for messages.
        xfer: retry policy and byte counter.
        md5: the expected MD5; on a mismatch the file is moved to `<dest>.corrupt` and we raise.
    """
    part = part_path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    failures, attempt = 0, 0
    while True:
        done_before = file_size(part, missing=0)
        try:
            total = _transfer(open_at, part, xfer, first=attempt == 0)
            break
        except TransientError as e:
            attempt += 1
            done_after = file_size(part, missing=0)
            # An attempt that moved the file forward is not a strike against it: a flaky link
            # may need many resumes to bring a 4 GB archive home.
            failures = 0 if done_after > done_before else failures + 1
            if failures > xfer.retries:
                raise DownloadError(
                    f"{what}: giving up after {xfer.retries} retries ({e}); {done_after} bytes are "
                    f"kept in {part}, rerun to resume"
                ) from None
            delay = min(xfer.backoff_s * 2 ** max(failures - 1, 0), MAX_BACKOFF_S)
            log.warning("%s: %s; retrying in %.2f s from byte %d", what, e, delay, done_after)
            time.sleep(delay)
    if total is not None and file_size(part, missing=0) != total:
        raise DownloadError(f"{what}: got {file_size(part, missing=0)} of {total} bytes; rerun to resume")
    if md5 is not None:
        check_md5(part, md5, dest, what)
    os.replace(part, dest)


def check_md5(path: Path, expected: str, dest: Path, what: str, move_aside: bool = True) -> None:
    """Raise naming `dest` when `path` does not hash to `expected`.

    With `move_aside` the bad file becomes `<dest>.corrupt`, out of the way of extraction and of a
    retry, but still there to inspect.
    """
    got = file_digest(path)  # MD5
    if got == expected.lower():
        return
    if move_aside:
        bad = dest.with_name(dest.name + ".corrupt")
        os.replace(path, bad)
        fate = f"the file was moved to {bad} and not extracted. Delete it and rerun; if it fails "
        fate += "again the source holds a damaged or different file"
    else:
        fate = "it was not extracted; replace it with the published archive"
    raise DownloadError(f"{dest.name}: MD5 {got} does not match the published {expected} (from {what}); {fate}")


def _transfer(open_at: Opener, part: Path, xfer: Transfer, first: bool) -> int | None:
    offset = file_size(part, missing=0)
    start, total, chunks = open_at(offset)
    if start > offset:
        raise DownloadError(f"{part.name}: the source answered from byte {start}, not {offset}")
    # start < offset: the source ignored the range, or the part was stale: start over there.
    offset = start
    if first and total is not None:
        xfer.add_total(total - offset)
    if total is not None and offset == total:
        return total
    with open(part, "r+b" if part.exists() else "wb") as f:
        f.seek(offset)
        f.truncate()
        try:
            for block in chunks:
                f.write(block)
                xfer.count(len(block))
        finally:
            f.flush()
            os.fsync(f.fileno())
    size = file_size(part, missing=0)
    if total is not None and size < total:
        raise TransientError(f"connection closed after {size} of {total} bytes")
    return total


# --- HTTP(S) ---------------------------------------------------------------------------------


class NotFound(DownloadError):
    """The source answered that the file does not exist (HTTP 404/410, S3 NoSuchKey)."""


class HttpRemote:
    """Files under a base URL, with one requests session per worker thread."""

    def __init__(self, base_url: str, xfer: Transfer):
        self.base_url = base_url.rstrip("/")
        self.xfer = xfer
        self._local = threading.local()

    def url(self, name: str) -> str:
        return f"{self.base_url}/{name}"

    def fetch(self, name: str, dest: Path, md5: str | None = None) -> None:
        self.fetch_url(self.url(name), dest, md5)

    def fetch_url(self, url: str, dest: Path, md5: str | None = None) -> None:
        resumable_copy(lambda offset: self._open(url, offset), dest, redact_uri(url), self.xfer, md5)

    def _session(self) -> requests.Session:
        # requests.Session is not thread-safe; each worker keeps its own connection pool.
        if not hasattr(self._local, "session"):
            self._local.session = requests.Session()
        return self._local.session

    def _open(self, url: str, offset: int) -> tuple[int, int | None, Iterator[bytes]]:
        # identity: byte ranges and lengths must count the file's own bytes, never a re-encoding.
        headers = {"Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        try:
            r = self._session().get(url, headers=headers, stream=True, timeout=self.xfer.timeout_s)
        except (requests.ConnectionError, requests.Timeout) as e:
            raise TransientError(redact_text(str(e))) from None
        if r.status_code == 416 and offset:
            # Nothing past `offset`: the part holds the whole file, or is stale and too long.
            r.close()
            size = r.headers.get("Content-Range", "").rpartition("/")[2]
            return (offset, offset, iter(())) if size == str(offset) else self._open(url, 0)
        if r.status_code >= 500 or r.status_code in (408, 429):
            r.close()
            raise TransientError(f"HTTP {r.status_code} {r.reason}")
        if r.status_code >= 400:
            r.close()
            error = NotFound if r.status_code in (404, 410) else DownloadError
            raise error(
                f"{redact_uri(url)}: HTTP {r.status_code} {r.reason}; check the URL (download.source, "
                "download.nih.base_url or download.nih.metadata_url) and that the file exists"
            )
        start, total = _content_range(r)
        return start, total, _iter_http(r)


def _content_range(r: requests.Response) -> tuple[int, int | None]:
    """(first byte served, whole file size) from a 200 or 206 response."""
    if r.status_code == 206:
        spec = r.headers.get("Content-Range", "").split()[-1]  # "100-199/200"
        first, size = spec.partition("-")[0], spec.rpartition("/")[2]
        return int(first), int(size) if size.isdigit() else None
    length = r.headers.get("Content-Length", "")
    return 0, int(length) if length.isdigit() else None


def _iter_http(r: requests.Response) -> Iterator[bytes]:
    try:
        # decode_content=False: an archive must arrive byte for byte, never gunzipped on the way.
        yield from r.raw.stream(CHUNK, decode_content=False)
    except (requests.ConnectionError, requests.Timeout, OSError, HTTPError) as e:
        raise TransientError(f"transfer interrupted: {redact_text(str(e))}") from None
    finally:
        r.close()


# --- S3 ---------------------------------------------------------------------------------------


@dataclass
class S3Object:
    key: str
    size: int
    etag: str


class S3Remote:
    """Objects under `s3://bucket/prefix` through boto3 (default credentials, or unsigned)."""

    def __init__(
        self,
        url: str,
        xfer: Transfer,
        endpoint_url: str | None = None,
        anonymous: bool = False,
        region: str | None = None,
        profile: str | None = None,
    ):
        import boto3
        from botocore import UNSIGNED
        from botocore.config import Config

        self.bucket, _, prefix = url.removeprefix("s3://").partition("/")
        self.prefix = prefix.strip("/")
        self.url = url
        self.endpoint_url = endpoint_url
        self.xfer = xfer
        config = Config(
            signature_version=UNSIGNED if anonymous else None,
            connect_timeout=xfer.timeout_s,
            read_timeout=xfer.timeout_s,
            retries={"max_attempts": xfer.retries + 1, "mode": "standard"},
            max_pool_connections=32,
        )
        session = boto3.session.Session(profile_name=profile, region_name=region)
        # boto3 clients are thread-safe; sessions are not, so build the one client here.
        self.client = session.client("s3", endpoint_url=endpoint_url, config=config)

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def where(self, name: str) -> str:
        return f"s3://{self.bucket}/{self.key(name)}"

    def list(self) -> dict[str, S3Object]:
        """Every object under the prefix, by its path relative to the prefix."""
        from botocore.exceptions import BotoCoreError, ClientError

        prefix = f"{self.prefix}/" if self.prefix else ""
        objects = {}
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
            for page in pages:
                for obj in page.get("Contents", []):
                    rel = obj["Key"][len(prefix) :]
                    if rel and not rel.endswith("/"):
                        objects[rel] = S3Object(obj["Key"], obj["Size"], obj["ETag"].strip('"'))
        except ClientError as e:
            raise DownloadError(self._explain(e)) from None
        except BotoCoreError as e:
            raise DownloadError(
                f"{self.url}: {redact_text(str(e))}. Configure AWS credentials (environment, ~/.aws or "
                "download.s3.profile), or set download.s3.anonymous: true for a public bucket; "
                "check download.s3.endpoint_url"
            ) from None
        return objects

    def fetch(self, obj: S3Object, dest: Path, md5: str | None = None) -> None:
        where = f"s3://{self.bucket}/{obj.key}"
        resumable_copy(lambda offset: self._open(obj, offset), dest, where, self.xfer, md5)

    def _open(self, obj: S3Object, offset: int) -> tuple[int, int | None, Iterator[bytes]]:
        from botocore.exceptions import BotoCoreError, ClientError

        if offset == obj.size:
            return offset, obj.size, iter(())
        if offset > obj.size:  # a stale part from another version of the object
            offset = 0
        try:
            r = self.client.get_object(Bucket=self.bucket, Key=obj.key, Range=f"bytes={offset}-")
        except ClientError as e:
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if status >= 500:
                raise TransientError(redact_text(str(e))) from None
            error = NotFound if status == 404 else DownloadError
            raise error(self._explain(e, obj.key)) from None
        except BotoCoreError as e:
            raise TransientError(redact_text(str(e))) from None
        # "bytes 100-199/200"; absent when the whole object came back.
        served = r.get("ContentRange") or "bytes 0-"
        return int(served.split()[-1].split("-")[0]), obj.size, _iter_s3(r["Body"])

    def _explain(self, e: Exception, key: str | None = None) -> str:
        code = getattr(e, "response", {}).get("Error", {}).get("Code", "")
        where = f"s3://{self.bucket}/{key}" if key else self.url
        at = f" at {redact_uri(self.endpoint_url)}" if self.endpoint_url else ""
        if code == "NoSuchBucket":
            return (
                f"{where}: bucket '{self.bucket}' does not exist{at}; check download.source "
                "and download.s3.endpoint_url"
            )
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return (
                f"{where}: access denied ({code}){at}; check your AWS credentials or "
                "download.s3.profile, or set download.s3.anonymous: true for a public bucket"
            )
        return f"{where}: {redact_text(str(e))}"


def _iter_s3(body) -> Iterator[bytes]:
    from botocore.exceptions import BotoCoreError

    try:
        yield from body.iter_chunks(CHUNK)
    except (BotoCoreError, HTTPError, OSError) as e:
        raise TransientError(f"transfer interrupted: {redact_text(str(e))}") from None
    finally:
        body.close()


def parallel(fn: Callable, items: Iterable, workers: int) -> list:
    """`fn` over `items` on `workers` threads, results in completion order.

    The first error is raised once running calls finish; calls not yet started are cancelled.
    """
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(fn, item) for item in items]
        try:
            return [f.result() for f in as_completed(futures)]
        except BaseException:
            for f in futures:
                f.cancel()
            raise


# --- local folders ----------------------------------------------------------------------------


def copy_file(src: Path, dest: Path) -> None:
    """Copy the bytes of `src` (opened without following a link) to `dest`, keeping its mtime.

    Never a hard link: a link would share the file's inode, and with it its mode, with the output
    folder, whose files a versioning cache links and makes read-only (0444), and would hand it
    whatever else shares that inode. The kernel copies (`copy_file_range`): where the file system
    shares extents (Btrfs, XFS) that is a reflink, with no second copy of the bytes on disk.

    Raises:
        DownloadError: `src` is a link or not a regular file.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = part_path(dest)
    tmp.unlink(missing_ok=True)
    try:
        # O_NONBLOCK: a fifo put where a file should be is refused below instead of blocking the open
        fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as e:
        if e.errno != errno.ELOOP:
            raise
        raise DownloadError(f"{src}: is a link; only regular files are copied from a local source") from None
    with open(fd, "rb") as fin, open(tmp, "wb") as fout:
        st = os.fstat(fin.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise DownloadError(f"{src}: not a regular file; only regular files are copied from a local source")
        _copy_bytes(fin, fout, st.st_size)
    os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))  # a rerun recognises the copy by size and mtime
    os.replace(tmp, dest)


def _copy_bytes(fin: BinaryIO, fout: BinaryIO, size: int) -> None:
    done = 0
    try:
        while done < size:
            n = os.copy_file_range(fin.fileno(), fout.fileno(), size - done)
            if n == 0:
                break
            done += n
    except OSError as e:
        # no in-kernel copy between these two files (an older kernel, some network file systems)
        if done or e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise
        shutil.copyfileobj(fin, fout, CHUNK)
