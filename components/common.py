"""What every component shares: the command line, params loading, MLflow runs, error reporting."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from pipeline import tracking
from pipeline.config import ConfigError, Params, Section, load_params
from pipeline.io import write_json

T = TypeVar("T")
RESOLVED = "resolved_config.json"


def parser(doc: str | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    return p


def stage_config(args: argparse.Namespace, step: str) -> tuple[Any, Params]:
    """The validated section `step` of the params file, and the whole file."""
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
    """A run of this step (or the existing `run_id`, to add to it); yields None with --no-mlflow."""
    if args.no_mlflow:
        yield None
        return
    import mlflow

    from components.provenance import run_tags

    tracking.setup(params.mlflow.experiment)
    tags = run_tags(step, params.profile)
    if run_id:
        # adding to another step's run: keep its identity, record this step's context beside it
        tags = {f"{k.replace('airflow.', f'airflow.{step}.')}": v for k, v in tags.items() if k.startswith("airflow.")}
        tags[f"cxr.step.{step}"] = "done"
    with mlflow.start_run(run_id=run_id, run_name=None if run_id else (run_name or step), tags=tags) as run:
        yield run


def run_main(step: str, fn: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """Run a component; user errors print one actionable line instead of a traceback."""
    try:
        return fn(argv) or 0
    except (ConfigError, ValueError, OSError, RuntimeError) as e:
        if os.environ.get("CXR_DEBUG"):
            raise
        print(f"cxr-dwml {step}: error: {e}", file=sys.stderr)
        print(f"cxr-dwml {step}: (set CXR_DEBUG=1 for the traceback)", file=sys.stderr)
        return 2
