"""decoder_l1_loss for every backend against reconstruction_l1(pixel_shuffle(conv1x1(...))) of
gfm_fast.ops.reference: the loss and the gradients of features, weight and bias, shapes from tiny to
GFM's Swin-B decoder (1024 -> 32*32*3, 6x6 blocks), odd grids, all/none-masked images, bf16,
non-contiguous inputs, fp64 gradcheck, opcheck of the C++ ops, torch.compile, error messages."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from gfm_fast import ops
from gfm_fast.ops import reference
from gfm_fast.ops.decoder_l1_loss import DecoderL1LossFunction

from .utils import (assert_bitwise_equal, assert_close, backend_device_params, cpu_threads, is_interpreted,
                    make_mask, random_scalar_grad, reference_dtype, skip_if_slow)


@dataclass(frozen=True)
class Case:
    name: str
    batch: int
    dim: int
    grid_h: int
    grid_w: int
    stride: int
    chans: int = 3
    mask: str = "random"

    @property
    def out_chans(self):
        return self.stride * self.stride * self.chans


CASES = [
    # Tiny enough for the Triton interpreter (B <= 2, D and O <= 64, grid <= 4x4).
    Case("tiny", 1, 32, 2, 2, 4),
    Case("tiny-mixed-rows", 2, 24, 2, 3, 4, mask="mixed"),
    Case("tiny-one-channel-odd-D", 2, 45, 3, 2, 2, chans=1),
    Case("tiny-all-masked", 2, 16, 2, 2, 4, mask="all"),
    Case("tiny-single-block", 1, 8, 1, 1, 4, mask="all"),
    # C++ (and GPU) sweep.
    Case("gfm-swin-b", 2, 1024, 6, 6, 32),
    Case("odd-5x7-blocks", 3, 40, 5, 7, 8, mask="mixed"),
    Case("batch32", 32, 64, 2, 2, 4, mask="mixed"),
    Case("multispectral-stride16", 2, 96, 3, 3, 16, chans=4),
]


def _skip_if_slow(backend, device, case: Case):
    skip_if_slow(backend, device, batch=case.batch, dims=(case.dim, case.out_chans), grid=(case.grid_h, case.grid_w))


def _make_inputs(case: Case, dtype, device):
    features = torch.randn(case.batch, case.dim, case.grid_h, case.grid_w)
    weight = torch.randn(case.out_chans, case.dim) * case.dim ** -0.5
    bias = 0.1 * torch.randn(case.out_chans)
    images = torch.randn(case.batch, case.chans, case.grid_h * case.stride, case.grid_w * case.stride)
    mask = make_mask(case.batch, case.grid_h, case.grid_w, case.mask, device=device)
    cast = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    return cast(features), cast(weight), cast(bias), cast(images), mask


def _fast(features, weight, bias, images, mask, stride, grad_loss, backend, op=ops.decoder_l1_loss):
    leaves = [t.detach().clone().requires_grad_() for t in (features, weight, bias)]
    loss = op(*leaves, images, mask, stride=stride, backend=backend)
    loss.backward(grad_loss)
    return loss, [leaf.grad for leaf in leaves]


def _reference(features, weight, bias, images, mask, stride, grad_loss, dtype):
    ref = reference_dtype(dtype)
    leaves = [t.detach().to(ref).requires_grad_() for t in (features, weight, bias)]
    loss = reference.decoder_l1_loss(*leaves, images.to(ref), mask, stride=stride)
    loss.backward(grad_loss.to(ref))
    return loss, [leaf.grad for leaf in leaves]


def _check_against_reference(case: Case, dtype, backend, device):
    features, weight, bias, images, mask = _make_inputs(case, dtype, device)
    grad_loss = random_scalar_grad(dtype, device)
    loss, grads = _fast(features, weight, bias, images, mask, case.stride, grad_loss, backend)
    expected, expected_grads = _reference(features, weight, bias, images, mask, case.stride, grad_loss, dtype)
    assert loss.dtype == dtype and loss.dim() == 0
    assert_close("loss", loss, expected, dtype)
    for name, grad, want, leaf in zip(("g_features", "g_weight", "g_bias"), grads, expected_grads,
                                      (features, weight, bias)):
        assert grad.dtype == dtype and grad.shape == leaf.shape, name
        assert_close(name, grad, want, dtype)


@pytest.mark.parametrize("backend,device", backend_device_params())
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_matches_reference_fp32(backend, device, case):
    _skip_if_slow(backend, device, case)
    _check_against_reference(case, torch.float32, backend, device)


@pytest.mark.parametrize("backend,device", backend_device_params())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("case", [CASES[1], CASES[2], CASES[5], CASES[6]], ids=lambda c: c.name)
def test_matches_reference_other_dtypes(backend, device, dtype, case):
    _skip_if_slow(backend, device, case)
    if dtype == torch.float16 and device == "cpu" and case.dim > 64:
        pytest.skip("fp16 GEMMs on CPU are emulated and slow; covered at small sizes and on CUDA")
    _check_against_reference(case, dtype, backend, device)


@pytest.mark.parametrize("backend,device", backend_device_params(backends=("cpp",), devices=("cpu",)))
def test_two_cpu_threads_match_reference(backend, device):
    """The CPU kernels split rows over threads and add per-thread partial sums: with two threads
    the merged sums must still be the reference's."""
    with cpu_threads(2):
        _check_against_reference(CASES[6], torch.float32, backend, device)  # 3 images of 5x7 blocks


