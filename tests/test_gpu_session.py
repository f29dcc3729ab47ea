"""What benchmarks/gpu_session.sh runs, checked without a GPU: its phases call a stub python that
records its arguments, and the test selection it records is collected by the real pytest."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import List

REPO = Path(__file__).resolve().parent.parent
TRITON_TESTS = ("tests/ops/test_triton_kernels.py", "tests/ops/test_triton_kernels_build.py")
NO_GPU_CHECK = "test_kernels_compile_for_h100_without_a_gpu"  # compiles every config for sm_90: minutes


def _run_session(tmp_path: Path, stub_body: str, *phases: str, expect: int = 0, **env_vars: str) -> str:
    """``gpu_session.sh <phases>`` from a copy (no .venv or .whl beside it: it takes $PYTHON, here a
    bash stub with ``stub_body``), with ``env_vars`` set and no deadline or backend unless given; its
    stdout, once it exited with ``expect``."""
    root = tmp_path / "repo"
    (root / "benchmarks").mkdir(parents=True)
    shutil.copy(REPO / "benchmarks" / "gpu_session.sh", root / "benchmarks")
    stub = tmp_path / "python"
    stub.write_text(f"#!/usr/bin/env bash\n{stub_body}\n")
    stub.chmod(0o755)
    env = {**os.environ, "PYTHON": str(stub), "OUT": str(tmp_path / "out"), "TMPDIR": str(tmp_path)}  # mktemp's
    env.pop("GPU_SESSION_SECONDS", None)
    env.pop("GFM_DIST_BACKEND", None)
    result = subprocess.run(["bash", str(root / "benchmarks" / "gpu_session.sh"), *phases], env={**env, **env_vars},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == expect, result.stdout + result.stderr
    return result.stdout


def _recorded_calls(tmp_path: Path, phase: str) -> List[List[str]]:
    """The python calls of ``gpu_session.sh <phase>``, each as [TORCHINDUCTOR_COMPILE_THREADS, *argv]."""
    calls = tmp_path / "calls"
    _run_session(tmp_path, f'printf "%s\\0" "${{TORCHINDUCTOR_COMPILE_THREADS:-}}" "$@" >>{calls}\n'
                           f'printf "\\n" >>{calls}', phase)
    return [line.rstrip("\0").split("\0") for line in calls.read_text().splitlines() if line]


def _collected(*args: str) -> List[str]:
    result = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                             *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return [line for line in result.stdout.splitlines() if "::" in line]


def test_test_phase_runs_the_triton_launcher_tests_on_the_gpu(tmp_path):
    """The op tests' GPU selection also takes test_triton_kernels[_build].py, whose tests run on CUDA when
    there is a GPU but carry no "cuda" in their names (a bare -k cuda dropped all of them), except its
    GPU-less compile check; with one inductor compile thread per xdist worker."""
    calls = _recorded_calls(tmp_path, "test")
    ops_call = next(call for call in calls if "tests/ops" in call)
    threads, argv = ops_call[0], ops_call[1:]
    assert threads == "1"
    selection = argv[argv.index("-k") + 1]
    selected = set(_collected("tests/ops", "-k", selection))
    every_triton_test = [t for t in _collected(*TRITON_TESTS) if t.startswith(TRITON_TESTS)]
    assert len(every_triton_test) > 20
    for test in every_triton_test:
        assert (test in selected) == (NO_GPU_CHECK not in test), test
    every_cuda_case = [t for t in _collected("tests/ops") if "cuda" in t]
    assert every_cuda_case and set(every_cuda_case) <= selected


def test_test_phase_reaches_the_model_checks_before_the_compiles(tmp_path):
    """The models' GPU checks run in file order under the session's deadline: the torch.compile
    cases (an inductor compile each, the slowest) come after every other selected test."""
    calls = _recorded_calls(tmp_path, "test")
    models_call = next(call for call in calls if "tests/models/test_cuda.py" in call)[1:]
    files = [arg for arg in models_call if arg.startswith("tests/")]
    order = _collected(*files, "-k", models_call[models_call.index("-k") + 1])
    compiled = [i for i, test in enumerate(order) if "compiled" in test]
    assert compiled and compiled == list(range(len(order) - len(compiled), len(order))), order


def _step_phase_backend(tmp_path: Path, nccl_exit: int) -> List[str]:
    """GFM_DIST_BACKEND as each python call of ``gpu_session.sh step`` saw it; the stub's NCCL
    check (the call that names init_process_group) exits with ``nccl_exit``."""
    seen = tmp_path / "seen"
    _run_session(tmp_path, f'case "$*" in *init_process_group*) exit {nccl_exit};; esac\n'
                           f'echo "${{GFM_DIST_BACKEND:-default}} $*" >>{seen}', "step")
    return [line.split()[0] for line in seen.read_text().splitlines() if "throughput.py" in line]


def test_engine_phases_fall_back_to_gloo_when_nccl_fails(tmp_path):
    """NCCL is checked once before the first phase that builds the engine; where it fails, those
    phases run with GFM_DIST_BACKEND=gloo (one rank needs no real communication)."""
    assert _step_phase_backend(tmp_path / "ok", 0) == ["default"]
    assert _step_phase_backend(tmp_path / "broken", 1) == ["gloo"]


def test_a_hanging_train_phase_leaves_the_deadline_to_the_phases_after_it(tmp_path):
    """The train phase is stopped after TRAIN_SECONDS even when the shared deadline is far off."""
    out = _run_session(tmp_path, 'case "$*" in *train.py*) sleep 60;; esac', "train", "features", expect=124,
                       GPU_SESSION_SECONDS="300", TRAIN_SECONDS="2")
    assert "=== train: exit 124" in out and "=== features: exit 0" in out, out


def test_the_train_phase_leaves_no_run_directory_behind(tmp_path):
    """Its run (checkpoints included) goes to a temporary directory; the metrics file is what it keeps."""
    temp = tmp_path / "temp"
    temp.mkdir()
    stub = 'out=$(printf "%s\\n" "$@" | grep -A1 -- --output-dir | tail -1); [ -n "$out" ] && echo "{}" >"$out/metrics.jsonl"'
    out = _run_session(tmp_path, stub, "train", TMPDIR=str(temp))
    assert "=== train: exit 0" in out, out
    assert list(temp.iterdir()) == []
    assert list((tmp_path / "out").glob("*_train_metrics.jsonl"))
