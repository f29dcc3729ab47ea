"""A bf16 linear layer computed by the fp32 GEMM, for CPUs without bf16 dot-product instructions.

x86 CPUs without AVX512-BF16 or AMX have no bf16 multiply: torch's bf16 GEMMs (oneDNN) emulate it
and run about 5x slower than fp32 GEMMs on the same CPU (measured on a 2-core AVX-512 Xeon: ~68
against ~350 GFLOP/s, benchmarks/results/cpu_step_base_b4.json). Here the bf16 operands are
widened to fp32, which is exact, and the fp32 GEMM computes the same thing a bf16 GEMM computes:
every product of two bf16 numbers is exact in fp32, the sums accumulate in fp32, and the output is
rounded to bf16. So this is a bf16 linear (bf16
operands, fp32 accumulation, bf16 output), not an fp32 one; only the summation order differs from a
native bf16 GEMM's, and the gradients of fp32 inputs (the weights, LayerNorm outputs) are returned
as the fp32 sums instead of being rounded to bf16 first. The conversions are memory-bound passes
over the operands, done in as few as possible (csrc/cpu/widened_linear_kernel.cpp).

Reference: ``torch.nn.functional.linear`` on the bf16 operands (under ``torch.autocast``, which casts
them). Where bf16 GEMMs are native (CUDA, AVX512-BF16, AMX, Arm's BF16) torch's is used
(``gfm_fast.models.linear``, ``model.bf16_matmul=auto``).
"""
from __future__ import annotations

import platform
from typing import Optional, Tuple

import torch
from torch.autograd.function import once_differentiable

from gfm_fast.ops._backend import cpp_available

__all__ = ["widened_linear", "widen", "cpu_has_bf16_matmul", "cpuinfo_has_bf16"]

_BF16 = torch.bfloat16


_CPU_HAS_BF16: Optional[bool] = None  # read once per process


@torch.compiler.assume_constant_result  # torch.compile takes the answer, not the file read
def cpu_has_bf16_matmul() -> bool:
    """Whether this CPU multiplies bf16 natively (x86: AVX512-BF16 or AMX-BF16; Arm: BF16), from
    /proc/cpuinfo; where there is none, assume it does (torch's GEMMs stay in use)."""
    global _CPU_HAS_BF16
    if _CPU_HAS_BF16 is None:
        try:
            with open("/proc/cpuinfo") as info:
                _CPU_HAS_BF16 = cpuinfo_has_bf16(info.read(), platform.machine())
        except OSError:
            _CPU_HAS_BF16 = True
    return _CPU_HAS_BF16


def cpuinfo_has_bf16(cpuinfo: str, machine: str) -> bool:
    """Whether a /proc/cpuinfo text lists bf16 multiply instructions for a CPU of ``machine`` type."""
    flags = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86, Arm
            flags.update(value.split())
    if machine.lower() in ("aarch64", "arm64"):
        return "bf16" in flags
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def kernels_built() -> bool:
    """Whether gfm_fast._C's CPU kernels (the conversions fused around the GEMM) are there, their
    fake kernels registered (``cpp_available`` imports them)."""
    return cpp_available("cpu")


def widen(t: torch.Tensor) -> torch.Tensor:
    """``t`` rounded to bf16 (as a bf16 GEMM's operand is), in fp32."""
    if t.dtype == torch.float32 and kernels_built():
        return torch.ops.gfm_fast.round_to_bf16(t.contiguous())  # one pass instead of two
    return t.to(_BF16).float()


class WidenedLinearFunction(torch.autograd.Function):
    """x (rows, in) float32 or bf16; weight32 / bias32: the weight and bias rounded to bf16, in fp32.
    With gfm_fast._C built, its kernels do the conversions in fewer passes; else torch ops do."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                weight32: torch.Tensor, bias32: Optional[torch.Tensor]) -> torch.Tensor:
        ctx.kernels = kernels_built()
        if ctx.kernels:
            out, rounded = torch.ops.gfm_fast.widened_linear(x, weight32, bias32)
            rounded = x if x.dtype == _BF16 else rounded
        else:
            rounded = x.to(_BF16)
            with torch.autocast("cpu", enabled=False):  # the fp32 GEMM must stay fp32
                if bias32 is None:
                    out = torch.mm(rounded.float(), weight32.t())
                else:
                    out = torch.addmm(bias32, rounded.float(), weight32.t())
            out = out.to(_BF16)
        ctx.save_for_backward(rounded, weight32)  # the input in bf16, as autocast saves it
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        rounded, weight32 = ctx.saved_tensors
        x_dtype, weight_dtype, bias_dtype = ctx.dtypes
        # Products of bf16 values summed in fp32, as a bf16 GEMM; the sums are returned in each
        # input's dtype (fp32 gradients are not rounded to bf16 on the way, as autocast's are).
        wanted = ctx.needs_input_grad[:3]
        grad_out = grad_out.to(_BF16).contiguous()  # bf16 already: the forward's output is
        if ctx.kernels:
            grads = torch.ops.gfm_fast._widened_linear_backward(grad_out, rounded, weight32, *wanted)
        else:
            grad = grad_out.float()
            with torch.autocast("cpu", enabled=False):
                grads = (grad.mm(weight32) if wanted[0] else None, grad.t().mm(rounded.float()) if wanted[1] else None,
                         grad.sum(0) if wanted[2] else None)
        return tuple(g.to(dtype) if want else None
                     for g, want, dtype in zip(grads, wanted, (x_dtype, weight_dtype, bias_dtype))) + (None, None)


def widened_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                   widened: Optional[Tuple[torch.Tensor, Optional[torch.Tensor]]] = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` in bf16 on CPU, computed by the fp32 GEMM; returns bf16.

    Any floating inputs are rounded to bf16 first, as ``torch.autocast(bf16)`` casts a linear's
    inputs; gradients come back in each input's dtype.

    Args:
        x: (..., in_features) on CPU.
        weight: (out_features, in_features).
        bias: (out_features,) or None.
        widened: ``(widen(weight), widen(bias))`` made beforehand (a frozen layer keeps them), or
            None to make them here.
    """
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is not None and (t.device.type != "cpu" or not t.is_floating_point()):
            raise ValueError(f"widened_linear: {name} must be a floating-point CPU tensor, got {t.dtype} on "
                             f"{t.device}; elsewhere use torch.nn.functional.linear")
    if x.shape[-1] != weight.shape[-1] or weight.dim() != 2 or (bias is not None and bias.shape != weight.shape[:1]):
        raise ValueError(f"widened_linear: x {tuple(x.shape)}, weight {tuple(weight.shape)} and bias "
                         f"{None if bias is None else tuple(bias.shape)} do not fit (x's last dim = weight's "
                         f"in_features, bias = out_features)")
    if widened is None:
        with torch.no_grad():
            widened = (widen(weight), None if bias is None else widen(bias))
    rows = x.reshape(-1, x.shape[-1])
    rows = rows.contiguous() if rows.dtype in (torch.float32, _BF16) else rows.to(_BF16)
    out = WidenedLinearFunction.apply(rows, weight, bias, *widened)
    return out.view(*x.shape[:-1], weight.shape[0])
