"""Real servers on 127.0.0.1 for tests: a static file server with byte ranges, a reverse proxy
that fails chosen requests, moto's S3, `mlflow server`, throwaway PostgreSQL databases, and the
one way the tests wait for anything (`wait_until`, `wait_http`) and stop what they started (`stop`).

with FileServer(folder) as server:
    server.cut_once("images_001.tar.gz", after=1000)  # the next GET dies after 1000 bytes
    requests.get(f"{server.url}/images_001.tar.gz")

with FaultProxy("http://127.0.0.1:5000") as proxy:   # e.g. an `mlflow server`
    proxy.fail("registered-models/get", times=20)     # the next 20 matching requests get 503
    MlflowClient(proxy.url).get_registered_model("m")
    proxy.hold("model-versions/create", count=2)      # two processes made to race: both forwarded together

with moto_s3() as endpoint:
    s3 = s3_client(endpoint)   # boto3 with moto's test credentials

with mlflow_server(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "server") as url:
    MlflowClient(url).search_experiments()

proc = subprocess.Popen(cmd, start_new_session=True, stdout=log_file, stderr=subprocess.STDOUT)
wait_http(f"http://127.0.0.1:{port}/ping", timeout=240, process=proc, log=log_path)
stop(proc)                                            # the process group and every child
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import NoReturn, Self, TypeVar

import pytest

T = TypeVar("T")
VENV_BIN = Path(sys.executable).parent
# The PostgreSQL server the tests make throwaway databases on (user postgres, trust authentication).
POSTGRES = os.environ.get("CXR_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432")
# SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3; the project ships psycopg2 (as docker/compose.yaml does)
POSTGRES_DIALECT = "postgresql+psycopg2"


def free_port() -> int:
    """A loopback port nobody listens on at the moment (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(
    what: str,
    check: Callable[[], T],
    timeout: float,
    *,
    every: float = 0.5,
    progress: Callable[[], object] | None = None,
    process: subprocess.Popen | None = None,
    log: Path | None = None,
) -> T:
    """Call `check` until it returns something true, and return that.

    Fails naming `what` once `timeout` seconds pass without success. With `progress`, the timeout
    counts from the last change of `progress()` instead: slow but steady work on a busy machine
    is waited for, a stall is not. With `process`, fails as soon as that process has exited, with
    the end of `log`.

    Args:
        what: what is awaited, for the failure message ("the API server").
        check: returns a true value when the wait is over.
        timeout: seconds without success (or without progress) before failing.
        every: seconds between two checks.
        progress: returns something that changes whenever the awaited work moves on.
        process: the process doing the work, or serving what is awaited.
        log: where `process` writes its output.
    """
    deadline = time.monotonic() + timeout
    seen = progress() if progress is not None else None
    while True:
        got = check()
        if got:
            return got
        if process is not None and process.poll() is not None:
            pytest.fail(f"waiting for {what}: the process exited with {process.returncode}{_tail(log)}")
        if progress is not None and (now := progress()) != seen:
            seen, deadline = now, time.monotonic() + timeout
        if time.monotonic() > deadline:
            stalled = "no progress" if progress is not None else "no success"
            pytest.fail(f"waiting for {what}: {stalled} in {timeout:.0f} s (last: {seen!r}){_tail(log)}")
        time.sleep(every)


def wait_http(url: str, timeout: float, *, process: subprocess.Popen | None = None, log: Path | None = None) -> None:
    """Wait until GET `url` answers 200 (a server's health or ping endpoint)."""

    def answers() -> bool:
        with contextlib.suppress(OSError, urllib.error.URLError):
            with urllib.request.urlopen(url, timeout=5) as r:
                return r.status == 200
        return False

    wait_until(url, answers, timeout, process=process, log=log)


def _tail(log: Path | None, chars: int = 4000) -> str:
    if log is None or not log.exists():
        return ""
    return f"\n--- end of {log}:\n{log.read_text(errors='replace')[-chars:]}"


def stop(proc: subprocess.Popen) -> None:
    """End a process started with start_new_session=True: its process group, and every process it
    started, some of which (Airflow's task runners) live in sessions of their own; SIGTERM first,
    SIGKILL for whatever is still there 20 s later."""
    import psutil

    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        for child in family:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.send_signal(sig)
        try:
            proc.wait(timeout=20)
            psutil.wait_procs(family, timeout=10)
            return
        except subprocess.TimeoutExpired:
            continue


def unavailable(reason: str) -> NoReturn:
    """Skip for want of `reason`; under CI=true, where the machine must have it, fail."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true but {reason}")
    pytest.skip(f"this test needs {reason}")


@dataclass
class Request:
    method: str
    path: str  # relative to the served folder, e.g. "images_001.tar.gz"
    range: str | None  # the Range header, e.g. "bytes=1000-"
    status: int


class LoopbackServer(ThreadingHTTPServer):
    """An HTTP server on a free loopback port, served from a background thread (`with` starts and
    stops it); `requests` records what it was asked."""

    daemon_threads = True

    def __init__(self, handler: type[BaseHTTPRequestHandler], host: str = "127.0.0.1", port: int = 0):
        super().__init__((host, port), handler)
        self.requests: list = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.server_address[0]}:{self.server_address[1]}"

    def start(self) -> Self:
        self._thread = threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _record(self, request) -> None:
        with self._lock:
            self.requests.append(request)


class FileServer(LoopbackServer):
    """Serve a folder over HTTP/1.1 with `Range: bytes=a-b` (206/416) and injectable failures.

    Every request is recorded in `requests`. `cut_once` makes the next GET of a file send its
    headers, then only the first bytes, then drop the connection (an interrupted transfer);
    `fail_once` answers the next GETs of a file with an error status.
    """

    def __init__(self, root: Path, host: str = "127.0.0.1", port: int = 0):
        super().__init__(_Handler, host, port)
        self.root = Path(root).resolve()
        self._cuts: dict[str, int] = {}
        self._failures: dict[str, list[int]] = {}

    def cut_once(self, path: str, after: int) -> None:
        with self._lock:
            self._cuts[path] = after

    def fail_once(self, path: str, status: int = 503, times: int = 1) -> None:
        with self._lock:
            self._failures[path] = [status] * times

    def gets(self, path: str) -> list[Request]:
        """The GET requests of one file so far."""
        with self._lock:
            return [r for r in self.requests if r.method == "GET" and r.path == path]

    def _take_failure(self, path: str) -> int | None:
        with self._lock:
            pending = self._failures.get(path)
            return pending.pop() if pending else None

    def _take_cut(self, path: str) -> int | None:
        with self._lock:
            return self._cuts.pop(path, None)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like real servers; a cut must drop the socket
    server: FileServer

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def log_message(self, format: str, *args) -> None:  # keep test output quiet
        pass

    def _serve(self, body: bool) -> None:
        rel = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path).lstrip("/")
        header = self.headers.get("Range")
        status = self.server._take_failure(rel) if body else None
        path = (self.server.root / rel).resolve()
        if status is None and (not path.is_file() or self.server.root not in path.parents):
            status = 404
        if status is not None:
            self.server._record(Request(self.command, rel, header, status))
            self._send_empty(status)
            return
        size = path.stat().st_size
        first, last = _parse_range(header, size)
        if first >= size and header:
            self.server._record(Request(self.command, rel, header, 416))
            self._send_empty(416, {"Content-Range": f"bytes */{size}"})
            return
        status = 206 if header else 200
        self.server._record(Request(self.command, rel, header, status))
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(last - first + 1))
        if status == 206:
            self.send_header("Content-Range", f"bytes {first}-{last}/{size}")
        self.end_headers()
        if body:
            self._send_body(path, first, last - first + 1, self.server._take_cut(rel))

    def _send_body(self, path: Path, first: int, length: int, cut: int | None) -> None:
        with open(path, "rb") as f:
            f.seek(first)
            if cut is None:
                shutil.copyfileobj(f, self.wfile, length=length)
                return
            self.wfile.write(f.read(min(cut, length)))
            self.wfile.flush()
        # Drop the connection mid-body, as a reset link or a killed proxy would.
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def _send_empty(self, status: int, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", "0")
        self.end_headers()


def _parse_range(header: str | None, size: int) -> tuple[int, int]:
    """(first, last) byte of `Range: bytes=a-b`, `bytes=a-` or `bytes=-n`; all when absent."""
    match = re.fullmatch(r"bytes=(\d*)-(\d*)", header or "")
    if not match or match.groups() == ("", ""):
        return 0, size - 1
    a, b = match.groups()
    if a == "":  # the last b bytes
        return max(size - int(b), 0), size - 1
    return int(a), min(int(b), size - 1) if b else size - 1


HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


@dataclass
class Forwarded:
    method: str
    path: str  # with its query, e.g. "/api/2.0/mlflow/registered-models/get?name=m"
    status: int
    injected: bool  # answered by the proxy itself, never reaching the server


class FaultProxy(LoopbackServer):
    """A reverse proxy to the HTTP server at `target` that answers chosen requests with an error.

    Every request is forwarded as it came (method, path, query, headers, body) and the answer sent
    back, except while a failure is pending for it: `fail(pattern, status, times)` makes the next
    `times` requests whose path and query contain `pattern` get `status` without reaching the
    server (a proxy whose backend is overloaded, or a server restarting). Every request is
    recorded in `requests`, with the status it got; `after` lets the first matching requests through
    (fail the second of two alias moves). `hold(pattern, count)` keeps matching requests until
    `count` of them wait, then forwards them together: two processes made to race at one call.
    """

    def __init__(self, target: str, host: str = "127.0.0.1", port: int = 0):
        super().__init__(_ProxyHandler, host, port)
        parts = urllib.parse.urlsplit(target)
        self.target = (parts.hostname or "127.0.0.1", parts.port or 80)
        self._failures: list[list] = []  # [pattern, status, how many to let through first, how many to fail]
        self._holds: list[tuple[str, threading.Barrier]] = []
        self.released: list[str] = []  # paths of held requests forwarded once all `count` were waiting

    def fail(self, pattern: str, status: int = 503, times: int = 1, after: int = 0) -> None:
        """Answer `status` to `times` requests matching `pattern`, after letting `after` of them through."""
        with self._lock:
            self._failures.append([pattern, status, after, times])

    def hold(self, pattern: str, count: int, timeout: float = 600.0) -> None:
        """Keep requests matching `pattern` until `count` wait, then forward them all; requests
        that waited `timeout` s without the others are forwarded alone (not in `released`)."""
        with self._lock:
            self._holds.append((pattern, threading.Barrier(count, timeout=timeout)))

    def clear(self) -> None:
        """Forward everything again."""
        with self._lock:
            self._failures.clear()
            self._holds.clear()

    def _wait_for_the_others(self, path: str) -> None:
        with self._lock:
            barriers = [b for pattern, b in self._holds if pattern in path]
        for barrier in barriers:
            try:
                barrier.wait()
            except threading.BrokenBarrierError:
                continue
            self._record_release(path)

    def _record_release(self, path: str) -> None:
        with self._lock:
            self.released.append(path)

    def failed(self, pattern: str) -> list[Forwarded]:
        """The requests matching `pattern` that were answered with an injected failure."""
        with self._lock:
            return [r for r in self.requests if pattern in r.path and r.injected]

    def _take_failure(self, path: str) -> int | None:
        with self._lock:
            for pending in self._failures:
                if pending[0] not in path:
                    continue
                if pending[2] > 0:  # still letting requests through
                    pending[2] -= 1
                elif pending[3] > 0:
                    pending[3] -= 1
                    return pending[1]
        return None


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FaultProxy

    def do_GET(self) -> None:
        self._forward()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_GET

    def log_message(self, format: str, *args) -> None:  # keep test output quiet
        pass

    def _forward(self) -> None:
        import http.client

        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        self.server._wait_for_the_others(self.path)
        status = self.server._take_failure(self.path)
        if status is not None:
            self.server._record(Forwarded(self.command, self.path, status, injected=True))
            payload = b'{"error_code": "TEMPORARILY_UNAVAILABLE", "message": "injected failure"}'
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        conn = http.client.HTTPConnection(*self.server.target, timeout=120)
        try:
            conn.request(self.command, self.path, body=body, headers=headers)
            answer = conn.getresponse()
            data = answer.read()
        finally:
            conn.close()
        self.server._record(Forwarded(self.command, self.path, answer.status, injected=False))
        self.send_response(answer.status)
        for key, value in answer.getheaders():
            if key.lower() not in HOP_BY_HOP and key.lower() != "content-length":
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)


def s3_client(endpoint: str):
    """A boto3 S3 client for moto's server at `endpoint`, with its test credentials."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


@contextlib.contextmanager
def moto_s3() -> Iterator[str]:
    """moto's S3 server on a free loopback port; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@contextlib.contextmanager
def mlflow_server(backend_uri: str, folder: Path) -> Iterator[str]:
    """`mlflow server` with proxied artifacts in `folder` on a free loopback port; yields its URL."""
    folder.mkdir(parents=True, exist_ok=True)
    port, log = free_port(), folder / "server.log"
    cmd = [str(VENV_BIN / "mlflow"), "server", "--backend-store-uri", backend_uri]
    cmd += ["--artifacts-destination", (folder / "artifacts").as_uri(), "--serve-artifacts"]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    # the background job runner (a dozen huey workers) is for GenAI jobs this project never starts
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "PATH": f"{VENV_BIN}:{os.environ['PATH']}"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health", timeout=180, process=proc, log=log)
        yield url
    finally:
        stop(proc)


def postgres_missing() -> str | None:
    """Why no throwaway database can be made on the PostgreSQL at POSTGRES, or None when one can."""
    import importlib.util

    if importlib.util.find_spec("psycopg2") is None:
        return "the PostgreSQL driver psycopg2 (pip install -e '.[postgres]')"
    import psycopg2

    try:
        psycopg2.connect(f"{POSTGRES}/postgres", connect_timeout=3).close()
    except psycopg2.OperationalError as e:
        return f"PostgreSQL at {POSTGRES} (user postgres, trust auth), unreachable: {str(e).strip()}"
    return None


@contextlib.contextmanager
def postgres_databases(*purposes: str) -> Iterator[dict[str, str]]:
    """A new database per purpose on the PostgreSQL at POSTGRES, dropped afterwards; yields their
    SQLAlchemy URLs by purpose. Skips when the server or its driver is missing (fails under CI=true)."""
    if (missing := postgres_missing()) is not None:
        unavailable(missing)
    import psycopg2

    admin = psycopg2.connect(f"{POSTGRES}/postgres", connect_timeout=5)
    admin.autocommit = True  # CREATE/DROP DATABASE cannot run inside a transaction
    names = {p: f"cxr_test_{p}_{uuid.uuid4().hex[:8]}" for p in purposes}
    server = POSTGRES.split("://", 1)[1]
    try:
        with admin.cursor() as cur:
            for name in names.values():
                cur.execute(f'CREATE DATABASE "{name}"')
        yield {p: f"{POSTGRES_DIALECT}://{server}/{n}" for p, n in names.items()}
    finally:
        with admin.cursor() as cur:
            for name in names.values():
                cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()
