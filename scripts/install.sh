#!/usr/bin/env bash
# Create .venv (if missing), install the pinned dependencies and build gfm_fast (C++ ops; CUDA ops
# too where a CUDA toolkit exists). Safe to re-run: finished steps are quick no-ops.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip setuptools wheel
pip install -q -r requirements.txt
# deepspeed and our extension compile against the torch installed above, not a fresh isolated copy.
pip install -q --no-build-isolation "deepspeed==0.19.8"
pip install -q --no-build-isolation -e ".[test]"
python -c "import gfm_fast, gfm_fast.ops as o; print('gfm_fast', gfm_fast.__version__, 'backends', o.available_backends())"
