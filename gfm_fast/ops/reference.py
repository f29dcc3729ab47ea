"""Plain-PyTorch references of GFM's fused ops and losses: the executable spec of every kernel.

Each fused op ``gfm_fast.ops.<op>`` (``backend="reference"``) runs the function of the same name
here, and every kernel is tested equal to it. Autograd provides the backward. Written for
clarity, not speed; the losses also run the data-dependent mask checks (a device sync) that the
fused ops skip. The formulas, with their place in the method: docs/method.md.

- ``masked_patch_embed``: patchify conv -> LayerNorm -> mask-token blend.
- ``decoder_l1_loss``: ``reconstruction_l1`` (L_rec) of the decoder's ``decoder_logits``.
- ``cosine_distillation``: L_feat.
- ``window_attention``: Swin's window attention core (timm's explicit path).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from gfm_fast.ops._common import check_feature_pair, check_float, check_mask, check_mask_values

__all__ = ["REC_EPS", "COS_EPS", "masked_patch_embed", "decoder_logits", "decoder_l1_loss", "reconstruction_l1",
           "cosine_distillation", "upsample_mask", "window_attention"]

REC_EPS = 1e-5  # added to sum(M) in L_rec, as in the reference implementation
COS_EPS = 1e-8  # per-vector norm clamp of the cosine similarity (torch.nn.functional.cosine_similarity)


def upsample_mask(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, h, w) 0/1 mask -> (B, 1, height, width) by nearest (block) upsampling."""
    sh, sw = height // mask.shape[1], width // mask.shape[2]
    return mask.repeat_interleave(sh, dim=1).repeat_interleave(sw, dim=2).unsqueeze(1)


# ---------------------------------------------------------------- masked patch embedding


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


# ---------------------------------------------------------------- decoder + masked L1 (L_rec)


def reconstruction_l1(images: torch.Tensor, recon: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked L1 reconstruction loss L_rec.

    Args:
        images: target (B, C, H, W), normalised, NCHW.
        recon: reconstruction (B, C, H, W), same dtype as ``images``.
        mask: (B, h, w) 0/1 (bool, int or float) at any resolution that divides (H, W).

    Returns:
        Scalar ``sum(|images - recon| * M) / (sum(M) + 1e-5) / C`` with M the mask upsampled to
        (B, 1, H, W): the mean absolute error over masked pixel-channels of the whole batch.
    """
    check_float("images", images)
    check_float("recon", recon)
    if images.dim() != 4:
        raise ValueError(f"images must have shape (B, C, H, W), got {tuple(images.shape)}")
    if recon.shape != images.shape:
        raise ValueError(f"recon shape {tuple(recon.shape)} does not match images shape {tuple(images.shape)}")
    if recon.dtype != images.dtype:
        raise TypeError(f"recon dtype {recon.dtype} does not match images dtype {images.dtype}")
    batch, chans, height, width = images.shape
    check_mask(mask, batch, height, width)
    check_mask_values(mask)
    pixel_mask = upsample_mask(mask.to(recon.dtype), height, width)  # (B, 1, H, W)
    per_pixel = (images - recon).abs() * pixel_mask
    return per_pixel.sum() / (pixel_mask.sum() + REC_EPS) / chans


def decoder_logits(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, stride: int) -> torch.Tensor:
    """GFM decoder: 1x1 conv (B, D, h, w) -> (B, s*s*C, h, w), then PixelShuffle(s) -> (B, C, h*s, w*s)."""
    out_chans, dim = weight.shape[0], features.shape[1]
    x = F.conv2d(features, weight.reshape(out_chans, dim, 1, 1), bias)
    return F.pixel_shuffle(x, stride)


def decoder_l1_loss(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, images: torch.Tensor,
                    mask: torch.Tensor, *, stride: int = 32) -> torch.Tensor:
    """``reconstruction_l1(images, pixel_shuffle(conv1x1(features)), mask)``; features NCHW (B, D, h, w)."""
    return reconstruction_l1(images, decoder_logits(features, weight, bias, stride), mask)


# ---------------------------------------------------------------- cosine distillation (L_feat)


def cosine_distillation(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Feature distillation loss L_feat = -mean_b cos(z_s[b], z_t[b]).

    The cosine is torch's: ``s.t / (max(|s|, eps) * max(|t|, eps))`` with eps 1e-8; the teacher is
    detached, so only ``student`` receives a gradient.

    Args:
        student: z_s, (B, D).
        teacher: z_t, (B, D).
    """
    check_float("student", student)
    check_float("teacher", teacher)
    check_feature_pair(student, teacher)
    return -F.cosine_similarity(student, teacher.detach().to(student.dtype), dim=-1, eps=COS_EPS).mean()


# ---------------------------------------------------------------- window attention core


def window_attention(qkv: torch.Tensor, bias: torch.Tensor, heads: int, scale: float,
                     dropout: Optional[nn.Module] = None) -> torch.Tensor:
    """Swin's window attention core the way timm's explicit path computes it (the reference of
    ``gfm_fast.ops.window_attention``): softmax(scale * q k^T + bias) v.

    Args:
        qkv: (windows, N, 3 * C), the qkv projection's output.
        bias: (groups, heads, N, N), window w adds ``bias[w % groups]``.
        heads: attention heads.
        scale: the scores' factor.
        dropout: attention dropout on the probabilities (timm's ``attn_drop``), if any.

    Returns:
        (windows, N, C).
    """
    windows, tokens, _ = qkv.shape
    q, k, v = qkv.reshape(windows, tokens, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    scores = (q * scale) @ k.transpose(-2, -1)  # (windows, heads, N, N)
    scores = scores.view(-1, bias.shape[0], heads, tokens, tokens) + bias  # bias and shift mask in one pass
    probs = scores.softmax(dim=-1).view(windows, heads, tokens, tokens)
    if dropout is not None:
        probs = dropout(probs)
    return (probs.to(v.dtype) @ v).transpose(1, 2).reshape(windows, tokens, -1)
