"""Triton kernels for the cosine distillation loss L_feat = -mean_b cos(z_s[b], z_t[b]).

One pass forward, one pass backward (docs/method.md, "Where the speed is"). The forward kernel
reads each (z_s, z_t) row pair once and writes its cosine plus three per-row statistics (s.t, |s|, |t|); the
backward kernel reads the rows once more and writes the student gradient, so neither pass keeps
a (B, D) intermediate.

The cosine is torch's ``F.cosine_similarity``: ``s.t / (max(|s|, eps) * max(|t|, eps))``, and so is
the gradient, including at clamped norms: torch clamps the norms in place under no_grad, so the
norm's own derivative ``s / |s|`` (0 at ``s = 0``) still flows while the clamped value divides:

    d cos / d s = t / (n_s n_t) - (s.t) / (n_s^2 n_t) * s / |s|,   n_s = max(|s|, eps), n_t = max(|t|, eps)

Norms far below eps (rows of magnitude 1e-20, say): the backward never forms the product
n_s^2 n_t |s| (below fp32's range, 0 / 0 or x / 0 there) but divides in an order whose partial
results stay bounded: |s.t| / |s| <= |t|, so (s.t / |s|) / n_t <= 1, and n_s >= eps. fp32 norms use
the IEEE square root (``tl.sqrt`` is sqrt.approx.ftz on NVIDIA GPUs, which flushes a subnormal sum
of squares to 0 where torch's norm does not).

These are row kernels (one program per row, the whole row in a few vector loads), so they use
Liger's ``calculate_settings`` heuristic for the warp count instead of autotuning.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from gfm_fast.kernels._common import acc_dtype, acc_torch_dtype

MAX_BLOCK_D = 4096  # columns per vector load; longer rows loop over chunks
NUM_STATS = 3  # per-row statistics saved for backward: s.t, |s|, |t|


@triton.jit
def _norm(sum_sq, ACC_DTYPE: tl.constexpr):
    """sqrt rounded like torch's norm: IEEE for fp32 (no flush of subnormal sums); fp64 sqrt is IEEE."""
    if ACC_DTYPE == tl.float32:
        return tl.sqrt_rn(sum_sq)
    else:
        return tl.sqrt(sum_sq)


