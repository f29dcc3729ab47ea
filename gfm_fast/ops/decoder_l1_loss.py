"""Fused decoder + masked L1 (L_rec): 1x1 conv, PixelShuffle and the masked L1 loss, block by block.

Reference: ``gfm_fast.ops.reference.decoder_l1_loss``. Kernels: kernels/decoder_l1_loss.py (Triton),
csrc/cpu/decoder_l1_loss_kernel.cpp and csrc/cuda/decoder_l1_loss_kernel.cu (C++), whose forward
also returns the gradients; csrc/decoder_l1_loss_backward.cpp scales them (any device).
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from gfm_fast.ops import reference
from gfm_fast.ops._backend import implementation, resolve
from gfm_fast.ops._common import (autocast_dtype, cast_floats, check_mask, check_no_grad, check_same, check_shape,
                                   mask_for_kernels)

OP = "decoder_l1_loss"


class DecoderL1LossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, features, weight, bias, images, mask, stride, backend, needs_grad):
        impl = implementation(backend)
        out_chans = weight.shape[0]
        # The kernels read features as NHWC rows: free when they come from timm's NHWC stages.
        features_nhwc = features.permute(0, 2, 3, 1).contiguous()  # (B, h, w, D)
        loss, saved = impl.decoder_l1_loss_forward(
            features_nhwc, weight.reshape(out_chans, -1).contiguous(), bias.contiguous(), images.contiguous(),
            mask, stride, needs_grad)
        ctx.save_for_backward(*saved)
        ctx.impl, ctx.stride, ctx.weight_shape = impl, stride, weight.shape
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        g_features_nhwc, g_weight, g_bias = ctx.impl.decoder_l1_loss_backward(
            grad_loss, tuple(ctx.saved_tensors), ctx.stride)
        return g_features_nhwc.permute(0, 3, 1, 2), g_weight.reshape(ctx.weight_shape), g_bias, None, None, None, None, None


def decoder_l1_loss(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, images: torch.Tensor,
                    mask: torch.Tensor, *, stride: int = 32, backend: str = "auto") -> torch.Tensor:
    """``reconstruction_l1(images, pixel_shuffle(conv1x1(features, weight, bias), stride), mask)``.

    Args:
        features: r, NCHW (B, D, h, w) (any strides; an NHWC tensor permuted to NCHW is read in place).
        weight: decoder weight (stride*stride*C, D) or its conv shape (stride*stride*C, D, 1, 1).
        bias: (stride*stride*C,).
        images: target (B, C, h*stride, w*stride), normalised, NCHW.
        mask: (B, h, w) 0/1 at block level (one entry per decoder output position).
        stride: the PixelShuffle factor s (the student's total stride, 32), equal to the mask block.
        backend: auto | reference | cpp | triton. The fused backends give no gradient for the
            target ``images`` and refuse images that require one; ``backend="reference"`` gives it.

    Returns:
        Scalar loss in the features' dtype. Under ``torch.autocast`` the floating inputs are cast to
        the autocast dtype first, as autocast does for a convolution.
    """
    if isinstance(features, torch.Tensor):
        features, weight, bias, images = cast_floats(autocast_dtype(features.device), features, weight, bias, images)
    _validate(features, weight, bias, images, mask, stride)
    backend = resolve(OP, backend, features.device)
    if backend == "reference":
        return reference.decoder_l1_loss(features, weight, bias, images, mask, stride=stride)
    check_no_grad(OP, "images", images, backend)
    # Decided out here: grad mode is always off inside autograd.Function.forward.
    needs_grad = torch.is_grad_enabled() and (features.requires_grad or weight.requires_grad or bias.requires_grad)
    return DecoderL1LossFunction.apply(features, weight, bias, images, mask_for_kernels(mask, features.device),
                                       stride, backend, needs_grad)


def _validate(features, weight, bias, images, mask, stride) -> None:
    check_same(OP, "features", features, weight=weight, bias=bias, images=images)
    if features.dim() != 4:
        raise ValueError(f"{OP}: features must be NCHW (B, D, h, w), got {tuple(features.shape)}")
    if images.dim() != 4:
        raise ValueError(f"{OP}: images must have shape (B, C, H, W), got {tuple(images.shape)}")
    batch, dim, grid_h, grid_w = features.shape
    chans = images.shape[1]
    out_chans = stride * stride * chans
    check_shape(OP, "images", images, (batch, chans, grid_h * stride, grid_w * stride))
    if weight.dim() not in (2, 4) or tuple(weight.shape[:2]) != (out_chans, dim) or weight.numel() != out_chans * dim:
        raise ValueError(f"{OP}: weight must have shape ({out_chans}, {dim}) or ({out_chans}, {dim}, 1, 1) for "
                         f"{chans}-channel images at stride {stride}, got {tuple(weight.shape)}")
    check_shape(OP, "bias", bias, (out_chans,))
    check_mask(mask, batch, grid_h, grid_w, what="feature grid")
    if tuple(mask.shape[1:]) != (grid_h, grid_w):
        raise ValueError(f"{OP}: mask must be at block level ({grid_h}x{grid_w}, one entry per decoder output), "
                         f"got {tuple(mask.shape[1:])}")
