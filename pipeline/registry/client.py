"""The registry's MLflow calls: versions, their tags, the aliases and putting them back.

Every new version gets `challenger`; `champion` moves to it when the gate (`pipeline.registry.gate`)
says so. Aliases, never stages. A failure of a registry call is one RegistryError line naming the
model, the alias and the server; aliases this step moved are put back where they were.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping
from typing import Any

import pandas as pd

from ..classes import CLASSES
from ..config import RegisterConfig
from .gate import PREDICTIONS_ARTIFACT

CHALLENGER, CHAMPION = "challenger", "champion"
# version tag: sha256 of the network's weights; no two versions of a model hold the same weights
WEIGHTS_TAG = "weights_sha256"
# version tag written last when the gate has set the aliases: a version without it is gated again
GATE_TAG = "gate.promoted"
# the decision's numbers recorded as `gate.<key>` version tags, beside gate.reason and gate.promoted:
# the comparison with the champion; the rest of the decision (floor, margin, class set, patients,
# interval) is in the version's registration.json artifact and its model card
GATE_KEYS = ("champion_version", "delta", "p_value")


def version_tags(metrics: Mapping[str, Any], training_run_id: str, provenance: Mapping[str, str]) -> dict[str, str]:
    """The tags of a new model version: `provenance`, the training run, and the mean AUCs. A handful,
    so that a version reads at a glance in the registry: per-class AUCs are in the model card and
    the registration.json artifact.

    Args:
        metrics: evaluate's metrics.json (`val_mean_auc`, `mean_auc`, `mean_auc_ci`, `per_class_auc`).
        training_run_id: the MLflow run that trained the model.
        provenance: what the model was made from (code version, data hash, settings hash, profile), as
            name -> value; set on the version first, unchanged.
    """
    tags = {
        **{str(k): str(v) for k, v in provenance.items()},
        "training_run_id": training_run_id,
        # to 4 decimals, as the card and the description give them: a tag is read, not computed on
        "val_mean_auc": _decimals(metrics.get("val_mean_auc")),
        "test_mean_auc": _decimals(metrics.get("mean_auc")),
        "test_mean_auc_ci": json.dumps([_round(v) for v in metrics.get("mean_auc_ci") or [None, None]]),
    }
    return tags


def _round(value: Any) -> float | None:
    return None if value is None else round(float(value), 4)


def _decimals(value: Any) -> str:
    return "None" if value is None else f"{float(value):.4f}"


def version_with_weights(client, name: str, digest: str):
    """The oldest version of `name` tagged with these weights (`WEIGHTS_TAG`), or None.

    Versions registered before the tag existed carry no digest and are never matched.
    """
    with _failing_clearly(f"looking for a version with these weights ({WEIGHTS_TAG})", name):
        try:
            found = client.search_model_versions(f"name = '{name}' AND tags.{WEIGHTS_TAG} = '{digest}'")
        except Exception as e:
            if _missing(e):  # no such registered model yet
                return None
            raise
    return min(found, key=lambda v: int(v.version)) if found else None


def register(model_uri: str, cfg: RegisterConfig, tags: dict[str, str]):
    """A new version of `cfg.model_name` with `tags`; no alias moves here (see `apply_decision`)."""
    import mlflow

    return mlflow.register_model(model_uri, cfg.model_name, tags=tags)


def keep_first(client, name: str, version, digest: str, logged_model_id: str | None):
    """The compare-and-set that makes one version per weights hold when register steps race.

    Called right after `version` was registered with the weights tag `digest` from the logged model
    `logged_model_id`. Versions are numbered
    in the order they are created, so of racing steps that each found no version with these weights
    and registered one, all see the same oldest version once they have registered: that one stays.
    A step whose `version` is not the oldest deletes it, and the model it logged, and gets the
    oldest back; a step whose `version` is the oldest gets None and gates it.
    """
    first = version_with_weights(client, name, digest)
    if first is None or str(first.version) == str(version.version):
        return None
    action = f"deleting v{version.version}, registered while v{first.version} took the same weights"
    with _failing_clearly(action, name):
        client.delete_model_version(name, version.version)
        if logged_model_id:
            client.delete_logged_model(logged_model_id)
    return first


class RegistryError(RuntimeError):
    """A registry call failed for a reason other than "no such model or alias": the step stops
    without moving an alias, and the message names the model, the alias and the server."""


def _error(action: str, name: str, e: BaseException, after: str = "") -> RegistryError:
    """One line: what was being done (`action`, naming the alias) to which model, on which server,
    the cause, and `after` (what state that leaves)."""
    from .. import tracking

    cause = tracking.redact_text(tracking.one_line(getattr(e, "message", None) or e, 400))
    return RegistryError(
        f"registered model {name} on {tracking.redacted_uri()}: {action} failed ({type(e).__name__}: {cause})"
        + (f"; {after}" if after else "")
    )


@contextlib.contextmanager
def _failing_clearly(action: str, name: str) -> Iterator[None]:
    """Any failure of the registry calls in the body becomes one RegistryError line (`_error`)."""
    try:
        yield
    except RegistryError:
        raise
    except Exception as e:  # a server error, a lost connection, an unreadable file: all the same to the caller
        raise _error(action, name, e) from e


def _missing(e: Exception) -> bool:
    """Whether `e` is MLflow's "no such resource" answer (the registered model does not exist)."""
    return getattr(e, "error_code", None) == "RESOURCE_DOES_NOT_EXIST"


