#!/usr/bin/env bash
# Fetch, here, the wheels that a lent GPU machine lacks (it has python3 3.12 with torch, triton,
# timm, numpy, pytest... but no package index): webdataset, simplejpeg, deepspeed and their needs,
# and timm at our pinned version (the image has its own).
# They go to .whl/ (git-ignored), which benchmarks/gpu_session.sh installs when the device tool
# carries it:  run(command="GPU_SESSION_SECONDS=540 bash benchmarks/gpu_session.sh", carry=[".whl"])
set -euo pipefail
cd "$(dirname "$0")/.."
PY_VERSION=${PY_VERSION:-3.12}   # the device image's python3
mkdir -p .whl
binary=(webdataset==1.0.2 braceexpand simplejpeg==1.9.0 hjson timm==1.0.31
        "pydantic>=2.11" annotated-types typing-inspection "typing-extensions>=4.16")
download() {
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "$@"
}
download "${binary[@]}"
# pydantic pins one pydantic-core version, often older than the newest pydantic-core: fetch that one.
# gpu_session.sh installs every wheel in .whl/, so only the newest pydantic and its core stay (a re-run
# after a new release would otherwise leave two versions of each, which pip refuses to install together).
core=$(python3 - <<'PY'
import glob, os, re, zipfile
def version(path):
    return tuple(int(n) for n in re.findall(r"\d+", os.path.basename(path).split("-")[1]))
wheels = sorted(glob.glob(".whl/pydantic-2*.whl"), key=version)
for old in wheels[:-1]:
    os.remove(old)
with zipfile.ZipFile(wheels[-1]) as wheel:
    meta = wheel.read(next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))).decode()
print(re.search(r"^Requires-Dist: pydantic-core==([\w.]+)", meta, re.M).group(1))
PY
)
find .whl -maxdepth 1 -name 'pydantic_core-*.whl' ! -name "pydantic_core-$core-*" -delete
download "pydantic-core==$core"
# deepspeed ships as an sdist only: build its pure-Python wheel here (no ops prebuilt; we use torch's AdamW).
if ! ls .whl/deepspeed-0.19.8-*.whl >/dev/null 2>&1; then
    DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps --no-build-isolation -w .whl deepspeed==0.19.8
fi
# Optional: gfm_fast._C prebuilt here for the device (its CUDA kernels for sm_90), so that the device's
# setup phase only checks it instead of spending device time compiling. PREBUILD_PYTHON must be a
# python with the device's own python and torch versions (3.12, 2.11.0+cu130 as last read): an
# extension runs only against the torch it was built with. gpu_session.sh uses the build only where
# torch, python, CUDA arch and the sources (csrc/, setup.py) all match, and builds there otherwise.
if [ -n "${PREBUILD_PYTHON:-}" ]; then
    tmp=$(mktemp -d)
    cp -r setup.py README.md csrc "$tmp"/ && mkdir "$tmp/gfm_fast"
    (cd "$tmp" && CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST=${PREBUILD_ARCH:-9.0} FORCE_CUDA=1 \
        MAX_JOBS=$(nproc) "$PREBUILD_PYTHON" setup.py -q build_ext --inplace >build.log 2>&1) \
        || { tail -30 "$tmp/build.log"; exit 1; }
    rm -rf .whl/gfm_fast_C && mkdir -p .whl/gfm_fast_C
    cp "$tmp"/gfm_fast/_C.*.so .whl/gfm_fast_C/
    strip --strip-debug .whl/gfm_fast_C/_C.*.so  # the device tool carries 64 MiB a call
    "$PREBUILD_PYTHON" -c "import torch, sys; print(torch.__version__, '%d.%d' % sys.version_info[:2])" >.whl/gfm_fast_C/built_for
    echo "${PREBUILD_ARCH:-9.0} $(bash benchmarks/gpu_session.sh --sources-digest)" >>.whl/gfm_fast_C/built_for
    rm -rf "$tmp"
    echo "prebuilt: $(ls .whl/gfm_fast_C) for $(tr '\n' ' ' <.whl/gfm_fast_C/built_for)"
fi
du -sh .whl && ls .whl
