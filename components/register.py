"""Register step: log the pyfunc model, register a version, and gate the `champion` alias.

Run:
    python -m components.register --model artifacts/model --reports reports --out reports/registration.json
The model serves the probabilities calibrated by reports/calibration.json (fitted on validation by
the evaluate step) and labels them with reports/thresholds.json. The version (registered model
`register.model_name`, default cxr-dwml) always gets the alias
`challenger`; `champion` moves to it only when its validation mean AUC clears `register.min_auc`
and it beats the current champion on the same validation images (paired bootstrap over patients,
`register.margin`, `register.max_p_value`). The gate reads reports/predictions/val.parquet and the
champion's evaluation/predictions/val.parquet, never test predictions: test AUCs are only recorded
as version tags. After the decision it writes the model card (model_card.md and model_card.html in
--reports), logs it into the version's run under model_card/ and makes its summary the version's
description. Manual promotion or rollback: python -m components.promote --version N

Only a registered model or alias that does not exist means "no champion". Any other failure of the
registry (reading the champion or its predictions, moving an alias) stops the step with exit status
2 and one line naming the model, the alias and the server, and leaves every alias where it was;
a version registered before such a failure is gated by the next run (docs/registry.md). Weights
already registered make no new version, even when two register steps race (docs/registry.md,
"One version per weights").
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from components.common import fingerprint, mlflow_run, parser, run_main, stage_config
from pipeline import tracking
from pipeline.io import read_json, write_json

if TYPE_CHECKING:
    from pipeline.registry.gate import SelectionSet


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--model", default="artifacts/model", help="train step output (default: %(default)s)")
    p.add_argument("--reports", default="reports", help="evaluate step output (default: %(default)s)")
    p.add_argument("--prepared", default="data/prepared", help="prepare step output (default: %(default)s)")
    p.add_argument("--out", default="reports/registration.json", help="decision file (default: %(default)s)")
    args = p.parse_args(argv)
    if args.no_mlflow:
        raise ValueError("register needs MLflow: drop --no-mlflow")
    cfg, params = stage_config(args, "register")
    from mlflow import MlflowClient

    from pipeline.card import render as card_render
    from pipeline.card import sections as model_card
    from pipeline.registry import client as registry
    from pipeline.registry import gate, packaging

    model_dir, reports = Path(args.model), Path(args.reports)
    ref = tracking.load_run_ref(model_dir)
    if ref is None:
        raise FileNotFoundError(f"{model_dir}/{tracking.RUN_FILE} not found: run the train step with MLflow first")
    metrics = read_json(reports / "metrics.json")  # test numbers: reported in tags, never selected on
    if not (reports / "calibration.json").exists():
        raise FileNotFoundError(
            f"{reports / 'calibration.json'} not found: rerun the evaluate step, which fits the calibration "
            "the registered model serves its probabilities through"
        )
    ours = _selection_set(reports, Path(args.prepared))
    # read before anything is registered: a bad report file fails the step while the registry is untouched;
    # the card names the data source, whose credentials (user info, tokens) it must not publish
    card_data = model_card.read_run(
        model_card.RunFiles(reports, model_dir, Path(args.prepared), tracking.redact_uri(params.download.source))
    )

    digest = packaging.weights_digest(model_dir / "best.pt")

    with mlflow_run(args, params, "register", run_id=ref["run_id"]) as run:
        client = MlflowClient()
        name = cfg.model_name
        same = registry.version_with_weights(client, name, digest)
        if same is not None and registry.gated(same):  # e.g. a finished training resumed and evaluated again
            # nothing goes to MLflow: the version and its run stay as they are
            return _report_registered(client, same, digest, run.info.run_id, args.out, card_data, reports)
        # everything the decision needs is read before anything is registered or moved: a registry
        # that fails here leaves no new version and every alias where it was
        held, champ, champ_preds = _champion_state(client, name, None if same is None else same.version)
        champ_version = champ.version if champ is not None else None
        decision = gate.decide(
            cfg, ours, champ_preds, champ_version, min_patients=params.evaluate.min_positive_patients
        )
        from components.provenance import dvc_data_hash

        md5s = dvc_data_hash()  # dvc.lock read once: the short data_hash tag, the md5s in the record
        tags = registry.version_tags(
            metrics, run.info.run_id, {**_provenance(params, md5s), registry.WEIGHTS_TAG: digest}
        )
        version, model_uri, model_id = _version_to_gate(same, model_dir, reports, Path(args.prepared), cfg, tags)
        first = None if same is not None else registry.keep_first(client, name, version, digest, model_id)
        if first is not None:  # another register step took these weights while this one registered them
            return _report_registered(client, first, digest, run.info.run_id, args.out, card_data, reports)
        _gate(client, name, version.version, decision, held)
        record = {
            "model_name": name,
            "version": str(version.version),
            "registered": True,
            registry.WEIGHTS_TAG: digest,
            "model_uri": model_uri,
            "run_id": run.info.run_id,
            "aliases": _aliases(client, name, version.version),
            "tracking_uri": tracking.redacted_uri(),
            **decision,
            "test_mean_auc": metrics.get("mean_auc"),
            "test_mean_auc_ci": metrics.get("mean_auc_ci"),
            # what the handful of version tags leave out: the data's md5s, per-class test AUCs
            "dvc_data_md5s": md5s,
            "test_per_class_auc": metrics.get("per_class_auc"),
            "tags": tags,
        }
        write_json(args.out, record)
        import mlflow

        if model_id is not None:  # the experiment's Models tab lists logged models with their metrics
            low, high = metrics.get("mean_auc_ci") or (None, None)
            model_metrics = {
                "val_mean_auc": decision.get("val_mean_auc"),
                "test_mean_auc": metrics.get("mean_auc"),
                "test_mean_auc_ci_low": low,
                "test_mean_auc_ci_high": high,
                "promoted": float(bool(decision["promote"])),
            }
            mlflow.log_metrics({k: float(v) for k, v in model_metrics.items() if v is not None}, model_id=model_id)

        mlflow.log_artifact(args.out, artifact_path="registration")
        tracking.log_to_parent(
            run,
            {"promoted": float(bool(decision["promote"]))},
            {"gate.promoted": str(bool(decision["promote"])).lower(), "model_version": f"{name} v{version.version}"},
        )
        card = _publish_card(client, card_data, record, reports)
    _report(record, reports / card_render.CARD_MD, card)
    return 0


def champion_change(record: dict) -> dict:
    """What a consumer of the champion alias needs from one register step's record
    (reports/registration.json): whether the step moved the alias, to which version, from which."""
    moved = bool(record.get("registered") and record.get("promote")) and str(record.get("champion_version")) != str(
        record.get("version")
    )
    return {
        "champion_moved": moved,
        "model_name": record.get("model_name"),
        "version": record.get("version"),
        "previous_champion": record.get("champion_version"),
        "val_mean_auc": record.get("val_mean_auc"),
        "reason": record.get("reason"),
    }


def _champion_state(client, name: str, ours: str | None):
    """(aliases before this step, the champion's version or None, its validation predictions or None).

    "No champion" only when the registered model does not exist yet or no version holds the alias;
    any other failure raises RegistryError, saying that nothing was registered or moved.
    `ours`: the version being gated, when it exists already; it is never compared with itself.
    """
    from pipeline.registry import client as registry

    try:
        held = registry.aliases(client, name)
        champ = registry.champion(client, name, held)
        if champ is not None and str(champ.version) == str(ours):
            champ = None
        return held, champ, None if champ is None else registry.champion_predictions(client, champ)
    except registry.RegistryError as e:
        raise registry.RegistryError(
            f"{e}; nothing registered, no alias moved: rerun the register step once the registry answers"
        ) from e


def _version_to_gate(same, model_dir: Path, reports: Path, prepared: Path, cfg, tags: dict[str, str]):
    """(version, model URI, logged model id or None) the gate decides on: `same`, registered by a run
    that stopped before its gate finished, or else a new version of the pyfunc, logged now."""
    from pipeline.registry import client as registry
    from pipeline.registry import packaging

    if same is not None:
        print(f"[register] {cfg.model_name} v{same.version} holds these weights but was never gated: gating it now")
        return same, same.source, None
    info = packaging.log_pyfunc(
        model_dir / "best.pt",
        reports / "thresholds.json",
        _example(prepared),
        calibration_path=reports / "calibration.json",
    )
    return registry.register(info.model_uri, cfg, tags), info.model_uri, info.model_id


def _gate(client, name: str, version: str, decision: dict, held: dict[str, str]) -> None:
    """The registered model's description, then the gate's tags and aliases on `version`; a failure
    says that the version stays registered, ungated, until the step runs again."""
    from pipeline.registry import client as registry

    try:
        registry.describe_model(client, name, registry.model_description(name))
        registry.apply_decision(client, name, version, decision, held)
    except registry.RegistryError as e:
        raise registry.RegistryError(
            f"{e}; {name} v{version} stays registered without the gate's decision: rerun the register step to gate it"
        ) from e


def _selection_set(reports: Path, prepared: Path) -> SelectionSet:
    """Our validation predictions with their labels and patients from the prepared manifest."""
    import pandas as pd

    from pipeline.data.layout import MANIFEST
    from pipeline.registry.gate import SELECTION_SPLIT, selection_set

    path = reports / "predictions" / f"{SELECTION_SPLIT}.parquet"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: run the evaluate step, which writes the {SELECTION_SPLIT} "
            f"predictions the promotion gate decides on"
        )
    return selection_set(pd.read_parquet(path), pd.read_csv(prepared / MANIFEST), str(path))


def _example(prepared: Path) -> bytes:
    from pipeline.data.cache import open_cache
    from pipeline.data.layout import CACHE_DIR
    from pipeline.registry.packaging import example_png

    return example_png(np.asarray(open_cache(prepared / CACHE_DIR)[0]))


def _provenance(params: dict, md5s: str) -> dict[str, str]:
    """The commit and prepared data (from git and dvc.lock in the working directory) and the settings."""
    from components.provenance import version_provenance

    return {**version_provenance(md5s=md5s), "params_hash": fingerprint(params.model_dump()), "profile": params.profile}


def _report_registered(client, version, digest: str, run_id: str, out: str, card_data, reports: Path) -> int:
    """Write the record and the model card of a step that found its weights registered as `version`."""
    from pipeline.card import render as card_render
    from pipeline.card import sections as model_card

    record = _already_registered(client, version.name, version, digest, run_id)
    write_json(out, record)
    card_render.write_card(model_card.build_card(card_data, record, None), reports)
    print(f"[register] {record['reason']}")
    return 0


def _already_registered(client, name: str, version, digest: str, run_id: str) -> dict:
    """The record of a register step that found its weights already registered as `version`."""
    from pipeline.registry.client import WEIGHTS_TAG

    aliases = {alias: str(v) for alias, v in sorted(client.get_registered_model(name).aliases.items())}
    held = ", ".join(f"{a} -> v{v}" for a, v in aliases.items()) or "none"
    return {
        "model_name": name,
        "version": str(version.version),
        "registered": False,
        "reason": f"{name} v{version.version} already holds these weights ({WEIGHTS_TAG} {digest[:12]}): "
        f"no new version registered, aliases unchanged ({held}); to make it the champion: "
        f"python -m components.promote --version {version.version}",
        WEIGHTS_TAG: digest,
        "run_id": run_id,
        "version_run_id": version.run_id,
        "aliases": _aliases(client, name, version.version),
        "tracking_uri": tracking.redacted_uri(),
    }


def _aliases(client, name: str, version: str) -> list[str]:
    return sorted(client.get_model_version(name, version).aliases)


def _publish_card(client, data, record: dict, reports: Path):
    """Write the version's model card, log it (with its figures) into the version's run under
    model_card/, and make its summary the version's description."""
    import mlflow

    from pipeline.card import render as card_render
    from pipeline.card import sections as model_card

    folder = model_card.ARTIFACT_DIR
    run = record["run_id"]
    note = f"`{folder}/{card_render.CARD_HTML}` (and `{card_render.CARD_MD}`) in the artifacts of run `{run}`"
    card = model_card.build_card(data, record, note)
    markdown, html = card_render.write_card(card, reports)
    for file in (markdown, html):
        mlflow.log_artifact(str(file), artifact_path=folder)
    for file, sub in card_render.figure_files(card, markdown.parent):  # what the Markdown's image links point at
        mlflow.log_artifact(str(file), artifact_path=f"{folder}/{sub}" if sub else folder)
    experiment = client.get_run(run).info.experiment_id
    page = model_card.version_page(
        data,
        f"#/experiments/{experiment}/runs/{run}/artifacts",
        "?workflowType=machine_learning",
        {
            "model card": f"{folder}/{card_render.CARD_HTML}",
            "calibration": "evaluation/plots/reliability.png",
            "subgroups": "evaluation/plots/subgroups.png",
            "ROC curves": "evaluation/plots/roc.png",
            "per-class table": "evaluation/per_class_auc.csv",
        },
    )
    client.update_model_version(record["model_name"], record["version"], description=f"{card.summary}\n\n{page}")
    return card


def _report(record: dict, card_path: Path, card) -> None:
    verdict = "promoted to champion" if record["promote"] else "kept as challenger"
    print(f"[register] {record['model_name']} v{record['version']} {verdict}: {record['reason']}")
    print(f"[register] model card: {card_path} and {card_path.with_suffix('.html')}; version description:")
    print("\n".join(f"    {line}" for line in card.summary.splitlines() if line))
    if not record["promote"]:
        print(f"[register] to promote it anyway: python -m components.promote --version {record['version']}")


if __name__ == "__main__":
    raise SystemExit(run_main("register", main))
