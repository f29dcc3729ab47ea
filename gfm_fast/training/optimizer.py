"""AdamW for the student: torch's fused kernel, with GFM's gradient clipping folded into it.

GFM clips the gradients' global L2 norm at 5 before each AdamW step. Done as DeepSpeed does it
without ZeRO (``deepspeed.runtime.utils.clip_grad_norm_``), that is a norm kernel and a ``mul_``
per parameter (about 330 each for Swin-B): one extra pass that rewrites every gradient. Here the
norm is one foreach pass and the clip factor goes to the fused AdamW kernel as its ``grad_scale``
(the divisor it already applies to every gradient for AMP's loss scaling), so clipping costs no
pass of its own and no host sync.

Where DeepSpeed's own optimizer wrapper owns the gradients (ZeRO 1-3, DeepSpeed's bf16/fp16) it
clips them in its flat buffers, and the optimizer is torch's plain fused AdamW.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional

import torch

from gfm_fast.training.schedule import clips_itself

__all__ = ["ClippedAdamW", "build_optimizer", "global_grad_norm"]


def global_grad_norm(grads: List[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of all ``grads`` together, as ``clip_grad_norm_`` computes it: one foreach pass, a
    device tensor (no host sync)."""
    return torch.linalg.vector_norm(torch.stack([n.float() for n in torch._foreach_norm(grads, 2.0)]))


class ClippedAdamW(torch.optim.AdamW):
    """torch's AdamW (fused kernel where the device has one) that clips the global gradient norm.

    Args:
        params: parameters or parameter groups.
        max_norm: clip the gradients' global L2 norm to this (0: no clipping).
        **kwargs: torch AdamW arguments (lr, betas, eps, weight_decay).

    Attributes:
        last_grad_norm: the global L2 norm of the gradients before clipping, a device tensor, from
            the last ``step`` (None before the first); read it without forcing a sync until logging.
    """

    def __init__(self, params: Iterable[Any], *, max_norm: float = 0.0, **kwargs: Any):
        super().__init__(params, fused=True, **kwargs)
        self.max_norm = float(max_norm)
        self.last_grad_norm: Optional[torch.Tensor] = None

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """torch's loader takes each group's settings from the file, the kernel choice included: a
        checkpoint written with torch's default AdamW (older runs, ``optim.fused=false``) would turn the
        fused kernel off, and with it the clipping's ``grad_scale``. Keep the fused kernel."""
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            group["fused"], group["foreach"] = True, None

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        if grads:
            norm = global_grad_norm(grads)
            self.last_grad_norm = norm
            if self.max_norm > 0:
                # The fused kernel divides every gradient by grad_scale: (norm / max_norm) when the norm
                # is over the limit, else 1 (clip_grad_norm_'s factor max_norm / (norm + 1e-6), inverted).
                self.grad_scale = torch.clamp((norm + 1e-6) / self.max_norm, min=1.0)
        try:
            return super().step(closure)
        finally:
            self.grad_scale = None


def build_optimizer(param_groups: list, cfg, precision: str) -> torch.optim.Optimizer:
    """The student's optimizer for a run config: with ``optim.fused``, ``ClippedAdamW`` where the
    optimizer sees the module's gradients (``schedule.clips_itself``), else torch's fused AdamW
    under DeepSpeed's clipping; without, torch's default AdamW (DeepSpeed clips)."""
    optim = cfg.optim
    kwargs: Dict[str, Any] = dict(lr=optim.base_lr, betas=optim.betas, eps=optim.eps)
    if not optim.fused:
        return torch.optim.AdamW(param_groups, **kwargs)
    if not clips_itself(cfg.run.zero_stage, precision):
        return torch.optim.AdamW(param_groups, fused=True, **kwargs)
    return ClippedAdamW(param_groups, max_norm=optim.clip_grad, **kwargs)
