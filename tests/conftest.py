"""Shared fixtures and helpers; test modules import from here and from tests/servers.py only.

- a throwaway copy of the repository configured for a tiny, fast demo run (`copy_repo`, `run_env`);
- `pipeline_run`: ONE tiny `dvc repro` of the whole pipeline per session, shared by every test
  that needs trained outputs; a test that changes anything works on `copy_run` of it;
- the committed settings (`settings`), a test-sized model bundle (`tiny_bundle`);
- MLflow in-process as a stage runs it (`tracking_env`), labels from the prepared manifest;
- DICOM files as an X-ray modality writes them (`write_dicom`, `PATIENT_STUDY`);
- docker/compose.yaml read as compose reads it (`resolve_compose`, `service_environment`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import yaml

if TYPE_CHECKING:
    import numpy as np

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent

COMPOSE = ROOT / "docker" / "compose.yaml"
ENV_EXAMPLE = ROOT / ".env.example"

# pytest-xdist workers share the machine's cores: each worker, and every process it starts (stages,
# servers, Airflow's tasks), computes with its share of them instead of a thread per core each,
# which on a small machine only adds threads contending for the same cores. Set before anything
# imports torch; a value in the environment wins.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT", "").isdigit():
    _share = (os.cpu_count() or 1) // max(1, int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, _share)))

# Every DVC command the tests run (and every process they start that runs one: stages, Airflow's
# tasks, the benchmark) would otherwise start a background process to send DVC's usage report,
# which has nowhere to go from a test machine.
os.environ["DVC_NO_ANALYTICS"] = "1"

# Small enough for a CPU test run, large enough that every split holds every common class.
TINY_PARAMS = {
    "download": {"synthetic": {"num_images": 360, "num_patients": 150, "image_size": 64, "seed": 7}},
    "prepare": {"image_size": 32, "workers": 1},
    "train": {
        "epochs": 2,
        "batch_size": 32,
        "eval_batch_size": 128,
        "log_every": 2,
        "model": {"embed_dim": 32, "hidden_dim": 64},
        "augment": {"crop_size": 32},
    },
    # ~17 validation patients: a class needs one positive and one negative patient to be in a mean
    "evaluate": {"bootstrap_resamples": 100, "min_positive_patients": 1},
    "register": {"min_auc": 0.0, "bootstrap_resamples": 100},
}


def deep_update(base: dict, overlay: dict) -> dict:
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            deep_update(base[key], value)
        else:
            base[key] = value
    return base


def copy_repo(dest: Path, params_overlay: dict | None = None) -> Path:
    """The tracked files of this repository in `dest`, as a fresh git repo with `dvc init` done."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.split()
    for rel in files:
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    (dest / "dvc.lock").unlink(missing_ok=True)
    # the overlay goes into conf/ (what every composition starts from), then params.yaml is composed
    conf_path = dest / "conf" / "config.yaml"
    conf = yaml.safe_load(conf_path.read_text())
    deep_update(conf, params_overlay if params_overlay is not None else TINY_PARAMS)
    conf_path.write_text(yaml.safe_dump(conf, sort_keys=False))
    from components.params import compose

    (dest / "params.yaml").write_text(compose(dest)[0])
    git = ["git", "-c", "user.email=test@example.invalid", "-c", "user.name=test"]
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run([*git, "add", "-A"], cwd=dest, check=True)
    subprocess.run([*git, "commit", "-qm", "snapshot"], cwd=dest, check=True)
    return dest


