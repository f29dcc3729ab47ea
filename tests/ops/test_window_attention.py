"""gfm_fast.ops.window_attention (the fused C++ CPU kernel) against
gfm_fast.ops.reference.window_attention (timm's explicit path): output, qkv gradient and bias
gradient over Swin's window sizes (36, 49 tokens), odd token counts and head widths, shifted
(per-window bias) and plain (shared bias) windows, fp32 / fp64 / bf16 / fp16, fp64 gradcheck,
opcheck of the C++ ops (their fake kernels), torch.compile, and input errors."""
from __future__ import annotations

import pytest
import torch

from gfm_fast.ops import reference
from gfm_fast.ops.window_attention import kernel_available, window_attention

pytestmark = pytest.mark.skipif(not kernel_available(torch.device("cpu")), reason="gfm_fast._C not built")

# (windows, tokens, heads, head_dim, bias groups)
SHAPES = [(8, 36, 4, 32, 4), (6, 49, 2, 32, 1), (4, 9, 3, 20, 2), (2, 50, 1, 40, 1), (3, 17, 2, 7, 3)]
TOLERANCE = {torch.float32: 2e-5, torch.float64: 1e-12, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def _inputs(windows, tokens, heads, head_dim, groups, dtype):
    torch.manual_seed(0)
    accumulate = torch.float64 if dtype == torch.float64 else torch.float32
    qkv = torch.randn(windows, tokens, 3 * heads * head_dim).to(dtype)
    bias = torch.randn(groups, heads, tokens, tokens, dtype=accumulate)
    bias[..., : tokens // 3] -= 100.0  # a shifted-window mask: some scores pushed far down
    return qkv, bias


def _run(fn, qkv, bias, heads, grad_out):
    qkv, bias = qkv.clone().requires_grad_(), bias.clone().requires_grad_()
    out = fn(qkv, bias, heads, (qkv.shape[-1] // 3 // heads) ** -0.5)
    out.backward(grad_out)
    return out.detach(), qkv.grad, bias.grad


def _relative_error(actual, expected):
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference_values_and_gradients(shape, dtype):
    windows, tokens, heads, head_dim, groups = shape
    qkv, bias = _inputs(*shape, dtype)
    grad_out = torch.randn(windows, tokens, heads * head_dim).to(dtype)
    # The reference in float64 from the same (rounded) inputs: the kernel accumulates in fp32.
    want = _run(reference.window_attention, qkv.double(), bias.double(), heads, grad_out.double())
    got = _run(window_attention, qkv, bias, heads, grad_out)
    assert got[0].dtype == dtype and got[1].dtype == dtype and got[2].dtype == bias.dtype
    for name, actual, expected in zip(("out", "grad qkv", "grad bias"), got, want):
        assert _relative_error(actual, expected) < TOLERANCE[dtype], name


def test_gradcheck_fp64():
    qkv, bias = _inputs(2, 10, 2, 5, 2, torch.float64)
    qkv.requires_grad_(), bias.requires_grad_()
    assert torch.autograd.gradcheck(lambda q, b: window_attention(q, b, 2, 0.37), (qkv, bias))


def test_frozen_bias_and_no_grad():
    qkv, bias = _inputs(4, 36, 2, 32, 2, torch.float32)
    leaf = qkv.clone().requires_grad_()
    window_attention(leaf, bias, 2, 0.2).sum().backward()  # bias without grad: only the qkv gradient
    want = qkv.clone().requires_grad_()
    reference.window_attention(want, bias, 2, 0.2).sum().backward()
    torch.testing.assert_close(leaf.grad, want.grad, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(window_attention(qkv, bias, 2, 0.2), reference.window_attention(qkv, bias, 2, 0.2),
                                   rtol=1e-5, atol=1e-6)


def test_bias_gradient_with_frozen_qkv():
    """Only the relative-position bias trains (qkv without grad): the kernel must still keep what
    the bias gradient needs."""
    qkv, bias = _inputs(4, 9, 2, 8, 2, torch.float32)
    grad_out = torch.randn(4, 9, 16)
    got, want = bias.clone().requires_grad_(), bias.clone().requires_grad_()
    window_attention(qkv, got, 2, 0.3).backward(grad_out)
    reference.window_attention(qkv, want, 2, 0.3).backward(grad_out)
    torch.testing.assert_close(got.grad, want.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("needs_grad", [True, False])
def test_opcheck_cpp_ops(needs_grad):
    qkv, bias = _inputs(4, 9, 2, 8, 2, torch.float32)
    torch.library.opcheck(torch.ops.gfm_fast.window_attention.default, (qkv, bias, 2, 0.3, needs_grad))
    _, probs = torch.ops.gfm_fast.window_attention(qkv, bias, 2, 0.3, True)
    grad_out = torch.randn(4, 9, 16)
    torch.library.opcheck(torch.ops.gfm_fast._window_attention_backward.default,
                          (grad_out, qkv, probs, 2, 0.3, needs_grad))


def test_torch_compile_fullgraph():
    qkv, bias = _inputs(4, 36, 2, 32, 2, torch.float32)
    grad_out = torch.randn(4, 36, 64)
    compiled = torch.compile(window_attention, backend="aot_eager", fullgraph=True)
    got = _run(compiled, qkv, bias, 2, grad_out)
    want = _run(reference.window_attention, qkv, bias, 2, grad_out)
    for actual, expected in zip(got, want):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_input_errors_name_the_problem():
    qkv, bias = _inputs(4, 9, 2, 8, 2, torch.float32)
    with pytest.raises(RuntimeError, match="divisible by 3 \\* heads"):
        window_attention(qkv, bias, 5, 0.3)
    with pytest.raises(RuntimeError, match="must be a multiple of the bias groups"):
        window_attention(qkv, torch.zeros(3, 2, 9, 9), 2, 0.3)
    with pytest.raises(RuntimeError, match="bias must have shape"):
        window_attention(qkv, torch.zeros(2, 2, 8, 9), 2, 0.3)
    with pytest.raises(TypeError, match="qkv"):
        window_attention(qkv.long(), bias, 2, 0.3)
