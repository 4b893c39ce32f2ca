#!/usr/bin/env bash
# Creates the MLflow and Airflow databases, each owned by its own login role.
#
# Mounted into /docker-entrypoint-initdb.d/ of the postgres service (docker/compose.yaml); the
# official postgres image runs it once, when the data volume is first initialised. Names and
# passwords come from the environment (.env), never from this file. Safe to run again: a role or
# database that exists is left as it is.
set -euo pipefail

: "${POSTGRES_USER:?POSTGRES_USER is not set: copy .env.example to .env and fill it in}"
: "${MLFLOW_DB_NAME:?MLFLOW_DB_NAME is not set: see .env.example}"
: "${MLFLOW_DB_USER:?MLFLOW_DB_USER is not set: see .env.example}"
: "${MLFLOW_DB_PASSWORD:?MLFLOW_DB_PASSWORD is not set: see .env.example}"
: "${AIRFLOW_DB_NAME:?AIRFLOW_DB_NAME is not set: see .env.example}"
: "${AIRFLOW_DB_USER:?AIRFLOW_DB_USER is not set: see .env.example}"
: "${AIRFLOW_DB_PASSWORD:?AIRFLOW_DB_PASSWORD is not set: see .env.example}"

# create_database DB ROLE PASSWORD
# Names and the password travel as psql variables and are quoted by format(%I, %L), so any
# character in them is safe. \gexec runs each generated statement outside a transaction, as
# CREATE DATABASE requires.
create_database() {
    psql --no-psqlrc -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
        -v db="$1" -v role="$2" -v password="$3" <<'SQL'
SELECT format('CREATE ROLE %I LOGIN PASSWORD %L', :'role', :'password')
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'role')\gexec
SELECT format('CREATE DATABASE %I OWNER %I', :'db', :'role')
WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'db')\gexec
SQL
    echo "postgres-init: database '$1' owned by '$2' is ready"
}

create_database "$MLFLOW_DB_NAME" "$MLFLOW_DB_USER" "$MLFLOW_DB_PASSWORD"
create_database "$AIRFLOW_DB_NAME" "$AIRFLOW_DB_USER" "$AIRFLOW_DB_PASSWORD"