def dvc_stage_graph(reduced: bool = False) -> dict[str, list[str]]:
    """Each dvc.yaml stage's upstream stages: the stages producing its deps (outs -> deps), a dep
    being produced by a stage when one path contains the other (a folder or a file in it).
    `reduced`: direct edges only (evaluate reads data/prepared too, but waits for it through train)."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]

    def paths(entries: list) -> list[str]:
        return [next(iter(e)) if isinstance(e, dict) else e for e in entries or []]

    producer = {
        out: name for name, st in stages.items() for key in ("outs", "metrics", "plots") for out in paths(st.get(key))
    }
    graph = {
        name: {
            stage
            for dep in paths(st.get("deps"))
            for out, stage in producer.items()
            if stage != name and (dep == out or dep.startswith(out + "/") or out.startswith(dep + "/"))
        }
        for name, st in stages.items()
    }
    if not reduced:
        return {name: sorted(ups) for name, ups in graph.items()}

    def ancestors(name: str) -> set[str]:
        return set().union(*({u} | ancestors(u) for u in graph[name])) if graph[name] else set()

    return {
        name: sorted(u for u in ups if not any(u in ancestors(o) for o in ups - {u})) for name, ups in graph.items()
    }


def settings(section: str, changes: dict | None = None, /, **fields):
    """The committed params.yaml's `section` (dotted, e.g. "train.loss") with dotted `changes`."""
    from pipeline.config import load_params

    node = load_params(ROOT / "params.yaml")
    for part in section.split("."):
        node = getattr(node, part)
    return node.replace(changes, at=section, **fields) if changes or fields else node


def stage_runner():
    """scripts/dvc_stage.py as a module (it is a script, not part of the package)."""
    import importlib.util

    if "dvc_stage" not in sys.modules:
        spec = importlib.util.spec_from_file_location("dvc_stage", ROOT / "scripts" / "dvc_stage.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclasses look their module up by name
        spec.loader.exec_module(module)
    return sys.modules["dvc_stage"]


def experiment_ref(repo: Path, name: str) -> str:
    """The git ref of the DVC experiment `name` (a DAG run saves itself as `dag-<run id>`)."""
    refs = subprocess.run(
        ["git", "for-each-ref", "--format=%(refname)", "refs/exps/"], cwd=repo, capture_output=True, text=True
    ).stdout.split()
    found = [r for r in refs if r.rsplit("/", 1)[-1] == name]
    assert len(found) == 1, f"experiment {name} not among {refs}"
    return found[0]


def experiment_file(repo: Path, name: str, path: str) -> str:
    """A file as the DVC experiment `name` holds it in git (dvc.lock, params, metrics, plots)."""
    shown = subprocess.run(
        ["git", "show", f"{experiment_ref(repo, name)}:{path}"], cwd=repo, capture_output=True, text=True
    )
    assert shown.returncode == 0, shown.stderr
    return shown.stdout


def run_env(repo: Path, **extra: str) -> dict[str, str]:
    """Environment for subprocesses: the venv first on PATH, MLflow inside the copy, offline hub."""
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{repo / 'mlflow.db'}"
    env["HF_HUB_OFFLINE"] = "1"
    env["PYTHONPATH"] = str(repo)
    env.pop("CXR_DEBUG", None)
    env.update(extra)
    return env


@pytest.fixture
def demo_repo(tmp_path: Path) -> Path:
    return copy_repo(tmp_path / "repo")


# --- the one pipeline run of the session ----------------------------------------------------------


@dataclass(frozen=True)
class PipelineRun:
    """A repository copy after one tiny `dvc repro` of the whole pipeline, and what it printed."""

    repo: Path
    output: str  # stdout and stderr of `dvc repro`, the stages' output included
    stdout: str  # its stdout alone (DVC's "Running stage" lines)

    @property
    def tracking_uri(self) -> str:
        """The SQLite MLflow store the run logged to (and registered the model in)."""
        return f"sqlite:///{self.repo / 'mlflow.db'}"

    def client(self):
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri)

    def env(self, **extra: str) -> dict[str, str]:
        """Environment for a command run in the repo: `run_env`, with the MLflow store named relative
        to the repo (`sqlite:///mlflow.db`, as the project's default names it). The steps record
        the store's URI beside their outputs (mlflow_run.json); named so, it is the same in a copy,
        and DVC finds the copy's outputs up to date."""
        return run_env(self.repo, MLFLOW_TRACKING_URI="sqlite:///mlflow.db", **extra)


