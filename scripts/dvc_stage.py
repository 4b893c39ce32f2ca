"""Run one Airflow DAG run of the pipeline in a workspace of its own: create it, reproduce one DVC
stage there, then record the run as a DVC experiment and remove the workspace.

Run with the project venv's Python, as the DAG `cxr_dwml` does (`CXR_RUN_ID` = Airflow's run id):
    python scripts/dvc_stage.py create  --run-id R      # git worktree + params.yaml for run R
    python scripts/dvc_stage.py train   --run-id R      # dvc repro --single-item train, in R's workspace
    python scripts/dvc_stage.py finish  --run-id R      # dvc exp save -n dag-R, then remove the workspace

`create` adds a git worktree of the project at its current commit (the deployed code) under
`.dvc/tmp/runs/<run>` (CXR_WORKSPACES_DIR elsewhere). The worktree uses the project's DVC cache,
so outputs are links into it and nothing is copied. It starts from the outputs of the last DAG run
saved as an experiment (or from the project's own dvc.lock): DVC reruns only what changed. The run's
params.yaml is composed there once, from conf/ with the run's profile and overrides
(CXR_RUN_OVERRIDES, `--set`), by the composition `dvc exp run -S` performs (`components.params`).

A stage runs `dvc repro --single-item <stage>` in the workspace. DVC's lock is per workspace, so
runs do not wait for each other; within a run, `--wait-for-lock` lets stages that run side by
side (prepare, prototypes) take turns. A retried or cleared stage runs again in the same workspace,
and train resumes from its `last.pt`. SIGTERM (a task timeout, a task marked failed, a pod
eviction) is passed on to the stage's process group: each component marks its MLflow runs KILLED
and DVC releases its lock before this exits. With CXR_DVC_REMOTE_URL set (and
CXR_DVC_REMOTE_ENDPOINT for an S3-compatible store) the stage's outputs are pushed afterwards.

`finish` saves a run whose stages all succeeded as the DVC experiment `dag-<run>` (its params,
dvc.lock, metrics and plots: `dvc exp show` lists it, `dvc exp apply dag-<run>` brings it into a
checkout; the commit message names the DAG run and its MLflow parent run) and removes the
workspace. A failed run's workspace is kept for inspection and for a cleared task to resume in,
unless CXR_KEEP_FAILED_WORKSPACES=false. Nothing is written to the project's own files; the MLflow
store of a project without MLFLOW_TRACKING_URI stays the project's mlflow.db.

The register stage ends with one line `[dvc_stage] champion: {...}`, a JSON object saying whether
this call moved the champion alias (`champion_moved`) and to which version: the last line of a
task's output is what Airflow keeps as its XCom, from which the DAG's `champion` task decides
whether to announce a new champion. In a pod the same object goes to /airflow/xcom/return.json.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from components.params import compose, override_strings, parse_sets
from pipeline.config import ConfigError
from pipeline.io import read_json, write_json, write_text
from pipeline.tracking import STORE_ROOT_ENV, redact_uri

PARAMS = "params.yaml"
REMOTE = "cxr-remote"
RUNS_DIR = Path(".dvc") / "tmp" / "runs"  # DVC's own scratch folder: ignored by git and by DVC
STATE = Path(".dvc") / "tmp" / "cxr-run"  # in a workspace: who it belongs to, which stages are done
EXPERIMENT_PREFIX = "dag-"
COMMANDS = ("create", "finish")


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


def slug(run_id: str) -> str:
    """A folder and git ref name for an Airflow run id (`manual__2026-01-05T03:00:00+00:00`): letters,
    digits, `.`, `_` and `-` only, so no run id can name a path outside the runs folder; a hash
    of the id keeps two ids that differ only in other characters apart."""
    text = re.sub(r"[^A-Za-z0-9._-]+", "-", run_id.strip())
    text = re.sub(r"\.{2,}", ".", text).strip(".-")[:100].strip(".-")  # git refs allow no `..`
    if not text:
        raise StageError(f"run id {run_id!r} has no letters or digits: give the DAG run an id that does")
    if text != run_id or text.endswith(".lock"):  # nor a name ending in .lock
        text += "-" + hashlib.sha256(run_id.encode()).hexdigest()[:8]
    return text


@dataclass(frozen=True)
class Workspace:
    project: Path
    path: Path
    run_id: str

    @classmethod
    def of(cls, project: Path, run_id: str) -> Workspace:
        runs = Path(os.environ.get("CXR_WORKSPACES_DIR") or RUNS_DIR)
        runs = runs if runs.is_absolute() else project / runs
        return cls(project, runs / slug(run_id), run_id)

    @property
    def experiment(self) -> str:
        return EXPERIMENT_PREFIX + slug(self.run_id)

    @property
    def record(self) -> Path:
        return self.path / STATE / "run.json"

    def done(self, stage: str) -> Path:
        return self.path / STATE / "done" / stage

    def owned(self) -> bool:
        try:
            return read_json(self.record).get("run_id") == self.run_id
        except (OSError, ValueError, AttributeError):
            return False

    def require(self) -> None:
        if not self.owned():
            raise StageError(
                f"the workspace of DAG run {self.run_id!r} ({self.path}) does not exist: its `workspace` "
                "task did not run or failed; clear that task to create it"
            )


def git(cwd: Path, *args: str, what: str) -> str:
    """git's output; a failure raises StageError with `what` and git's own last line."""
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise StageError(f"{what}: git {args[0]} did not run ({e})") from None
    if done.returncode:
        last = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        raise StageError(f"{what}: git {args[0]} failed: {last}")
    return done.stdout


def uncached_outputs(dvc_yaml: Path) -> list[str]:
    """The outputs dvc.yaml marks `cache: false` (metrics, plots, small reports): DVC does not
    restore them from its cache, so a new workspace copies them from where it starts from."""
    stages = (yaml.safe_load(dvc_yaml.read_text(encoding="utf-8")) or {}).get("stages") or {}
    found = []
    for stage in stages.values():
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind) or []:
                if isinstance(entry, dict):
                    found += [p for p, opts in entry.items() if isinstance(opts, dict) and opts.get("cache") is False]
    return [p for p in found if "${" not in p]


def stage_names(root: Path) -> list[str]:
    return list((yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8")) or {}).get("stages") or {})


def last_experiment(project: Path) -> str | None:
    """The git ref of the DAG run most recently saved as an experiment, or None."""
    refs = git(
        project,
        "for-each-ref",
        "--sort=-committerdate",
        "--format=%(refname)",
        "refs/exps/",
        what="cannot list the DVC experiments",
    )
    for ref in refs.split():
        if "/exec/" not in ref and ref.rsplit("/", 1)[-1].startswith(EXPERIMENT_PREFIX):
            return ref
    return None


def seed(ws: Workspace) -> str:
    """dvc.lock and the uncached outputs of the last DAG run (else of the project checkout) in the
    new workspace, then `dvc checkout`: the cached outputs become links into the shared cache, and
    DVC reruns only the stages whose code, data or params changed since. Returns where it started."""
    paths = ["dvc.lock", *uncached_outputs(ws.path / "dvc.yaml")]
    ref = last_experiment(ws.project)
    if ref:
        source = f"the DVC experiment {ref.rsplit('/', 1)[-1]}"
        listed = git(ws.project, "ls-tree", "-r", "--name-only", ref, "--", *paths, what=f"cannot read {ref}")
        for name in listed.split("\n"):
            if name:
                blob = subprocess.run(["git", "show", f"{ref}:{name}"], cwd=ws.project, capture_output=True)
                if blob.returncode:
                    raise StageError(f"cannot read {name} of {source} in {ws.project}: {blob.stderr.decode().strip()}")
                (ws.path / name).parent.mkdir(parents=True, exist_ok=True)
                (ws.path / name).write_bytes(blob.stdout)
    elif (ws.project / "dvc.lock").is_file():
        source = f"the dvc.lock of {ws.project}"
        for name in paths:
            src, dst = ws.project / name, ws.path / name
            if src.is_dir():
                shutil.copytree(src, dst, dirs_exist_ok=True)
            elif src.is_file():
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst)
    else:
        return "nothing (no earlier run): every stage runs"
    # a missing cache object is not an error: its stage simply runs again
    if run(["dvc", "checkout", "--allow-missing", "--quiet"], ws.path, quiet=True) != 0:
        print("[dvc_stage] warning: dvc checkout of the earlier outputs failed: the stages will rerun", flush=True)
    return source


def link_cache(ws: Workspace) -> None:
    """The workspace uses the project's DVC cache (`dvc cache dir --local`, in .dvc/config.local)."""
    from dvc.config import Config
    from dvc.repo import Repo

    with Repo(str(ws.project)) as repo:
        cache = repo.cache.local_cache_dir
    with Config(dvc_dir=str(ws.path / ".dvc")).edit("local") as conf:
        conf["cache"]["dir"] = str(cache)


