"""Whether the MLflow tracking store can be used, asked in seconds before a step starts its work.

MLflow's own client retries an unreachable server for minutes and reports a database it cannot
write with a stack of wrapped errors. A step asks here first and fails in one line that names the
store (credentials masked) and what to do; `describe_error` turns MLflow's and the databases'
errors raised later into the same kind of line.
"""

from __future__ import annotations

import os
import re
import socket
import sys
import urllib.parse
from pathlib import Path

from . import default_tracking_uri, one_line, redact_text, redact_uri

# how long the reachability check of the tracking store waits before saying it is unreachable
TRACKING_TIMEOUT_S = 5.0
# database URI schemes of MLflow's SQL stores, with their servers' default ports
_DB_PORTS = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}


class TrackingStoreError(RuntimeError):
    """The MLflow tracking store `store` (credentials masked) cannot be used: `detail` says why and
    what to do."""

    def __init__(self, store: str, detail: str) -> None:
        super().__init__(f"MLflow tracking store {store}: {detail}")
        self.store, self.detail = store, detail


def check_tracking_store(uri: str, write: bool = True, timeout: float = TRACKING_TIMEOUT_S) -> None:
    """Fail within `timeout` seconds, in one line, when the store at `uri` cannot be used.

    http(s): GET <uri>/health, once, no retries (MLflow's own client retries for minutes), must
    get an answer that is not a server error; sqlite and file stores (only when `write`): the
    database file and its folder, or the folder that will hold them, must be writable; PostgreSQL,
    MySQL and SQL Server: their port must accept a connection. Other schemes (databricks, ...) are
    not checked.

    Raises:
        TrackingStoreError: naming the store (credentials redacted) and what to do.
    """
    shown = redact_uri(uri)
    fix = "start it, or point MLFLOW_TRACKING_URI at a store that is up (or pass --no-mlflow where the step has it)"
    if "://" in uri or uri.startswith("file:"):
        scheme = uri.split(":", 1)[0].lower()
    elif ":" in uri or uri.startswith("databricks"):
        return  # databricks, databricks-uc, databricks://profile: reached through their own clients
    else:
        scheme = "file"  # a plain folder path
    if scheme in ("http", "https"):
        _check_http(uri, shown, fix, timeout)
    elif scheme == "sqlite" and write:
        _check_sqlite(uri, shown)
    elif scheme == "file" and write:
        folder = Path(urllib.parse.urlsplit(uri).path if uri.startswith("file:") else uri)
        _check_writable_folder(folder if folder.exists() else _existing_parent(folder), shown)
    elif scheme.split("+", 1)[0] in _DB_PORTS:
        parts = urllib.parse.urlsplit(uri)
        port = parts.port or _DB_PORTS[scheme.split("+", 1)[0]]
        try:
            socket.create_connection((parts.hostname or "localhost", port), timeout=timeout).close()
        except OSError as e:
            raise TrackingStoreError(shown, f"its database server is not reachable ({_reason(e)}): {fix}") from None


def _check_http(uri: str, shown: str, fix: str, timeout: float) -> None:
    import requests

    insecure = os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true"
    verify: bool | str = not insecure and (os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH") or True)
    try:
        r = requests.get(f"{uri.rstrip('/')}/health", timeout=timeout, verify=verify, allow_redirects=True)
    except requests.RequestException as e:
        raise TrackingStoreError(shown, f"the tracking server is not reachable ({_reason(e)}): {fix}") from None
    if r.status_code >= 500:  # a proxy whose server is down, or a server that cannot reach its database
        raise TrackingStoreError(
            shown,
            f"the tracking server answers HTTP {r.status_code} to GET /health: "
            f"check the server's log, or point MLFLOW_TRACKING_URI at a store that is up",
        )


def _check_sqlite(uri: str, shown: str) -> None:
    # sqlite:///relative.db, sqlite:////absolute.db; a URI filename (?mode=...) is left to SQLite
    path = urllib.parse.unquote(uri.split("://", 1)[1].split("?", 1)[0])
    path = path[1:] if path.startswith("/") else path
    if not path or path == ":memory:":
        return
    db = Path(path)
    if db.exists():
        try:
            os.close(os.open(db, os.O_RDWR))  # what SQLite needs to record a run: the OS decides, root or not
        except OSError as e:
            raise TrackingStoreError(
                shown,
                f"{db} cannot be opened for writing ({_reason(e)}): "
                f"make it writable (chmod u+w {db}), or point MLFLOW_TRACKING_URI at a writable store",
            ) from None
        _check_writable_folder(db.parent, shown)  # SQLite writes its journal beside the database
    else:
        _check_writable_folder(_existing_parent(db.parent), shown)


def _existing_parent(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_writable_folder(folder: Path, shown: str) -> None:
    if not os.access(folder, os.W_OK | os.X_OK):
        raise TrackingStoreError(
            shown,
            f"folder {folder} is not writable: make it writable "
            f"(chmod u+w {folder}), or point MLFLOW_TRACKING_URI at a writable store",
        )


def _reason(e: BaseException) -> str:
    """The innermost cause of a connection error, in a few words (no stack of wrapped exceptions)."""
    while e.__cause__ is not None or e.__context__ is not None:
        e = e.__cause__ or e.__context__
    text = str(e.args[-1] if isinstance(e, OSError) and len(e.args) > 1 else e) or type(e).__name__
    return one_line(redact_text(re.sub(r"^<[^>]+>: ", "", text)), 200)


def tracking_errors() -> tuple[type[BaseException], ...]:
    """MLflow's and the databases' exception classes, among those already imported (a class never
    imported cannot have been raised)."""
    found: list[type[BaseException]] = []
    for module, name in (
        ("mlflow.exceptions", "MlflowException"),
        ("sqlite3", "Error"),
        ("sqlalchemy.exc", "SQLAlchemyError"),
    ):
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type):
            found.append(cls)
    return tuple(found)


def describe_error(e: BaseException) -> str:
    """One line for `e`; MLflow and database errors also name the tracking store and what to do."""
    known = tracking_errors()
    if not known or not isinstance(e, known):
        return str(e)
    message = str(getattr(e, "message", None) or e)
    # SQLAlchemy appends the statement, its parameters and a link: the error itself is the first part
    message = re.split(r"\s*\[SQL: |\s*\(Background on this error", message, maxsplit=1)[0]
    store = redact_uri(_current_tracking_uri())
    return (
        f"MLflow tracking store {store}: {type(e).__name__}: {one_line(redact_text(message))} "
        f"(check MLFLOW_TRACKING_URI, the store's state and its log)"
    )


def _current_tracking_uri() -> str:
    mlflow = sys.modules.get("mlflow")
    try:
        return mlflow.get_tracking_uri() if mlflow is not None else default_tracking_uri()
    except Exception:  # the URI is context in an error message; never a second error
        return default_tracking_uri()
