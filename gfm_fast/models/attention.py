"""Swin window attention on the fastest path measured for each device, precision and use.

timm's ``WindowAttention`` has two paths: explicit (``q @ k^T``, + bias, softmax, ``@ v``) and
``F.scaled_dot_product_attention`` with the bias as an additive ``attn_mask``. This module adds a
third, ``cpp``: gfm_fast's fused C++ window attention (``gfm_fast.ops.window_attention``), which
reads q, k, v in place from the qkv projection and computes each (window, head) in cache.
Measured with torch 2.14, 2 threads, Swin-B stage 3 at batch 4 (16 windows x 16 heads x 36 or 49
tokens x 32), median ms; the q/k/v permute and output transpose included (docs/method.md):

==============================  ========  =============================  =====
stage-3 attention core          explicit  SDPA                           cpp
==============================  ========  =============================  =====
student fwd+bwd, fp32           3.54      6.36 (bias grad: math path)    2.45
teacher fwd, fp32               1.87      1.20 (frozen bias: CPU flash)  1.21
student fwd+bwd, bf16 autocast  5.19      4.96                           1.94
teacher fwd, bf16               2.83      1.68                           1.19
==============================  ========  =============================  =====

(This Xeon has no bf16 instructions: its bf16 bmm is emulated, while the kernel computes in fp32
from bf16 inputs. On a CPU with bf16 matmuls the explicit path is faster than here, 3.5 / 1.35 ms
on an AVX512-BF16 EPYC, so the bf16 choice is one to re-measure there.) A trainable
relative-position bias sends CPU SDPA to its unfused math path, and batched GEMM runs these tiny
matrices far below the machine's matmul rate. So ``auto`` takes SDPA on CUDA (fused kernels with
the bias gradient) and the ``cpp`` kernel on CPU (where it is built, and without attention
dropout, which the kernel does not do); without it, SDPA's flash kernel for the fp32 teacher and
bmm + softmax otherwise. ``cpp``, ``sdpa`` and ``explicit`` force a path. All compute the same
function.

Beyond the path, three things timm repeats on every call are done once here:
- the relative-position bias and the shifted-window mask are added together while they are small
  (windows x heads x N x N) and then added to the scores in one pass, not two;
- for a frozen block (the teacher) that sum is computed once and kept until its weights change;
- the cyclic shift and the window partition (``roll``, ``pad``, ``window_partition``) are one
  gather of the tokens in window order, and the window reverse and the shift back one gather with
  the inverse order (:func:`to_windows`, :func:`from_windows`): one copy each way instead of three,
  and the gradient is a gather too (measured at stage 1, batch 4: 2.7 vs 22 ms for the four copies).
"""
from __future__ import annotations

from contextlib import contextmanager
from functools import lru_cache
from typing import Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
from timm.models.swin_transformer import WindowAttention
from torch import nn

from gfm_fast.config import ATTENTION_PATHS
from gfm_fast.ops import reference
from gfm_fast.ops._common import accumulate_dtype, cached_until_changed
from gfm_fast.ops.window_attention import kernel_available
from gfm_fast.ops.window_attention import window_attention as fused_window_attention

__all__ = ["ATTENTION_PATHS", "RoutedWindowAttention", "set_attention", "attention_path", "resolve_path",
           "window_attention", "to_windows", "from_windows"]


def _check_path(path: str) -> None:
    if path not in ATTENTION_PATHS:
        raise ValueError(f"attention path must be one of {', '.join(ATTENTION_PATHS)}, got {path!r}")


def resolve_path(path: str, x: torch.Tensor, bias_needs_grad: bool, dropout: float = 0.0) -> str:
    """The path (cpp | sdpa | explicit) that ``path`` runs for q/k/v like ``x`` (after autocast):
    ``auto`` resolved as the module docstring says."""
    if path == "cpp" and dropout:
        raise ValueError(f"model.attention=cpp has no attention dropout (attn_drop {dropout}); use auto or explicit")
    if path != "auto":
        return path
    if x.device.type != "cpu":
        return "sdpa"
    if kernel_available(x.device) and dropout == 0.0:
        return "cpp"
    return "sdpa" if x.dtype == torch.float32 and not bias_needs_grad else "explicit"


def _bias_and_mask(attn: WindowAttention, mask: Optional[torch.Tensor],
                   dtype: Optional[torch.dtype]) -> torch.Tensor:
    """The additive attention bias: (1 or nW, heads, N, N), rel-pos bias plus the shift mask, in
    ``dtype`` (None: the table's)."""
    bias = attn._get_rel_pos_bias()  # (1, heads, N, N)
    if mask is not None:
        bias = bias + mask.unsqueeze(1).to(bias.dtype)  # (nW, 1, N, N) -> (nW, heads, N, N)
    return bias if dtype is None else bias.to(dtype)


def _frozen_bias(attn: WindowAttention, mask: Optional[torch.Tensor], dtype: Optional[torch.dtype]) -> torch.Tensor:
    """``_bias_and_mask`` of a block whose bias needs no gradient, cached until the table or the mask
    is replaced (``.to()``, a new size's mask) or written in place (``load_state_dict``)."""
    return cached_until_changed(attn, "_gfm_bias_cache", (attn.relative_position_bias_table, mask),
                                lambda: _bias_and_mask(attn, mask, dtype), key=(dtype,))