def create(ws: Workspace, overrides: dict[str, Any]) -> None:
    """The run's workspace: a git worktree of the project's current commit, its DVC cache, the
    last run's outputs and the run's params.yaml. Creating it again for the same run (a cleared
    task) keeps what is there."""
    if ws.owned():
        write_text(ws.path / PARAMS, composed_params(ws.path, overrides))
        print(f"[dvc_stage] reusing the workspace of DAG run {ws.run_id!r}: {ws.path}", flush=True)
        return
    commit = git(
        ws.project,
        "rev-parse",
        "--verify",
        "HEAD^{commit}",
        what=f"{ws.project} is not a git checkout with a commit, which the DAG runs each run in a worktree of; "
        "commit the project (git init; git add -A; git commit) or point CXR_PROJECT_DIR at its checkout",
    ).strip()
    if ws.path.exists():  # left by a workspace task killed before it finished
        print(f"[dvc_stage] removing the unfinished workspace {ws.path}", flush=True)
        remove(ws)
    try:
        ws.path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StageError(f"cannot create the runs folder {ws.path.parent} ({e}): fix CXR_WORKSPACES_DIR") from None
    git(
        ws.project,
        "worktree",
        "add",
        "--detach",
        str(ws.path),
        commit,
        what=f"cannot create the workspace {ws.path} of DAG run {ws.run_id!r}",
    )
    try:
        params = composed_params(ws.path, overrides)  # a wrong override fails before anything else
        link_cache(ws)
        source = seed(ws)
        if overrides:
            shown = {k: redact_uri(v) if isinstance(v, str) else v for k, v in overrides.items()}
            print(f"[dvc_stage] overrides for this run: {json.dumps(shown, sort_keys=True)}")
        # composed from the worktree's conf/, the commit's (not the checkout's, which may hold edits)
        write_text(ws.path / PARAMS, params)
        write_json(ws.record, {"run_id": ws.run_id, "experiment": ws.experiment, "commit": commit, "from": source})
    except BaseException:
        with contextlib.suppress(Exception):
            remove(ws)
        raise
    print(
        f"[dvc_stage] workspace of DAG run {ws.run_id!r}: {ws.path} (commit {commit[:12]}, starting from {source})",
        flush=True,
    )


