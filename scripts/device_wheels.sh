#!/usr/bin/env bash
# Fetch, here, the wheels that a lent GPU machine lacks (it has python3 3.12 with torch, triton,
# timm, numpy, pytest... but no package index): webdataset, simplejpeg, deepspeed and their needs.
# They go to .whl/ (git-ignored), which benchmarks/gpu_session.sh installs when the device tool
# carries it:  run(command="GPU_SESSION_SECONDS=540 bash benchmarks/gpu_session.sh", carry=[".whl"])
set -euo pipefail
cd "$(dirname "$0")/.."
PY_VERSION=${PY_VERSION:-3.12}   # the device image's python3
mkdir -p .whl
binary=(webdataset==1.0.2 braceexpand simplejpeg==1.9.0 hjson
        "pydantic>=2.11" pydantic-core annotated-types typing-inspection "typing-extensions>=4.16")
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${binary[@]}"
# deepspeed ships as an sdist only: build its pure-Python wheel here (no ops prebuilt; we use torch's AdamW).
if ! ls .whl/deepspeed-0.19.8-*.whl >/dev/null 2>&1; then
    DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps --no-build-isolation -w .whl deepspeed==0.19.8
fi
# pydantic pins one pydantic-core version: keep only the matching one so the offline install is consistent.
python3 - <<'PY'
import glob, re, zipfile
pyd = sorted(glob.glob(".whl/pydantic-2*.whl"))[-1]
meta = zipfile.ZipFile(pyd).read(next(n for n in zipfile.ZipFile(pyd).namelist() if n.endswith("METADATA"))).decode()
want = re.search(r"^Requires-Dist: pydantic-core==([\w.]+)", meta, re.M).group(1)
cores = glob.glob(".whl/pydantic_core-*.whl")
assert any(f"pydantic_core-{want}-" in c for c in cores), f"{pyd} needs pydantic-core {want}, have {cores}"
PY
du -sh .whl && ls .whl
