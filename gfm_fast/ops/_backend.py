"""Backend selection for the fused ops: reference | cpp | triton, chosen per call.

``auto`` picks ``cpp`` for CPU tensors (the fastest in the committed CPU measurements,
benchmarks/results/cpu_ops_*.json) and ``GPU_PREFERENCE`` for CUDA tensors: the backend expected
to be fastest there, until a GPU measurement is committed. A backend that cannot serve the
tensors' device, or was not built, is a clear error: nothing falls back silently. ``GFM_FAST_BACKEND``
overrides ``auto`` for the whole process. The compiled extension and the Triton kernels are
loaded lazily, so ``import gfm_fast`` works on a CPU box without either.
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Dict

import torch

from gfm_fast.errors import ConfigError, GFMError

BACKENDS = ("auto", "reference", "cpp", "triton")
OPS = ("masked_patch_embed", "decoder_l1_loss", "cosine_distillation")
ENV_BACKEND = "GFM_FAST_BACKEND"

# The CUDA backend that backend="auto" runs, per op. An expectation, not a measurement: no GPU
# result is committed yet. Triton is expected to win: its kernels autotune their tiles per shape
# and card, where the CUDA kernels launch with fixed block sizes (256 threads). Replace it by
# the "fastest_fused" of the GPU run committed under benchmarks/results/ (<card>_ops_*.json, written
# by benchmarks/gpu_session.sh); tests/ops/test_backend.py then checks the two agree.
GPU_PREFERENCE: Dict[str, str] = {
    "masked_patch_embed": "triton",
    "decoder_l1_loss": "triton",
    "cosine_distillation": "triton",
}


class BackendUnavailableError(GFMError, RuntimeError):
    """The requested backend cannot run here (not built, or wrong device); a GFMError, so the CLIs
    print it in one line (e.g. ``model.ops_backend=triton`` in a CPU run)."""


_IMPORT_ERRORS: Dict[str, str] = {}
_MODULES: Dict[str, ModuleType] = {}


def _import_error(module: str) -> str:
    """Why ``module`` cannot be imported ("" when it can; the module is then in ``_MODULES``).
    Memoised in plain dicts: torch.compile traces this on every op call and reads a dict directly,
    but cannot trace ``importlib`` (or an lru_cache wrapper) without a graph break."""
    if module not in _IMPORT_ERRORS:
        try:
            _MODULES[module] = importlib.import_module(module)
            _IMPORT_ERRORS[module] = ""
        except Exception as exc:  # ImportError, or a failed extension load
            _IMPORT_ERRORS[module] = f"{type(exc).__name__}: {exc}"
    return _IMPORT_ERRORS[module]


def cpp_available(device_type: str = "cpu") -> bool:
    """True when gfm_fast._C is built with kernels for ``device_type`` (its Python side, with the
    ops' fake kernels, imported too: a later call under torch.compile then finds it loaded)."""
    if _import_error("gfm_fast._C") or _import_error("gfm_fast.ops._cpp_impl"):
        return False
    from gfm_fast import _C

    return device_type == "cpu" or (device_type == "cuda" and bool(getattr(_C, "WITH_CUDA", False)))


def triton_available() -> bool:
    return not _import_error("gfm_fast.ops._triton_impl")


def available_backends() -> Dict[str, Dict[str, bool]]:
    """Which backends can serve which device here: {backend: {"cpu": bool, "cuda": bool}}."""
    cuda = torch.cuda.is_available()
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    return {
        "reference": {"cpu": True, "cuda": cuda},
        "cpp": {"cpu": cpp_available("cpu"), "cuda": cuda and cpp_available("cuda")},
        "triton": {"cpu": interp and triton_available(), "cuda": cuda and triton_available()},
    }


def resolve(op: str, backend: str, device: torch.device) -> str:
    """The concrete backend name for ``op`` on ``device``; raises if it cannot run there."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; expected one of {', '.join(OPS)}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r} for {op}; expected one of {', '.join(BACKENDS)}")
    if backend == "auto":
        backend = os.environ.get(ENV_BACKEND, "auto") or "auto"
        if backend not in BACKENDS:
            raise ConfigError(f"{ENV_BACKEND}={backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "auto":
        backend = "cpp" if device.type == "cpu" else GPU_PREFERENCE[op]
    _check_can_serve(op, backend, device)
    return backend


def _check_can_serve(op: str, backend: str, device: torch.device) -> None:
    if backend == "reference":
        return
    if device.type not in ("cpu", "cuda"):
        raise BackendUnavailableError(f"{op}: backend {backend!r} supports CPU and CUDA tensors, got {device}; "
                                      f"use backend='reference'")
    if backend == "cpp":
        if _import_error("gfm_fast._C"):
            raise BackendUnavailableError(
                f"{op}: the C++ extension gfm_fast._C is not built ({_import_error('gfm_fast._C')}); "
                f"run `pip install -e .` in the repository, or pass backend='reference'")
        if not cpp_available(device.type):
            raise BackendUnavailableError(
                f"{op}: gfm_fast._C was built without CUDA kernels, so backend='cpp' cannot run on {device}; "
                f"rebuild with a CUDA toolkit (FORCE_CUDA=1 pip install -e .) or use backend='triton'")
        return
    # triton
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise BackendUnavailableError(
            f"{op}: backend='triton' needs a CUDA tensor (got a CPU tensor); use backend='cpp' or 'auto' on CPU, "
            f"or set TRITON_INTERPRET=1 before importing triton to run the kernels in the interpreter")
    error = _import_error("gfm_fast.ops._triton_impl")
    if error:
        raise BackendUnavailableError(f"{op}: Triton kernels are unavailable ({error}){_triton_fix(error)}")


def _triton_fix(error: str) -> str:
    if "No module named 'triton'" in error:
        return "; install triton"
    if "No module named 'gfm_fast.kernels'" in error:
        # kernels/ is mapped to gfm_fast.kernels by setup.py's package_dir, which a legacy
        # `setup.py develop` (what pip < 25 runs for `pip install -e .` of a setup.py project) ignores.
        return ("; gfm_fast was installed without its kernels/ package (an old pip's legacy editable install): "
                "reinstall with `pip install --no-build-isolation --use-pep517 -e .`, or upgrade pip first")
    return ""


_IMPL_MODULES = {"cpp": "gfm_fast.ops._cpp_impl", "triton": "gfm_fast.ops._triton_impl"}


def implementation(backend: str) -> ModuleType:
    """The module implementing ``<op>_forward`` / ``<op>_backward`` for a fast backend (already
    checked by ``resolve``, so importing it succeeds)."""
    if backend not in _IMPL_MODULES:
        raise ValueError(f"backend {backend!r} has no fused implementation module")
    module = _IMPL_MODULES[backend]
    error = _import_error(module)
    if error:
        raise BackendUnavailableError(f"backend {backend!r} cannot be loaded: {error}")
    return _MODULES[module]
