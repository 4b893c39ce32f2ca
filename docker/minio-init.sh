#!/bin/sh
# Creates the stack's buckets on MinIO and the access key the applications use.
#
# Run once by the minio-init service of docker/compose.yaml (image minio/mc) after MinIO is
# healthy; safe to run again. It creates every bucket in MINIO_BUCKETS plus the bucket of each
# s3:// URL the stack is configured with (MLflow artifacts, DVC remote, data source), so a bucket
# renamed in .env is still created. The applications get their own key (AWS_ACCESS_KEY_ID) with
# the readwrite policy instead of the root credentials.
set -eu

: "${MINIO_ROOT_USER:?MINIO_ROOT_USER is not set: copy .env.example to .env and fill it in}"
: "${MINIO_ROOT_PASSWORD:?MINIO_ROOT_PASSWORD is not set: see .env.example}"
: "${AWS_ACCESS_KEY_ID:?AWS_ACCESS_KEY_ID is not set: see .env.example}"
: "${AWS_SECRET_ACCESS_KEY:?AWS_SECRET_ACCESS_KEY is not set: see .env.example}"

alias_name=cxr
endpoint="${MINIO_ENDPOINT:-http://minio:9000}"

# bucket_of URL: prints the bucket of an s3:// URL, nothing for any other kind of URL.
bucket_of() {
    case "$1" in
        s3://*)
            rest="${1#s3://}"
            printf '%s\n' "${rest%%/*}"
            ;;
    esac
}

buckets="${MINIO_BUCKETS:-}"
for url in "${MLFLOW_ARTIFACTS_DESTINATION:-}" "${CXR_DVC_REMOTE_URL:-}" "${CXR_DATA_SOURCE:-}"; do
    buckets="$buckets $(bucket_of "$url")"
done

mc alias set "$alias_name" "$endpoint" "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD" >/dev/null

for bucket in $buckets; do
    mc mb --ignore-existing "$alias_name/$bucket"
done

# `user add` on an existing user only resets its secret; `policy attach` fails when the policy
# is attached already, which is fine as long as the user does hold it.
mc admin user add "$alias_name" "$AWS_ACCESS_KEY_ID" "$AWS_SECRET_ACCESS_KEY"
# (The mc image has no grep: the check is a shell pattern.)
if ! mc admin policy attach "$alias_name" readwrite --user "$AWS_ACCESS_KEY_ID"; then
    case "$(mc admin user info "$alias_name" "$AWS_ACCESS_KEY_ID")" in
        *readwrite*) ;;
        *)
            echo "minio-init: could not give '$AWS_ACCESS_KEY_ID' the readwrite policy" >&2
            exit 1
            ;;
    esac
fi

echo "minio-init: buckets ready:$buckets"
