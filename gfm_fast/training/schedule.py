"""What a run's configuration means for the optimizer: the LR schedule, the precision, DeepSpeed's JSON.

The schedule scales with the global batch (docs/method.md, "Optimisation"): one optimizer step
consumes ``grad_accum`` loader batches on every rank, and every LR scales by
``global batch / optim.lr_scale_batch``.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Dict

from gfm_fast.config import TrainConfig
from gfm_fast.errors import ConfigError

__all__ = ["lr_at", "Schedule", "resolve_grad_accum", "make_schedule", "resolve_precision", "deepspeed_config"]


def lr_at(step: int, total_steps: int, warmup_steps: int, base_lr: float, warmup_lr: float, min_lr: float) -> float:
    """Per-step LR: linear warmup from ``warmup_lr`` to ``base_lr``, then cosine to ``min_lr``."""
    if step < warmup_steps:
        return warmup_lr + (base_lr - warmup_lr) * step / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


@dataclass
class Schedule:
    """The optimizer steps of a run and their LRs (from ``make_schedule``)."""

    total_steps: int
    warmup_steps: int
    base_lr: float
    warmup_lr: float
    min_lr: float
    global_batch: int
    stop_step: int  # training ends here (run.max_steps, or the end of the schedule)

    def lr(self, step: int) -> float:
        return lr_at(step, self.total_steps, self.warmup_steps, self.base_lr, self.warmup_lr, self.min_lr)


def resolve_grad_accum(cfg: TrainConfig, world_size: int) -> TrainConfig:
    """``cfg`` with ``optim.grad_accum`` = ``optim.global_batch`` / (``data.batch_size`` x
    ``world_size``): the same global batch on any number of ranks. ``cfg`` itself when
    ``optim.global_batch`` is 0 (the global batch follows the ranks)."""
    target, batch = cfg.optim.global_batch, cfg.data.batch_size
    if not target:
        return cfg
    if target % (batch * world_size):
        per_rank = target // world_size
        fits = (f"a data.batch_size that divides {per_rank} (e.g. "
                f"{max(b for b in range(1, batch + 1) if per_rank % b == 0)})" if target % world_size == 0
                else f"a number of ranks that divides {target}")
        raise ConfigError(f"optim.global_batch={target} is not data.batch_size x ranks x accumulation: {batch} x "
                          f"{world_size} does not divide it; choose {fits}, or optim.global_batch=0")
    return dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, grad_accum=target // (batch * world_size)))


def make_schedule(cfg: TrainConfig, steps_per_epoch: int, world_size: int) -> Schedule:
    """Optimizer steps and LRs scaled by the global batch.

    The warmup + cosine schedule spans ``optim.schedule_steps`` if set, else ``run.max_steps`` if
    set (compressed, keeping the warmup fraction), else all epochs; training stops at
    ``run.max_steps`` (default: the schedule's end), so a long run can be trained in chunks.

    Args:
        cfg: the run config.
        steps_per_epoch: loader batches per epoch on one rank.
        world_size: data-parallel ranks.

    Returns:
        The ``Schedule``.
    """
    optim = cfg.optim
    global_batch = cfg.data.batch_size * world_size * optim.grad_accum
    scale = global_batch / optim.lr_scale_batch
    steps_per_epoch = max(1, steps_per_epoch // optim.grad_accum)
    planned = optim.epochs * steps_per_epoch
    length = optim.schedule_steps or cfg.run.max_steps or planned
    warmup = round(length * optim.warmup_epochs / optim.epochs)
    return Schedule(length, warmup, optim.base_lr * scale, optim.warmup_lr * scale, optim.min_lr * scale,
                    global_batch, cfg.run.max_steps or length)


def resolve_precision(cfg: TrainConfig, device_type: str) -> str:
    """``run.precision`` for this device: ``auto`` becomes bf16-mixed (GPUs with bf16), fp16 (other
    GPUs) or fp32 (CPU)."""
    import torch

    precision = cfg.run.precision
    if precision == "auto":
        if device_type == "cuda" and torch.cuda.is_bf16_supported():
            # bf16 autocast over fp32 weights, GFM's AMP recipe: the fused AdamW clips and steps with
            # the step's one host read, where DeepSpeed's bf16 at ZeRO-0 reads one per parameter.
            return "bf16-mixed"
        return "fp16" if device_type == "cuda" else "fp32"
    if precision == "fp16" and device_type == "cpu":
        raise ConfigError("run.precision=fp16 needs a GPU; use run.precision=fp32, bf16, bf16-mixed or auto on CPU")
    if precision.startswith("bf16") and device_type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"run.precision={precision}: this GPU has no bf16 support; use run.precision=fp16 or fp32")
    return precision


def clips_itself(zero_stage: int, precision: str) -> bool:
    """Whether the torch optimizer sees the module's own gradients and so clips them itself (with
    ``optim.fused``): ZeRO-0 with fp32 weights (fp32, bf16-mixed); elsewhere DeepSpeed's optimizer
    wrapper clips its flat buffers."""
    return zero_stage == 0 and precision in ("fp32", "bf16-mixed")


def deepspeed_config(cfg: TrainConfig, precision: str, load_universal: bool = False) -> Dict[str, Any]:
    """The DeepSpeed JSON: micro-batch, accumulation, clipping, precision and ZeRO stage live here.
    ``load_universal``: the engine loads a checkpoint converted to DeepSpeed's universal layout
    (a resume at another world size, ``checkpoints.reshard``)."""
    ds: Dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": cfg.optim.grad_accum,
        # Clipped inside the optimizer's fused kernel where it sees the module's own gradients.
        "gradient_clipping": 0.0 if cfg.optim.fused and clips_itself(cfg.run.zero_stage, precision)
        else cfg.optim.clip_grad,
        "zero_optimization": {"stage": cfg.run.zero_stage},
        "steps_per_print": 10 ** 9,  # our own logger prints progress
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,  # torch's AdamW: no DeepSpeed op needs compiling
    }
    if cfg.run.zero_stage == 3:
        # memory_efficient_linear (DeepSpeed's default) replaces torch.nn.functional.linear for the
        # whole process and never puts it back: every later nn.Linear (a second run, feature
        # extraction, torch.compile) would run DeepSpeed's autograd Function. ZeRO-3 gathers
        # partitioned weights for torch's own linear through its module hooks, as for every layer.
        ds["zero_optimization"].update({"stage3_gather_16bit_weights_on_model_save": False,
                                        "memory_efficient_linear": False})
    if load_universal:
        ds["checkpoint"] = {"load_universal": True}
    if precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif precision == "bf16-mixed":  # DeepSpeed's engine runs the forward under torch.autocast
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    elif precision == "fp16":
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    return ds