@pytest.fixture(scope="session")
def pipeline_run(tmp_path_factory: pytest.TempPathFactory) -> PipelineRun:
    """`dvc repro` of every stage on TINY_PARAMS in a copy of the repository, once per test session.

    Shared by every test that needs trained outputs: read it, never change it (no DVC command, no
    MLflow write, no file written in it); a test that does any of those works on `copy_run`, and
    runs its commands there with the copy's `env()`. Under pytest-xdist (`make test`) the workers
    share one run: the first to ask makes it under a file lock, in the session's common temporary
    folder, and records how it ended; the others wait for it and read the record.
    """
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # pytest-of-<user>/pytest-<n>/, above each worker's own folder
    home = base / "shared-pipeline-run"
    record = home / "result.json"
    with FileLock(str(base / "shared-pipeline-run.lock")):
        if not record.exists():
            home.mkdir(exist_ok=True)
            run = PipelineRun(copy_repo(home / "repo"), "", "")
            done = subprocess.run(
                ["dvc", "repro"], cwd=run.repo, env=run.env(), capture_output=True, text=True, timeout=1800
            )
            result = {"returncode": done.returncode, "output": done.stdout + done.stderr, "stdout": done.stdout}
            record.write_text(json.dumps(result))
    result = json.loads(record.read_text())
    assert result["returncode"] == 0, result["output"][-6000:]
    return PipelineRun(home / "repo", result["output"], result["stdout"])


