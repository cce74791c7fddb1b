#!/usr/bin/env bash
# Submit a calotune search to a RUNNING Ray cluster with `ray job submit`.
#
#   jobs/submit.sh SPACE [more python -m calotune.search flags]
#   jobs/submit.sh zdc_swiglu --trials 200 --gpus-per-trial 0.25
#
# The search driver runs on the cluster's head node, so closing your laptop does not stop
# it (`ray job logs -f ID` re-attaches, `ray job stop ID` stops it). Edit the defaults
# below or override them from the environment:
#
#   RAY_API_SERVER_ADDRESS  the head's dashboard / job server   (http://127.0.0.1:8265;
#                           `ray dashboard jobs/cluster.yaml` or a kubectl port-forward
#                           makes a remote head appear there)
#   CALOTUNE_TRACKING_URI   the team MLflow server, every node must reach it
#                           (see jobs/mlflow-server/)
#   CALOTUNE_SHARED         a folder that every node mounts at the same path (NFS, EFS,
#                           a ReadWriteMany volume): Ray Tune results and checkpoints go to
#                           $CALOTUNE_SHARED/ray_results, the data cache to $CALOTUNE_SHARED/home
#   CALOTUNE_PYTHON         the interpreter on the cluster that has calotune's dependencies
#                           (python)
#   RAY_JOB_FLAGS           extra `ray job submit` flags, e.g. "--no-wait" or
#                           "--submission-id zdc-sweep-7"
#   RAY_AUTH_MODE / RAY_AUTH_TOKEN
#                           a cluster started with token authentication (Ray's default from
#                           2.59 on for `ray start --head`) needs them here too: run
#                           `ray get-auth-token` on the head and export RAY_AUTH_MODE=token
#                           RAY_AUTH_TOKEN=<token> before submitting
#
# Your working tree (this repository, minus what .gitignore excludes) is uploaded as the
# job's working directory, so edited search spaces and code take effect without rebuilding
# the cluster image. The cluster must already have calotune's dependencies installed
# (`pip install torch==2.13.0 -e '.[team]'`, or an image built that way).
set -euo pipefail

if [[ $# -lt 1 || "$1" == -* ]]; then
    echo "usage: $0 SPACE [python -m calotune.search flags...]" >&2
    exit 2
fi
space="$1"
shift

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
address="${RAY_API_SERVER_ADDRESS:-http://127.0.0.1:8265}"
tracking_uri="${CALOTUNE_TRACKING_URI:-http://mlflow.example.org:5000}"
shared="${CALOTUNE_SHARED:-/shared/calotune}"
python="${CALOTUNE_PYTHON:-python}"
read -r -a job_flags <<< "${RAY_JOB_FLAGS:-}"

if ! command -v ray >/dev/null 2>&1; then
    echo "$0: no 'ray' command; install the job CLI with: pip install 'ray[default]==2.60.0'" >&2
    exit 2
fi

# Environment of the search driver and of every trial worker it starts.
runtime_env=$(cat <<JSON
{"env_vars": {"PYTHONUNBUFFERED": "1", "MLFLOW_TRACKING_URI": "${tracking_uri}"}}
JSON
)

exec ray job submit \
    --address "${address}" \
    --working-dir "${repo}" \
    --runtime-env-json "${runtime_env}" \
    ${job_flags[@]+"${job_flags[@]}"} \
    -- "${python}" -m calotune.search "${space}" \
    --tracking-uri "${tracking_uri}" \
    --storage-path "${shared}/ray_results" \
    --home "${shared}/home" \
    "$@"
