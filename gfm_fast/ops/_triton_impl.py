"""Triton backend of the fused ops: the backend contract of ``gfm_fast.ops`` over ``gfm_fast.kernels``.

Each op file's autograd.Function has already validated the inputs and made them contiguous; these
functions only adapt the contract (``<op>_forward`` -> (output, saved tensors), ``<op>_backward``)
to the kernel launchers. Importing this module imports triton (``_backend`` loads it lazily).
On CPU the kernels run only under ``TRITON_INTERPRET=1``, set before triton is imported.

Every launch is also a ``torch.library`` custom op (``torch.ops.gfm_fast_triton.*``) with a fake
(shape-only) kernel. Under ``torch.compile`` the launches go through those ops, so the compiler
sees an opaque op of known output shapes instead of tracing the launchers' Python, autotuners and
device queries (which would break the graph). Eager calls launch directly: the dispatcher hop of a
Python custom op costs about 8 us per call, which the bandwidth-bound kernels would notice.
"""
from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Tuple

import torch

from gfm_fast.kernels import cosine_distillation as _cosine
from gfm_fast.kernels import decoder_l1_loss as _decoder
from gfm_fast.kernels import masked_patch_embed as _embed
from gfm_fast.kernels._common import acc_torch_dtype
from gfm_fast.ops.reference import REC_EPS

LIBRARY = "gfm_fast_triton"
Saved = Tuple[torch.Tensor, ...]
Tensor = torch.Tensor


class _Launch:
    """A kernel launcher plus the custom op that wraps it (opaque to torch.compile)."""

    def __init__(self, launch: Callable, fake: Callable):
        self.launch = launch
        self.op = torch.library.custom_op(f"{LIBRARY}::{launch.__name__.lstrip('_')}", launch, mutates_args=())
        self.op.register_fake(fake)

    def __call__(self, *args):
        if torch.compiler.is_compiling():
            return self.op(*args)
        return self.launch(*args)


def _on_device(tensor: torch.Tensor) -> ContextManager:
    """Triton launches on the current CUDA device: make it the tensors' device (multi-GPU safety)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def _require_saved(op: str, saved: Saved) -> None:
    if not saved:
        raise RuntimeError(f"{op}: backward called but the forward ran with needs_grad=False, so nothing was "
                           f"saved; call the op with grad mode on and an input that requires grad")


# ---------------------------------------------------------------- masked patch embedding


def _masked_patch_embed_fwd(images: Tensor, weight: Tensor, bias: Tensor, norm_weight: Tensor, norm_bias: Tensor,
                            mask: Tensor, mask_token: Tensor, patch_size: int,
                            eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    with _on_device(images):
        return _embed.masked_patch_embed_forward(images, weight, bias, norm_weight, norm_bias, mask, mask_token,
                                                 patch_size, eps)


def _masked_patch_embed_fwd_fake(images, weight, bias, norm_weight, norm_bias, mask, mask_token, patch_size, eps):
    batch, _, height, width = images.shape
    tokens = (height // patch_size) * (width // patch_size)
    stats = acc_torch_dtype(images.dtype)
    return (images.new_empty((batch, tokens, weight.shape[0])), images.new_empty(batch * tokens, dtype=stats),
            images.new_empty(batch * tokens, dtype=stats))


def _masked_patch_embed_bwd(grad_out: Tensor, images: Tensor, weight: Tensor, bias: Tensor, norm_weight: Tensor,
                            mask: Tensor, mean: Tensor, rstd: Tensor, patch_size: int) -> Tuple[Tensor, Tensor]:
    """(g_weight, the four (D,) gradients stacked): a custom op's outputs may not be views of one tensor."""
    with _on_device(images):
        g_weight, *g_vectors = _embed.masked_patch_embed_backward(grad_out, images, weight, bias, norm_weight, mask,
                                                                  mean, rstd, patch_size)
    return g_weight, torch.stack(g_vectors)


def _masked_patch_embed_bwd_fake(grad_out, images, weight, bias, norm_weight, mask, mean, rstd, patch_size):
    return torch.empty_like(weight), weight.new_empty((_embed.NUM_VECTOR_GRADS, weight.shape[0]))


_embed_fwd = _Launch(_masked_patch_embed_fwd, _masked_patch_embed_fwd_fake)
_embed_bwd = _Launch(_masked_patch_embed_bwd, _masked_patch_embed_bwd_fake)


def masked_patch_embed_forward(images, weight, bias, norm_weight, norm_bias, mask, mask_token, patch_size,
                               eps) -> Tuple[torch.Tensor, Saved]:
    """Tokens (B, L, D); saves the inputs the backward re-reads plus per-token mean and rstd."""
    out, mean, rstd = _embed_fwd(images, weight, bias, norm_weight, norm_bias, mask, mask_token, patch_size, eps)
    return out, (images, weight, bias, norm_weight, mask, mean, rstd)