def copy_run(run: PipelineRun, dest: Path) -> PipelineRun:
    """A copy of the session's pipeline run at `dest`, free to change: files, git history, DVC
    cache and MLflow store. MLflow's SQLite store records where each artifact lies as an absolute
    path; in the copy those name the copy's own artifacts, so nothing written there reaches the
    original."""
    shutil.copytree(run.repo, dest, symlinks=True)
    old, new = f"{run.repo}/", f"{dest}/"
    with contextlib.closing(sqlite3.connect(dest / "mlflow.db")) as db, db:
        tables = [t for (t,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            for column in db.execute(f'SELECT name, type FROM pragma_table_info("{table}")').fetchall():
                if re.search(r"CHAR|TEXT|CLOB", column[1], re.IGNORECASE):
                    db.execute(f'UPDATE "{table}" SET "{column[0]}" = replace("{column[0]}", ?, ?)', (old, new))
    return PipelineRun(dest, run.output, run.stdout)


@contextlib.contextmanager
def tracking_env(uri: str, cwd: Path) -> Iterator[None]:
    """Run in-process components as `dvc repro` would: in the repo copy `cwd`, against `uri`.

    MLflow keeps the URI a component sets in a process-wide global (which beats the environment);
    `_use_tracking_uri` puts the previous one back so later tests in this process are not redirected.
    """
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    with pytest.MonkeyPatch.context() as mp, _use_tracking_uri(uri):
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.chdir(cwd)
        yield


def labels_of(repo: Path, images: Iterable[str]) -> np.ndarray:
    """(N, C) labels of `images` (file names) from the repo's prepared manifest."""
    import pandas as pd

    from pipeline.classes import CLASSES

    manifest = pd.read_csv(repo / "data/prepared/manifest.csv").set_index("image")
    return manifest.loc[images, list(CLASSES)].to_numpy()


def tiny_bundle(path: Path, size: int = 32, **model_changes):
    """Save an untrained test-sized metric-head model as training saves best.pt (`size` px images);
    returns the network, in eval mode. `model_changes`: dotted `train.model` settings, e.g. backbone.name."""
    import numpy as np
    import torch

    from pipeline.classes import CLASSES
    from pipeline.models import ModelBundle, build_model

    torch.manual_seed(0)
    cfg = settings("train.model", {"embed_dim": 16, "hidden_dim": 32, **model_changes})
    text_vectors = np.random.default_rng(0).normal(size=(len(CLASSES), 16)).astype(np.float32)
    net = build_model(cfg, text_vectors).eval()
    bundle = ModelBundle(
        model_config=cfg,
        model_state=net.state_dict(),
        text_vectors=text_vectors,
        classes=tuple(CLASSES),
        image_size=size,
        crop_size=size,
        epoch=1,
        val_mean_auc=0.5,
        fingerprint="tiny",
    )
    bundle.save(path)
    return net


# --- DICOM files: real ones written by pydicom, as a DX modality writes them, with patient and study
# values that nothing the project writes may contain.
PATIENT_STUDY = {
    "PatientName": "Quixote^Dulcinea",
    "PatientID": "PID-7Q4X9Z",
    "PatientBirthDate": "19431107",
    "PatientAddress": "12 Rue Zola Lyon",
    "OtherPatientIDs": "OPID-55K2",
    "StudyInstanceUID": "1.2.826.0.1.3680043.9.7777.1",
    "SeriesInstanceUID": "1.2.826.0.1.3680043.9.7777.2",
    "StudyDate": "20240229",
    "StudyTime": "134201",
    "AccessionNumber": "ACC8842917",
    "StudyID": "STU99173",
    "StudyDescription": "THORAX QX7 WARD",
    "ReferringPhysicianName": "Kildare^James",
    "InstitutionName": "Saint Elsewhere Hospital",
}


def write_dicom(
    path: Path, stored: np.ndarray, syntax: str = "1.2.840.10008.1.2.1", instance: int = 1, **attributes
) -> Path:
    """A single-frame DX file at `path` holding the stored values `stored` ((H, W) uint8 or uint16).

    Args:
        syntax: transfer syntax UID (explicit VR little endian by default); a compressed one is
            encoded by pydicom's plugins, with `j2k_cr`/`j2k_psnr` in `attributes` for lossy JPEG 2000.
        instance: makes the SOP Instance UID unique.
        attributes: DICOM keywords overriding the defaults (BitsStored, PhotometricInterpretation,
            WindowCenter, ...); a value of None deletes the element.
    """
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian

    stored = np.ascontiguousarray(stored)
    codec = {k: attributes.pop(k) for k in ("j2k_cr", "j2k_psnr") if k in attributes}
    bits = 8 * stored.dtype.itemsize
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    ds.file_meta.MediaStorageSOPInstanceUID = f"{PATIENT_STUDY['SeriesInstanceUID']}.{instance}"
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.update(
        {
            "SOPClassUID": DigitalXRayImageStorageForPresentation,
            "SOPInstanceUID": ds.file_meta.MediaStorageSOPInstanceUID,
            **PATIENT_STUDY,
            "PatientSex": "F",
            "Modality": "DX",
            "BodyPartExamined": "CHEST",
            "ViewPosition": "PA",
            "PresentationIntentType": "FOR PRESENTATION",
            "SamplesPerPixel": 1,
            "PhotometricInterpretation": "MONOCHROME2",
            "Rows": stored.shape[0],
            "Columns": stored.shape[1],
            "BitsAllocated": bits,
            "BitsStored": bits,
            "HighBit": bits - 1,
            "PixelRepresentation": 0,
        }
    )
    for keyword, value in attributes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.HighBit = ds.BitsStored - 1
    ds.PixelData = stored.tobytes()
    if syntax != ExplicitVRLittleEndian:
        ds.compress(syntax, stored, generate_instance_uid=False, **codec)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def voi_lut(entries: list[int], bits: int) -> object:
    """A VOI LUT Sequence item mapping input i (from 0) to entries[i], `bits` per entry."""
    from pydicom.dataset import Dataset

    item = Dataset()
    item.add_new(0x00283002, "US", [len(entries), 0, bits])  # LUT Descriptor: entries, first input, bits
    item.add_new(0x00283006, "US", entries)  # LUT Data
    return item


def dicom_twins(x: np.ndarray) -> dict[str, tuple[np.ndarray, dict]]:
    """Stored values and `write_dicom` header of files that a viewer shows exactly as the (H, W)
    uint8 image `x`: {name: (stored, header)}."""
    import numpy as np

    twelve = x.astype(np.uint16) * 16  # 0..4080 of 4095
    inverted = (255 - x.astype(np.uint16)) * 257  # 0..65535, dark where x is bright
    exact = {"VOILUTFunction": "LINEAR_EXACT"}
    return {
        "8-bit window": (x, {"WindowCenter": 127.5, "WindowWidth": 255, **exact}),
        "12-bit window": (twelve, {"BitsStored": 12, "WindowCenter": 2040, "WindowWidth": 4080, **exact}),
        # modality LUT 2 s - 1000 spans [-1000, 130070] and the window is exactly that span; DX
        # writes INVERSE beside MONOCHROME1, which restates the inversion rather than adding one
        "16-bit MONOCHROME1 rescale window": (
            inverted,
            {
                "PhotometricInterpretation": "MONOCHROME1",
                "PresentationLUTShape": "INVERSE",
                "RescaleSlope": 2,
                "RescaleIntercept": -1000,
                "WindowCenter": 64535,
                "WindowWidth": 131070,
                **exact,
            },
        ),
        # 8-bit entries looked up by 12-bit values (pydicom 3.0.2 alone wraps the index past 255)
        "12-bit VOI LUT": (twelve, {"BitsStored": 12, "VOILUTSequence": [voi_lut([i // 16 for i in range(4096)], 8)]}),
    }


def identifiers() -> list[str]:
    """Every patient and study value the test files carry, and each part of a person's name."""
    values = set(PATIENT_STUDY.values())
    values |= {part for v in PATIENT_STUDY.values() if "^" in v for part in v.split("^")}
    return sorted(values)


def assert_no_identifier(folder: Path, logs: str, inputs: Path) -> None:
    """No file under `folder` (but the input DICOMs themselves), nor `logs`, holds a value from the
    patient or study modules."""
    given = {p.read_bytes() for p in inputs.iterdir()}  # the download step links or copies them
    files = [p for p in folder.rglob("*") if p.is_file() and p.read_bytes() not in given]
    assert files, f"nothing under {folder}"
    for path in files:
        data = path.read_bytes()
        found = [v for v in identifiers() if v.encode() in data]
        assert not found, f"{path} holds {found}"
    assert not [v for v in identifiers() if v in logs], logs


class _RunsACommand:
    """Unpickling this runs `touch <marker>`: what a crafted model file could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def crafted_checkpoint(path: Path, marker: Path, **keys) -> Path:
    """A torch file at `path` shaped like a model bundle (`keys` added) whose unpickling would
    create `marker`; nothing may ever load it that way."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {"format": "cxr-dwml model bundle", "format_version": 2, **keys, "model_state": _RunsACommand(marker)}, path
    )
    return path


# --- docker/compose.yaml as compose reads it ----------------------------------------------------------

_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def read_env_file(path: Path) -> dict[str, str]:
    """NAME=value lines of an env file (.env.example), comments and blank lines skipped."""
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{path.name}: line {line!r} is not NAME=value"
            env[key.strip()] = value.strip()
    return env


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose-style ${VAR}, ${VAR:-default}, ${VAR:?error} and $$ substitution."""

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.groups()
        value = env.get(name)
        empty = value is None or (op in (":-", ":?") and value == "")
        if op and op.endswith("-"):
            return arg if empty else value
        if op and op.endswith("?"):
            if empty:
                raise KeyError(f"{name}: {arg}")
            return value
        return value or ""

    return _VAR.sub(sub, text)


def compose_strings(node) -> list[str]:
    """Every string (keys included) of a parsed compose file."""
    if isinstance(node, dict):
        return [s for key, value in node.items() for s in compose_strings(key) + compose_strings(value)]
    if isinstance(node, list):
        return [s for item in node for s in compose_strings(item)]
    return [node] if isinstance(node, str) else []


def compose_variables(compose: dict) -> list[tuple[str, str]]:
    """(name, operator) of every ${...} reference in the compose file, $$ escapes excluded."""
    return [
        (m.group(1), m.group(2) or "") for text in compose_strings(compose) for m in _VAR.finditer(text) if m.group(1)
    ]


def resolve_compose(node, env: dict[str, str]):
    """Interpolates every string of the parsed compose file, as compose does (not its comments)."""
    if isinstance(node, dict):
        return {key: resolve_compose(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [resolve_compose(item, env) for item in node]
    return interpolate(node, env) if isinstance(node, str) else node


def service_environment(service: dict) -> dict[str, str]:
    """The `environment` of a compose service as a dict, whichever form the file uses."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {k: str(v) for k, v in env.items()}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The longest modules first, each kept whole: the stack's module, then those with end-to-end
    runs (`slow`), then the rest. Under pytest-xdist's `--dist loadfile` (`make test`) a module runs
    on one worker, and workers take modules in this order, so the long ones start at once rather
    than last; module-scoped fixtures are made once either way."""

    def rank(item: pytest.Item) -> int:
        return 0 if item.get_closest_marker("stack") else 1 if item.get_closest_marker("slow") else 2

    modules: dict[str, int] = {}
    for item in items:
        modules[item.module.__name__] = min(modules.get(item.module.__name__, 2), rank(item))
    items.sort(key=lambda item: modules[item.module.__name__])
