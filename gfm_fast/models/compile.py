"""``torch.compile`` for GFM modules, in place, so that checkpoints stay interchangeable with eager runs."""
from __future__ import annotations

from torch import nn

__all__ = ["compile_in_place"]


def compile_in_place(*modules: nn.Module) -> None:
    """torch.compile each module in place (``nn.Module.compile``).

    Parameter names, state dicts and the module DeepSpeed wraps stay the same, so checkpoints are
    interchangeable with eager runs. The fused ops are torch.library ops with fake kernels, so they
    sit in the graph as single nodes; their backends are imported here, because dynamo cannot trace
    an import (a graph break per op). Static shapes (every batch has the same shape): without
    ``dynamic=False``, a function compiled earlier in the process at another shape (e.g. a fused
    op's wrapper) makes dynamo recompile with symbolic shapes, whose reasoning over the Swin graph
    runs for many minutes.

    Args:
        *modules: the modules to compile (e.g. the student and the teacher).
    """
    from gfm_fast.ops import available_backends

    available_backends()
    for module in modules:
        module.compile(dynamic=False)