@triton.jit
def _cosine_distillation_fwd_kernel(
    s_ptr, t_ptr, cos_ptr, stats_ptr,
    D,
    EPS: tl.constexpr, BLOCK_D: tl.constexpr, ACC_DTYPE: tl.constexpr, SAVE_STATS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    eps = tl.full((), EPS, ACC_DTYPE)  # exact in fp64 (a runtime float argument would be fp32)
    s_row, t_row = s_ptr + row * D, t_ptr + row * D
    dot = tl.zeros((BLOCK_D,), ACC_DTYPE)
    s_sq = tl.zeros((BLOCK_D,), ACC_DTYPE)
    t_sq = tl.zeros((BLOCK_D,), ACC_DTYPE)
    for start in range(0, D, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        valid = cols < D
        s = tl.load(s_row + cols, mask=valid, other=0.0).to(ACC_DTYPE)
        t = tl.load(t_row + cols, mask=valid, other=0.0).to(ACC_DTYPE)
        dot += s * t
        s_sq += s * s
        t_sq += t * t
    dot_sum = tl.sum(dot, axis=0)
    s_norm = _norm(tl.sum(s_sq, axis=0), ACC_DTYPE)
    t_norm = _norm(tl.sum(t_sq, axis=0), ACC_DTYPE)
    cos = dot_sum / (tl.maximum(s_norm, eps) * tl.maximum(t_norm, eps))
    # Per-row cosines; the launcher reduces them to -mean_b cos in a fixed order (deterministic).
    tl.store(cos_ptr + row, cos)
    if SAVE_STATS:
        tl.store(stats_ptr + row * 3 + 0, dot_sum)
        tl.store(stats_ptr + row * 3 + 1, s_norm)
        tl.store(stats_ptr + row * 3 + 2, t_norm)


@triton.jit
def _cosine_distillation_bwd_kernel(
    s_ptr, t_ptr, stats_ptr, grad_loss_ptr, g_ptr,
    D, batch,
    EPS: tl.constexpr, BLOCK_D: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    eps = tl.full((), EPS, ACC_DTYPE)
    dot = tl.load(stats_ptr + row * 3 + 0)
    s_norm = tl.load(stats_ptr + row * 3 + 1)
    t_norm = tl.load(stats_ptr + row * 3 + 2)
    # d(-mean_b cos)/d cos_b = -1/B, times the incoming gradient (read on device: no host sync).
    scale = -tl.load(grad_loss_ptr).to(ACC_DTYPE) / batch
    s_clamped = tl.maximum(s_norm, eps)
    t_clamped = tl.maximum(t_norm, eps)
    t_coef = scale / (s_clamped * t_clamped)
    # torch's vector_norm backward gives 0 at a zero vector, hence the guard on s_norm. Divide step by
    # step (module docstring): the product of the four norms underflows fp32 for tiny rows.
    safe_norm = tl.where(s_norm > 0, s_norm, 1.0)
    s_coef = tl.where(s_norm > 0, scale * ((dot / safe_norm) / t_clamped) / (s_clamped * s_clamped), 0.0)
    s_row, t_row, g_row = s_ptr + row * D, t_ptr + row * D, g_ptr + row * D
    for start in range(0, D, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        valid = cols < D
        s = tl.load(s_row + cols, mask=valid, other=0.0).to(ACC_DTYPE)
        t = tl.load(t_row + cols, mask=valid, other=0.0).to(ACC_DTYPE)
        g = t_coef * t - s_coef * s
        tl.store(g_row + cols, g.to(g_ptr.dtype.element_ty), mask=valid)


def _row_settings(dim: int) -> Tuple[int, int]:
    """(BLOCK_D, num_warps) for a row of ``dim`` elements (Liger's calculate_settings)."""
    block = min(triton.next_power_of_2(dim), MAX_BLOCK_D)
    num_warps = 8 if block >= 2048 else 4
    return block, num_warps


def _check_pair(student: torch.Tensor, teacher: torch.Tensor) -> None:
    if student.dim() != 2 or student.shape[0] == 0 or student.shape[1] == 0:
        raise ValueError(f"student must have shape (B, D) with B, D > 0, got {tuple(student.shape)}")
    if teacher.shape != student.shape:
        raise ValueError(f"teacher shape {tuple(teacher.shape)} must equal student shape {tuple(student.shape)}")
    if teacher.dtype != student.dtype or teacher.device != student.device:
        raise ValueError(f"teacher ({teacher.dtype}, {teacher.device}) must match student "
                         f"({student.dtype}, {student.device}); cast/move it first")
    for name, tensor in (("student", student), ("teacher", teacher)):
        if not tensor.is_contiguous():
            raise ValueError(f"{name} with shape {tuple(tensor.shape)} must be contiguous; call .contiguous()")


def cosine_distillation_forward(student: torch.Tensor, teacher: torch.Tensor, eps: float = 1e-8,
                                save_stats: bool = True) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Forward of -mean_b cos(student[b], teacher[b]).

    Args:
        student: z_s, contiguous (B, D), fp16/bf16/fp32/fp64.
        teacher: z_t, contiguous (B, D), same dtype and device.
        eps: norm clamp of the cosine (torch's ``cosine_similarity`` eps).
        save_stats: also return the per-row statistics that the backward needs.

    Returns:
        (loss, stats): loss is a 0-dim tensor in the student's dtype; stats is (B, 3) (s.t, |s|, |t|)
        in fp32 (fp64 for fp64 inputs), or None when ``save_stats`` is False.
    """
    _check_pair(student, teacher)
    batch, dim = student.shape
    acc_torch = acc_torch_dtype(student.dtype)
    cos = torch.empty(batch, dtype=acc_torch, device=student.device)
    stats = torch.empty((batch, NUM_STATS), dtype=acc_torch, device=student.device) if save_stats else cos
    block, num_warps = _row_settings(dim)
    _cosine_distillation_fwd_kernel[(batch,)](
        student, teacher, cos, stats, dim,
        EPS=eps, BLOCK_D=block, ACC_DTYPE=acc_dtype(student.dtype), SAVE_STATS=save_stats, num_warps=num_warps)
    loss = (-cos.mean()).to(student.dtype)
    return loss, (stats if save_stats else None)


def cosine_distillation_backward(grad_loss: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor,
                                 stats: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Gradient of -mean_b cos(student[b], teacher[b]) with respect to the student.

    Args:
        grad_loss: 0-dim (or 1-element) upstream gradient, on the student's device.
        student, teacher: the forward inputs, contiguous (B, D).
        stats: (B, 3) statistics returned by :func:`cosine_distillation_forward`.
        eps: the forward's eps.

    Returns:
        g_student (B, D) in the student's dtype.
    """
    _check_pair(student, teacher)
    batch, dim = student.shape
    acc_torch = acc_torch_dtype(student.dtype)
    if stats.shape != (batch, NUM_STATS) or stats.dtype != acc_torch or not stats.is_contiguous():
        raise ValueError(f"stats must be the contiguous ({batch}, {NUM_STATS}) {acc_torch} tensor returned by "
                         f"cosine_distillation_forward, got {tuple(stats.shape)} {stats.dtype}")
    if grad_loss.numel() != 1 or grad_loss.device != student.device:
        raise ValueError(f"grad_loss must be a single element on {student.device}, got shape "
                         f"{tuple(grad_loss.shape)} on {grad_loss.device}")
    g_student = torch.empty_like(student)
    block, num_warps = _row_settings(dim)
    _cosine_distillation_bwd_kernel[(batch,)](
        student, teacher, stats, grad_loss.reshape(1), g_student, dim, batch,
        EPS=eps, BLOCK_D=block, ACC_DTYPE=acc_dtype(student.dtype), num_warps=num_warps)
    return g_student