def aliases(client, name: str) -> dict[str, str]:
    """Alias -> version of registered model `name`; {} when the model does not exist yet.

    Only MLflow's RESOURCE_DOES_NOT_EXIST means "no model"; any other failure raises
    RegistryError, so a registry that does not answer is never mistaken for an empty one.
    """
    with _failing_clearly(f"reading its aliases ({CHALLENGER}, {CHAMPION})", name):
        try:
            model = client.get_registered_model(name)
        except Exception as e:
            if _missing(e):
                return {}
            raise
    return {str(alias): str(version) for alias, version in model.aliases.items()}


def champion(client, name: str, held: Mapping[str, str]):
    """The version `held` (from `aliases`) names `champion`, or None when no version holds it.

    An alias absent from `held` is the only "no champion"; failing to read the version it names
    raises RegistryError.
    """
    version = held.get(CHAMPION)
    if version is None:
        return None
    with _failing_clearly(f"reading alias {CHAMPION} (v{version})", name):
        return client.get_model_version(name, version)


def gated(version) -> bool:
    """Whether the gate finished for `version`: its aliases were set and `gate.promoted` recorded last.

    A version registered by a step that failed before that (the registry stopped answering) is
    gated by the next run of the step instead of being registered again.
    """
    return GATE_TAG in (version.tags or {})


def model_description(name: str) -> str:
    """What registered model `name` is, for its description in the registry (Markdown, one line per
    paragraph: the registry shows line breaks as they are)."""
    paragraphs = [
        "Multi-label chest X-ray classifier: the 14 findings of ChestX-ray14 from one frontal radiograph.",
        "**Method.** ConvNeXt image embeddings scored by their distance to 14 label prototypes (the class "
        "names encoded by the text encoder of `prototypes.encoder`: BioBERT in the paper profile), trained "
        "with a dual-weighted metric loss (the project's formulation of Jin et al., Comput Biol Med "
        "2023;157:106683).",
        "**Input.** A DataFrame with one column `image`: PNG, JPEG or DICOM bytes (base64 text over REST), "
        "any size; the model converts it to 8-bit grayscale, resizes and centre-crops it as training did.",
        "**Output.** One row per image: a probability per class, `labels` (the classes at or above their "
        "threshold chosen on validation, joined by `|`, or `No Finding`) and `error` (null, or why that "
        "row could not be read).",
        f"**Classes.** {', '.join(CLASSES)}.",
        f"**Aliases.** `{CHAMPION}` is the version to serve (`models:/{name}@{CHAMPION}`); `{CHALLENGER}` "
        f"is the latest registered. A version becomes {CHAMPION} only when it clears a floor on validation "
        f"mean AUC and beats the current {CHAMPION} on the same validation patients (paired bootstrap); "
        "test AUC is reported in the version tags, never used to choose.",
        "**More.** Each version's description summarises its model card (`model_card/` in the version's "
        "run); the promotion gate, the version tags and how to promote by hand are documented in "
        "docs/registry.md of the project.",
    ]
    return "\n\n".join(paragraphs)


def describe_model(client, name: str, description: str) -> bool:
    """Set the registered model's description when it differs; returns whether it changed."""
    with _failing_clearly("setting its description", name):
        if (client.get_registered_model(name).description or "") == description:
            return False
        client.update_registered_model(name, description=description)
    return True


