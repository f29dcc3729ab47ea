"""The fused ops under torch.autocast (run.precision=bf16-mixed) follow autocast's rules, so fp32
weights train through them: masked_patch_embed and decoder_l1_loss compute like a convolution
(floating inputs cast to the autocast dtype), cosine_distillation like cosine_similarity (float32).

Each case runs the op on fp32 inputs twice: under autocast, and outside it with the casts written
out by hand (the independent statement of what autocast must do). Values and the gradients that
reach the fp32 leaves agree, and those gradients are fp32.
"""
from __future__ import annotations

import pytest
import torch

from gfm_fast import ops

from .utils import assert_close, backend_device_params, make_mask

AUTOCAST_DTYPE = torch.bfloat16
ALL_BACKENDS = ("reference", "cpp", "triton")


def _check_autocast_equals_explicit_casts(op, inputs, n_leaves, device, compute_dtype):
    """op(*inputs) under autocast == op(*inputs cast to compute_dtype) outside it, in value and in
    the gradients of the first ``n_leaves`` inputs (fp32 leaves)."""
    leaves = inputs[:n_leaves]
    with torch.autocast(device, dtype=AUTOCAST_DTYPE):
        out = op(*inputs)
    grads = torch.autograd.grad(out.float().sum(), leaves)
    expected = op(*(x.to(compute_dtype) for x in inputs))
    expected_grads = torch.autograd.grad(expected.float().sum(), leaves)
    assert out.dtype == expected.dtype == compute_dtype
    assert_close("value", out, expected, compute_dtype)
    for i, (grad, want) in enumerate(zip(grads, expected_grads)):
        assert grad.dtype == torch.float32, f"input {i}: gradient in {grad.dtype}, the fp32 leaf needs fp32"
        assert_close(f"grad of input {i}", grad, want, compute_dtype)


def _leaves(device, *shapes):
    return [(0.2 * torch.randn(shape)).to(device).requires_grad_() for shape in shapes]


@pytest.mark.parametrize("backend,device", backend_device_params(ALL_BACKENDS))
def test_masked_patch_embed_computes_like_a_convolution(backend, device):
    torch.manual_seed(0)
    dim, patch = 32, 4
    mask = make_mask(2, 2, 2, "mixed", device=device)
    params = _leaves(device, (dim, 3, patch, patch), (dim,), (dim,), (dim,), (dim,))
    images = torch.randn(2, 3, 16, 16, device=device)

    def embed(weight, bias, norm_weight, norm_bias, mask_token, images):
        return ops.masked_patch_embed(images, weight, bias, norm_weight, norm_bias, mask, mask_token,
                                      patch_size=patch, backend=backend)

    _check_autocast_equals_explicit_casts(embed, [*params, images], len(params), device, AUTOCAST_DTYPE)


@pytest.mark.parametrize("backend,device", backend_device_params(ALL_BACKENDS))
def test_decoder_l1_loss_computes_like_a_convolution(backend, device):
    torch.manual_seed(0)
    dim, stride, chans, grid = 32, 4, 3, 2
    features, weight, bias = _leaves(device, (2, dim, grid, grid), (stride * stride * chans, dim),
                                     (stride * stride * chans,))
    images = torch.randn(2, chans, grid * stride, grid * stride, device=device)
    mask = make_mask(2, grid, grid, "mixed", device=device)

    def loss(features, weight, bias, images):
        return ops.decoder_l1_loss(features, weight, bias, images, mask, stride=stride, backend=backend)

    _check_autocast_equals_explicit_casts(loss, [features, weight, bias, images], 3, device, AUTOCAST_DTYPE)


@pytest.mark.parametrize("backend,device", backend_device_params(ALL_BACKENDS))
def test_cosine_distillation_computes_in_float32(backend, device):
    """A bf16 student (what autocast's Linear gives) and a bf16 teacher: the loss is taken in fp32."""
    torch.manual_seed(0)
    (weight,) = _leaves(device, (16, 24))
    features = torch.randn(4, 24, device=device)
    teacher = torch.randn(4, 16, device=device, dtype=AUTOCAST_DTYPE)

    def loss(weight, features, teacher):
        student = features @ weight.t()  # a projector: bf16 under autocast
        return ops.cosine_distillation(student, teacher, backend=backend)

    with torch.autocast(device, dtype=AUTOCAST_DTYPE):
        out = loss(weight, features, teacher)
    (grad,) = torch.autograd.grad(out, [weight])
    student = (features.to(AUTOCAST_DTYPE) @ weight.to(AUTOCAST_DTYPE).t()).float()
    expected = ops.cosine_distillation(student, teacher.float(), backend="reference")
    (expected_grad,) = torch.autograd.grad(expected, [weight])
    assert out.dtype == torch.float32 and grad.dtype == torch.float32
    assert_close("loss", out, expected, torch.float32)
    assert_close("grad of the projector", grad, expected_grad, torch.float32)