def remove(ws: Workspace) -> None:
    try:
        git(ws.project, "worktree", "remove", "--force", "--force", str(ws.path), what=f"cannot remove {ws.path}")
    except StageError:
        shutil.rmtree(ws.path, ignore_errors=True)
    git(ws.project, "worktree", "prune", what="cannot prune the worktree list")


def run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, quiet: bool = False) -> int:
    """Run `cmd` in a process group of its own; stopped from outside (SIGTERM, Ctrl-C), stop it
    (`stop`) before going on."""
    if not quiet:
        print("+ " + " ".join(redact_uri(arg) for arg in cmd), flush=True)  # a remote URL may hold a password
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, start_new_session=True)
    try:
        return proc.wait()
    except BaseException:
        stop(proc)
        mend_rwlock(cwd)
        raise


def stop(proc: subprocess.Popen) -> None:
    """Stop DVC and the stage it runs, in the order that leaves nothing locked or RUNNING.

    While DVC runs a stage's command it ignores SIGINT and waits: SIGTERM goes to what it runs (the
    stage's component marks its MLflow runs KILLED), and DVC, its command failed, lets go of its locks
    and exits by itself. It is not interrupted then, because an interrupt that lands as it rewrites
    its lock file leaves that file empty and every later DVC command in the folder failing on it.
    DVC at work without a command (hashing, checking out, pushing) gets SIGINT, as from Ctrl-C, and
    so does a DVC still there a grace period (CXR_STOP_GRACE_SECONDS, 30) after its command ended. A
    command still alive after the grace period gets SIGKILL; so does whatever is left of the group
    after as long again."""
    import psutil

    try:
        grace = float(os.environ.get("CXR_STOP_GRACE_SECONDS") or 30)
    except ValueError:
        grace = 30.0

    with contextlib.suppress(ValueError):  # a second SIGTERM (the orchestrator's group kill) must not cut this short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)

    def interrupt() -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGINT)

    try:
        below = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        below = []
    for child in below:
        with contextlib.suppress(psutil.Error):
            child.terminate()
    if not below:
        interrupt()
    _, alive = psutil.wait_procs(below, timeout=grace)
    for child in alive:  # a command that hangs on its way out (a stuck worker process, a thread)
        with contextlib.suppress(psutil.Error):
            child.kill()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        interrupt()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
    with contextlib.suppress(ProcessLookupError):  # whatever is left of the group
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def mend_rwlock(cwd: Path) -> None:
    """DVC rewrites `.dvc/tmp/rwlock` in place, under its guard `rwlock.lock`: a DVC process killed
    between the two leaves the file empty or cut short, and every later DVC command in the folder
    stops on it. Under the same guard (so a live writer is never taken for a dead one) such a file
    is reset to no locks: what it listed is lost either way, and DVC drops a dead process's entries."""
    folder = cwd / ".dvc" / "tmp"
    path = folder / "rwlock"
    if not path.is_file():
        return
    from dvc.lock import LockError, make_lock

    with contextlib.suppress(LockError, OSError), make_lock(str(folder / "rwlock.lock"), tmp_dir=str(folder)):
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            write_text(path, "{}")
            print(f"[dvc_stage] DVC's lock file {path} was left unreadable by the stopped DVC: reset", flush=True)


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


