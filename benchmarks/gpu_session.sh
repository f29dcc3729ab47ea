#!/usr/bin/env bash
# What a session with a GPU runs, GPU-only work first, in phases:
#   bash benchmarks/gpu_session.sh [setup] [step] [bench] [test] [train] [features] [compile] [bench32]
#   (none: all, in this order)
#   setup   gfm_fast._C with its CUDA kernels for this card: the one prebuilt by scripts/device_wheels.sh
#           where it matches (torch, python, arch, sources), else built here (a fresh machine needs it first)
#   step    the whole training step (Swin-B student + teacher, batch 128), ours vs the reference GFM step
#           in bf16, eager: first, since the whole step is what the project is judged on
#   bench   the fused ops vs reference, bf16 at batch 128, and cosine at 64k rows (bandwidth)
#   test    the GPU cases of the op tests, then the assembled model, features and GPU decode
#   train   a short pretraining run (run.precision=auto) through the real entry point, stopped and resumed
#           (at most TRAIN_SECONDS, 180, of the deadline)
#   features extract_features vs plain timm with the same weights, bf16, batch 256, added to step's JSON
#   compile the same step with both sides under torch.compile, added to step's JSON (compiling takes
#           minutes: after the checks that take less)
#   bench32 the fused ops in fp32
# Works on a GPU box with .venv (scripts/install.sh), or on the lent device machine, which has
# python3 with torch/triton/timm but no package index: there, first run scripts/device_wheels.sh
# here and carry .whl. The device budget (15 min a session, a machine start included) fits one
# call, with GPU_SESSION_SECONDS as the deadline every phase shares (a phase still running at the
# deadline is stopped, and the ones after it are skipped):
#   run(command="GPU_SESSION_SECONDS=540 bash benchmarks/gpu_session.sh", carry=[".whl"], timeout_s=600)
# Each phase writes into $OUT when set (the device tool brings that folder back), else into
# benchmarks/results: <card>_ops_{bf16,fp32}_b128.json, <card>_ops_cosine_bf16_b65536.json,
# <card>_throughput.json, <card>_train_metrics.jsonl and gpu_session.log (8 files at most).
set -uo pipefail
cd "$(dirname "$0")/.."
# What the extension is built from: a prebuilt gfm_fast._C (scripts/device_wheels.sh, PREBUILD_PYTHON)
# is used only when this matches the digest it was built from.
sources_digest() { cat setup.py $(find csrc -type f | LC_ALL=C sort) | sha256sum | cut -c1-16; }
if [ "${1:-}" = --sources-digest ]; then sources_digest; exit 0; fi

