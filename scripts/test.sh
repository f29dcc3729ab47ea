#!/usr/bin/env bash
# Run the test suite (CPU; Triton kernels in the interpreter). Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f .venv/bin/activate ] || { echo "test.sh: no .venv in $PWD: run bash scripts/install.sh first" >&2; exit 2; }
. .venv/bin/activate
export TRITON_INTERPRET=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
python -m pytest tests -q -ra "$@"
