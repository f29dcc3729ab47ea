"""Fused Swin window attention core, softmax(scale * q k^T + bias) v, from the qkv projection's output.

Reference: ``gfm_fast.ops.reference.window_attention`` (timm's explicit path). Kernel:
csrc/cpu/window_attention_kernel.cpp (CPU; on CUDA the attention runs SDPA's fused kernels, see
``gfm_fast.models.attention``). The kernel reads q, k, v in place from (windows, N, 3C), writes the
output as (windows, N, C) for the output projection and the gradient as (windows, N, 3C) for the
qkv projection: none of the reference's permute / transpose / stack copies happen, and each
(window, head) is computed in cache with vectorised small GEMMs.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from gfm_fast.ops._backend import cpp_available
from gfm_fast.ops._common import accumulate_dtype, check_float


class WindowAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, bias, heads, scale, needs_grad):
        out, probs = torch.ops.gfm_fast.window_attention(qkv, bias, heads, scale, needs_grad)
        ctx.save_for_backward(qkv, probs)
        ctx.heads, ctx.scale, ctx.groups = heads, scale, bias.shape[0]
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        qkv, probs = ctx.saved_tensors
        bias_grad = ctx.needs_input_grad[1]
        grad_qkv, grad_scores = torch.ops.gfm_fast._window_attention_backward(
            grad_out.contiguous(), qkv, probs, ctx.heads, ctx.scale, bias_grad)
        grad_bias = None
        if bias_grad:  # the bias of window w is bias[w % groups]: sum the scores' gradient over images
            windows, heads, tokens, _ = grad_scores.shape
            grad_bias = grad_scores.view(windows // ctx.groups, ctx.groups, heads, tokens, tokens).sum(0)
        return grad_qkv, grad_bias, None, None, None


def kernel_available(device: torch.device) -> bool:
    """Whether the fused kernel can run on ``device`` (CPU, with the C++ extension built; its fake
    kernels, for torch.compile, are registered by ``cpp_available``)."""
    return device.type == "cpu" and cpp_available("cpu")


def window_attention(qkv: torch.Tensor, bias: torch.Tensor, heads: int, scale: float) -> torch.Tensor:
    """softmax(scale * q k^T + bias) v per window and head, heads side by side.

    Args:
        qkv: (windows, N, 3 * C), the qkv projection's output (q | k | v, each heads x head_dim).
        bias: (groups, heads, N, N), added to the scores of window w as ``bias[w % groups]``
            (the relative-position bias, plus the shifted-window mask per window when shifted).
        heads: attention heads.
        scale: the scores' factor, head_dim ** -0.5 in Swin.

    Returns:
        (windows, N, C).
    """
    check_float("qkv", qkv)
    if not kernel_available(qkv.device):
        raise RuntimeError("window_attention: the fused kernel runs on CPU with gfm_fast._C built; use "
                           "gfm_fast.ops.reference.window_attention elsewhere")
    needs_grad = torch.is_grad_enabled() and (qkv.requires_grad or bias.requires_grad)
    bias = bias.to(accumulate_dtype(qkv.dtype)).contiguous()
    return WindowAttentionFunction.apply(qkv.contiguous(), bias, heads, scale, needs_grad)
