"""MLflow set-up: tracking URI, experiment, linked runs, parameters; secrets kept out of URIs.

Default store: `sqlite:///<repo>/mlflow.db` with artifacts in `<repo>/mlartifacts`, browsed with
`mlflow ui --backend-store-uri sqlite:///mlflow.db`; a step run in another working copy of the
project (an orchestrated run's workspace) sets STORE_ROOT_ENV to the project, so that its runs land
in the project's store and not in the copy. `MLFLOW_TRACKING_URI` points elsewhere
(e.g. `http://mlflow:5000`, a tracking server with PostgreSQL and S3 behind it). A URI is
printed or recorded only through `redact_uri`, so a password or token in it stays out of logs
and files:

    redact_uri("http://user:p@ss@host:5000/path?token=abc&run=3")
    # 'http://***@host:5000/path?token=***&run=3'

The scheme, host, port, path and every other query or fragment value are kept, so the result
still says where things went; a URI with nothing secret comes back unchanged. A `#token=...`
fragment (OAuth's implicit flow puts `access_token` there) and the user info of a scheme-less
`user:pw@host:5000` are masked too.
"""

from __future__ import annotations

import os
import re
import urllib.parse
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ..io import read_json, write_json

RUN_FILE = "mlflow_run.json"
# MLflow 3's UI opens an experiment in its GenAI view unless this tag names another kind; ours is
# model training, whose view lists runs with their metrics, parameters and datasets
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
# One pipeline execution is one parent run; its steps' runs are nested under it (MLflow's
# `mlflow.parentRunId` tag). The parent carries the execution's key in PIPELINE_TAG and
# `cxr.step` = PIPELINE_STEP, which is how every step, in any process, finds it.
PIPELINE_TAG = "cxr.pipeline_run"
PIPELINE_STEP = "pipeline"
# the dataset context MLflow shows for each split of the prepared manifest
SPLIT_CONTEXTS = {"train": "training", "val": "validation", "test": "test"}


# the folder of the default local store when it is not the step's working folder
STORE_ROOT_ENV = "CXR_TRACKING_ROOT"


def store_root(root: str | Path = ".") -> Path:
    """Where the default local store (mlflow.db, mlartifacts/) lives: STORE_ROOT_ENV, else `root`."""
    return Path(os.environ.get(STORE_ROOT_ENV) or root).resolve()


def default_tracking_uri(root: str | Path = ".") -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{store_root(root) / 'mlflow.db'}"


