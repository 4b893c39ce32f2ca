"""Reproduce one DVC stage for an orchestrator run, with that run's profile and overrides.

Run from anywhere, with the project venv's Python (the Airflow DAG `cxr_dwml` does):
    python scripts/dvc_stage.py train                               # dvc repro --single-item train
    python scripts/dvc_stage.py train --set train.epochs=2 --set profile=paper
    CXR_RUN_OVERRIDES='{"train.epochs": 2}' python scripts/dvc_stage.py train

params.yaml is composed from conf/ with the run's profile and overrides by the same composition
`dvc exp run -S` performs (`components.params`), the stage is reproduced with `dvc repro
--single-item`, and params.yaml is put back byte for byte afterwards: dvc.lock records the values
that ran while params.yaml stays as committed. An unchanged stage is skipped by DVC; a retried
train stage resumes from its `last.pt` (artifacts/model is persistent).

DVC holds one repository lock per workspace, so calls are serialised by a file lock in
`.dvc/tmp/` (a second call waits instead of failing); a params.yaml left behind by a killed call
is restored by the next one. After the stage, `dvc checkout --relink` makes its outputs links into
the DVC cache (`.dvc/config`: cache.type hardlink,symlink), copies left by older runs included.
With CXR_DVC_REMOTE_URL set (and CXR_DVC_REMOTE_ENDPOINT for an S3-compatible store), the stage's
outputs are pushed to that remote afterwards.

The register stage ends with one line `[dvc_stage] champion: {...}`, a JSON object saying whether
this call moved the champion alias (`champion_moved`) and to which version: the last line of a
task's output is what Airflow keeps as its XCom, from which the DAG's `champion` task decides
whether to announce a new champion. In a pod the same object goes to /airflow/xcom/return.json.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from components.params import compose, override_strings, parse_sets
from pipeline.config import ConfigError
from pipeline.io import write_text
from pipeline.tracking import redact_uri

PARAMS = "params.yaml"
STATE_DIR = Path(".dvc") / "tmp" / "cxr-stage"
REMOTE = "cxr-remote"


class StageError(RuntimeError):
    """A wrong override or workspace; the message says what to fix."""


def parse_overrides(env_json: str | None, sets: list[str]) -> dict[str, Any]:
    """Dotted-key overrides from a JSON object (CXR_RUN_OVERRIDES) and `key=value` strings."""
    out: dict[str, Any] = {}
    if env_json and env_json.strip():
        try:
            loaded = json.loads(env_json)
        except json.JSONDecodeError as e:
            raise StageError(f"CXR_RUN_OVERRIDES is not valid JSON ({e}); pass an object of dotted keys") from None
        if not isinstance(loaded, dict):
            raise StageError('CXR_RUN_OVERRIDES must be a JSON object such as {"train.epochs": 2}')
        out.update(loaded)
    try:
        out.update(parse_sets(sets))
    except ConfigError as e:
        raise StageError(str(e)) from None
    for key in out:
        if not key or any(not part for part in key.split(".")):
            raise StageError(f"override key {key!r} is not a dotted params key such as 'train.epochs'")
    return {k: v for k, v in out.items() if v is not None}


def composed_params(root: Path, overrides: dict[str, Any]) -> str:
    """params.yaml's text for this run: conf/ composed with the run's profile and overrides."""
    try:
        text, _ = compose(root, override_strings(overrides))
    except ConfigError as e:
        raise StageError(str(e)) from None
    return text


@contextlib.contextmanager
def workspace_lock(root: Path) -> Iterator[None]:
    state = root / STATE_DIR
    state.mkdir(parents=True, exist_ok=True)
    with open(state / "lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # blocks: the orchestrator's execution timeout bounds the wait
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def restore_backups(root: Path) -> list[Path]:
    """Put back the files a previous (possibly killed) call patched; returns what was restored."""
    backups = root / STATE_DIR / "backup"
    restored = []
    if backups.is_dir():
        for saved in sorted(backups.rglob("*")):
            if saved.is_file():
                target = root / saved.relative_to(backups)
                os.replace(saved, target)
                restored.append(target)
        shutil.rmtree(backups)
    return restored


@contextlib.contextmanager
def applied(root: Path, text: str) -> Iterator[None]:
    """params.yaml holds `text` for the body of the `with`; the committed file is back afterwards."""
    path = root / PARAMS
    if path.read_text(encoding="utf-8") == text:
        yield
        return
    saved = root / STATE_DIR / "backup" / PARAMS
    try:
        saved.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, saved)  # the backup exists before the file changes
        write_text(path, text)
        yield
    finally:
        restore_backups(root)


def run(cmd: list[str], cwd: Path) -> int:
    print("+ " + " ".join(redact_uri(arg) for arg in cmd), flush=True)  # a remote URL may hold a password
    proc = subprocess.Popen(cmd, cwd=cwd)
    try:
        return proc.wait()
    except BaseException:
        # killed from outside (task timeout): let DVC finish its own clean-up before files move back
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=60)
        raise


def configure_remote(root: Path, url: str, endpoint: str) -> None:
    """The remote REMOTE in .dvc/config.local, as `dvc remote add --local --force` and `dvc remote
    modify --local ... endpointurl` set it, in this process (two DVC start-ups fewer per task)."""
    from dvc.config import Config, ConfigError

    remote = {"url": url, **({"endpointurl": endpoint} if endpoint else {})}
    try:
        # --local: the remote (and any endpoint) lands in config.local, never in the committed config
        with Config(dvc_dir=str(root / ".dvc")).edit("local") as conf:
            conf["remote"][REMOTE] = remote
    except ConfigError as e:
        shown = redact_uri(url) + (f" at {redact_uri(endpoint)}" if endpoint else "")
        raise StageError(
            f"DVC rejects the remote {shown} ({e}): fix CXR_DVC_REMOTE_URL / CXR_DVC_REMOTE_ENDPOINT"
        ) from None


def push(root: Path, stage: str) -> int:
    url = os.environ.get("CXR_DVC_REMOTE_URL", "").strip()
    if not url:
        print(f"[dvc_stage] CXR_DVC_REMOTE_URL is not set: outputs of '{stage}' stay in the local cache")
        return 0
    endpoint = os.environ.get("CXR_DVC_REMOTE_ENDPOINT", "").strip()
    where = f"{redact_uri(url)} at {redact_uri(endpoint)}" if endpoint else redact_uri(url)
    configure_remote(root, url, endpoint)
    print(f"[dvc_stage] DVC remote {REMOTE}: {where} (.dvc/config.local)", flush=True)
    rc = run(["dvc", "--wait-for-lock", "push", "--remote", REMOTE, stage], root)
    if rc:
        print(
            f"dvc_stage: error: dvc push of stage '{stage}' to the DVC remote {REMOTE} ({where}) failed; "
            "its outputs are safe in the local cache: check that the object store is up and that "
            "CXR_DVC_REMOTE_URL, CXR_DVC_REMOTE_ENDPOINT and the AWS_* credentials are right, then retry the task",
            file=sys.stderr,
        )
    return rc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", help="a stage name of dvc.yaml")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a params key for this run (repeatable), e.g. train.epochs=2",
    )
    p.add_argument(
        "--project",
        default=os.environ.get("CXR_PROJECT_DIR") or ".",
        help="project folder (default: $CXR_PROJECT_DIR or the current folder)",
    )
    args = p.parse_args(argv)
    root = Path(args.project).resolve()
    if not (root / "dvc.yaml").exists():
        raise StageError(f"{root}/dvc.yaml not found: set CXR_PROJECT_DIR to the project checkout")
    overrides = parse_overrides(os.environ.get("CXR_RUN_OVERRIDES"), args.set)
    # SIGTERM (a timeout or a cleared task) must unwind through `finally` to restore params.yaml
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with workspace_lock(root):
        for path in restore_backups(root):
            print(f"[dvc_stage] restored {path} left patched by an interrupted run")
        if overrides:
            shown = {k: redact_uri(v) if isinstance(v, str) else v for k, v in overrides.items()}
            print(f"[dvc_stage] overrides for this run: {json.dumps(shown, sort_keys=True)}")
        before = _read_bytes(root / REGISTRATION) if args.stage == "register" else None
        with applied(root, composed_params(root, overrides)):
            rc = run(["dvc", "--wait-for-lock", "repro", "--single-item", args.stage], root)
            if rc == 0:  # outputs left as copies (by a run under an older cache.type) become links
                rc = run(["dvc", "--wait-for-lock", "checkout", "--relink", args.stage], root)
        if rc == 0:
            rc = push(root, args.stage)
    if rc == 0 and args.stage == "register":
        announce_champion(champion_change(before, _read_bytes(root / REGISTRATION)))
    return rc


REGISTRATION = Path("reports") / "registration.json"
XCOM_FILE = Path("/airflow/xcom/return.json")  # what KubernetesPodOperator's XCom sidecar reads


def _read_bytes(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def champion_change(before: bytes | None, after: bytes | None) -> dict[str, Any]:
    """Whether the register step just run moved the champion alias, from its record before and after.

    An unchanged record means DVC skipped the step (its inputs had not changed): nothing moved.
    """
    if after is None:
        raise StageError(f"{REGISTRATION} is missing after the register stage: rerun the register task")
    if after == before:
        return {
            "champion_moved": False,
            "reason": "the register stage was skipped: its inputs are unchanged since the run that wrote "
            f"{REGISTRATION}",
        }
    from components.register import champion_change as from_record

    return from_record(json.loads(after))


def announce_champion(change: dict[str, Any], xcom_file: Path = XCOM_FILE) -> None:
    """The change as the output's last line (Airflow's XCom of a local task) and, in a pod, as its XCom file."""
    text = json.dumps(change, sort_keys=True)
    if xcom_file.parent.is_dir():
        write_text(xcom_file, text)
    print(f"[dvc_stage] champion: {text}", flush=True)


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except StageError as e:
        print(f"dvc_stage: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
