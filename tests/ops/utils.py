"""Shared helpers of the fused-op tests (tests/ops/test_<op>.py), for every backend.

- ``backend_device_params``: the (backend, device) grid with a skip reason wherever that backend
  cannot run (not built, no GPU, Triton on CPU without the interpreter).
- ``skip_if_slow``: the Triton interpreter on CPU gets tiny cases only; big ones run on the GPU.
- tolerances per dtype, and ``assert_close`` that says which tensor failed, where, and by how much.
- ``assert_bitwise_equal``: run-to-run determinism checks.
- ``make_mask``: 0/1 masks with all-masked, none-masked and mixed rows.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator, Optional

import pytest
import torch

from gfm_fast.ops import available_backends

FAST_BACKENDS = ("cpp", "triton")
DEVICES = ("cpu", "cuda")

# Errors are measured against max(1, max|expected|): gradients that sum many terms are compared at
# the scale of their largest entry rather than entry by entry. 16-bit cases compare with an fp32
# reference computed from the same rounded inputs, so the tolerance covers the 16-bit rounding of
# outputs and intermediates (8 bits of mantissa for bf16, 11 for fp16).
TOLERANCE = {
    torch.float64: 1e-10,
    torch.float32: 2e-5,
    torch.float16: 5e-3,
    torch.bfloat16: 3e-2,
}

# Sizes the Triton interpreter handles in a few seconds on CPU (issue 4: B <= 2, dims <= 64,
# grids <= 4x4). Bigger cases run on CUDA only for Triton.
TINY_BATCH, TINY_DIM, TINY_GRID = 2, 64, 4


def backend_device_params(backends: Iterable[str] = FAST_BACKENDS, devices: Iterable[str] = DEVICES):
    """pytest params (backend, device), skipped with the reason wherever they cannot run here."""
    available = available_backends()
    params = []
    for backend in backends:
        for device in devices:
            marks = []
            if device == "cuda" and not torch.cuda.is_available():
                marks.append(pytest.mark.skip(reason="no CUDA device: GPU cases run on a GPU machine"))
            elif not available[backend][device]:
                why = {"cpp": "gfm_fast._C is not built with kernels for this device (pip install -e .)",
                       "triton": "triton is not installed, or runs on CPU only with TRITON_INTERPRET=1"}[backend]
                marks.append(pytest.mark.skip(reason=f"{backend} on {device}: {why}"))
            params.append(pytest.param(backend, device, id=f"{backend}-{device}", marks=marks))
    return params


@contextmanager
def cpu_threads(count: int) -> Iterator[None]:
    """Run the body on ``count`` CPU threads, whatever OMP_NUM_THREADS the suite was started with: on
    one thread the C++ kernels never merge per-thread partial sums."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def is_interpreted(backend: str, device: str) -> bool:
    return backend == "triton" and device == "cpu"


def skip_if_slow(backend: str, device: str, *, batch: int, dims: Iterable[int], grid: Iterable[int]) -> None:
    """Skip cases too big for the Triton interpreter on CPU (they run on the GPU)."""
    if is_interpreted(backend, device) and (batch > TINY_BATCH or max(dims) > TINY_DIM or max(grid) > TINY_GRID):
        pytest.skip("large case: the Triton interpreter on CPU is too slow, this size runs on CUDA")


def reference_dtype(dtype: torch.dtype) -> torch.dtype:
    """The reference runs in fp64 for fp64 inputs and in fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def assert_close(name: str, actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype,
                 tolerance: Optional[float] = None) -> None:
    """|actual - expected| <= tol * max(1, max|expected|) everywhere; reports the worst entry."""
    tol = TOLERANCE[dtype] if tolerance is None else tolerance
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    if actual.numel() == 0:
        return
    assert torch.isfinite(actual).all(), f"{name}: non-finite values {actual[~torch.isfinite(actual)][:5].tolist()}"
    scale = max(1.0, expected.abs().max().item())
    error = (actual - expected).abs()
    worst = error.max().item()
    if not worst <= tol * scale:
        index = tuple(int(i) for i in torch.nonzero(error == worst)[0])
        raise AssertionError(f"{name} ({dtype}): max error {worst:.3e} > {tol * scale:.3e} (tol {tol:g} x scale "
                             f"{scale:.3g}) at {index}: got {actual[index].item():.8g}, expected "
                             f"{expected[index].item():.8g}; {int((error > tol * scale).sum())} of "
                             f"{error.numel()} entries off")


def assert_bitwise_equal(name: str, first: torch.Tensor, second: torch.Tensor) -> None:
    """Two runs on the same inputs agree to the bit (fixed-order reductions, no atomics)."""
    if not torch.equal(first, second):
        diff = (first.double() - second.double()).abs()
        raise AssertionError(f"{name}: two runs on the same inputs differ, by up to {diff.max().item():.3e} in "
                             f"{int((diff > 0).sum())} of {diff.numel()} entries: a reduction's order is not fixed")


def make_mask(batch: int, height: int, width: int, kind: str = "random", *, device="cpu",
              generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """(B, h, w) bool mask. kind: random (about half), all, none, or mixed (image 0 fully masked,
    image 1 fully kept, the rest random; at least one masked and one kept entry overall)."""
    mask = torch.rand(batch, height, width, generator=generator) < 0.5
    if kind == "all":
        mask.fill_(True)
    elif kind == "none":
        mask.fill_(False)
    elif kind == "mixed":
        mask[0] = True
        if batch > 1:
            mask[1] = False
    elif kind != "random":
        raise ValueError(f"unknown mask kind {kind!r}")
    if kind in ("random", "mixed") and mask.numel() > 1:
        mask.view(-1)[0], mask.view(-1)[-1] = True, False  # never degenerate
    return mask.to(device)


def random_scalar_grad(dtype: torch.dtype, device) -> torch.Tensor:
    """A grad_loss != 1, so that the backward's scaling is exercised (0.5 + U(0, 1), exact in bf16)."""
    value = 0.5 + float(torch.randint(0, 64, ()).item()) / 64
    return torch.tensor(value, dtype=dtype, device=device)
