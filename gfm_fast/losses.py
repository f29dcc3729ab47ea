"""Plain-PyTorch reference losses of GFM (shared GFM.md, "Losses").

These functions are the ground truth for every fused kernel in ``gfm_fast.ops``: they are written
for clarity, not speed, and validate their inputs thoroughly (including data-dependent checks such
as an empty mask, which cost a device sync and so are not repeated by the fused ops).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

REC_EPS = 1e-5  # added to sum(M) in L_rec, as in the reference implementation
COS_EPS = 1e-8  # per-vector norm clamp of the cosine similarity (torch.nn.functional.cosine_similarity)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class GFMLoss(NamedTuple):
    loss: torch.Tensor
    loss_rec: torch.Tensor
    loss_feat: torch.Tensor


def check_float(name: str, tensor: torch.Tensor) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor (fp16, bf16, fp32 or fp64), got {tensor.dtype}; "
                        f"convert it with .float()")


def check_mask(mask: torch.Tensor, batch: int, height: int, width: int, *, what: str = "images") -> None:
    """Validate a (B, h, w) 0/1 mask whose grid divides (height, width). Shape checks only."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dim() != 3:
        raise ValueError(f"mask must have shape (B, h, w), got {tuple(mask.shape)}")
    if mask.shape[0] != batch:
        raise ValueError(f"mask batch size {mask.shape[0]} does not match {what} batch size {batch}")
    h, w = mask.shape[1:]
    if h == 0 or w == 0 or height % h or width % w:
        raise ValueError(f"mask grid {h}x{w} does not divide the {what} size {height}x{width}; use a mask at "
                         f"block or token resolution (e.g. {height // 32}x{width // 32} for 32-px blocks)")
    if mask.is_complex():
        raise TypeError(f"mask must be boolean, integer or real floating point, got {mask.dtype}")


def check_mask_values(mask: torch.Tensor) -> None:
    """Data-dependent checks (device sync): values are 0/1 and at least one is 1."""
    values = mask.float()
    if not bool(((values == 0) | (values == 1)).all()):
        raise ValueError("mask must contain only 0 and 1 (or be boolean)")
    if not bool(values.any()):
        raise ValueError("mask is empty (no masked positions): the reconstruction loss is undefined; "
                         "mask at least one block per batch")


def check_feature_pair(student: torch.Tensor, teacher: torch.Tensor, *, op: str = "cosine_distillation") -> None:
    """z_s and z_t are matching, non-empty (B, D) batches."""
    if student.dim() != 2:
        raise ValueError(f"{op}: student features must have shape (B, D), got {tuple(student.shape)}")
    if teacher.shape != student.shape:
        raise ValueError(f"{op}: teacher features shape {tuple(teacher.shape)} does not match student features "
                         f"shape {tuple(student.shape)}; the projector output must match the teacher width")
    if student.shape[0] == 0:
        raise ValueError(f"{op}: got an empty batch")


def upsample_mask(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, h, w) 0/1 mask -> (B, 1, height, width) by nearest (block) upsampling."""
    sh, sw = height // mask.shape[1], width // mask.shape[2]
    return mask.repeat_interleave(sh, dim=1).repeat_interleave(sw, dim=2).unsqueeze(1)


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


def gfm_loss(images: torch.Tensor, recon: torch.Tensor, mask: torch.Tensor, z_s: torch.Tensor,
             z_t: torch.Tensor, alpha: float = 1.0) -> GFMLoss:
    """Total GFM loss ``L_rec + alpha * L_feat`` with its parts (for logging)."""
    loss_rec = reconstruction_l1(images, recon, mask)
    loss_feat = cosine_distillation(z_s, z_t)
    return GFMLoss(loss_rec + alpha * loss_feat, loss_rec, loss_feat)
