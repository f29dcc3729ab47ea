"""Helpers shared by the Triton kernel launchers (kernels/<op>.py): dtype settings and input checks."""
from __future__ import annotations

import copy
import functools
import os
from typing import Callable, Dict, List, Tuple

import torch
import triton
import triton.language as tl

# The interpreter (TRITON_INTERPRET=1, CPU) runs tl.dot through numpy, which cannot multiply
# bf16 (stored as uint16): there, dot operands are upcast to fp32, which is exact for the products.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _check_interpreter_numpy() -> None:
    """Triton's interpreter before 3.7 turns loop bounds into Python ints in a way numpy 2.4 made an
    error (triton-lang/triton#9171): every kernel with a runtime loop bound fails. Say so at import."""
    import numpy

    def version(module):
        return tuple(int(part) for part in module.__version__.split(".")[:2] if part.isdigit())

    if version(triton) < (3, 7) and version(numpy) >= (2, 4):
        raise ImportError(f"the Triton {triton.__version__} interpreter (TRITON_INTERPRET=1) cannot run with numpy "
                          f"{numpy.__version__} (triton-lang/triton#9171); install 'numpy<2.4' or triton>=3.7")


if INTERPRET:
    _check_interpreter_numpy()

MIN_DOT_DIM = 16  # tl.dot needs every tile dimension >= 16


def acc_torch_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 accumulation for 16/32-bit inputs; fp64 stays fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def acc_dtype(dtype: torch.dtype):
    """:func:`acc_torch_dtype` as a Triton dtype (the kernels' ACC_DTYPE)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def fp32_matmul_uses_tf32() -> bool:
    """torch's choice for fp32 CUDA matmuls. torch >= 2.9 keeps it in ``fp32_precision`` ("none"
    defers to ``torch.backends.fp32_precision``), and reading the legacy ``allow_tf32`` raises
    once the new API was used; older torch has only ``allow_tf32``."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision is None:
        return bool(matmul.allow_tf32)
    if precision == "none":
        precision = getattr(torch.backends, "fp32_precision", "ieee")
    return precision == "tf32"


def dot_settings(dtype: torch.dtype) -> Tuple[object, str]:
    """(operand dtype, input_precision) for tl.dot on inputs of ``dtype``.

    16-bit inputs go to the tensor cores as they are (fp32 accumulation); fp32 follows torch's
    fp32 matmul precision, so it is IEEE unless the user opted into TF32.
    """
    if dtype == torch.float64:
        return tl.float64, "ieee"
    if dtype == torch.float32:
        return tl.float32, "tf32" if fp32_matmul_uses_tf32() else "ieee"
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


# --------------------------------------------------------------------------------------------
# Autotune pruning: pipelined tl.dot operands must fit the device's shared memory
# --------------------------------------------------------------------------------------------

StageBytes = Callable[[Dict[str, object], Dict[str, object]], int]


@functools.lru_cache(maxsize=None)
def shared_memory_limit(device_index: int) -> int:
    """Bytes of shared memory one program may use on CUDA device ``device_index`` (opt-in maximum)."""
    return triton.runtime.driver.active.utils.get_device_properties(device_index)["max_shared_mem"]


def configs_within(configs: List[triton.Config], stage_bytes: Callable[[triton.Config], int],
                   limit: int) -> List[triton.Config]:
    """The configs whose ``num_stages`` copies of one pipeline stage fit in ``limit`` bytes.

    Conservative: on sm_90, tensor-core (wgmma) dots stage ``num_stages`` copies, the others one
    fewer (measured from compiled kernels' shared-memory sizes).

    A config that is too deep gets as many stages as fit (a copy; duplicates dropped); one whose
    single stage is too big is dropped. If nothing fits, the config with the smallest stage, at
    one stage, is kept, so that Triton reports the real OutOfResources rather than an empty list.
    """
    kept, seen = [], set()
    for config in configs:
        stages = min(config.num_stages, limit // max(1, stage_bytes(config)))
        if stages < 1:
            continue
        if stages != config.num_stages:
            config = copy.copy(config)
            config.num_stages = stages
        signature = (tuple(sorted(config.kwargs.items())), config.num_warps, config.num_stages)
        if signature not in seen:
            seen.add(signature)
            kept.append(config)
    if not kept:
        smallest = copy.copy(min(configs, key=stage_bytes))
        smallest.num_stages = 1
        kept.append(smallest)
    return kept


def prune_to_shared_memory(stage_bytes: StageBytes, device_arg: str):
    """An autotune ``early_config_prune``: :func:`configs_within` the shared memory of the device
    that holds argument ``device_arg``. ``stage_bytes(config_kwargs, args)`` gives the bytes one
    pipeline stage of a config stages (its tl.dot operand tiles, at the dot's operand width);
    ``args`` holds the launch's arguments by name, constexprs included.

    Without it, deep pipelines of fp64 tiles (8 bytes an element) exceed shared memory in every
    config, and the autotuner has nothing left to launch."""

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        limit = shared_memory_limit(args[device_arg].device.index)
        return configs_within(configs, lambda config: stage_bytes(config.kwargs, args), limit)

    return prune
