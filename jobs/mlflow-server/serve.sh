#!/usr/bin/env bash
# A team MLflow tracking server: runs, metrics and the model registry in PostgreSQL,
# artifacts (plots, models) in a shared store that the server itself serves. Clients (every
# Ray node of a search, `calotune.promote`, `calotune.generate`, the UI) need only the HTTP
# URL: no database password and no artifact-store credentials leave this machine.
#
#   MLFLOW_BACKEND_STORE_URI=postgresql://mlflow:PASSWORD@db-host:5432/mlflow \
#   MLFLOW_ARTIFACTS_DESTINATION=/shared/mlflow-artifacts \
#   MLFLOW_SERVER_ALLOWED_HOSTS=mlflow.internal,mlflow.internal:5000 \
#     jobs/mlflow-server/serve.sh
#
# then search with: python -m calotune.search zdc_swiglu --tracking-uri http://mlflow.internal:5000
#
# Settings (environment; the MLFLOW_* names are the ones `mlflow server` itself reads):
#   MLFLOW_BACKEND_STORE_URI      required. postgresql://USER:PASSWORD@HOST:PORT/DB; create the
#                                 role and database once with jobs/mlflow-server/init_db.py
#   MLFLOW_ARTIFACTS_DESTINATION  where artifacts are stored: a local or shared folder, or
#                                 s3://bucket/prefix, gs://... (needs boto3 / google-cloud-storage)
#                                 (default ./mlartifacts)
#   MLFLOW_HOST                   interface to bind (default 0.0.0.0: the whole team)
#   MLFLOW_PORT                   (default 5000)
#   MLFLOW_WORKERS                server processes (default 4)
#   MLFLOW_SERVER_ALLOWED_HOSTS   Host headers the server accepts. MLflow accepts only
#                                 localhost and private IPs by default, so clients that use a
#                                 DNS name (mlflow.internal) get "403 Invalid Host header"
#                                 until the name is listed here.
#   MLFLOW_SERVER_ENABLE_JOB_EXECUTION
#                                 MLflow's background job runner (GenAI features); calotune
#                                 does not use it (default false here: 7 fewer processes)
#
# There is no authentication: keep the port inside the cluster network, or put the server
# behind a reverse proxy that authenticates (or add --app-name basic-auth below).
set -euo pipefail

: "${MLFLOW_BACKEND_STORE_URI:?set MLFLOW_BACKEND_STORE_URI=postgresql://USER:PASSWORD@HOST:PORT/DB}"
artifacts="${MLFLOW_ARTIFACTS_DESTINATION:-./mlartifacts}"
host="${MLFLOW_HOST:-0.0.0.0}"
port="${MLFLOW_PORT:-5000}"
workers="${MLFLOW_WORKERS:-4}"
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"

backend="${MLFLOW_BACKEND_STORE_URI}"
case "${backend}" in
    postgresql://* | postgres://*)
        # SQLAlchemy 2.1 maps a bare postgresql:// to psycopg (v3); calotune[team] installs
        # psycopg2, so name the driver explicitly.
        backend="postgresql+psycopg2://${backend#*://}"
        ;;
    postgresql+*://*) ;;
    *)
        echo "$0: MLFLOW_BACKEND_STORE_URI must be a postgresql:// URI (got '${backend%%://*}://...')" >&2
        exit 2
        ;;
esac

if ! command -v mlflow >/dev/null 2>&1; then
    echo "$0: no 'mlflow' command; pip install 'calotune[team]' (or: pip install mlflow psycopg2-binary)" >&2
    exit 2
fi
if [[ "${backend}" == postgresql+psycopg2://* ]] && ! python -c "import psycopg2" 2>/dev/null; then
    echo "$0: the PostgreSQL driver is missing; pip install psycopg2-binary (or 'calotune[team]')" >&2
    exit 2
fi

# A local or shared folder must exist; object-store URIs are used as they are.
if [[ "${artifacts}" != *://* ]]; then
    mkdir -p "${artifacts}"
    artifacts="$(cd "${artifacts}" && pwd)"
fi

extra=()
if [[ -n "${MLFLOW_SERVER_ALLOWED_HOSTS:-}" ]]; then
    extra+=(--allowed-hosts "${MLFLOW_SERVER_ALLOWED_HOSTS}")
fi

shown="${backend}"
if [[ "${backend}" == *@* ]]; then
    shown="${backend%%://*}://***@${backend##*@}"  # never print the password
fi
echo "mlflow server: backend ${shown}, artifacts ${artifacts}, http://${host}:${port}" >&2
# exec: the server gets this script's PID and signals (systemd, docker, a test's teardown).
exec mlflow server \
    --backend-store-uri "${backend}" \
    --artifacts-destination "${artifacts}" \
    --serve-artifacts \
    --host "${host}" \
    --port "${port}" \
    --workers "${workers}" \
    ${extra[@]+"${extra[@]}"}
