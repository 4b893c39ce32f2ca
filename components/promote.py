"""Manual promotion or rollback: point a registry alias at a chosen model version.

Run:
    python -m components.promote --version 3                     # make v3 the champion
    python -m components.promote --version 2 --alias champion    # roll back to v2
    python -m components.promote --list                          # versions, aliases, validation AUC first
The MLflow UI does the same: Models -> cxr-dwml -> a version -> Aliases.
"""

from __future__ import annotations

import argparse

from components.common import run_main
from pipeline import tracking
from pipeline.config import load_params
from pipeline.tracking.store import check_tracking_store


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--name", default=None, help="registered model (default: register.model_name)")
    p.add_argument("--version", help="model version to point the alias at")
    p.add_argument("--alias", default="champion", help="alias to move (default: %(default)s)")
    p.add_argument(
        "--list",
        action="store_true",
        help="list versions with their aliases, the validation AUC that promotion is decided on, "
        "then the test AUC (reported, never chosen on)",
    )
    args = p.parse_args(argv)
    # in seconds, before the params are validated (which imports the model library)
    check_tracking_store(tracking.default_tracking_uri(), write=bool(args.version) and not args.list)
    params = load_params(args.params)
    name = args.name or params.register.model_name
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from pipeline.registry.client import set_alias

    mlflow.set_tracking_uri(tracking.default_tracking_uri())  # the registry needs no experiment
    try:
        if args.list or not args.version:
            _list_versions(MlflowClient(), name)
            return 0
        set_alias(name, args.alias, args.version)
    except MlflowException as e:  # unknown model or version: say which, and where we looked
        raise RuntimeError(
            f"{name} v{args.version or '*'} at {tracking.redacted_uri()}: {tracking.redact_text(e.message)} "
            f"(python -m components.promote --list shows the versions)"
        ) from e
    print(f"[promote] {name}@{args.alias} -> v{args.version}")
    return 0


def _list_versions(client, name: str) -> None:
    # search results carry no aliases; the registered model holds the alias -> version map
    aliases: dict[str, list[str]] = {}
    for alias, version in client.get_registered_model(name).aliases.items():
        aliases.setdefault(str(version), []).append(alias)
    for v in sorted(client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version)):
        # a version number is an int from a database store and a str from a tracking server
        print(
            f"v{v.version:>3}  aliases={','.join(sorted(aliases.get(str(v.version), []))) or '-':<22} "
            f"val_mean_auc={v.tags.get('val_mean_auc')}  test_mean_auc={v.tags.get('test_mean_auc')} (reported)  "
            f"promoted={v.tags.get('gate.promoted')}"
        )


if __name__ == "__main__":
    raise SystemExit(run_main("promote", main))
