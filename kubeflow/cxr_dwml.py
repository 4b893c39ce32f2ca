"""The cxr-dwml pipeline for Kubeflow Pipelines v2:
download -> prepare | prototypes -> train -> evaluate -> register, the stage graph of dvc.yaml.

Orchestration only. Each task is a lightweight Python component whose image is the training image
(docker/Dockerfile, `cxr-dwml:latest` unless --image says otherwise) and whose body calls
`components.kfp_step`, which runs the same component code `dvc repro` runs, with KFP's artifact
folders as its paths and the run's params.yaml composed from the image's conf/ with the pipeline
parameters `profile` and `overrides` (`key=value` strings, the syntax of `--set`). Run it with the
KFP environment (`make kfp-venv`):

    .venv-kfp/bin/python kubeflow/cxr_dwml.py compile --out cxr_dwml.yaml          # the IR YAML
    .venv-kfp/bin/python kubeflow/cxr_dwml.py local --root kfp-outputs --set train.epochs=2

`local` runs the whole pipeline here with kfp.local's SubprocessRunner, in this environment (not
in the image). On a cluster, train asks for one `nvidia.com/gpu` and is retried; every task is
cached by KFP and reads the MLflow and S3 settings from a Kubernetes Secret (docs/kubeflow.md).
"""

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import NamedTuple

from kfp import compiler, dsl, kubernetes
from kfp.dsl import HTML, Artifact, ClassificationMetrics, Dataset, Input, Markdown, Metrics, Model, Output

PIPELINE_NAME = "cxr-dwml"
IMAGE = "cxr-dwml:latest"  # the training image, as docker/compose.yaml's trainer and the DAG's pods name it
SECRET = "cxr-dwml-env"  # the Kubernetes Secret with the MLflow and S3 settings
# Secret keys passed to every task as environment variables of the same name; a key the Secret
# lacks is left unset (MLFLOW_TRACKING_URI is required: the steps refuse to run without it)
SECRET_KEYS = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_S3_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_DEFAULT_REGION",
    "CXR_S3_ENDPOINT_URL",
)
TRAIN_RETRIES = 2


# --- the steps: each body runs in the image; it imports the project, never this file ------------


def download(profile: str, overrides: list, raw: Output[Dataset]):
    """NIH layout (or the synthetic demo set) from `download.source`: components.download."""
    from components.kfp_step import run_step

    run_step("download", profile, overrides, {"out": raw.path})


def prepare(profile: str, overrides: list, raw: Input[Dataset], prepared: Output[Dataset]):
    """Manifest, patient-level splits and the uint8 image cache: components.prepare."""
    from components.kfp_step import run_step

    run_step("prepare", profile, overrides, {"raw": raw.path, "out": prepared.path})


def prototypes(profile: str, overrides: list, prototypes: Output[Artifact]):
    """The label texts' vectors, the class prototypes: components.prototypes."""
    from components.kfp_step import run_step

    run_step("prototypes", profile, overrides, {"out": prototypes.path})


def train(
    profile: str,
    overrides: list,
    prepared: Input[Dataset],
    prototypes: Input[Artifact],
    model: Output[Model],
    history: Output[Artifact],
):
    """The model bundle (best.pt, last.pt, the MLflow run it logged to): components.train."""
    from components.kfp_step import run_step

    paths = {"prepared": prepared.path, "prototypes": prototypes.path, "out": model.path, "reports": history.path}
    run_step("train", profile, overrides, paths)


def evaluate(
    profile: str,
    overrides: list,
    prepared: Input[Dataset],
    model: Input[Model],
    reports: Output[Artifact],
    metrics: Output[Metrics],
    roc: Output[ClassificationMetrics],
):
    """Test AUCs with patient-bootstrap intervals, thresholds, calibration: components.evaluate;
    the headline numbers and the pooled ROC curve also as KFP metrics."""
    import json
    from pathlib import Path

    from components.kfp_step import headline_metrics, pooled_roc, run_step

    run_step("evaluate", profile, overrides, {"prepared": prepared.path, "model": model.path, "out": reports.path})
    for name, value in headline_metrics(reports.path).items():
        metrics.log_metric(name, value)
    fpr, tpr, thresholds = pooled_roc(reports.path, prepared.path)
    roc.log_roc_curve(fpr, tpr, thresholds)
    # the values also as the artifacts' files: a cache (kfp.local's) reuses only outputs that exist
    for artifact in (metrics, roc):
        Path(artifact.path).write_text(json.dumps(artifact.metadata, indent=2))


def register(
    profile: str,
    overrides: list,
    prepared: Input[Dataset],
    model: Input[Model],
    reports: Input[Artifact],
    registration: Output[Artifact],
    model_card: Output[Markdown],
    model_card_html: Output[HTML],
):
    """A registry version, the champion gate and the model card: components.register."""
    import shutil

    from components.kfp_step import register, registration_metadata

    out = register(profile, overrides, prepared.path, model.path, reports.path)
    shutil.copyfile(out / "registration.json", registration.path)
    shutil.copyfile(out / "model_card.md", model_card.path)
    shutil.copyfile(out / "model_card.html", model_card_html.path)
    registration.metadata.update(registration_metadata(registration.path))
    shutil.rmtree(out)