@pytest.mark.parametrize("backend,device", backend_device_params())
def test_nothing_masked_gives_zero_loss_and_gradients(backend, device):
    """reference: sum(0) / (0 + 1e-5) = 0 (the reference losses refuse an empty mask outright)."""
    case = Case("none", 2, 16, 2, 2, 4, mask="none")
    features, weight, bias, images, mask = _make_inputs(case, torch.float32, device)
    loss, grads = _fast(features, weight, bias, images, mask, case.stride, torch.tensor(1.0, device=device), backend)
    assert loss.item() == 0.0
    for grad in grads:
        assert grad is not None and not grad.any()


@pytest.mark.parametrize("backend,device", backend_device_params())
def test_bitwise_deterministic(backend, device):
    """The loss and g_weight, g_bias sum over every masked block: the same inputs must give the
    same bits, run after run."""
    case = CASES[1] if is_interpreted(backend, device) else CASES[5]
    features, weight, bias, images, mask = _make_inputs(case, torch.float32, device)
    grad_loss = random_scalar_grad(torch.float32, device)
    (loss, grads), (loss_again, grads_again) = (_fast(features, weight, bias, images, mask, case.stride, grad_loss,
                                                      backend) for _ in range(2))
    assert_bitwise_equal("loss", loss, loss_again)
    for name, grad, grad_again in zip(("g_features", "g_weight", "g_bias"), grads, grads_again):
        assert_bitwise_equal(name, grad, grad_again)


@pytest.mark.parametrize("backend,device", backend_device_params())
@pytest.mark.parametrize("trainable", ["bias", "weight", "features"])
def test_gradient_of_one_trainable_input(backend, device, trainable):
    """Only one of features / weight / bias requires grad (a frozen decoder, a frozen encoder): the
    fused forward must still keep the gradients that input needs."""
    case = CASES[1]
    features, weight, bias, images, mask = _make_inputs(case, torch.float32, device)
    inputs = {"features": features, "weight": weight, "bias": bias}
    leaf = inputs[trainable].clone().requires_grad_()
    ops.decoder_l1_loss(*(leaf if name == trainable else t for name, t in inputs.items()), images, mask,
                        stride=case.stride, backend=backend).backward()
    _, expected_grads = _reference(features, weight, bias, images, mask, case.stride,
                                   torch.tensor(1.0, device=device), torch.float32)
    assert_close(f"g_{trainable}", leaf.grad, expected_grads[list(inputs).index(trainable)], torch.float32)


@pytest.mark.parametrize("backend,device", backend_device_params())
def test_unit_grad_and_retained_graph(backend, device):
    """backward() (grad_loss = 1) and a second backward through a retained graph both accumulate correctly."""
    case = CASES[1]
    features, weight, bias, images, mask = _make_inputs(case, torch.float32, device)
    leaves = [t.clone().requires_grad_() for t in (features, weight, bias)]
    loss = ops.decoder_l1_loss(*leaves, images, mask, stride=case.stride, backend=backend)
    loss.backward(retain_graph=True)
    first = [leaf.grad.clone() for leaf in leaves]
    loss.backward()
    _, expected = _reference(features, weight, bias, images, mask, case.stride, torch.tensor(1.0), torch.float32)
    for name, leaf, once, want in zip(("g_features", "g_weight", "g_bias"), leaves, first, expected):
        assert_close(name, once, want, torch.float32)
        assert_close(f"2x {name}", leaf.grad, 2 * want, torch.float32)


