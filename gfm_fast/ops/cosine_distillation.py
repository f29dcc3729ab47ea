"""Fused cosine distillation loss L_feat = -mean(cos(z_s, z_t)): one pass forward, one pass backward.

Reference: ``gfm_fast.ops.reference.cosine_distillation``. Kernels: kernels/cosine_distillation.py
(Triton), csrc/cpu/cosine_distillation_kernel.cpp and csrc/cuda/cosine_distillation_kernel.cu (C++).
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from gfm_fast.ops import reference
from gfm_fast.ops._backend import implementation, resolve
from gfm_fast.ops._common import autocast_dtype, cast_floats, check_feature_pair, check_same
from gfm_fast.ops.reference import COS_EPS

OP = "cosine_distillation"


class CosineDistillationFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, backend, needs_grad):
        impl = implementation(backend)
        loss, saved = impl.cosine_distillation_forward(student.contiguous(), teacher.contiguous(), COS_EPS, needs_grad)
        ctx.save_for_backward(*saved)
        ctx.impl = impl
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        (g_student,) = ctx.impl.cosine_distillation_backward(grad_loss, tuple(ctx.saved_tensors), COS_EPS)
        return g_student, None, None, None


def cosine_distillation(student: torch.Tensor, teacher: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """L_feat = -mean_b cos(student[b], teacher[b]), each norm clamped at 1e-8 (torch's cosine_similarity).

    Args:
        student: z_s, (B, D); receives the gradient.
        teacher: z_t, (B, D); detached, and cast to the student's dtype.
        backend: auto | reference | cpp | triton.

    Returns:
        Scalar loss in the student's dtype. Under ``torch.autocast`` both inputs are computed in
        float32 first, as autocast runs cosine_similarity.
    """
    if isinstance(student, torch.Tensor):
        (student,) = cast_floats(autocast_dtype(student.device, loss=True), student)
    if isinstance(teacher, torch.Tensor):  # anything else gets check_same's TypeError below
        teacher = teacher.detach()
        if isinstance(student, torch.Tensor) and teacher.is_floating_point():
            teacher = teacher.to(student.dtype)
    check_same(OP, "student", student, teacher=teacher)
    check_feature_pair(student, teacher, op=OP)
    backend = resolve(OP, backend, student.device)
    if backend == "reference":
        return reference.cosine_distillation(student, teacher)
    # Decided out here: grad mode is always off inside autograd.Function.forward.
    needs_grad = torch.is_grad_enabled() and student.requires_grad
    return CosineDistillationFunction.apply(student, teacher, backend, needs_grad)
