"""What every component shares: the command line, params loading, MLflow runs, error reporting."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import re
import socket
import sys
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from pipeline import tracking
from pipeline.config import ConfigError, Params, Section, load_params
from pipeline.io import write_json

T = TypeVar("T")
RESOLVED = "resolved_config.json"
# how long the reachability check of the tracking store waits before saying it is unreachable
TRACKING_TIMEOUT_S = 5.0
# database URI schemes of MLflow's SQL stores, with their servers' default ports
_DB_PORTS = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}


def parser(doc: str | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    return p


def stage_config(args: argparse.Namespace, step: str) -> tuple[Any, Params]:
    """The validated section `step` of the params file, and the whole file.

    A step that logs to MLflow first checks that the tracking store answers: in seconds, before
    the params are validated (which imports the model library) or any work starts.
    """
    if not getattr(args, "no_mlflow", True):
        check_tracking_store(tracking.default_tracking_uri())
    params = load_params(args.params)
    return getattr(params, step), params


def save_resolved(out: str | Path, step: str, cfg: Section, params: Params) -> None:
    """Keep the exact settings an output was made with beside it."""
    write_json(Path(out), {"step": step, "profile": params.profile, step: cfg.model_dump()})


def fingerprint(*parts: Any) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


@contextlib.contextmanager
def mlflow_run(
    args, params: Params, step: str, run_id: str | None = None, run_name: str | None = None
) -> Iterator[Any]:
    """A run of this step (or the existing `run_id`, to add to it); yields None with --no-mlflow.

    A step of a pipeline execution (`components.provenance.pipeline_run`: a DAG run, a `dvc repro`,
    or CXR_PIPELINE_RUN) nests its new run under the execution's parent run, found or created by
    its key, and shows its state on the parent while it runs. A step that adds to an earlier run
    (evaluate and register add to the training run) leaves that run where it is.
    """
    if args.no_mlflow:
        yield None
        return
    check_tracking_store(tracking.default_tracking_uri())  # before importing mlflow: seconds count here
    import mlflow

    from components.provenance import pipeline_run, run_tags

    experiment_id = tracking.setup(params.mlflow.experiment)
    tags = run_tags(step, params.profile)
    execution = pipeline_run()
    if run_id:
        # adding to another step's run: keep its identity, record this step's context beside it
        tags = {f"{k.replace('airflow.', f'airflow.{step}.')}": v for k, v in tags.items() if k.startswith("airflow.")}
        tags[f"cxr.step.{step}"] = "done"
        parent = execution and tracking.find_pipeline_parent(experiment_id, execution.key)
    else:
        parent = execution and _pipeline_parent(experiment_id, execution, params.profile)
        if parent:
            tags[tracking.PIPELINE_TAG] = execution.key
    with _parent_state(parent):
        with mlflow.start_run(
            run_id=run_id,
            run_name=None if run_id else (run_name or step),
            parent_run_id=None if run_id else parent,
            tags=tags,
        ) as run:
            yield run


def _pipeline_parent(experiment_id: str, execution, profile: str) -> str:
    from components.provenance import pipeline_tags

    return tracking.pipeline_parent(experiment_id, execution.key, execution.name, pipeline_tags(profile))


@contextlib.contextmanager
def _parent_state(parent: str | None) -> Iterator[None]:
    """The parent run shows RUNNING while the body runs, then FINISHED, or FAILED when it raised."""
    if not parent:
        yield
        return
    tracking.mark_parent(parent, "RUNNING")
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):  # the step's own error is the one to report
            tracking.mark_parent(parent, "FAILED")
        raise
    tracking.mark_parent(parent, "FINISHED")


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
    shown = tracking.redact_uri(uri)
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
    return _one_line(tracking.redact_text(re.sub(r"^<[^>]+>: ", "", text)), 200)


def _one_line(text: str, limit: int = 600) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _tracking_errors() -> tuple[type[BaseException], ...]:
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


def _describe(e: BaseException) -> str:
    """One line for `e`; MLflow and database errors also name the tracking store and what to do."""
    tracking_errors = _tracking_errors()
    if not tracking_errors or not isinstance(e, tracking_errors):
        return str(e)
    message = str(getattr(e, "message", None) or e)
    # SQLAlchemy appends the statement, its parameters and a link: the error itself is the first part
    message = re.split(r"\s*\[SQL: |\s*\(Background on this error", message, maxsplit=1)[0]
    store = tracking.redact_uri(_current_tracking_uri())
    return (
        f"MLflow tracking store {store}: {type(e).__name__}: {_one_line(tracking.redact_text(message))} "
        f"(check MLFLOW_TRACKING_URI, the store's state and its log)"
    )


def _current_tracking_uri() -> str:
    mlflow = sys.modules.get("mlflow")
    try:
        return mlflow.get_tracking_uri() if mlflow is not None else tracking.default_tracking_uri()
    except Exception:  # the URI is context in an error message; never a second error
        return tracking.default_tracking_uri()


def run_main(step: str, fn: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """Run a component; user errors, and errors of the MLflow store, print one actionable line
    instead of a traceback (CXR_DEBUG=1 shows the traceback)."""
    if not os.environ.get("CXR_DEBUG"):
        # MLflow logs a database error's traceback before raising it; the raised error is reported below
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    try:
        return fn(argv) or 0
    except Exception as e:
        if not isinstance(e, (ConfigError, ValueError, OSError, RuntimeError, *_tracking_errors())):
            raise
        if os.environ.get("CXR_DEBUG"):
            raise
        print(f"cxr-dwml {step}: error: {_describe(e)}", file=sys.stderr)
        print(f"cxr-dwml {step}: (set CXR_DEBUG=1 for the traceback)", file=sys.stderr)
        return 2
