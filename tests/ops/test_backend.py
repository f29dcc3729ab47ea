"""Backend selection: the C++ ops are compiled and are what backend="auto" runs on CPU; a backend
that cannot serve the tensors' device (or was not built) is a clear error, never a silent fallback."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import gfm_fast
from gfm_fast import ops
from gfm_fast.errors import ConfigError, GFMError
from gfm_fast.ops import _backend

OPS = ("masked_patch_embed", "decoder_l1_loss", "cosine_distillation")
REPO = Path(__file__).resolve().parents[2]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


class CountGfmOps(TorchDispatchMode):
    """Counts the torch.ops.gfm_fast.* calls that reach the dispatcher (and runs them)."""

    def __init__(self):
        super().__init__()
        self.calls = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "gfm_fast":
            name = func.overloadpacket.__name__
            self.calls[name] = self.calls.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def _run_all_ops(device, backend="auto"):
    """Forward + backward of the three ops on small GFM-like inputs; returns the loss values."""
    torch.manual_seed(0)
    images = torch.randn(2, 3, 16, 16, device=device)
    mask = torch.tensor([[[1, 0], [0, 1]], [[0, 0], [1, 1]]], device=device).bool()
    # Patch embedding 3 -> 32 (p 4) with mask token; decoder 32 -> 8*8*3 (stride 8).
    embed = [0.1 * torch.randn(32, 3, 4, 4), torch.randn(32), 1 + 0.1 * torch.randn(32), torch.randn(32),
             torch.randn(32)]
    weight, bias, norm_weight, norm_bias, mask_token = (p.to(device).requires_grad_() for p in embed)
    dec_weight = (0.1 * torch.randn(192, 32)).to(device).requires_grad_()
    dec_bias = torch.zeros(192, device=device, requires_grad=True)
    token_mask = mask.repeat_interleave(2, 1).repeat_interleave(2, 2)
    tokens = ops.masked_patch_embed(images, weight, bias, norm_weight, norm_bias, token_mask, mask_token,
                                    backend=backend)  # (2, 16, 32)
    features = tokens.reshape(2, 4, 4, 32)[:, ::2, ::2].permute(0, 3, 1, 2)  # (2, 32, 2, 2) NCHW view of NHWC
    rec = ops.decoder_l1_loss(features, dec_weight, dec_bias, images, mask, stride=8, backend=backend)
    feat = ops.cosine_distillation(tokens.mean(1), torch.randn(2, 32, device=device), backend=backend)
    (rec + feat).backward()
    assert weight.grad is not None and dec_weight.grad is not None
    return rec.detach(), feat.detach()


def test_cpp_extension_is_built():
    available = ops.available_backends()
    assert available["cpp"]["cpu"], (f"gfm_fast._C is not built or does not load "
                                     f"({_backend._import_error('gfm_fast._C')}); run pip install -e .")


@pytest.mark.parametrize("op", OPS)
def test_cpu_kernels_are_registered(op):
    pytest.importorskip("gfm_fast._C", reason="gfm_fast._C is not built")
    for name in (op, f"_{op}_backward"):
        # A CPU kernel, or a device-agnostic CompositeExplicitAutograd one that serves CPU.
        assert torch._C._dispatch_has_computed_kernel_for_dispatch_key(f"gfm_fast::{name}", "CPU"), name
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"gfm_fast::{op}", "CPU"), op


def test_cuda_kernels_follow_the_build_flag():
    _C = pytest.importorskip("gfm_fast._C", reason="gfm_fast._C is not built")
    assert isinstance(_C.WITH_CUDA, bool)
    # CUDA builds register at least decoder_l1_loss (the Triton-vs-CUDA comparison); CPU builds none.
    assert torch._C._dispatch_has_kernel_for_dispatch_key("gfm_fast::decoder_l1_loss", "CUDA") == _C.WITH_CUDA


def test_auto_runs_the_cpp_ops_on_cpu(monkeypatch):
    monkeypatch.delenv(_backend.ENV_BACKEND, raising=False)
    assert all(_backend.resolve(op, "auto", torch.device("cpu")) == "cpp" for op in OPS)
    counter = CountGfmOps()
    with counter:
        auto = _run_all_ops("cpu")
    for op in OPS:
        assert counter.calls.get(op) == 1, f"{op}: forward not dispatched to torch.ops.gfm_fast ({counter.calls})"
    # The decoder's backward is a no-op scaling for grad_loss = 1; the others always dispatch.
    assert counter.calls.get("_masked_patch_embed_backward") == 1
    assert counter.calls.get("_cosine_distillation_backward") == 1
    for got, want in zip(auto, _run_all_ops("cpu", backend="reference")):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_env_overrides_auto(monkeypatch):
    monkeypatch.setenv(_backend.ENV_BACKEND, "reference")
    counter = CountGfmOps()
    with counter:
        _run_all_ops("cpu")
    assert counter.calls == {}
    monkeypatch.setenv(_backend.ENV_BACKEND, "fastest")
    with pytest.raises(ConfigError, match="GFM_FAST_BACKEND='fastest' is not one of"):  # a ValueError too
        _backend.resolve("decoder_l1_loss", "auto", torch.device("cpu"))


def test_gpu_backend_on_cpu_tensors_is_an_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    student = torch.randn(2, 8)
    with pytest.raises(ops.BackendUnavailableError, match="backend='triton' needs a CUDA tensor") as error:
        ops.cosine_distillation(student, student, backend="triton")
    assert isinstance(error.value, GFMError)  # the CLIs print it in one line


def test_cpp_without_extension_is_an_error(monkeypatch):
    monkeypatch.setattr(_backend, "_import_error",
                        lambda module: "ImportError: no _C" if module == "gfm_fast._C" else "")
    assert ops.available_backends()["cpp"] == {"cpu": False, "cuda": False}
    with pytest.raises(ops.BackendUnavailableError, match="gfm_fast._C is not built .*pip install -e"):
        ops.cosine_distillation(torch.randn(2, 8), torch.randn(2, 8), backend="cpp")


@pytest.mark.parametrize("error,fix", [
    ("ModuleNotFoundError: No module named 'gfm_fast.kernels'", r"--use-pep517 -e \."),
    ("ModuleNotFoundError: No module named 'triton'", "install triton")])
def test_missing_triton_kernels_name_the_fix(monkeypatch, error, fix):
    """An old pip's legacy editable install leaves out gfm_fast.kernels (kernels/ via package_dir)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(_backend, "_import_error",
                        lambda module: error if module == "gfm_fast.ops._triton_impl" else "")
    assert ops.available_backends()["triton"] == {"cpu": False, "cuda": False}
    with pytest.raises(ops.BackendUnavailableError, match=f"Triton kernels are unavailable .*{fix}"):
        ops.cosine_distillation(torch.randn(2, 8), torch.randn(2, 8), backend="triton")