def champion_predictions(client, version) -> pd.DataFrame | None:
    """The champion's validation predictions, logged by its evaluate step into its run; None if
    its run has no such file (or no longer exists). A failure to list or read them raises
    RegistryError: an unreadable champion is not an absent one."""
    import tempfile

    import mlflow

    action = f"reading alias {CHAMPION}'s predictions (v{version.version}, {PREDICTIONS_ARTIFACT})"
    with _failing_clearly(action, version.name):
        if not version.run_id or not _has_artifact(client, version.run_id, PREDICTIONS_ARTIFACT):
            return None
        with tempfile.TemporaryDirectory() as tmp:
            path = mlflow.artifacts.download_artifacts(
                run_id=version.run_id, artifact_path=PREDICTIONS_ARTIFACT, dst_path=tmp
            )
            return pd.read_parquet(path)


def _has_artifact(client, run_id: str, artifact_path: str) -> bool:
    """Whether the run logged `artifact_path`; False also for a run that no longer exists."""
    folder = artifact_path.rsplit("/", 1)[0]
    try:
        return artifact_path in {f.path for f in client.list_artifacts(run_id, folder)}
    except Exception as e:
        if _missing(e):  # the champion's run was deleted
            return False
        raise


def apply_decision(client, name: str, version: str, decision: dict[str, Any], held: Mapping[str, str]) -> None:
    """Record `decision` on `version` (its `gate.*` tags), then move the aliases: `challenger` to
    it, and `champion` when it is promoted; `gate.promoted` is written last, as the mark that the
    gate finished (`gated`).

    Args:
        held: alias -> version before this registration (`aliases`), to put back on failure.

    Raises:
        RegistryError: a tag or an alias could not be set. Every alias this call touched is put
            back where `held` had it (or removed, when it did not exist), and the message says so.
    """
    with _failing_clearly(f"recording the gate's decision on v{version}", name):
        for key, value in _gate_tags(decision).items():
            client.set_model_version_tag(name, version, key, value)
    targets = [CHALLENGER, *([CHAMPION] if decision["promote"] else [])]
    touched: list[str] = []
    action = ""
    try:
        for alias in targets:
            action = f"setting alias {alias} to v{version}"
            touched.append(alias)  # before the call: a request can succeed on the server and fail here
            client.set_registered_model_alias(name, alias, version)
        action = f"recording {GATE_TAG} on v{version}"
        client.set_model_version_tag(name, version, GATE_TAG, str(decision["promote"]).lower())
    except Exception as e:
        raise _error(action, name, e, _put_back(client, name, touched, held)) from e


def _gate_tags(decision: dict[str, Any]) -> dict[str, str]:
    """The decision's `gate.*` version tags, all but GATE_TAG (written last, by `apply_decision`)."""
    tags = {"gate.reason": decision["reason"][:5000]}
    for key in GATE_KEYS:
        value = decision.get(key)
        if value is not None:
            tags[f"gate.{key}"] = json.dumps(value) if isinstance(value, list | dict) else _short(value)
    return tags


def _short(value: Any) -> str:
    """A tag's text: a float to 4 significant digits (a delta of 0.004138, not 0.004137787250891201)."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _put_back(client, name: str, touched: list[str], held: Mapping[str, str]) -> str:
    """Point every alias in `touched` back where `held` had it (remove it where it did not exist);
    returns what that leaves, for the error message."""
    failed = []
    for alias in touched:
        try:
            if alias in held:
                client.set_registered_model_alias(name, alias, held[alias])
            else:
                client.delete_registered_model_alias(name, alias)
        except Exception as e:
            if not (alias not in held and _missing(e)):  # an alias that was never set needs no removal
                failed.append(f"{alias} (was {_shown(held, alias)}: {type(e).__name__})")
    before = ", ".join(f"{a} -> v{v}" for a, v in sorted(held.items())) or "none"
    if failed:
        return f"could not put back {', '.join(failed)}: set them by hand; before this step: {before}"
    return f"aliases left as they were ({before})"


def _shown(held: Mapping[str, str], alias: str) -> str:
    return f"v{held[alias]}" if alias in held else "unset"


def set_alias(name: str, alias: str, version: str) -> None:
    """Manual promotion or rollback: point `alias` at `version`."""
    from mlflow import MlflowClient

    client = MlflowClient()
    client.get_model_version(name, version)  # raises a clear MLflow error for a missing version
    client.set_registered_model_alias(name, alias, version)
