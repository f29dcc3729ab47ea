"""Fused masked patch embedding: patchify conv + LayerNorm + mask-token blend in one pass.

Reference: ``gfm_fast.ops.reference.masked_patch_embed``. Kernels: kernels/masked_patch_embed.py
(Triton), csrc/cpu/masked_patch_embed_kernel.cpp and csrc/cuda/masked_patch_embed_kernel.cu (C++).
The Swin student calls it from its patch embedding (``MaskedPatchEmbed`` in gfm_fast/models/swin.py).
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from gfm_fast.ops import reference
from gfm_fast.ops._backend import implementation, resolve
from gfm_fast.ops._common import (autocast_dtype, cast_floats, check_mask, check_no_grad, check_same, check_shape,
                                   mask_for_kernels)

OP = "masked_patch_embed"


class MaskedPatchEmbedFunction(torch.autograd.Function):
    """Autograd for the fused backends. Saved for backward: what the backend returns, no more."""

    @staticmethod
    def forward(ctx, images, weight, bias, norm_weight, norm_bias, mask, mask_token, patch_size, eps, backend):
        impl = implementation(backend)
        dim = weight.shape[0]
        out, saved = impl.masked_patch_embed_forward(
            images.contiguous(), weight.reshape(dim, -1).contiguous(), bias.contiguous(),
            norm_weight.contiguous(), norm_bias.contiguous(), mask, mask_token.reshape(dim).contiguous(),
            patch_size, eps)
        ctx.save_for_backward(*saved)
        ctx.impl, ctx.patch_size, ctx.eps = impl, patch_size, eps
        ctx.weight_shape, ctx.token_shape = weight.shape, mask_token.shape
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        g_weight, g_bias, g_norm_weight, g_norm_bias, g_token = ctx.impl.masked_patch_embed_backward(
            grad_out.contiguous(), tuple(ctx.saved_tensors), ctx.patch_size, ctx.eps)
        return (None, g_weight.reshape(ctx.weight_shape), g_bias, g_norm_weight, g_norm_bias, None,
                g_token.reshape(ctx.token_shape), None, None, None)


def masked_patch_embed(images: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, norm_weight: torch.Tensor,
                       norm_bias: torch.Tensor, mask: torch.Tensor, mask_token: torch.Tensor, *,
                       patch_size: int = 4, eps: float = 1e-5, backend: str = "auto") -> torch.Tensor:
    """Masked patch embedding; returns tokens (B, L, D) with L = (H/p) * (W/p), row-major.

    Args:
        images: (B, C, H, W) NCHW; H and W divisible by ``patch_size``.
        weight: patchify conv weight (D, C, p, p) or (D, C*p*p).
        bias, norm_weight, norm_bias: (D,).
        mask: (B, h, w) 0/1 on the token grid (H/p, W/p) or any coarser grid dividing it
            (e.g. 32-px blocks); upsampled on the fly.
        mask_token: (D,) or (1, 1, D); replaces masked tokens after the LayerNorm.
        patch_size: p, the conv's kernel and stride (4 in Swin).
        eps: the LayerNorm's epsilon.
        backend: auto | reference | cpp | triton. The fused backends give no gradient for
            ``images`` and refuse images that require one; ``backend="reference"`` gives it.

    Returns:
        Tokens (B, L, D) in the images' dtype. Under ``torch.autocast`` the floating inputs (not the
        mask) are cast to the autocast dtype first, as autocast does for a convolution; the
        LayerNorm statistics are fp32 inside the kernels.
    """
    if isinstance(images, torch.Tensor):
        images, weight, bias, norm_weight, norm_bias, mask_token = cast_floats(
            autocast_dtype(images.device), images, weight, bias, norm_weight, norm_bias, mask_token)
    _validate(images, weight, bias, norm_weight, norm_bias, mask, mask_token, patch_size)
    backend = resolve(OP, backend, images.device)
    if backend == "reference":
        return reference.masked_patch_embed(images, weight, bias, norm_weight, norm_bias, mask, mask_token,
                                            patch_size=patch_size, eps=eps)
    check_no_grad(OP, "images", images, backend)
    return MaskedPatchEmbedFunction.apply(images, weight, bias, norm_weight, norm_bias,
                                          mask_for_kernels(mask, images.device), mask_token, patch_size, eps, backend)


def _validate(images, weight, bias, norm_weight, norm_bias, mask, mask_token, patch_size) -> None:
    check_same(OP, "images", images, weight=weight, bias=bias, norm_weight=norm_weight, norm_bias=norm_bias,
               mask_token=mask_token)
    if images.dim() != 4:
        raise ValueError(f"{OP}: images must have shape (B, C, H, W), got {tuple(images.shape)}")
    batch, chans, height, width = images.shape
    if patch_size <= 0 or height % patch_size or width % patch_size:
        raise ValueError(f"{OP}: image size {height}x{width} is not divisible by patch_size {patch_size}")
    dim = weight.shape[0]
    if weight.numel() != dim * chans * patch_size * patch_size or weight.dim() not in (2, 4):
        raise ValueError(f"{OP}: weight must have shape ({dim}, {chans}, {patch_size}, {patch_size}) or "
                         f"({dim}, {chans * patch_size * patch_size}) for {chans}-channel images, got "
                         f"{tuple(weight.shape)}; check the number of input channels")
    for name, tensor in (("bias", bias), ("norm_weight", norm_weight), ("norm_bias", norm_bias)):
        check_shape(OP, name, tensor, (dim,))
    if mask_token.numel() != dim:
        raise ValueError(f"{OP}: mask_token must have {dim} elements ((D,) or (1, 1, D)), got {tuple(mask_token.shape)}")
    check_mask(mask, batch, height // patch_size, width // patch_size, what="token grid")