def run_stage(ws: Workspace, stage: str) -> int:
    """`dvc repro --single-item stage` in the run's workspace, then the push to the DVC remote."""
    ws.require()
    if stage not in stage_names(ws.path):
        raise StageError(f"'{stage}' is not a stage of dvc.yaml; stages: {', '.join(stage_names(ws.path))}")
    ws.done(stage).unlink(missing_ok=True)
    # the components' default MLflow store is the project's, not the workspace's (removed at the end)
    env = {**os.environ, STORE_ROOT_ENV: str(ws.project)}
    before = _read_bytes(ws.path / REGISTRATION) if stage == "register" else None
    print(f"[dvc_stage] DAG run {ws.run_id!r}, workspace {ws.path}", flush=True)
    rc = run(["dvc", "--wait-for-lock", "repro", "--single-item", stage], ws.path, env)
    if rc == 0:
        rc = push(ws.path, stage)
    if rc == 0:
        ws.done(stage).parent.mkdir(parents=True, exist_ok=True)
        ws.done(stage).touch()
        if stage == "register":
            announce_champion(champion_change(before, _read_bytes(ws.path / REGISTRATION)))
    return rc


def mlflow_parent(ws: Workspace) -> str | None:
    """The MLflow parent run of this DAG run (tagged with the experiment's name here), or None."""
    from components.provenance import pipeline_run
    from pipeline import tracking

    execution = pipeline_run()
    if execution is None:
        return None
    name = ((yaml.safe_load((ws.path / PARAMS).read_text(encoding="utf-8")) or {}).get("mlflow") or {}).get(
        "experiment"
    )
    try:
        import mlflow

        mlflow.set_tracking_uri(tracking.default_tracking_uri(ws.project))
        client = mlflow.MlflowClient()
        found = client.get_experiment_by_name(name) if name else None
        parent = found and tracking.find_pipeline_parent(found.experiment_id, execution.key)
        if parent:
            client.set_tag(parent, "cxr.dvc_experiment", ws.experiment)
        return parent or None
    except Exception as e:  # the experiment is saved either way; the message says what is missing
        print(f"[dvc_stage] warning: the MLflow parent run was not found ({tracking.one_line(e, 300)})", flush=True)
        return None


def finish(ws: Workspace, keep_failed: bool) -> int:
    """Save a finished run as the DVC experiment `dag-<run>` and remove its workspace; keep a failed
    run's workspace (unless keep_failed is off) for inspection and for a cleared task."""
    if not ws.path.exists():
        print(f"[dvc_stage] DAG run {ws.run_id!r} has no workspace (its workspace task failed): nothing to record")
        return 0
    ws.require()
    undone = [s for s in stage_names(ws.path) if not ws.done(s).exists()]
    if undone:
        if keep_failed:
            print(
                f"[dvc_stage] DAG run {ws.run_id!r} did not finish (not done: {', '.join(undone)}): its workspace "
                f"{ws.path} is kept; clear a failed task to resume there, or remove it with "
                f"`git -C {ws.project} worktree remove --force {ws.path}`",
                flush=True,
            )
        else:
            remove(ws)
            print(
                f"[dvc_stage] DAG run {ws.run_id!r} did not finish (not done: {', '.join(undone)}): workspace removed"
            )
        return 0
    parent = mlflow_parent(ws)
    dag = os.environ.get("AIRFLOW_CTX_DAG_ID", "cxr_dwml")
    message = f"DAG run {ws.run_id} of {dag}; MLflow parent run {parent or 'unknown'}"
    # the run's metrics, plots and .gitignore files are new to git: the experiment holds them too,
    # and so do outputs marked `cache: false` in folders git ignores (artifacts/)
    untracked = git(ws.path, "ls-files", "--others", "--exclude-standard", "-z", what="cannot list the run's files")
    files = {name for name in untracked.split("\0") if name}
    for out in uncached_outputs(ws.path / "dvc.yaml"):
        found = ws.path / out
        inside = found.rglob("*") if found.is_dir() else [found] if found.is_file() else []
        files.update(str(f.relative_to(ws.path)) for f in inside if f.is_file())
    include = [a for name in sorted(files) for a in ("-I", name)]
    cmd = ["dvc", "exp", "save", "--force", "--quiet", "-n", ws.experiment, "-m", message, *include]
    env = committer_env(ws.path)
    for attempt in range(3):  # two runs saving at once may meet on a git lock: try again
        if run(cmd, ws.path, env, quiet=True) == 0:
            break
        if attempt == 2:
            raise StageError(
                f"dvc exp save of DAG run {ws.run_id!r} failed three times: its workspace {ws.path} is kept; "
                "clear the finish task to try again"
            )
        time.sleep(2 + 3 * attempt)
    share(ws, env)
    remove(ws)
    print(
        f"[dvc_stage] DAG run {ws.run_id!r} saved as the DVC experiment {ws.experiment} (MLflow parent run "
        f"{parent or 'unknown'}): `dvc exp show` lists it, `dvc exp apply {ws.experiment}` brings it into a checkout",
        flush=True,
    )
    return 0


