"""Input validation shared by the fused ops' entry points and their references (one check, one
message), and the autocast rule the entry points follow."""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple, TypeVar

import torch

T = TypeVar("T")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


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
    """Data-dependent checks (a device sync, so only the references and GFMPretrainer run them):
    values are 0/1 and at least one is 1."""
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


def write_version(tensor: Optional[torch.Tensor]) -> int:
    """In-place write counter of ``tensor``, for caches of what is made from it (inference tensors
    have none; they cannot change outside inference mode)."""
    return 0 if tensor is None or tensor.is_inference() else tensor._version


def memory_stamp(tensor: Optional[torch.Tensor]) -> tuple:
    """Where and how a tensor's values are laid out, and how often they were written: what a cache
    made from them must compare (``Module.to()`` keeps each Parameter object and swaps its data: a
    new address, the same write count)."""
    if tensor is None:
        return ()
    return (tensor.data_ptr(), tensor.dtype, tensor.device, tuple(tensor.shape), tensor.stride(),
            write_version(tensor))


def cached_until_changed(owner: object, name: str, sources: Sequence[Optional[torch.Tensor]],
                         make: Callable[[], T], *, key: tuple = ()) -> T:
    """``make()`` (run without autograd), kept as ``owner.<name>`` until one of ``sources`` is
    replaced, moved or cast (``.to()``), or written in place (``load_state_dict``), or ``key``
    changes. The cache holds the sources' memory, so no other tensor can take its address meanwhile."""
    stamp = tuple(memory_stamp(t) for t in sources) + tuple(key)
    cached = getattr(owner, name, None)
    if cached is None or cached[1] != stamp:
        with torch.no_grad():
            cached = (tuple(None if t is None else t.detach() for t in sources), stamp, make())
        setattr(owner, name, cached)
    return cached[2]


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """What the kernels accumulate in and return their fp32 statistics as: fp64 for fp64, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


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
