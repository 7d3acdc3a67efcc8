#!/usr/bin/env bash
# Submit a sweep to a running Ray cluster as a Ray job:
#   jobs/submit.sh search_spaces/cga.yaml [--set tune.num_samples=32 ...]
# Environment:
#   RAY_ADDRESS   the cluster's dashboard (default http://127.0.0.1:8265)
#   OFQ_PYTHON    the interpreter with ofq-ray installed on every node (default: this repo's .venv)
#   OFQ_RUNS_DIR  runs folder on storage every node sees (default: this repo's ofq-runs)
#   MLFLOW_TRACKING_URI (and MLFLOW_TRACKING_USERNAME/_PASSWORD/_TOKEN, MLFLOW_S3_ENDPOINT_URL, when set)
#                 passed on to the job, whose driver and trials log there (a spec's mlflow.tracking_uri wins)
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: jobs/submit.sh SPEC.yaml [--set KEY=VALUE ...]" >&2
  exit 2
fi
repo=$(cd "$(dirname "$0")/.." && pwd)
spec=$1
shift
address=${RAY_ADDRESS:-http://127.0.0.1:8265}
python=${OFQ_PYTHON:-$repo/.venv/bin/python}
runs_dir=${OFQ_RUNS_DIR:-$repo/ofq-runs}
ray=$(dirname "$python")/ray
# A job gets only the environment its runtime env names: add the MLflow variables set here to a copy of
# jobs/runtime_env.yaml (without them the job would log to a store of its own).
runtime_env=$(mktemp --suffix .yaml)
trap 'rm -f "$runtime_env"' EXIT
"$python" - "$repo/jobs/runtime_env.yaml" "$runtime_env" <<'PY'
import os
import sys

import yaml

with open(sys.argv[1]) as handle:
    env = yaml.safe_load(handle) or {}
names = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
         "MLFLOW_S3_ENDPOINT_URL")
env.setdefault("env_vars", {}).update({name: os.environ[name] for name in names if os.environ.get(name)})
with open(sys.argv[2], "w") as handle:
    yaml.safe_dump(env, handle)
PY
# The job runs in an uploaded copy of the repo, so the runs folder must be an absolute shared path.
"$ray" job submit --address "$address" --working-dir "$repo" --runtime-env "$runtime_env" \
  -- "$python" -m ofq_ray.cli tune "$spec" --set "base.runs_dir=$runs_dir" "$@"