def setup(experiment: str, root: str | Path = ".") -> str:
    """Point MLflow at the configured store and select (or create) `experiment`; returns its id."""
    import mlflow

    uri = default_tracking_uri(root)
    mlflow.set_tracking_uri(uri)
    found = mlflow.get_experiment_by_name(experiment)
    if found is not None:
        exp_id = found.experiment_id
        if found.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:  # made before the tag, or by hand
            mlflow.MlflowClient().set_experiment_tag(exp_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    else:
        # A local store keeps artifacts beside mlflow.db so `mlflow ui` run from the repo finds them.
        location = (store_root(root) / "mlartifacts").as_uri() if uri.startswith("sqlite") else None
        exp_id = mlflow.create_experiment(
            experiment, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
        )
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def pipeline_parent(experiment_id: str, key: str, name: str, tags: Mapping[str, str]) -> str:
    """The id of the parent run of pipeline execution `key`: found by its tags, or created.

    Each step of an execution may run in its own process (or on its own machine); they agree on
    the parent through the search, not through shared memory. Two steps creating it at the same
    moment both keep the oldest and the other is deleted.

    Args:
        key: what identifies the execution (the PIPELINE_TAG value).
        name: the parent's run name, what the list of runs shows for the execution.
        tags: more tags for a new parent (the profile, the orchestrator's run).
    """
    from mlflow import MlflowClient

    client = MlflowClient()
    found = _parents(client, experiment_id, key)
    if found:
        return found[0].info.run_id
    tags = {**tags, PIPELINE_TAG: key, "cxr.step": PIPELINE_STEP}
    ours = client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
    keep = _parents(client, experiment_id, key)[0].info.run_id
    if keep != ours:
        client.delete_run(ours)
    return keep


def find_pipeline_parent(experiment_id: str, key: str) -> str | None:
    """The id of the parent run of execution `key`, or None when no step of it has made one."""
    from mlflow import MlflowClient

    found = _parents(MlflowClient(), experiment_id, key)
    return found[0].info.run_id if found else None


def _parents(client, experiment_id: str, key: str) -> list:
    """The live parent runs of execution `key`, oldest first."""
    if "'" in key:
        raise ValueError(f"pipeline run key {key!r}: a quote cannot be searched for; leave it out")
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{PIPELINE_TAG}` = '{key}' AND tags.`cxr.step` = '{PIPELINE_STEP}'",
    )
    return sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id))


def log_to_parent(run: Any, metrics: Mapping[str, float | None], tags: Mapping[str, str] | None = None) -> str | None:
    """Copy an execution's headline figures onto its parent run (the step's run's `mlflow.parentRunId`),
    so that the collapsed runs list and the default charts show them; the parent's id, or None
    for a run that has no parent."""
    from mlflow import MlflowClient

    client = MlflowClient()
    parent = client.get_run(run.info.run_id).data.tags.get("mlflow.parentRunId")
    if not parent:
        return None
    for key, value in metrics.items():
        if value is not None:
            client.log_metric(parent, key, float(value))
    for key, value in (tags or {}).items():
        client.set_tag(parent, key, value)
    return parent


def mark_parent(run_id: str, status: str) -> None:
    """Show a step's state on its execution's parent: RUNNING while a step runs, then FINISHED (or
    FAILED) with the end time of the step that finished last, so the parent spans the execution."""
    from mlflow import MlflowClient

    client = MlflowClient()
    if status == "RUNNING":
        client.update_run(run_id, status=status)
    else:
        client.set_terminated(run_id, status=status)


def log_splits(manifest_path: str | Path, splits: Iterable[str]) -> str:
    """Log `splits` of the prepared manifest as dataset inputs of the active run; returns the digest.

    One dataset per split, named `prepared-<split>`, with its rows' schema and count, the manifest
    as source, and as digest the md5 of the manifest file: the hash the pipeline's lock file
    records for that output, so the Dataset column of the runs list says which prepared data a
    model was trained (context `training`), selected (`validation`) and tested (`test`) on.
    """
    import warnings

    import mlflow
    import pandas as pd

    from ..io import file_digest

    digest = file_digest(manifest_path)
    manifest = pd.read_csv(manifest_path)
    with warnings.catch_warnings():  # MLflow's hints about a local path and integer label columns
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
        warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer")
        for split in splits:
            rows = manifest[manifest["split"] == split].reset_index(drop=True)
            dataset = mlflow.data.from_pandas(rows, source=str(manifest_path), name=f"prepared-{split}", digest=digest)
            mlflow.log_input(dataset, context=SPLIT_CONTEXTS[split])
    return digest


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}, for mlflow.log_params."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def log_params(params: Mapping[str, Any], prefix: str = "") -> None:
    import mlflow

    flat = {k: str(v)[:6000] for k, v in flatten(params, prefix).items()}
    items = list(flat.items())
    for i in range(0, len(items), 100):  # MLflow caps one batch at 100 params
        mlflow.log_params(dict(items[i : i + 100]))


def save_run_ref(out_dir: str | Path, run: Any) -> None:
    """Record which MLflow run produced an output folder, so later steps can link or resume it."""
    write_json(
        Path(out_dir) / RUN_FILE,
        {
            "run_id": run.info.run_id,
            "experiment_id": run.info.experiment_id,
            "tracking_uri": redacted_uri(),
        },
    )


def load_run_ref(out_dir: str | Path) -> dict[str, Any] | None:
    path = Path(out_dir) / RUN_FILE
    return read_json(path) if path.exists() else None


def redacted_uri() -> str:
    """The current tracking URI with its secrets masked (`redact_uri`), for messages and files."""
    import mlflow

    return redact_uri(mlflow.get_tracking_uri())


# MLflow 3's UI shows an experiment in the view its sidebar switch last chose, kept in the browser
# (GenAI on a first visit, whatever the experiment's kind tag says); a link carrying this query opens
# the model-training view, with the runs list, the charts and the registry's Models page.
MODEL_TRAINING_VIEW = "workflowType=machine_learning"


def ui_url(base: str, page: str) -> str:
    """`page` of the MLflow UI at `base` (e.g. "experiments/1/runs", "models/cxr-dwml"), in the
    model-training view, with `base`'s credentials masked."""
    return f"{redact_uri(base).rstrip('/')}/#/{page}?{MODEL_TRAINING_VIEW}"


def run_url(run: Any) -> str | None:
    """The page of `run` in the tracking server's UI, its credentials masked; None for a store that
    has no UI of its own (a local database or folder: `mlflow ui` shows it)."""
    import mlflow

    uri = mlflow.get_tracking_uri()
    if not uri.lower().startswith(("http://", "https://")):
        return None
    return ui_url(uri, f"experiments/{run.info.experiment_id}/runs/{run.info.run_id}")


# --- secrets out of URIs ---------------------------------------------------------------------

MASK = "***"

# query keys whose values are secrets, matched anywhere in the key, ignoring case:
# token, access_token, password, passwd, pwd, secret, client_secret, key, api_key, apikey,
# access_key, sig, signature, X-Amz-Signature, X-Amz-Credential, X-Amz-Security-Token, auth,
# authorization, session, credential
SECRET_KEY = re.compile(r"token|passw|pwd|secret|key|sig|credential|auth|session", re.IGNORECASE)

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)(.*)$", re.DOTALL)
# what may stand before the path: a host name or address, an optional port
_HOST_PORT = re.compile(r"^(\[[0-9A-Fa-f:.]*\]|[A-Za-z0-9._~%!$&'()*+,;=-]*)(:\d*)?$")
_URI_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")
_QUERY_PAIR = re.compile(r"(?<=[?&;#])([^=&;#\s'\"]+)=([^&;#\s'\"]*)")
# `user:password@host[:port]` with no scheme before it, inside a text (not part of a longer word)
_BARE_USERINFO = re.compile(r"(?<![\w.:/@%-])[\w.~%+-]+:[^\s/'\"<>]+@(?=[A-Za-z0-9\[][\w.:\]-]*(?![\w.:\]@-]))")


def redact_uri(uri: str) -> str:
    """`uri` with its user info and secret-looking query and fragment values masked.

    The user info is everything between `://` (or, without a scheme, the start) and the last `@`
    before the host, so a password holding `@` (or `/`) is masked whole. Query and fragment values
    whose key names a secret (token, password, secret, key, signature, credential, auth, session,
    ... in any case) become `***`.
    """
    if not isinstance(uri, str) or not uri:
        return uri
    found = _SCHEME.match(uri)
    scheme, rest = found.groups() if found else ("", uri)
    end = _userinfo_end(rest)
    # without a scheme, only `user:password@` is user info: `deploy@host:repo` and `a@b.org` are not
    if end >= 0 and (found or ":" in rest[:end]):
        rest = f"{MASK}@{rest[end + 1 :]}"
    return scheme + _mask_query(rest)


def redact_text(text: str) -> str:
    """`text` (an error message, a command line) with every URI in it passed through `redact_uri`,
    and secret-looking `key=value` query pairs masked where no scheme marks them as a URI."""
    text = _URI_IN_TEXT.sub(lambda m: redact_uri(m.group(0)), text)
    text = _BARE_USERINFO.sub(f"{MASK}@", text)
    return _QUERY_PAIR.sub(_mask_pair, text)


def _userinfo_end(rest: str) -> int:
    """Index in `rest` (the text after `://`) of the `@` that ends the user info, or -1.

    Each `@` extends the user info unless a `/`, `?` or `#` came before it after something that
    can be a host (and port): then the path has started and that `@` belongs to it.
    """
    end = -1
    for at in (i for i, c in enumerate(rest) if c == "@"):
        segment = rest[end + 1 : at]
        cut = min((segment.index(c) for c in "/?#" if c in segment), default=-1)
        if cut >= 0 and _HOST_PORT.match(segment[:cut]):
            break
        end = at
    return end


def _mask_query(rest: str) -> str:
    """`rest` with the secret-looking values of its query and of its fragment's `key=value` pairs masked."""
    rest, hash_, fragment = rest.partition("#")
    before, mark, query = rest.partition("?")
    return f"{before}{mark}{_mask_pairs(query)}{hash_}{_mask_pairs(fragment)}"


def _mask_pairs(text: str) -> str:
    pairs = []
    for pair in re.split(r"([&;])", text):
        key, eq, value = pair.partition("=")
        if eq and value and SECRET_KEY.search(urllib.parse.unquote_plus(key)):
            pair = f"{key}={MASK}"
        pairs.append(pair)
    return "".join(pairs)


def _mask_pair(m: re.Match) -> str:
    key, value = m.groups()
    if value and value != MASK and SECRET_KEY.search(urllib.parse.unquote_plus(key)):
        return f"{key}={MASK}"
    return m.group(0)


def one_line(text: object, limit: int = 600) -> str:
    """`text` on one line (whitespace runs collapsed), cut to `limit` characters with "...": for
    an error message that must stay one line in a log."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