def committer_env(cwd: Path) -> dict[str, str]:
    """The environment for `dvc exp save`: a git identity for its commit where git has none (an
    image or a pod with no git configuration); a configured one is kept."""
    env = dict(os.environ)
    for key in ("name", "email"):
        configured = subprocess.run(["git", "config", f"user.{key}"], cwd=cwd, capture_output=True, text=True)
        if not configured.stdout.strip():
            value = "cxr-dwml DAG" if key == "name" else "cxr-dwml@localhost"
            for who in ("AUTHOR", "COMMITTER"):
                env.setdefault(f"GIT_{who}_{key.upper()}", value)
    return env


def share(ws: Workspace, env: dict[str, str]) -> None:
    """`dvc exp push` of the run to the git remote CXR_EXPERIMENTS_REMOTE (a remote name or URL), where
    the project's checkouts get it with `dvc exp pull <remote> <name>`; nothing without it."""
    remote = os.environ.get("CXR_EXPERIMENTS_REMOTE", "").strip()
    if not remote:
        return
    # --no-cache: the outputs went to the DVC remote with each stage (CXR_DVC_REMOTE_URL)
    if run(["dvc", "exp", "push", "--quiet", "--no-cache", remote, ws.experiment], ws.path, env) != 0:
        raise StageError(
            f"the DVC experiment {ws.experiment} is saved here but its push to the git remote "
            f"{redact_uri(remote)} (CXR_EXPERIMENTS_REMOTE) failed: check the remote and its credentials, "
            "then clear the finish task"
        )
    print(f"[dvc_stage] pushed {ws.experiment} to {redact_uri(remote)}: `dvc exp pull` gets it", flush=True)


def _flag(name: str, default: bool) -> bool:
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise StageError(f"{name}={value!r}: expected true or false")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", help="create, finish, or a stage name of dvc.yaml")
    p.add_argument(
        "--run-id",
        default=os.environ.get("CXR_RUN_ID"),
        help="the DAG run this call belongs to (default: $CXR_RUN_ID, which the DAG sets to Airflow's run id)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="with create: override a params key for this run (repeatable), e.g. train.epochs=2",
    )
    p.add_argument(
        "--project",
        default=os.environ.get("CXR_PROJECT_DIR") or ".",
        help="the project checkout (default: $CXR_PROJECT_DIR or the current folder); never written to",
    )
    args = p.parse_args(argv)
    root = Path(args.project).resolve()
    if not (root / "dvc.yaml").exists():
        raise StageError(f"{root}/dvc.yaml not found: set CXR_PROJECT_DIR to the project checkout")
    if not (args.run_id or "").strip():
        raise StageError("no run id: pass --run-id or set CXR_RUN_ID (the DAG sets it to Airflow's run id)")
    ws = Workspace.of(root, args.run_id)
    # SIGTERM (a timeout, a task marked failed, an evicted pod) unwinds through `run`, which stops the stage
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.command == "create":
        create(ws, parse_overrides(os.environ.get("CXR_RUN_OVERRIDES"), args.set))
        return 0
    if args.set:
        raise StageError("--set applies to `create`: a run's params are composed once, when its workspace is made")
    if args.command == "finish":
        return finish(ws, _flag("CXR_KEEP_FAILED_WORKSPACES", True))
    return run_stage(ws, args.command)


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