RESULTS=${OUT:-benchmarks/results}
OPS_TESTS='cuda or (test_triton_kernels and not without_a_gpu)'  # pytest -k of the test phase's op tests
mkdir -p "$RESULTS"
phases=("$@")
[ ${#phases[@]} -eq 0 ] && phases=(setup step bench test train features compile bench32)
DEADLINE=${GPU_SESSION_SECONDS:-}
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0

if [ -x .venv/bin/python ]; then
    PY=.venv/bin/python
else
    PY=${PYTHON:-python3}
    if [ -d .whl ]; then  # the device machine: our missing dependencies, as carried wheels
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gfm_site .whl/*.whl \
            || { echo "installing .whl failed"; exit 1; }
        export PYTHONPATH=/tmp/gfm_site${PYTHONPATH:+:$PYTHONPATH} PATH=/tmp/gfm_site/bin:$PATH
    fi
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # gfm_fast from this tree, prebuilt or installed here

card() { "$PY" -c "import torch, re; n = torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'; print(re.sub(r'[^a-z0-9]+', '_', n.lower()).strip('_'))"; }

phase_setup() {
    "$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device visible'; print('torch', torch.__version__, torch.cuda.get_device_name())" || return 1
    local arch want
    arch=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
    ln -sfn ../kernels gfm_fast/kernels  # what the editable install maps; PYTHONPATH holds the repo
    want=$("$PY" -c "import torch, sys; print(torch.__version__, '%d.%d' % sys.version_info[:2])"; echo "$arch $(sources_digest)")
    if [ -f .whl/gfm_fast_C/built_for ]; then
        if [ "$(cat .whl/gfm_fast_C/built_for)" != "$want" ]; then
            echo "prebuilt gfm_fast._C not used: built for $(tr '\n' ' ' <.whl/gfm_fast_C/built_for), here $(echo $want)"
        elif cp .whl/gfm_fast_C/_C.*.so gfm_fast/ && check_backends; then
            echo "using the prebuilt gfm_fast._C (built for: $(echo $want))"
            return 0
        else
            echo "prebuilt gfm_fast._C does not load here: building it"
        fi
    fi
    rm -f gfm_fast/_C.*.so
    # Offline, against the torch already there; builds gfm_fast._C with its CUDA kernels for this card.
    # --use-pep517: an old pip would otherwise fall back to `setup.py develop`, which cannot map
    # kernels/ to gfm_fast.kernels.
    CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$arch} FORCE_CUDA=1 \
        MAX_JOBS=${MAX_JOBS:-$(nproc)} "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --use-pep517 -e . || return 1
    check_backends
}

check_backends() {
    "$PY" -c "import gfm_fast.kernels, gfm_fast.ops as o; b = o.available_backends(); print(b)
assert b['cpp']['cuda'] and b['triton']['cuda'], 'CUDA backends not available'"
}

phase_test() {
    # The GPU cases of the op tests, then the assembled model, features and GPU decode on the device.
    # One worker per core: most of the time is Triton compiling each autotune config. -v: each result
    # is in the log as it comes, even if the deadline stops the run. OPS_TESTS: the per-op tests'
    # CUDA cases, and the Triton launcher tests (tests/ops/test_triton_kernels*.py), which run on the
    # GPU whenever there is one but have no "cuda" in their names; not its sm_90 compile check, which
    # needs no GPU and takes minutes. One inductor compile thread per worker: the few
    # torch.compile tests compile one op each, and 16 workers would each start a 16-process pool.
    # Then the model checks, one process in file order: test_cuda.py last, whose two whole-student
    # torch.compile cases close it, so that a deadline stops them rather than the quick checks.
    TORCHINDUCTOR_COMPILE_THREADS=1 "$PY" -m pytest tests/ops -v --tb=short -ra -k "$OPS_TESTS" -p no:cacheprovider \
        -n "${PYTEST_WORKERS:-$(nproc)}"
    local ops=$?
    "$PY" -m pytest tests/data/test_loader.py tests/data/test_device_normalise.py tests/models/test_cuda.py \
        -v --tb=short -ra -k "cuda or gpu" -p no:cacheprovider
    return $(( ops || $? ))
}

phase_bench() {
    local c
    c=$(card)
    "$PY" benchmarks/ops_bench.py --device cuda --dtype bfloat16 --batch 128 --out "$RESULTS/${c}_ops_bf16_b128.json" &&
    # At GFM's batch the cosine op moves 0.5 MB (launch-bound); 64k rows measure its bandwidth.
    "$PY" benchmarks/ops_bench.py --device cuda --dtype bfloat16 --batch 65536 --ops cosine_distillation \
        --out "$RESULTS/${c}_ops_cosine_bf16_b65536.json"
}

phase_bench32() {
    "$PY" benchmarks/ops_bench.py --device cuda --dtype float32 --batch 128 --out "$RESULTS/$(card)_ops_fp32_b128.json"
}

phase_step() {
    "$PY" benchmarks/throughput.py --device cuda --only step --precision bf16 --out "$RESULTS/$(card)_throughput.json"
}

phase_features() {
    "$PY" benchmarks/throughput.py --device cuda --only features --precision bf16 --append \
        --out "$RESULTS/$(card)_throughput.json"
}

phase_compile() {
    "$PY" benchmarks/throughput.py --device cuda --only step --precision bf16 --compiled-only --append \
        --out "$RESULTS/$(card)_throughput.json"
}

phase_train() {
    # A short pretraining run on the GPU through the real entry point (one process, NCCL),
    # stopped at 40 and resumed to 60 (one 60-step schedule).
    local c dir
    c=$(card)
    dir=$(mktemp -d)
    local args=(--config configs/tiny.yaml --output-dir "$dir" run.device=${TRAIN_DEVICE:-cuda}
                run.precision=${TRAIN_PRECISION:-auto} data.batch_size=16 data.samples_per_epoch=640
                optim.schedule_steps=60 data.num_workers=4 run.ckpt_every=20 run.preview_every=20)
    "$PY" gfm_fast/train.py "${args[@]}" --max-steps 40 && "$PY" gfm_fast/train.py "${args[@]}" --max-steps 60 &&
    cp "$dir/metrics.jsonl" "$RESULTS/${c}_train_metrics.jsonl" 2>/dev/null
    local status=$?
    rm -rf "$dir"  # its checkpoints: the metrics are all the session keeps
    return $status
}

# torch.distributed as the DeepSpeed engine uses it, one rank: NCCL has never run on the lent machines.
check_nccl() {
    timeout --kill-after=5 60 "$PY" -c "import torch, torch.distributed as dist
dist.init_process_group('nccl', init_method='tcp://127.0.0.1:29517', rank=0, world_size=1)
x = torch.ones(4, device='cuda'); dist.all_reduce(x); dist.broadcast(x, 0); torch.cuda.synchronize()
dist.destroy_process_group(); print('NCCL: one rank, all_reduce and broadcast work')"
}

export PY RESULTS OPS_TESTS
export -f card sources_digest check_backends phase_setup phase_bench phase_bench32 phase_test phase_step phase_features phase_compile phase_train

status=0
for phase in "${phases[@]}"; do
    case "$phase" in
        setup|step|bench|test|train|features|compile|bench32) ;;
        *) echo "unknown phase $phase (setup, step, bench, test, train, features, compile, bench32)"; exit 2 ;;
    esac
done
for phase in "${phases[@]}"; do
    limit=()
    if [ -n "$DEADLINE" ]; then
        left=$((DEADLINE - SECONDS))
        if [ "$left" -le 10 ]; then
            echo "=== $phase: skipped, the ${DEADLINE} s deadline has passed ===" | tee -a "$RESULTS/gpu_session.log"
            status=124
            continue
        fi
        # The short train run gets at most TRAIN_SECONDS: a hang there (its loader workers fork after
        # CUDA has started, never yet seen on the lent machines) must not take the phases after it.
        [ "$phase" = train ] && [ "$left" -gt "${TRAIN_SECONDS:-180}" ] && left=${TRAIN_SECONDS:-180}
        limit=(timeout --kill-after=10 "$left")
    fi
    # If NCCL fails or hangs, the phases that build the engine run on gloo (GFM_DIST_BACKEND) rather
    # than each failing, or hanging until the deadline.
    if [ -z "${dist_checked:-}" ] && [[ " step train compile " == *" $phase "* ]]; then
        dist_checked=1
        check_nccl 2>&1 | tail -n 5 | tee -a "$RESULTS/gpu_session.log"
        if [ "${PIPESTATUS[0]}" -ne 0 ]; then
            echo "NCCL did not work here: step, train and compile use gloo (GFM_DIST_BACKEND=gloo)" |
                tee -a "$RESULTS/gpu_session.log"
            export GFM_DIST_BACKEND=gloo
        fi
    fi
    echo "=== $phase ==="
    start=$SECONDS
    # A child bash runs the phase, so that `timeout` can stop it (and its children) at the deadline.
    "${limit[@]}" bash -c "phase_$phase" 2>&1 | tee -a "$RESULTS/gpu_session.log"  # one log: 8 files come back at most
    rc=${PIPESTATUS[0]}
    echo "=== $phase: exit $rc in $((SECONDS - start)) s ===" | tee -a "$RESULTS/gpu_session.log"
    if [ "$rc" -ne 0 ]; then
        status=$rc
        [ "$phase" = setup ] && exit "$rc"  # nothing else can run without the build
    fi
done
exit "$status"
