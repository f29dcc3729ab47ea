"""Plain-PyTorch reference of the fused chains: with ``gfm_fast.losses`` the executable spec of
every fused op. Autograd provides the backward. Written for clarity, not speed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from gfm_fast.losses import cosine_distillation, reconstruction_l1, upsample_mask

__all__ = ["masked_patch_embed", "decoder_l1_loss", "cosine_distillation"]


def masked_patch_embed(images: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, norm_weight: torch.Tensor,
                       norm_bias: torch.Tensor, mask: torch.Tensor, mask_token: torch.Tensor, *,
                       patch_size: int = 4, eps: float = 1e-5) -> torch.Tensor:
    """Patchify conv -> LayerNorm -> mask-token blend; returns tokens (B, L, D), L = (H/p)*(W/p).

    ``mask`` is (B, h, w) 0/1 on a grid that divides the token grid (H/p, W/p); masked tokens are
    replaced by ``mask_token``: ``x * (1 - m) + mask_token * m``.
    """
    dim = weight.shape[0]
    x = F.conv2d(images, weight.view(dim, -1, patch_size, patch_size), bias, stride=patch_size)  # (B, D, h, w)
    grid_h, grid_w = x.shape[2:]
    x = x.flatten(2).transpose(1, 2)  # (B, L, D)
    x = F.layer_norm(x, (dim,), norm_weight, norm_bias, eps)
    m = upsample_mask(mask.to(x.dtype), grid_h, grid_w).flatten(1).unsqueeze(-1)  # (B, L, 1)
    return x * (1 - m) + mask_token.reshape(1, 1, dim).to(x.dtype) * m


def decoder_logits(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, stride: int) -> torch.Tensor:
    """GFM decoder: 1x1 conv (B, D, h, w) -> (B, s*s*C, h, w), then PixelShuffle(s) -> (B, C, h*s, w*s)."""
    out_chans, dim = weight.shape[0], features.shape[1]
    x = F.conv2d(features, weight.reshape(out_chans, dim, 1, 1), bias)
    return F.pixel_shuffle(x, stride)


def decoder_l1_loss(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, images: torch.Tensor,
                    mask: torch.Tensor, *, stride: int = 32) -> torch.Tensor:
    """``reconstruction_l1(images, pixel_shuffle(conv1x1(features)), mask)``; features NCHW (B, D, h, w)."""
    return reconstruction_l1(images, decoder_logits(features, weight, bias, stride), mask)