STEP_FUNCTIONS = (download, prepare, prototypes, train, evaluate, register)


class Outputs(NamedTuple):
    metrics: Metrics
    roc: ClassificationMetrics
    model: Model
    registration: Artifact
    model_card: Markdown


def build_pipeline(image: str = IMAGE, secret: str = SECRET):
    """The pipeline with every step in `image`, reading its settings from the Secret `secret`."""
    # the image carries the KFP runtime (docker/Dockerfile): a step's pod installs nothing at start
    steps = {fn.__name__: dsl.component(fn, base_image=image, install_kfp_package=False) for fn in STEP_FUNCTIONS}

    # `overrides` defaults to an empty list: KFP keeps a parameter's default in the IR as JSON
    @dsl.pipeline(name=PIPELINE_NAME, description=__doc__.splitlines()[0])
    def cxr_dwml(profile: str = "", overrides: list = []) -> Outputs:  # noqa: B006
        args = {"profile": profile, "overrides": overrides}
        fetched = steps["download"](**args).set_display_name("download")
        prepared = steps["prepare"](**args, raw=fetched.outputs["raw"]).set_display_name("prepare")
        protos = steps["prototypes"](**args).set_display_name("prototypes")
        trained = steps["train"](
            **args, prepared=prepared.outputs["prepared"], prototypes=protos.outputs["prototypes"]
        ).set_display_name("train")
        evaluated = steps["evaluate"](
            **args, prepared=prepared.outputs["prepared"], model=trained.outputs["model"]
        ).set_display_name("evaluate")
        registered = steps["register"](
            **args,
            prepared=prepared.outputs["prepared"],
            model=trained.outputs["model"],
            reports=evaluated.outputs["reports"],
        ).set_display_name("register")
        trained.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(1)
        # a retry starts training over: the task's output folder is new on every attempt
        trained.set_retry(num_retries=TRAIN_RETRIES, backoff_duration="60s", backoff_factor=2)
        kubernetes.add_toleration(trained, key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")
        for task in (fetched, prepared, protos, trained, evaluated, registered):
            task.set_caching_options(True)
            kubernetes.use_secret_as_env(task, secret, {key: key for key in SECRET_KEYS}, optional=True)
            # one MLflow parent run per pipeline run: the pod's run-id label (an environment
            # variable is not part of KFP's cache key, a parameter would be)
            kubernetes.use_field_path_as_env(task, "CXR_PIPELINE_RUN", "metadata.labels['pipeline/runid']")
        for task in (trained, evaluated):  # DataLoader workers share batches through /dev/shm
            kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory")
        return Outputs(
            metrics=evaluated.outputs["metrics"],
            roc=evaluated.outputs["roc"],
            model=trained.outputs["model"],
            registration=registered.outputs["registration"],
            model_card=registered.outputs["model_card"],
        )

    return cxr_dwml


def compile_pipeline(out: Path, image: str = IMAGE, secret: str = SECRET) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build_pipeline(image, secret), package_path=str(out))
    return out


def run_local(root: Path, profile: str, overrides: list[str], cache: bool = True) -> dict:
    """Run the pipeline here with kfp.local (SubprocessRunner in this environment); returns its
    outputs as {name: {"path", "metadata"}}. A failed task raises."""
    from kfp import local

    # the steps' image is the training image; here they run in this environment instead
    warnings.filterwarnings("ignore", message="You may be attemping to run a task", category=RuntimeWarning)
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(root),
        enable_caching=cache,
        cache_root=str(root / ".kfp_cache"),
    )
    task = build_pipeline()(profile=profile, overrides=list(overrides))
    return {name: {"path": art.path, "metadata": dict(art.metadata)} for name, art in task.outputs.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compile", help="write the pipeline's IR YAML")
    c.add_argument("--out", type=Path, default=Path("cxr_dwml.yaml"), help="the YAML file (default: %(default)s)")
    c.add_argument("--image", default=IMAGE, help="every step's image (default: %(default)s)")
    c.add_argument("--secret", default=SECRET, help="the Secret with the MLflow and S3 settings (default: %(default)s)")
    r = sub.add_parser("local", help="run the pipeline here with kfp.local")
    r.add_argument("--root", type=Path, default=Path("kfp-outputs"), help="artifacts folder (default: %(default)s)")
    r.add_argument("--profile", default="", help="conf/profile/<name>.yaml (default: conf's)")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key (repeatable)")
    r.add_argument("--no-cache", action="store_true", help="run every task, even one kfp.local has cached")
    r.add_argument("--outputs", type=Path, default=None, help="write the pipeline's outputs here as JSON")
    args = p.parse_args(argv)
    if args.command == "compile":
        print(f"[kfp] wrote {compile_pipeline(args.out, args.image, args.secret)}")
        return 0
    try:
        outputs = run_local(args.root.resolve(), args.profile, args.set, cache=not args.no_cache)
    except RuntimeError as e:  # a task failed; its own output above says why
        print(f"[kfp] the pipeline failed: {e}", file=sys.stderr)
        return 1
    if args.outputs:
        args.outputs.write_text(json.dumps(outputs, indent=2, default=str), encoding="utf-8")
    print(json.dumps({k: v["metadata"] for k, v in outputs.items() if v["metadata"]}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
