"""Linear layers whose bf16 GEMMs take the fastest exact path on the machine (``model.bf16_matmul``).

Every ``nn.Linear`` of the student (attention qkv/proj, MLPs, patch merging, projector) and of the
teacher computes in bf16 in a bf16 run: under ``torch.autocast`` for ``bf16-mixed``, on bf16
weights for the teacher and for ``bf16``. On a CPU without bf16 instructions torch emulates those
GEMMs, about 5x slower than its fp32 GEMMs; ``gfm_fast.ops.widened_linear`` computes the same bf16
linear with the fp32 GEMM instead. Paths:

- ``auto``: ``widened`` for bf16 on a CPU without bf16 instructions, torch's GEMM otherwise (CUDA,
  AVX512-BF16/AMX CPUs, and every fp32 or fp16 linear);
- ``native``: always torch's (``F.linear`` under the caller's autocast);
- ``widened``: the widened GEMM for every bf16 linear on CPU (torch's elsewhere).

Measured on the 2-core AVX-512 Xeon without bf16 instructions, forward + backward under bf16
autocast, Swin-B stage-3 MLP (576 x 512 -> 1536): 45 ms native, 14 ms widened, 13 ms in fp32.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from gfm_fast.config import BF16_MATMUL_PATHS
from gfm_fast.ops._common import cached_until_changed
from gfm_fast.ops.widened_linear import cpu_has_bf16_matmul, kernels_built, widen, widened_linear

__all__ = ["BF16_MATMUL_PATHS", "RoutedLinear", "set_bf16_matmul", "resolve_linear_path", "linear_forward"]


def _check_path(path: str) -> None:
    if path not in BF16_MATMUL_PATHS:
        raise ValueError(f"bf16 matmul path must be one of {', '.join(BF16_MATMUL_PATHS)}, got {path!r}")


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype torch's linear would compute in: autocast's, else the operands' promotion."""
    if torch.is_autocast_enabled(x.device.type) and x.is_floating_point():
        return torch.get_autocast_dtype(x.device.type)
    return torch.promote_types(x.dtype, weight.dtype)


def resolve_linear_path(path: str, x: torch.Tensor, weight: torch.Tensor) -> str:
    """``native`` or ``widened``: what ``path`` runs a linear of ``x`` and ``weight`` on."""
    if x.device.type != "cpu" or _compute_dtype(x, weight) != torch.bfloat16:
        return "native"
    if path == "auto":
        return "native" if cpu_has_bf16_matmul() else "widened"
    return path


def _frozen_widened(layer: nn.Linear) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The widened weight and bias of a layer that is not trained (the teacher), made once and kept
    until they are replaced (``.to()``) or written in place (``load_state_dict``)."""
    weight, bias = layer.weight, layer.bias
    return cached_until_changed(layer, "_gfm_widened", (weight, bias),
                                lambda: (widen(weight), None if bias is None else widen(bias)))


def linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``nn.Linear.forward`` on the path ``self.gfm_bf16_matmul`` picks."""
    if resolve_linear_path(self.gfm_bf16_matmul, x, self.weight) != "widened":
        return F.linear(x, self.weight, self.bias)
    frozen = not any(p.requires_grad for p in (self.weight, self.bias) if p is not None)
    widened = _frozen_widened(self) if frozen and not torch.compiler.is_compiling() else None
    return widened_linear(x, self.weight, self.bias, widened=widened)


class RoutedLinear(nn.Linear):
    """``nn.Linear`` whose forward is :func:`linear_forward` (what :func:`set_bf16_matmul` turns
    plain linear layers into: same parameters and state dict, picklable)."""

    forward = linear_forward


def set_bf16_matmul(model: nn.Module, path: str) -> nn.Module:
    """Run every plain ``nn.Linear`` of ``model`` through :func:`linear_forward` on ``path``
    (auto | native | widened), in place; returns ``model``."""
    _check_path(path)
    cpu_has_bf16_matmul(), kernels_built()  # read and loaded now: not inside a later torch.compile trace
    for module in model.modules():
        if type(module) in (nn.Linear, RoutedLinear):  # not subclasses with a forward of their own
            module.__class__ = RoutedLinear
            module.gfm_bf16_matmul = path
    return model
