"""Helpers shared by the Triton kernel launchers (kernels/<op>.py): dtype settings and input checks."""
from __future__ import annotations

import os
from typing import Tuple

import torch
import triton.language as tl

# The interpreter (TRITON_INTERPRET=1, CPU) runs tl.dot through numpy, which cannot multiply
# bf16 (stored as uint16): there, dot operands are upcast to fp32, which is exact for the products.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
MIN_DOT_DIM = 16  # tl.dot needs every tile dimension >= 16


def acc_torch_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 accumulation for 16/32-bit inputs; fp64 stays fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def acc_dtype(dtype: torch.dtype):
    """:func:`acc_torch_dtype` as a Triton dtype (the kernels' ACC_DTYPE)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def dot_settings(dtype: torch.dtype) -> Tuple[object, str]:
    """(operand dtype, input_precision) for tl.dot on inputs of ``dtype``.

    16-bit inputs go to the tensor cores as they are (fp32 accumulation); fp32 follows torch's
    ``allow_tf32`` matmul flag, so it is IEEE unless the user opted into TF32.
    """
    if dtype == torch.float64:
        return tl.float64, "ieee"
    if dtype == torch.float32:
        return tl.float32, "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    if INTERPRET:
        return tl.float32, "ieee"
    return (tl.bfloat16 if dtype == torch.bfloat16 else tl.float16), "ieee"


def check_tensors(reference_name: str, reference: torch.Tensor, **tensors: torch.Tensor) -> None:
    """``reference_name`` is plural (\"images\", \"features\"). Every tensor (``reference`` included) is contiguous and on the reference's device; all but
    ``mask`` (float32 0/1, checked by the caller) also have the reference's dtype."""
    for name, tensor in {reference_name: reference, **tensors}.items():
        if not tensor.is_contiguous():
            raise ValueError(f"{name} with shape {tuple(tensor.shape)} must be contiguous; call .contiguous()")
        if tensor.device != reference.device:
            raise ValueError(f"{name} with shape {tuple(tensor.shape)} is on {tensor.device}, {reference_name} on "
                             f"{reference.device}; move all inputs to one device")
        if name != "mask" and tensor.dtype != reference.dtype:
            raise ValueError(f"{name} with shape {tuple(tensor.shape)} has dtype {tensor.dtype}, {reference_name} have "
                             f"{reference.dtype}; cast all inputs to one dtype")