@pytest.mark.parametrize("backend,device", backend_device_params())
def test_no_grad_forward_matches(backend, device):
    case = CASES[6]
    _skip_if_slow(backend, device, case)
    features, weight, bias, images, mask = _make_inputs(case, torch.float32, device)
    with torch.no_grad():
        loss = ops.decoder_l1_loss(features, weight, bias, images, mask, stride=case.stride, backend=backend)
    expected = reference.decoder_l1_loss(features, weight, bias, images, mask, stride=case.stride)
    assert_close("loss", loss, expected, torch.float32)
    assert loss.grad_fn is None


@pytest.mark.parametrize("backend,device", backend_device_params())
def test_noncontiguous_inputs(backend, device):
    case = CASES[1]
    features, weight, bias, images, mask = _make_inputs(case, torch.float32, device)
    grad_loss = torch.tensor(0.75, device=device)
    expected, expected_grads = _fast(features, weight, bias, images, mask, case.stride, grad_loss, backend)
    # NHWC features viewed as NCHW (what timm's NHWC stages give), the conv-shaped weight, a strided
    # bias, channels-last images and a transposed mask.
    nhwc = features.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    conv_weight = weight.t().contiguous().t().reshape(case.out_chans, case.dim, 1, 1)
    strided_bias = torch.stack([bias, bias], dim=-1)[:, 0]
    cl_images = images.contiguous(memory_format=torch.channels_last)
    t_mask = mask.transpose(1, 2).contiguous().transpose(1, 2)
    assert not (nhwc.is_contiguous() or strided_bias.is_contiguous() or t_mask.is_contiguous())
    loss, grads = _fast(nhwc, conv_weight, strided_bias, cl_images, t_mask, case.stride, grad_loss, backend)
    assert_close("loss", loss, expected, torch.float32, tolerance=1e-6)
    assert grads[1].shape == conv_weight.shape
    for name, grad, want in zip(("g_features", "g_weight", "g_bias"), grads, expected_grads):
        assert_close(name, grad.reshape(want.shape), want, torch.float32, tolerance=1e-6)


