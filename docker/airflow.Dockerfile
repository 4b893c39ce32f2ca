# syntax=docker/dockerfile:1
# Airflow image for the cxr-dwml DAG: the official Airflow image plus the project, with the
# project's own venv at /opt/cxr-dwml/.venv built from the lock file.
#
#   docker build -f docker/airflow.Dockerfile -t cxr-dwml-airflow:latest .
#
# Airflow runs in its own interpreter, which gets the project's `airflow` and `postgres` extras
# (pyproject.toml); the DAG's tasks run the component commands (through DVC) in the project venv,
# which holds the core dependencies and the `dicom` extra, so the ML stack (torch, timm, DVC, ...)
# never shares Airflow's process or has to agree with Airflow's constraints. The venv is not on
# PATH: the DAG puts it first for each task (CXR_VENV), and Airflow's own interpreter stays the default.

ARG AIRFLOW_IMAGE=apache/airflow:3.3.2-python3.11

# ---------------------------------------------------------------------------------------------
# builder: the project venv, built by the same Python the runtime stage has.
FROM ${AIRFLOW_IMAGE} AS builder

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
USER 0
RUN mkdir -p /opt/cxr-dwml && chown 50000:0 /opt/cxr-dwml
USER 50000:0

# The base image sets PIP_USER=true for its own installs; a venv must not get --user installs.
ENV PIP_USER=false \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
ARG PIP_EXTRA_INDEX_URL

WORKDIR /opt/cxr-dwml
COPY --chown=50000:0 pyproject.toml requirements.lock ./
# The venv is made by the system interpreter, not by Airflow's (which has Airflow's packages
# in its user site): the project's core dependencies and the `dicom` extra (DICOM sources for
# prepare) are resolved against the lock file alone.
RUN /usr/local/bin/python -m venv .venv \
    && .venv/bin/python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies']['dicom']))" \
        > /tmp/requirements.txt \
    && .venv/bin/pip install --no-cache-dir -r /tmp/requirements.txt -c requirements.lock \
    && rm /tmp/requirements.txt

COPY --chown=50000:0 . .
RUN .venv/bin/pip install --no-cache-dir --no-deps . \
    && .venv/bin/pip check

# ---------------------------------------------------------------------------------------------
# runtime: Airflow + the DAG + the project venv.
FROM ${AIRFLOW_IMAGE} AS runtime

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Airflow's own environment: the `airflow` extra (the Kubernetes provider for the DAG's pod tasks,
# PyYAML for dags/cxr_dwml.yaml) and the `postgres` extra (psycopg2 and asyncpg for the metadata
# database), installed the way the base image expects (as the airflow user, into its user site).
# The extra pins apache-airflow to the base image's version, so pip cannot replace the image's
# Airflow. requirements.lock is not applied here: it pins the project venv's environment, while
# this interpreter keeps the versions the base image was built with (Airflow's constraints).
USER 50000:0
COPY --chown=50000:0 pyproject.toml /tmp/cxr-pyproject.toml
RUN python -c "import tomllib; extras = tomllib.load(open('/tmp/cxr-pyproject.toml', 'rb'))['project']['optional-dependencies']; print('\n'.join(extras['airflow'] + extras['postgres']))" \
        > /tmp/airflow-requirements.txt \
    && pip install --no-cache-dir -r /tmp/airflow-requirements.txt \
    && rm /tmp/cxr-pyproject.toml /tmp/airflow-requirements.txt

USER 0
# git: each DAG run works in a git worktree of the project and is saved as a DVC experiment.
# Debian package versions are not pinned: the security updates are what we want.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends git \
    && rm -rf /var/lib/apt/lists/*
RUN mkdir -p /opt/cxr-dwml && chown 50000:0 /opt/cxr-dwml && chmod g+rwx /opt/cxr-dwml

WORKDIR /opt/cxr-dwml
COPY --from=builder --chown=50000:0 /opt/cxr-dwml/.venv /opt/cxr-dwml/.venv
COPY --chown=50000:0 . .
# The build context has no git history (.dockerignore), so the image's project is a git repository
# of one commit, the deployed code: the DAG's runs are worktrees of it, and their DVC experiments
# hang off it (CXR_EXPERIMENTS_REMOTE pushes them where checkouts can `dvc exp pull` them). The
# output and cache folders exist so that the named volumes mounted on them start owned by the
# airflow user (UID 50000, GID 0).
RUN mkdir -p data artifacts reports .dvc/cache .dvc/tmp .cache/huggingface \
    && touch .dvc/config \
    && git init -q \
    && git add -A \
    && git -c user.name="cxr-dwml image" -c user.email=cxr-dwml@localhost commit -qm "cxr-dwml, as built into the Airflow image" \
    && chown -R 50000:0 .git data artifacts reports .dvc .cache \
    && chmod -R g+rwX .git data artifacts reports .dvc .cache

ENV CXR_PROJECT_DIR=/opt/cxr-dwml \
    HF_HOME=/opt/cxr-dwml/.cache/huggingface \
    AIRFLOW__CORE__DAGS_FOLDER=/opt/cxr-dwml/dags \
    AIRFLOW__CORE__LOAD_EXAMPLES=False \
    PYTHONDONTWRITEBYTECODE=1

USER 50000:0
WORKDIR /opt/airflow
# The entrypoint and the per-service commands (api-server, scheduler, dag-processor, triggerer)
# are the base image's; health checks are per service in docker/compose.yaml.
