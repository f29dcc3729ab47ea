#!/usr/bin/env bash
# Everything a session with a GPU should run, in one go (see DEVELOPERS' guide: GPU work comes
# first): the CUDA test cases, then the benchmarks, with results named after the card.
#   bash benchmarks/gpu_session.sh            # after scripts/install.sh (builds the CUDA ops)
# Writes benchmarks/results/<card>_{ops_bf16,ops_fp32,throughput}.json and prints the tables.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device visible'"
card=$(python -c "import torch, re; print(re.sub(r'[^a-z0-9]+', '_', torch.cuda.get_device_name().lower()).strip('_'))")
echo "card: $card"
python -c "import gfm_fast.ops as o; b = o.available_backends(); print(b); assert b['cpp']['cuda'] and b['triton']['cuda'], 'CUDA backends not built: FORCE_CUDA=1 bash scripts/install.sh'"
# GPU test cases (tests/ops parametrize device; the model/feature tests pick CUDA when present).
TRITON_INTERPRET=0 python -m pytest tests/ops tests/models tests/test_features.py -q -ra -x -k "cuda or gpu" || status=$?
mkdir -p benchmarks/results
python benchmarks/ops_bench.py --device cuda --dtype bfloat16 --batch 128 --out "benchmarks/results/${card}_ops_bf16_b128.json"
python benchmarks/ops_bench.py --device cuda --dtype float32 --batch 128 --out "benchmarks/results/${card}_ops_fp32_b128.json"
python benchmarks/throughput.py --device cuda --out "benchmarks/results/${card}_throughput.json"
exit "${status:-0}"
