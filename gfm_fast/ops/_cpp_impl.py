"""The ``cpp`` backend: the fused ops as C++ (CPU) / CUDA kernels in ``gfm_fast._C``.

Implements the backend contract used by the autograd Functions in ``gfm_fast/ops/<op>.py``
(``<op>_forward`` / ``<op>_backward``; every tensor argument arrives contiguous, one float dtype,
``mask`` float32 0/1) on top of ``torch.ops.gfm_fast.*``, and registers the ops' fake kernels so
that they trace under ``torch.compile``. Importing this module raises a clear ImportError when the
extension was not built.
"""
from __future__ import annotations

from typing import Tuple

import torch

from gfm_fast.ops._common import accumulate_dtype

try:
    from gfm_fast import _C  # noqa: F401  (loading the library registers torch.ops.gfm_fast.*)
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        f"gfm_fast._C (the C++/CUDA extension) is not built or failed to load ({exc}); run "
        f"`pip install --no-build-isolation -e .` in the repository, or use backend='reference'") from exc

Tensors = Tuple[torch.Tensor, ...]
_ops = torch.ops.gfm_fast

# ---------------------------------------------------------------- masked patch embedding


def masked_patch_embed_forward(images, weight, bias, norm_weight, norm_bias, mask, mask_token, patch_size: int,
                               eps: float) -> Tuple[torch.Tensor, Tensors]:
    out = _ops.masked_patch_embed(images, weight, bias, norm_weight, norm_bias, mask, mask_token, patch_size, eps)
    # The backward recomputes the conv and the norm statistics of the unmasked tokens from the inputs.
    return out, (images, weight, bias, norm_weight, mask)


def masked_patch_embed_backward(grad_out, saved: Tensors, patch_size: int, eps: float) -> Tensors:
    images, weight, bias, norm_weight, mask = saved
    return tuple(_ops._masked_patch_embed_backward(grad_out, images, weight, bias, norm_weight, mask, patch_size, eps))


# ---------------------------------------------------------------- decoder + masked L1


def decoder_l1_loss_forward(features, weight, bias, images, mask, stride: int,
                            needs_grad: bool) -> Tuple[torch.Tensor, Tensors]:
    loss, g_features, g_weight, g_bias = _ops.decoder_l1_loss(features, weight, bias, images, mask, stride, needs_grad)
    # The gradients for grad_loss = 1 come out of the forward pass (Liger's fused-loss idiom): the
    # backward only scales them, so nothing else is kept between the two.
    return loss, ((g_features, g_weight, g_bias) if needs_grad else ())


def decoder_l1_loss_backward(grad_loss, saved: Tensors, stride: int) -> Tensors:
    if not saved:
        raise RuntimeError("decoder_l1_loss: backward called on a forward run without gradients (needs_grad=False)")
    g_features, g_weight, g_bias = saved
    # Always scaled by the kernel: skipping it when grad_loss is 1 would read grad_loss on the host.
    return tuple(_ops._decoder_l1_loss_backward(grad_loss, g_features, g_weight, g_bias))


# ---------------------------------------------------------------- cosine distillation


def cosine_distillation_forward(student, teacher, eps: float, needs_grad: bool) -> Tuple[torch.Tensor, Tensors]:
    loss, row_stats = _ops.cosine_distillation(student, teacher, eps, needs_grad)
    return loss, ((student, teacher, row_stats) if needs_grad else ())


def cosine_distillation_backward(grad_loss, saved: Tensors, eps: float) -> Tensors:
    if not saved:
        raise RuntimeError("cosine_distillation: backward called on a forward run without gradients")
    student, teacher, row_stats = saved
    return (_ops._cosine_distillation_backward(grad_loss, student, teacher, row_stats, eps),)


# ---------------------------------------------------------------- fake kernels (torch.compile, opcheck)


@torch.library.register_fake("gfm_fast::masked_patch_embed")
def _masked_patch_embed_fake(images, weight, bias, norm_weight, norm_bias, mask, mask_token, patch_size, eps):
    batch, _, height, width = images.shape
    return images.new_empty((batch, (height // patch_size) * (width // patch_size), weight.shape[0]))


@torch.library.register_fake("gfm_fast::_masked_patch_embed_backward")
def _masked_patch_embed_backward_fake(grad_out, images, weight, bias, norm_weight, mask, patch_size, eps):
    dim = weight.shape[0]
    return (weight.new_empty(weight.shape), weight.new_empty((dim,)), weight.new_empty((dim,)),
            weight.new_empty((dim,)), weight.new_empty((dim,)))


@torch.library.register_fake("gfm_fast::decoder_l1_loss")
def _decoder_l1_loss_fake(features, weight, bias, images, mask, stride, needs_grad):
    loss = features.new_empty(())
    if not needs_grad:
        return loss, features.new_empty((0,)), features.new_empty((0,)), features.new_empty((0,))
    return loss, features.new_empty(features.shape), weight.new_empty(weight.shape), bias.new_empty(bias.shape)


@torch.library.register_fake("gfm_fast::_decoder_l1_loss_backward")
def _decoder_l1_loss_backward_fake(grad_loss, g_features, g_weight, g_bias):
    return g_features.new_empty(g_features.shape), g_weight.new_empty(g_weight.shape), g_bias.new_empty(g_bias.shape)


@torch.library.register_fake("gfm_fast::cosine_distillation")
def _cosine_distillation_fake(student, teacher, eps, needs_grad):
    rows = student.shape[0] if needs_grad else 0
    return student.new_empty(()), student.new_empty((rows, 3), dtype=accumulate_dtype(student.dtype))


@torch.library.register_fake("gfm_fast::_cosine_distillation_backward")
def _cosine_distillation_backward_fake(grad_loss, student, teacher, row_stats, eps):
    return student.new_empty(student.shape)


@torch.library.register_fake("gfm_fast::window_attention")
def _window_attention_fake(qkv, bias, heads, scale, needs_grad):
    windows, tokens, width = qkv.shape
    probs = (windows, heads, tokens, -(-tokens // 16) * 16) if needs_grad else (0,)  # rows padded to 16
    return qkv.new_empty((windows, tokens, width // 3)), qkv.new_empty(probs)


@torch.library.register_fake("gfm_fast::_window_attention_backward")
def _window_attention_backward_fake(grad_out, qkv, probs, heads, scale, bias_grad):
    scores = (*probs.shape[:3], probs.shape[2]) if bias_grad else (0,)
    return qkv.new_empty(qkv.shape), qkv.new_empty(scores, dtype=accumulate_dtype(qkv.dtype))


@torch.library.register_fake("gfm_fast::widened_linear")
def _widened_linear_fake(x, weight, bias):
    rounded = x.shape if x.dtype == torch.float32 else (0,)
    return x.new_empty((x.shape[0], weight.shape[0]), dtype=torch.bfloat16), x.new_empty(rounded, dtype=torch.bfloat16)


@torch.library.register_fake("gfm_fast::_widened_linear_backward")
def _widened_linear_backward_fake(grad_out, x_rounded, weight, x_grad, weight_grad, bias_grad):
    def sized(shape, wanted):
        return grad_out.new_empty(shape if wanted else (0,), dtype=torch.float32)

    return (sized(x_rounded.shape, x_grad), sized(weight.shape, weight_grad), sized((weight.shape[0],), bias_grad))


@torch.library.register_fake("gfm_fast::round_to_bf16")
def _round_to_bf16_fake(x):
    return torch.empty_like(x)
