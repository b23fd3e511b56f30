#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py) as one prepared run on a GPU machine that reaches no registry: the wheels it
# lacks travel in .whl/ (made here by bench/gpu_wheels.sh) and are installed into /tmp/site; this checkout is
# measured. --quick runs the same on the CPU with the tiny model.
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
exec python3 bench/gpu_check.py "$@"
