"""gfm_fast.ops.widened_linear (a bf16 linear on the fp32 GEMM) against float64 references built from
the same bf16-rounded operands, and against torch's own bf16 linear under autocast, with the C++
conversion kernels and without them (torch ops); opcheck and torch.compile of the kernels; the CPU
flag check; input errors."""
from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from gfm_fast.ops.widened_linear import cpuinfo_has_bf16, kernels_built, widened_linear

from .utils import cpu_threads

module = importlib.import_module("gfm_fast.ops.widened_linear")  # the module (ops.widened_linear is the function)

BF16 = torch.bfloat16
needs_kernels = pytest.mark.skipif(not kernels_built(), reason="gfm_fast._C not built")


@pytest.fixture(autouse=True, params=["kernels", "torch"])
def implementation(request, monkeypatch):
    """Every test runs on the C++ kernels and on the torch-ops fallback."""
    if request.param == "kernels":
        if not kernels_built():
            pytest.skip("gfm_fast._C not built")
    else:
        monkeypatch.setattr(module, "kernels_built", lambda: False)
    return request.param


def _operands(shape=(3, 37, 64), out_features=48, bias=True, dtype=torch.float32):
    torch.manual_seed(0)
    x = torch.randn(*shape).to(dtype).requires_grad_()
    weight = (torch.randn(out_features, shape[-1]) / 8).to(dtype).requires_grad_()
    b = torch.randn(out_features).to(dtype).requires_grad_() if bias else None
    return x, weight, b


def _exact(x, weight, b, grad_out):
    """float64 linear of the bf16-rounded operands: output and gradients before any final rounding."""
    x64, w64 = x.detach().to(BF16).double().requires_grad_(), weight.detach().to(BF16).double().requires_grad_()
    b64 = None if b is None else b.detach().to(BF16).double().requires_grad_()
    out = F.linear(x64, w64, b64)
    out.backward(grad_out.to(BF16).double())
    return out.detach(), x64.grad, w64.grad, None if b is None else b64.grad


@pytest.mark.parametrize("bias", [True, False])
def test_output_is_the_rounded_exact_bf16_product(bias):
    x, weight, b = _operands(bias=bias)
    out = widened_linear(x, weight, b)
    exact = _exact(x, weight, b, torch.zeros(out.shape))[0]
    assert out.dtype == BF16 and out.shape == (3, 37, 48)
    # fp32 sums of exact products, rounded once to bf16: the correctly rounded result but for
    # (rare) sums within fp32 error of a rounding boundary, which then land one bf16 step away.
    same = (out.double() == exact.to(BF16).double()).float().mean().item()
    assert same > 0.99
    assert ((out.double() - exact).abs() <= exact.abs() * 2 ** -8 + 1e-30).all()


def test_fp32_gradients_are_the_exact_sums_of_bf16_products():
    x, weight, b = _operands()
    out = widened_linear(x, weight, b)
    grad_out = torch.randn(out.shape).to(BF16)
    out.backward(grad_out)
    _, gx, gw, gb = _exact(x, weight, b, grad_out)
    for name, got, want in (("x", x.grad, gx), ("weight", weight.grad, gw), ("bias", b.grad, gb)):
        assert got.dtype == torch.float32, name
        # fp32 accumulation of bf16 products: ~1e-6 relative. Unrounded fp32 operands would be off
        # by ~2^-9 relative, so this also checks that the operands were rounded to bf16.
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item(), msg=name)


@needs_kernels
def test_two_cpu_threads_give_the_exact_sums():
    """The CPU kernels split rows over threads and add per-thread partial sums: with two threads
    (the test runs otherwise use one) the merged sums must still be the reference's."""
    x, weight, b = _operands(shape=(1024, 32), out_features=64)  # 4 row chunks of the kernels' grain
    with cpu_threads(2):
        out = widened_linear(x, weight, b)
        grad_out = torch.randn(out.shape).to(BF16)
        out.backward(grad_out)
    exact, gx, gw, gb = _exact(x, weight, b, grad_out)
    assert ((out.double() - exact).abs() <= exact.abs() * 2 ** -8 + 1e-30).all()
    for name, got, want in (("x", x.grad, gx), ("weight", weight.grad, gw), ("bias", b.grad, gb)):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item(), msg=name)


