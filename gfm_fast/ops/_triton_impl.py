"""Triton backend of the fused ops: the backend contract of ``gfm_fast.ops`` over ``gfm_fast.kernels``.

Each op file's autograd.Function has already validated the inputs and made them contiguous; these
functions only adapt the contract (``<op>_forward`` -> (output, saved tensors), ``<op>_backward``)
to the kernel launchers. Importing this module imports triton (``_backend`` loads it lazily).
On CPU the kernels run only under ``TRITON_INTERPRET=1``, set before triton is imported.
"""
from __future__ import annotations

import contextlib
from typing import ContextManager, Tuple

import torch

from gfm_fast.kernels import cosine_distillation as _cosine
from gfm_fast.kernels import decoder_l1_loss as _decoder
from gfm_fast.kernels import masked_patch_embed as _embed
from gfm_fast.losses import REC_EPS

Saved = Tuple[torch.Tensor, ...]


def _on_device(tensor: torch.Tensor) -> ContextManager:
    """Triton launches on the current CUDA device: make it the tensors' device (multi-GPU safety)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def _require_saved(op: str, saved: Saved) -> None:
    if not saved:
        raise RuntimeError(f"{op}: backward called but the forward ran with needs_grad=False, so nothing was "
                           f"saved; call the op with grad mode on and an input that requires grad")


def masked_patch_embed_forward(images, weight, bias, norm_weight, norm_bias, mask, mask_token, patch_size,
                               eps) -> Tuple[torch.Tensor, Saved]:
    """Tokens (B, L, D); saves the inputs the backward re-reads plus per-token mean and rstd."""
    with _on_device(images):
        out, mean, rstd = _embed.masked_patch_embed_forward(images, weight, bias, norm_weight, norm_bias, mask,
                                                            mask_token, patch_size, eps)
    return out, (images, weight, bias, norm_weight, mask, mean, rstd)


def masked_patch_embed_backward(grad_out, saved: Saved, patch_size, eps) -> Tuple[torch.Tensor, ...]:
    """(g_weight (D, C*p*p), g_bias, g_norm_weight, g_norm_bias, g_mask_token); eps lives in the saved rstd."""
    _require_saved("masked_patch_embed", saved)
    images, weight, bias, norm_weight, mask, mean, rstd = saved
    with _on_device(images):
        return _embed.masked_patch_embed_backward(grad_out, images, weight, bias, norm_weight, mask, mean, rstd,
                                                  patch_size)


def decoder_l1_loss_forward(features, weight, bias, images, mask, stride, needs_grad) -> Tuple[torch.Tensor, Saved]:
    """Loss over masked blocks; with needs_grad saves features, weight and the int8 residual signs."""
    with _on_device(features):
        loss, residuals = _decoder.decoder_l1_loss_forward(features, weight, bias, images, mask, stride, needs_grad,
                                                           eps=REC_EPS)
    return loss, ((features, weight, *residuals) if needs_grad else ())


def decoder_l1_loss_backward(grad_loss, saved: Saved, stride) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(g_features NHWC (B, h, w, D), g_weight (O, D), g_bias (O,))."""
    _require_saved("decoder_l1_loss", saved)
    features, weight, *residuals = saved
    with _on_device(features):
        return _decoder.decoder_l1_loss_backward(grad_loss, features, weight,
                                                 _decoder.DecoderL1Residuals(*residuals))


def cosine_distillation_forward(student, teacher, eps, needs_grad) -> Tuple[torch.Tensor, Saved]:
    """-mean_b cos(student, teacher); with needs_grad saves both inputs and per-row (s.t, |s|, |t|)."""
    with _on_device(student):
        loss, stats = _cosine.cosine_distillation_forward(student, teacher, eps, save_stats=needs_grad)
    return loss, ((student, teacher, stats) if needs_grad else ())


def cosine_distillation_backward(grad_loss, saved: Saved, eps) -> Tuple[torch.Tensor]:
    """(g_student (B, D),)."""
    _require_saved("cosine_distillation", saved)
    student, teacher, stats = saved
    with _on_device(student):
        return (_cosine.cosine_distillation_backward(grad_loss, student, teacher, stats, eps),)
