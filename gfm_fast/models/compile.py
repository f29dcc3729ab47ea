"""``torch.compile`` for GFM modules, in place, so that checkpoints stay interchangeable with eager runs."""
from __future__ import annotations

import torch
from torch import nn

from gfm_fast.config import COMPILE_SCOPES

__all__ = ["COMPILE_SCOPES", "compile_in_place"]


def compile_in_place(*modules: nn.Module, scope: str = "regional") -> None:
    """torch.compile each module in place (``nn.Module.compile``).

    ``regional`` compiles every Swin block (timm's ``SwinTransformerBlock``: norms, attention,
    MLP, residuals; most of the step) and leaves the rest eager: blocks of one stage share their
    compiled code, so the compile is a few graphs per stage instead of the whole network's, and
    the fused ops and losses stay on their own kernels. ``full`` compiles each whole module.

    Parameter names, state dicts and the module DeepSpeed wraps stay the same, so checkpoints are
    interchangeable with eager runs. The fused ops are torch.library ops with fake kernels, so they
    sit in a graph as single nodes; their backends are imported here, because dynamo cannot trace
    an import (a graph break per op). Static shapes (every batch has the same shape): without
    ``dynamic=False``, a function compiled earlier in the process at another shape (e.g. a fused
    op's wrapper) makes dynamo recompile with symbolic shapes, whose reasoning over the Swin graph
    runs for many minutes.

    Args:
        *modules: the modules to compile (e.g. the student and the teacher).
        scope: ``regional`` or ``full``.
    """
    from timm.models.swin_transformer import SwinTransformerBlock

    from gfm_fast.ops import available_backends

    if scope not in COMPILE_SCOPES:
        raise ValueError(f"compile scope must be one of {', '.join(COMPILE_SCOPES)}, got {scope!r}")
    available_backends()
    if scope == "regional":
        # Every block shares SwinTransformerBlock.forward's code: one graph per stage shape and shift,
        # student and teacher (about 14 for Swin-B), more than dynamo keeps per code object by default.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    for module in modules:
        if scope == "full":
            module.compile(dynamic=False)
            continue
        for block in module.modules():
            if isinstance(block, SwinTransformerBlock):
                block.compile(dynamic=False)