def masked_patch_embed_backward(grad_out, saved: Saved, patch_size, eps) -> Tuple[torch.Tensor, ...]:
    """(g_weight (D, C*p*p), g_bias, g_norm_weight, g_norm_bias, g_mask_token); eps lives in the saved rstd."""
    _require_saved("masked_patch_embed", saved)
    g_weight, g_vectors = _embed_bwd(grad_out, *saved, patch_size)
    return (g_weight, *g_vectors.unbind(0))


# ---------------------------------------------------------------- decoder + masked L1


def _decoder_l1_loss_fwd(features: Tensor, weight: Tensor, bias: Tensor, images: Tensor, mask: Tensor, stride: int,
                         needs_grad: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, order, count, inv_norm, sign): the loss and the residuals of DecoderL1Residuals."""
    with _on_device(features):
        loss, residuals = _decoder.decoder_l1_loss_forward(features, weight, bias, images, mask, stride, needs_grad,
                                                           eps=REC_EPS)
    return (loss, *residuals)


def _decoder_l1_loss_fwd_fake(features, weight, bias, images, mask, stride, needs_grad):
    rows, out_chans = features.shape[0] * features.shape[1] * features.shape[2], weight.shape[0]
    sign_dtype = _decoder._sign_dtype(features.dtype)
    return (features.new_empty(()), features.new_empty(rows, dtype=torch.int32),
            features.new_empty(1, dtype=torch.int32), features.new_empty(1, dtype=acc_torch_dtype(features.dtype)),
            features.new_empty((rows if needs_grad else 0, out_chans), dtype=sign_dtype))


def _decoder_l1_loss_bwd(grad_loss: Tensor, features: Tensor, weight: Tensor, order: Tensor, count: Tensor,
                         inv_norm: Tensor, sign: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    with _on_device(features):
        return _decoder.decoder_l1_loss_backward(grad_loss, features, weight,
                                                 _decoder.DecoderL1Residuals(order, count, inv_norm, sign))


def _decoder_l1_loss_bwd_fake(grad_loss, features, weight, order, count, inv_norm, sign):
    return torch.empty_like(features), torch.empty_like(weight), weight.new_empty(weight.shape[0])


_decoder_fwd = _Launch(_decoder_l1_loss_fwd, _decoder_l1_loss_fwd_fake)
_decoder_bwd = _Launch(_decoder_l1_loss_bwd, _decoder_l1_loss_bwd_fake)


def decoder_l1_loss_forward(features, weight, bias, images, mask, stride, needs_grad) -> Tuple[torch.Tensor, Saved]:
    """Loss over masked blocks; with needs_grad saves features, weight and the int8 residual signs."""
    loss, *residuals = _decoder_fwd(features, weight, bias, images, mask, stride, needs_grad)
    return loss, ((features, weight, *residuals) if needs_grad else ())


def decoder_l1_loss_backward(grad_loss, saved: Saved, stride) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(g_features NHWC (B, h, w, D), g_weight (O, D), g_bias (O,))."""
    _require_saved("decoder_l1_loss", saved)
    return _decoder_bwd(grad_loss, *saved)


# ---------------------------------------------------------------- cosine distillation


def _cosine_distillation_fwd(student: Tensor, teacher: Tensor, eps: float,
                             save_stats: bool) -> Tuple[Tensor, Tensor]:
    """(loss, stats); stats is (0, 3) when not saved (a custom op returns tensors, never None)."""
    with _on_device(student):
        loss, stats = _cosine.cosine_distillation_forward(student, teacher, eps, save_stats=save_stats)
    if stats is None:
        stats = student.new_empty((0, _cosine.NUM_STATS), dtype=acc_torch_dtype(student.dtype))
    return loss, stats


def _cosine_distillation_fwd_fake(student, teacher, eps, save_stats):
    rows = student.shape[0] if save_stats else 0
    return student.new_empty(()), student.new_empty((rows, _cosine.NUM_STATS), dtype=acc_torch_dtype(student.dtype))


def _cosine_distillation_bwd(grad_loss: Tensor, student: Tensor, teacher: Tensor, stats: Tensor,
                             eps: float) -> Tensor:
    with _on_device(student):
        return _cosine.cosine_distillation_backward(grad_loss, student, teacher, stats, eps)


def _cosine_distillation_bwd_fake(grad_loss, student, teacher, stats, eps):
    return torch.empty_like(student)


_cosine_fwd = _Launch(_cosine_distillation_fwd, _cosine_distillation_fwd_fake)
_cosine_bwd = _Launch(_cosine_distillation_bwd, _cosine_distillation_bwd_fake)


def cosine_distillation_forward(student, teacher, eps, needs_grad) -> Tuple[torch.Tensor, Saved]:
    """-mean_b cos(student, teacher); with needs_grad saves both inputs and per-row (s.t, |s|, |t|)."""
    loss, stats = _cosine_fwd(student, teacher, eps, needs_grad)
    return loss, ((student, teacher, stats) if needs_grad else ())


def cosine_distillation_backward(grad_loss, saved: Saved, eps) -> Tuple[torch.Tensor]:
    """(g_student (B, D),)."""
    _require_saved("cosine_distillation", saved)
    return (_cosine_bwd(grad_loss, *saved, eps),)