def window_attention(self: WindowAttention, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``WindowAttention.forward`` on the path ``self.gfm_attention`` picks.

    Args:
        x: window tokens (num_windows * B, N, C).
        mask: the shifted-window mask (num_windows, N, N), 0 / -100, or None.

    Returns:
        (num_windows * B, N, C).
    """
    windows, tokens, chans = x.shape
    heads = self.num_heads
    qkv = self.qkv(x)  # (windows, N, 3 * C)
    table = self.relative_position_bias_table
    bias_needs_grad = table.requires_grad and torch.is_grad_enabled()
    dropout = self.attn_drop.p if self.training else 0.0
    path = resolve_path(self.gfm_attention, qkv, bias_needs_grad, dropout)
    # The bias in the dtype the path adds it in: the kernel's accumulation dtype, SDPA's q dtype.
    bias_dtype = {"cpp": accumulate_dtype(qkv.dtype), "sdpa": qkv.dtype}.get(path)
    # Under torch.compile the bias is part of the graph (inductor fuses it); the cache is eager's.
    cached = not bias_needs_grad and not torch.compiler.is_compiling()
    bias = _frozen_bias(self, mask, bias_dtype) if cached else _bias_and_mask(self, mask, bias_dtype)
    if path == "cpp":
        out = fused_window_attention(qkv, bias, heads, self.scale)
    elif path == "sdpa":
        q, k, v = qkv.reshape(windows, tokens, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        groups = bias.shape[0]  # 1, or the windows per image (nW)
        attn_mask = bias.expand(windows // groups, -1, -1, -1, -1).reshape(windows, heads, tokens, tokens)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout)
        out = out.transpose(1, 2).reshape(windows, tokens, -1)
    else:
        out = reference.window_attention(qkv, bias, heads, self.scale, self.attn_drop)
    return self.proj_drop(self.proj(out))


class RoutedWindowAttention(WindowAttention):
    """timm's ``WindowAttention`` whose forward is :func:`window_attention` (what
    :func:`set_attention` turns timm's into: same parameters and state dict, picklable)."""

    forward = window_attention


def set_attention(model: nn.Module, path: str) -> nn.Module:
    """Run every window attention of ``model`` through :func:`window_attention` on ``path``
    (auto | cpp | sdpa | explicit), in place; returns ``model``."""
    _check_path(path)
    kernel_available(torch.device("cpu"))  # the extension loaded now: not inside a later torch.compile trace
    for module in model.modules():
        if isinstance(module, WindowAttention):
            module.__class__ = RoutedWindowAttention
            module.gfm_attention = path
    return model


@contextmanager
def attention_path(model: nn.Module, path: str) -> Iterator[nn.Module]:
    """Run ``model``'s routed window attentions on ``path`` inside the block (then as before):
    e.g. ``sdpa`` for an export, whose file must not need gfm_fast's own kernel."""
    _check_path(path)
    routed = [m for m in model.modules() if hasattr(m, "gfm_attention")]
    before = [m.gfm_attention for m in routed]
    for module in routed:
        module.gfm_attention = path
    try:
        yield model
    finally:
        for module, old in zip(routed, before):
            module.gfm_attention = old


# --------------------------------------------------------------------------------------------
# Tokens in window order: cyclic shift + window partition as one gather
# --------------------------------------------------------------------------------------------

@lru_cache(maxsize=64)
def _window_order(height: int, width: int, window: Tuple[int, int], shift: Tuple[int, int],
                  device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Token indices of a (height, width) map in shifted-window order, and the inverse order.

    Window (i, j), position (p, q) holds the token that ``roll(x, -shift)`` puts at
    (i * wh + p, j * ww + q), i.e. x[(i * wh + p + sh) % H, (j * ww + q + sw) % W]: the order of
    timm's ``window_partition(roll(x, -shift))``, which its shifted-window mask is built for.
    """
    (win_h, win_w), (shift_h, shift_w) = window, shift
    with torch.inference_mode(False):  # cached across calls: never inference tensors (training reuses them)
        return _orders(height, width, win_h, win_w, shift_h, shift_w, device)


def _orders(height: int, width: int, win_h: int, win_w: int, shift_h: int, shift_w: int,
            device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    rows = (torch.arange(height).view(height // win_h, win_h) + shift_h) % height  # (nWh, wh)
    cols = (torch.arange(width).view(width // win_w, win_w) + shift_w) % width  # (nWw, ww)
    order = (rows[:, None, :, None] * width + cols[None, :, None, :]).reshape(-1)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel())
    return order.to(device), inverse.to(device)


class _GatherTokens(torch.autograd.Function):
    """``x[:, order]`` on (B, L, C) tokens whose backward gathers with the inverse permutation
    (index_select's own backward would scatter-add)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.inverse = inverse  # a constant index (cached per shape), not an activation to save
        return x.index_select(1, order)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.contiguous().index_select(1, ctx.inverse), None, None


def to_windows(x: torch.Tensor, window: Tuple[int, int], shift: Tuple[int, int]) -> torch.Tensor:
    """(B, H, W, C) NHWC -> (B * nW, wh * ww, C): ``window_partition(roll(x, -shift))`` in one
    gather. H and W must be multiples of the window (no padding)."""
    batch, height, width, chans = x.shape
    order, inverse = _window_order(height, width, tuple(window), tuple(shift), x.device)
    tokens = _GatherTokens.apply(x.reshape(batch, height * width, chans), order, inverse)
    return tokens.view(-1, window[0] * window[1], chans)


def from_windows(windows: torch.Tensor, height: int, width: int, window: Tuple[int, int],
                 shift: Tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`to_windows`: (B * nW, wh * ww, C) -> (B, H, W, C) NHWC."""
    chans = windows.shape[-1]
    order, inverse = _window_order(height, width, tuple(window), tuple(shift), windows.device)
    tokens = _GatherTokens.apply(windows.reshape(-1, height * width, chans), inverse, order)
    return tokens.view(-1, height, width, chans)