def test_cpp_impl_import_names_the_fix(monkeypatch):
    """Importing the cpp implementation without the extension is an ImportError that says what to do."""
    monkeypatch.setitem(sys.modules, "gfm_fast._C", None)
    monkeypatch.delattr(gfm_fast, "_C", raising=False)
    spec = importlib.util.spec_from_file_location("_cpp_impl_without_C", _backend.__file__.replace(
        "_backend.py", "_cpp_impl.py"))
    with pytest.raises(ImportError, match="not built or failed to load .*pip install"):
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


def test_cpp_on_cuda_needs_cuda_kernels(monkeypatch):
    _C = pytest.importorskip("gfm_fast._C", reason="gfm_fast._C is not built")
    monkeypatch.setattr(_C, "WITH_CUDA", False)
    with pytest.raises(ops.BackendUnavailableError, match="built without CUDA kernels"):
        _backend.resolve("decoder_l1_loss", "cpp", torch.device("cuda"))


def test_unknown_backend_and_op():
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        ops.cosine_distillation(torch.randn(2, 8), torch.randn(2, 8), backend="cuda")
    with pytest.raises(ValueError, match="unknown op"):
        _backend.resolve("conv", "auto", torch.device("cpu"))


@pytest.mark.parametrize("device", DEVICES)
def test_explicit_backends_agree(device):
    """Every backend that can run on the device gives the same losses (and runs its backward)."""
    available = ops.available_backends()
    expected = _run_all_ops(device, backend="reference")
    for backend in ("cpp", "triton"):
        if not available[backend][device]:
            continue
        for got, want in zip(_run_all_ops(device, backend=backend), expected):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=f"{backend} on {device}")


def test_auto_follows_the_committed_measurements(monkeypatch):
    """backend="auto" runs what benchmarks/results/ measured fastest: cpp on CPU, GPU_PREFERENCE on
    CUDA. While no GPU measurement is committed, GPU_PREFERENCE is documented as an expectation,
    not as measured (issue 15 item 7)."""
    results = [json.loads(path.read_text()) for path in sorted((REPO / "benchmarks" / "results").glob("*_ops_*.json"))]
    assert results, "no committed ops measurement under benchmarks/results/"
    monkeypatch.delenv(_backend.ENV_BACKEND, raising=False)
    measured_on = set()
    for result in results:
        device = result["environment"]["device_type"]
        measured_on.add(device)
        for op, fastest in result["fastest_fused"].items():
            if device == "cpu":
                assert _backend.resolve(op, "auto", torch.device("cpu")) == fastest, (op, fastest)
            elif device == "cuda":
                assert _backend.GPU_PREFERENCE[op] == fastest, (
                    f"{op}: GPU_PREFERENCE says {_backend.GPU_PREFERENCE[op]!r} but the committed GPU measurement's "
                    f"fastest is {fastest!r}; update GPU_PREFERENCE in gfm_fast/ops/_backend.py")
    if "cuda" not in measured_on:
        readme = (REPO / "README.md").read_text()
        for name, text in (("gfm_fast/ops/_backend.py", _backend.__doc__), ("README.md", readme)):
            assert "fastest measured GPU backend" not in text, f"{name} calls GPU_PREFERENCE measured"
