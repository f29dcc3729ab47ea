"""Input validation shared by the fused ops' Python entry points (one check, one message)."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from gfm_fast.losses import check_float


def check_same(op: str, reference_name: str, reference: torch.Tensor, **tensors: torch.Tensor) -> None:
    """All ``tensors`` are floating point with the dtype and device of ``reference``."""
    check_float(reference_name, reference)
    for name, tensor in tensors.items():
        check_float(name, tensor)
        if tensor.device != reference.device:
            raise ValueError(f"{op}: {name} is on {tensor.device} but {reference_name} is on {reference.device}; "
                             f"move all inputs to one device")
        if tensor.dtype != reference.dtype:
            raise TypeError(f"{op}: {name} has dtype {tensor.dtype} but {reference_name} has {reference.dtype}; "
                            f"cast them to one dtype (accumulation is fp32 inside the kernels)")


def check_shape(op: str, name: str, tensor: torch.Tensor, expected: Sequence[int]) -> None:
    if tuple(tensor.shape) != tuple(expected):
        raise ValueError(f"{op}: {name} must have shape {tuple(expected)}, got {tuple(tensor.shape)}")


def check_no_grad(op: str, name: str, tensor: torch.Tensor, backend: str) -> None:
    """The fused backends do not differentiate w.r.t. targets/inputs that GFM never trains."""
    if tensor.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{op}: backend {backend!r} gives no gradient for {name}, but {name} requires grad; "
                         f"detach it, or use backend='reference' for a full autograd graph")


def mask_for_kernels(mask: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The mask as the kernels take it: contiguous float32 0/1 on the inputs' device."""
    if mask.device != device:
        raise ValueError(f"mask is on {mask.device} but the inputs are on {device}; move it with .to(device)")
    if mask.is_complex():
        raise TypeError(f"mask must be boolean, integer or real floating point, got {mask.dtype}")
    return mask.to(torch.float32).contiguous()


def autocast_dtype(device: torch.device, *, loss: bool = False) -> Optional[torch.dtype]:
    """The dtype a fused op computes in under ``torch.autocast`` on ``device``; None outside it.

    Autocast runs convolutions in its low-precision dtype and losses such as cosine_similarity in
    float32; the fused ops follow the same rule (``loss=True`` for the latter), accumulating in
    fp32 inside their kernels either way.
    """
    if not torch.is_autocast_enabled(device.type):
        return None
    return torch.float32 if loss else torch.get_autocast_dtype(device.type)


def cast_floats(dtype: Optional[torch.dtype], *tensors: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """``tensors`` with the floating-point ones cast to ``dtype`` (differentiably); None: unchanged.
    Anything else passes through untouched for the validation that follows to name it."""
    if dtype is None:
        return tensors
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in tensors)
