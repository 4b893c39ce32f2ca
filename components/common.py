"""What every component shares: the command line, params loading, MLflow runs, error reporting."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from pipeline import tracking
from pipeline.config import ConfigError, Params, Section, load_params
from pipeline.io import write_json
from pipeline.tracking import store

T = TypeVar("T")
RESOLVED = "resolved_config.json"
# exit status of a step stopped by SIGTERM, as a shell reports a process killed by it
TERMINATED_EXIT = 128 + signal.SIGTERM


class Terminated(BaseException):
    """SIGTERM arrived: an orchestrator stopped the task (a timeout, a task marked failed).

    Raised in the main thread so the step unwinds like Ctrl-C does: every `with` closes, and
    `mlflow_run` ends the step's run and shows its parent as KILLED instead of leaving them RUNNING.
    A BaseException, so that no `except Exception` (a retry loop, say) swallows it.
    """


def parser(doc: str | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    return p


def stage_config(args: argparse.Namespace, step: str) -> tuple[Any, Params]:
    """The validated section `step` of the params file, and the whole file.

    A step that logs to MLflow first checks that the tracking store answers: in seconds, before
    the params are validated (which imports the model library) or any work starts. The file's
    `profile` must name a profile of the project's conf/profile/ (the working directory's).
    """
    if not getattr(args, "no_mlflow", True):
        _check_store_once()
    from components.params import check_profile  # components.params imports this module

    params = load_params(args.params)
    check_profile(params.profile, args.params, Path.cwd())  # the project whose conf/ composed it
    return getattr(params, step), params


_STORES_CHECKED: set[str] = set()


def _check_store_once() -> None:
    """Check the tracking store the step logs to, once per process: stage_config checks it before
    the params are validated, mlflow_run before it opens the run, and a step does both."""
    uri = tracking.default_tracking_uri()
    if uri not in _STORES_CHECKED:
        store.check_tracking_store(uri)
        _STORES_CHECKED.add(uri)


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
    _check_store_once()  # before importing mlflow: seconds count here
    # MLflow prints "View run <name> at: <tracking URI>/..." as each run ends, password included, into
    # the step's output and so into the orchestrator's task log; _print_run_link prints it masked
    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
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
            _print_run_link(step, run)
            try:
                yield run
            except (Terminated, KeyboardInterrupt):
                mlflow.end_run("KILLED")  # stopped from outside; start_run's exit would say FAILED
                raise


def _print_run_link(step: str, run: Any) -> None:
    """Where the run shows in the tracking server's UI, its credentials masked (`tracking.run_url`)."""
    url = tracking.run_url(run)
    if url:
        print(f"[{step}] MLflow run {run.info.run_name}: {url}", flush=True)


def _pipeline_parent(experiment_id: str, execution, profile: str) -> str:
    from components.provenance import pipeline_tags

    return tracking.pipeline_parent(experiment_id, execution.key, execution.name, pipeline_tags(profile))


@contextlib.contextmanager
def _parent_state(parent: str | None) -> Iterator[None]:
    """The parent run shows RUNNING while the body runs, then FINISHED, FAILED when it raised, or
    KILLED when the step was stopped from outside (SIGTERM, Ctrl-C)."""
    if not parent:
        yield
        return
    tracking.mark_parent(parent, "RUNNING")
    try:
        yield
    except BaseException as e:
        stopped = isinstance(e, (Terminated, KeyboardInterrupt))
        with contextlib.suppress(Exception):  # the step's own error is the one to report
            tracking.mark_parent(parent, "KILLED" if stopped else "FAILED")
        raise
    tracking.mark_parent(parent, "FINISHED")


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """SIGTERM raises Terminated in this process while the body runs (Python's default would end
    the process at once, leaving its MLflow runs RUNNING); the previous handler comes back after."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    ours = os.getpid()

    def stop(signum: int, frame: Any) -> None:
        if os.getpid() != ours:  # a forked worker (data loading): end as it would have without us
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        # the orchestrator may signal the whole process group again: let the clean-up finish
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_main(step: str, fn: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """Run a component; user errors, and errors of the MLflow store, print one actionable line
    instead of a traceback (CXR_DEBUG=1 shows the traceback). SIGTERM ends the step's MLflow runs
    as KILLED, then exits with status 143."""
    if not os.environ.get("CXR_DEBUG"):
        # MLflow logs a database error's traceback before raising it; the raised error is reported below
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    try:
        with _sigterm_unwinds():
            return fn(argv) or 0
    except Terminated:
        print(f"cxr-dwml {step}: stopped by SIGTERM (a task timeout or stop); rerun the step", file=sys.stderr)
        return TERMINATED_EXIT
    except Exception as e:
        if not isinstance(e, (ConfigError, ValueError, OSError, RuntimeError, *store.tracking_errors())):
            raise
        if os.environ.get("CXR_DEBUG"):
            raise
        print(f"cxr-dwml {step}: error: {store.describe_error(e)}", file=sys.stderr)
        print(f"cxr-dwml {step}: (set CXR_DEBUG=1 for the traceback)", file=sys.stderr)
        return 2
