#!/usr/bin/env bash
# Submit a sweep to a running Ray cluster as a Ray job:
#   jobs/submit.sh search_spaces/cga.yaml [--set tune.num_samples=32 ...]
# Environment:
#   RAY_ADDRESS   the cluster's dashboard (default http://127.0.0.1:8265)
#   OFQ_PYTHON    the interpreter with ofq-ray installed on every node (default: this repo's .venv)
#   OFQ_RUNS_DIR  runs folder on storage every node sees (default: this repo's ofq-runs)
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
# The job runs in an uploaded copy of the repo, so the runs folder must be an absolute shared path.
exec "$ray" job submit --address "$address" --working-dir "$repo" \
  --runtime-env "$repo/jobs/runtime_env.yaml" \
  -- "$python" -m ofq_ray.cli tune "$spec" --set "base.runs_dir=$runs_dir" "$@"