@pytest.mark.parametrize("backend,device", backend_device_params())
def test_gradcheck_float64(backend, device):
    f64 = dict(dtype=torch.float64, device=device)
    images = torch.randn(2, 1, 4, 6, **f64)
    mask = torch.tensor([[[1, 0, 1], [0, 1, 1]], [[0, 0, 1], [1, 0, 0]]], device=device).bool()
    inputs = [torch.randn(2, 3, 2, 3, **f64), 0.5 * torch.randn(4, 3, **f64), 0.1 * torch.randn(4, **f64)]
    inputs = [t.requires_grad_() for t in inputs]
    fn = lambda f, w, b: ops.decoder_l1_loss(f, w, b, images, mask, stride=2, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


def test_functional_and_function_agree():
    case = CASES[1]
    features, weight, bias, images, mask = _make_inputs(case, torch.float32, "cpu")
    functional = ops.decoder_l1_loss(features, weight, bias, images, mask, stride=case.stride, backend="cpp")
    function = DecoderL1LossFunction.apply(features, weight, bias, images, mask.float(), case.stride, "cpp", False)
    assert torch.equal(functional, function)


def _op_args(needs_grad):
    features, weight, bias, images, mask = _make_inputs(CASES[1], torch.float32, "cpu")
    return (features.permute(0, 2, 3, 1).contiguous(), weight, bias, images, mask.float(), 4, needs_grad)


@pytest.mark.parametrize("needs_grad", [True, False])
def test_opcheck_cpp_ops(needs_grad):
    pytest.importorskip("gfm_fast.ops._cpp_impl", reason="gfm_fast._C is not built")
    args = _op_args(needs_grad)
    torch.library.opcheck(torch.ops.gfm_fast.decoder_l1_loss.default, args)
    if needs_grad:
        _, g_features, g_weight, g_bias = torch.ops.gfm_fast.decoder_l1_loss(*args)
        torch.library.opcheck(torch.ops.gfm_fast._decoder_l1_loss_backward.default,
                              (torch.tensor(0.5), g_features, g_weight, g_bias))


@pytest.mark.parametrize("backend,device", backend_device_params())
def test_torch_compile_fullgraph(backend, device):
    """The op is one opaque node under torch.compile (fullgraph), the backward scales by a
    grad_loss != 1 there too, and loss and gradients equal the eager ones."""
    case = CASES[1]
    inputs = _make_inputs(case, torch.float32, device)
    grad_loss = random_scalar_grad(torch.float32, device)
    expected, expected_grads = _fast(*inputs, case.stride, grad_loss, backend)
    compiled = torch.compile(ops.decoder_l1_loss, backend="aot_eager", fullgraph=True)
    loss, grads = _fast(*inputs, case.stride, grad_loss, backend, op=compiled)
    assert_close("compiled loss", loss, expected, torch.float32, tolerance=1e-6)
    for name, grad, want in zip(("g_features", "g_weight", "g_bias"), grads, expected_grads):
        assert_close(f"compiled {name}", grad, want, torch.float32, tolerance=1e-6)


# ---------------------------------------------------------------- errors


def _call(backend="cpp", **overrides):
    features, weight, bias, images, mask = _make_inputs(CASES[1], torch.float32, "cpu")  # D 24, 2x3 blocks, s 4
    args = dict(features=features, weight=weight, bias=bias, images=images, mask=mask)
    args.update(overrides)
    return ops.decoder_l1_loss(**args, stride=4, backend=backend)


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_error_messages(backend):
    with pytest.raises(TypeError, match="floating-point"):
        _call(backend, images=torch.zeros(2, 3, 8, 12, dtype=torch.uint8))
    with pytest.raises(TypeError, match="has dtype torch.bfloat16 but features has torch.float32"):
        _call(backend, weight=torch.zeros(48, 24, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="is on meta but features is on cpu"):
        _call(backend, bias=torch.zeros(48, device="meta"))
    with pytest.raises(ValueError, match=r"weight must have shape \(48, 24\) or \(48, 24, 1, 1\)"):
        _call(backend, weight=torch.zeros(64, 24))  # 4-channel decoder for 3-channel images
    with pytest.raises(ValueError, match=r"images must have shape \(2, 3, 8, 12\)"):
        _call(backend, images=torch.zeros(2, 3, 8, 16))
    with pytest.raises(ValueError, match="does not divide the feature grid"):
        _call(backend, mask=torch.zeros(2, 4, 6))  # pixel-level mask
    with pytest.raises(ValueError, match="must be at block level"):
        _call(backend, mask=torch.zeros(2, 1, 1))


def test_no_gradient_for_images():
    with pytest.raises(ValueError, match="gives no gradient for images"):
        _call(images=torch.zeros(2, 3, 8, 12, requires_grad=True))


def test_cpp_op_checks_its_arguments():
    pytest.importorskip("gfm_fast._C", reason="gfm_fast._C is not built")
    features, weight, bias, images, mask, stride, needs_grad = _op_args(True)
    op = torch.ops.gfm_fast.decoder_l1_loss
    with pytest.raises(RuntimeError, match="features must be contiguous"):
        op(features.transpose(1, 2), weight, bias, images, mask, stride, needs_grad)
    with pytest.raises(RuntimeError, match="mask must be float32"):
        op(features, weight, bias, images, mask.double(), stride, needs_grad)
    with pytest.raises(RuntimeError, match=r"weight must have shape \[48, 24\]"):
        op(features, weight[:, :20].contiguous(), bias, images, mask, stride, needs_grad)
    with pytest.raises(RuntimeError, match="images must have shape"):
        op(features, weight, bias, images[:, :, :4].contiguous(), mask, stride, needs_grad)
    with pytest.raises(RuntimeError, match="mask must be at block level"):
        op(features, weight, bias, images, torch.zeros(2, 1, 3), stride, needs_grad)
    with pytest.raises(RuntimeError, match="grad_loss must be a 0-dim tensor"):
        torch.ops.gfm_fast._decoder_l1_loss_backward(torch.ones(2), features, weight, bias)