def test_matches_torch_bf16_linear_under_autocast():
    x, weight, b = _operands()
    grad_out = torch.randn(3, 37, 48)
    with torch.autocast("cpu", dtype=BF16):
        ours = widened_linear(x, weight, b)
        torch_out = F.linear(x, weight, b)
    assert ours.dtype == torch_out.dtype == BF16
    torch.testing.assert_close(ours.float(), torch_out.float(), rtol=1e-2, atol=1e-2)
    ours_grads = torch.autograd.grad(ours, (x, weight, b), grad_out)
    torch_grads = torch.autograd.grad(torch_out, (x, weight, b), grad_out)
    for got, want in zip(ours_grads, torch_grads):
        assert got.dtype == want.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * want.abs().max().item())


def test_bf16_inputs_get_bf16_gradients():
    x, weight, b = _operands(dtype=BF16)
    out = widened_linear(x, weight, b)
    out.backward(torch.ones_like(out))
    assert x.grad.dtype == weight.grad.dtype == b.grad.dtype == BF16
    _, gx, gw, _ = _exact(x, weight, b, torch.ones(out.shape))
    torch.testing.assert_close(x.grad.double(), gx, rtol=2 ** -8, atol=1e-6)
    torch.testing.assert_close(weight.grad.double(), gw, rtol=2 ** -8, atol=1e-6)


def test_fp32_gemm_runs_even_under_autocast():
    """Inside autocast the GEMM must not be sent back to torch's bf16 one (the result would still be
    right; the speed would not). The profiler shows which GEMM ran."""
    x, weight, b = _operands(shape=(64, 32), out_features=16)
    with torch.autocast("cpu", dtype=BF16), torch.profiler.profile() as prof:
        widened_linear(x, weight, b).float().sum().backward()
    gemm_inputs = [e.input_shapes for e in prof.events() if e.name in ("aten::mm", "aten::addmm")]
    assert gemm_inputs  # the GEMMs ran through aten, on fp32 operands (no mkldnn bf16 GEMM)
    names = {e.name for e in prof.events()}
    assert not any("mkldnn" in n and ("matmul" in n or "linear" in n) for n in names)


@needs_kernels
def test_kernels_opcheck_and_compile(implementation):
    if implementation != "kernels":
        pytest.skip("the C++ ops only")
    x, weight, b = _operands(shape=(20, 16), out_features=8)
    weight32, b32 = module.widen(weight.detach()), module.widen(b.detach())
    ops = torch.ops.gfm_fast
    for args in ((x.detach(), weight32, b32), (x.detach().to(BF16), weight32, None)):
        torch.library.opcheck(ops.widened_linear, args)
    rounded = x.detach().to(BF16)
    grad = torch.randn(20, 8).to(BF16)
    torch.library.opcheck(ops._widened_linear_backward, (grad, rounded, weight32, True, True, True))
    torch.library.opcheck(ops._widened_linear_backward, (grad, rounded, weight32, True, False, False))
    torch.library.opcheck(ops.round_to_bf16, (weight.detach(),))
    compiled = torch.compile(lambda a, w, c: widened_linear(a, w, c).float().sum(), fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x, weight, b), widened_linear(x, weight, b).float().sum())


@pytest.mark.parametrize("text,machine,expected", [
    ("flags\t\t: fpu sse avx512f avx512_bf16 avx512_vnni\n", "x86_64", True),
    ("flags\t\t: fpu sse avx512f amx_bf16 amx_tile\n", "x86_64", True),
    ("flags\t\t: fpu sse avx512f avx512bw avx512_vnni\n", "x86_64", False),
    ("Features\t: fp asimd bf16 i8mm\n", "aarch64", True),
    ("Features\t: fp asimd sve\n", "aarch64", False),
])
def test_cpuinfo_flags(text, machine, expected):
    assert cpuinfo_has_bf16(text, machine) is expected


def test_errors_name_the_problem():
    x, weight, b = _operands()
    with pytest.raises(ValueError, match="do not fit"):
        widened_linear(x, weight[:, :10], b)
    with pytest.raises(ValueError, match="do not fit"):
        widened_linear(x, weight, b[:5])
    with pytest.raises(ValueError, match="floating-point CPU tensor"):
        widened_linear(x.detach().long(), weight, b)
    with pytest.raises(ValueError, match="floating-point CPU tensor"):
        widened_linear(x.detach().to("meta"), weight, b)
