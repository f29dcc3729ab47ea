"""The training step: DeepSpeed around the student, one optimizer step through the pretrainer's forward.

``build_engine`` wraps only the trainable ``pretrainer.student`` (encoder, projector, decoder) in
DeepSpeed; the frozen teacher stays outside and hands ``z_t`` to the student's loss
(docs/architecture.md). ``train_step`` runs ``pretrainer(images, student=engine)`` per
micro-batch, so training, the throughput benchmark and the tests time and test the same code.

Host syncs: one per step, a small all-reduced tensor holding "a loss was non-finite" and "stop
requested" together, read after the last backward; none inside forward or backward. The losses
stay on the device until the loop logs (``step_metrics``, once per log interval).
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Tuple

from gfm_fast.config import TrainConfig
from gfm_fast.training.distributed import max_over_ranks
from gfm_fast.training.schedule import deepspeed_config

__all__ = ["build_engine", "train_step", "StepResult", "BatchStream", "step_metrics"]


def build_engine(cfg: TrainConfig, pretrainer, device, precision: str,
                 load_universal: bool = False) -> Tuple[Any, Any]:
    """DeepSpeed engine and optimizer for ``pretrainer.student``; the teacher goes to ``device``.

    Call ``init_distributed`` first (one process: gloo on CPU, NCCL on GPU, no launcher needed).

    torch's AdamW (no DeepSpeed op to compile; its fused kernel with the clipping folded in, see
    ``training.optimizer``) over ``param_groups`` (no decay for norms, biases, mask token, relative
    position tables). The teacher's weights are cast once to the run's compute dtype; with
    ``run.compile`` the student and teacher are compiled in place first; with
    ``run.teacher_cuda_graph`` the teacher's forward is replayed as a CUDA graph.

    Args:
        cfg: the run config (optimizer, ZeRO stage, accumulation, clipping, compile).
        pretrainer: a ``GFMPretrainer``.
        device: this rank's device.
        precision: resolved precision (``resolve_precision``).
        load_universal: the engine will load a checkpoint written by another number of ranks
            (``checkpoints.needs_resharding``).

    Returns:
        (engine, optimizer): the optimizer's LR is set per step by the caller.
    """
    import deepspeed

    from gfm_fast.models.compile import compile_in_place
    from gfm_fast.models.pretrainer import param_groups
    from gfm_fast.training.optimizer import build_optimizer

    if precision in ("bf16", "fp16") and cfg.run.zero_stage == 0:
        instead = "run.precision=bf16-mixed (the default on GPUs with bf16) or " if precision == "bf16" else ""
        warnings.warn(f"run.precision={precision} at run.zero_stage=0 runs DeepSpeed's unfused 16-bit optimizer, "
                      "which reads every parameter's gradient back to the host each step (a device sync each); "
                      f"{instead}run.zero_stage>=1 avoids that", stacklevel=2)
    pretrainer.teacher.to(device)
    pretrainer.teacher.set_run_precision(precision)  # its weights cast once, not on every step
    if cfg.run.compile:
        compile_in_place(pretrainer.student, pretrainer.teacher, scope=cfg.run.compile_scope)
    pretrainer.teacher.use_cuda_graph(cfg.run.teacher_cuda_graph)
    optimizer = build_optimizer(param_groups(pretrainer.student, cfg.optim.weight_decay), cfg, precision)
    engine, optimizer, _, _ = deepspeed.initialize(model=pretrainer.student, optimizer=optimizer,
                                                   config=deepspeed_config(cfg, precision, load_universal))
    if engine.zero_optimization_stage() == 0 and engine.dp_world_size == 1:
        # Averaging gradients over one rank changes nothing, but DeepSpeed would still flatten every
        # gradient into buckets, all-reduce and copy them back (Swin-B, CPU: ~180 ms of a 2.2 s step).
        engine.enable_backward_allreduce = False
    return engine, optimizer


class BatchStream:
    """Loader batches across epochs (every rank yields the same count), moved to ``device`` and normalised there.

    uint8 batches cross to the device as they are (a quarter of the bytes of float32) and
    ``loader.normalize`` turns them into the normalised float32 batch there.
    """

    def __init__(self, loader, epoch: int, device):
        self.loader, self.epoch, self.device = loader, epoch, device
        self.batches = iter(loader)

    def __call__(self):
        try:
            images = next(self.batches)
        except StopIteration:
            self.epoch += 1
            self.loader.set_epoch(self.epoch)
            self.batches = iter(self.loader)
            images = next(self.batches)
        return self.loader.normalize(images.to(self.device, non_blocking=True))

    def close(self) -> None:
        """Stop the loader's workers now (the loader's generator shuts them down when closed)."""
        close = getattr(self.batches, "close", None)
        if close is not None:
            close()


@dataclass
class StepResult:
    """What one ``train_step`` did.

    Attributes:
        applied: the optimizer ran (False: a loss was non-finite on some rank; nothing applied).
        stop: the number of a stop signal some rank received (the highest), else 0 (read with the same sync).
        sums: (3,) device tensor: loss, loss_rec, loss_feat summed over the micro-batches.
        micro_batches: how many micro-batches the sums cover.
        wait_s: seconds spent waiting for data.
        images: the last micro-batch (for previews).
        mask: its block mask (B, H / block, W / block).
        grad_norm: (,) device tensor where DeepSpeed keeps no gradient norm (see ``_grad_norm_before_step``).
    """

    applied: bool
    stop: int
    sums: Any
    micro_batches: int
    wait_s: float
    images: Any
    mask: Any
    grad_norm: Any = None


def train_step(engine, pretrainer, next_batch: Callable[[], Any], grad_accum: int, *, generator=None,
               stop_signal: Callable[[], int] = lambda: 0, measure_grad_norm: bool = False) -> StepResult:
    """One optimizer step over ``grad_accum`` micro-batches.

    Each micro-batch runs ``pretrainer(images, generator=generator, student=engine)`` (teacher,
    a drawn block mask, the student's losses) and ``engine.backward``. After the last backward,
    one host sync: when any rank saw a non-finite loss every rank skips the optimizer step together
    (ZeRO collectives stay in step) and drops every gradient of this step.

    Args:
        engine: the DeepSpeed engine around ``pretrainer.student`` (``build_engine``).
        pretrainer: the ``GFMPretrainer`` (its teacher on the engine's device).
        next_batch: returns the next normalised image batch (B, C, H, W) on the device.
        grad_accum: micro-batches per optimizer step (the engine's ``gradient_accumulation_steps``).
        generator: the random source of the masks.
        stop_signal: the number of a stop signal received (0: none); read once per step, at the sync,
            and maximised over the ranks into ``StepResult.stop``.
        measure_grad_norm: compute the gradient norm where DeepSpeed records none (for logging).

    Returns:
        ``StepResult``.
    """
    import torch

    device = engine.device
    sums, finite, wait = torch.zeros(3, device=device), torch.ones((), dtype=torch.bool, device=device), 0.0
    for i in range(grad_accum):
        last = i == grad_accum - 1
        # The optimizer runs after this step's last micro-batch, whatever DeepSpeed's own
        # micro-step counter says (a skipped step leaves that counter mid-accumulation).
        engine.set_gradient_accumulation_boundary(last)
        start = time.perf_counter()
        images = next_batch()
        wait += time.perf_counter() - start
        out = pretrainer(images, generator=generator, student=engine)
        losses = torch.stack([out.loss, out.loss_rec, out.loss_feat]).detach().float()
        finite &= torch.isfinite(losses[0])
        sums += losses
        engine.backward(out.loss)
        if not last:
            engine.step()  # counts the micro-step; no optimizer step before the boundary
    bad, stop = max_over_ranks(torch.stack([(~finite).float(), torch.full((), float(stop_signal()), device=device)]),
                               device)
    grad_norm = None
    if bad:
        _discard_gradients(engine)
    else:
        grad_norm = _grad_norm_before_step(engine) if measure_grad_norm else None
        engine.step()
        if measure_grad_norm and grad_norm is None:  # ClippedAdamW measured it in its step
            grad_norm = getattr(engine.optimizer, "last_grad_norm", None)
    return StepResult(not bad, int(stop), sums, grad_accum, wait, images, out.mask, grad_norm)


def _grad_norm_before_step(engine):
    """The gradients' global L2 norm (before clipping) where DeepSpeed records none: ZeRO-0 with
    torch's optimizer in fp32 or bf16-mixed. Elsewhere ``engine.get_global_grad_norm()`` has it."""
    from gfm_fast.training.optimizer import global_grad_norm

    if engine.zero_optimization_stage() != 0 or engine.bfloat16_enabled() or engine.fp16_enabled():
        return None
    if hasattr(engine.optimizer, "last_grad_norm"):  # ClippedAdamW measures it in its own step
        return None
    grads = [p.grad.detach() for p in engine.module.parameters() if p.grad is not None]
    return global_grad_norm(grads) if grads else None


def _discard_gradients(engine) -> None:
    """Drop every gradient accumulated since the last optimizer step, so the next step starts clean.

    Where DeepSpeed keeps them (checked against deepspeed==0.19.8):
    - ``param.grad`` of the module: cleared by ``engine.zero_grad()``.
    - bf16 without ZeRO (``BF16_Optimizer``): fp32 copies summed at each backward; its ``zero_grad()``
      clears them. fp16 and torch's own optimizer: their ``zero_grad()`` clears what they hold.
    - ZeRO-3: a flat buffer of reduced gradient partitions that each backward *adds* to while the
      optimizer's ``micro_step_id`` > 0 (stage3.py ``partition_grads``); the optimizer's
      ``zero_grad()`` resets it to 0, so the next step's first micro-batch overwrites the buffer.
    - ZeRO-1/2 after a reduction: the owned partition summed in ``all_grad_tensors`` /
      ``averaged_gradients`` (stage_1_and_2.py); only the optimizer's ``step()`` clears that: see
      ``_reset_zero12_accumulation``.
    """
    engine.zero_grad()
    engine.optimizer.zero_grad(set_to_none=True)
    if engine.zero_optimization_stage() in (1, 2):
        _reset_zero12_accumulation(engine.optimizer)


def _reset_zero12_accumulation(optimizer) -> None:
    """Forget the gradient partitions a ZeRO-1/2 optimizer summed over this step's micro-batches.

    DeepSpeed internals, because no public call does this: what the overflow branch of
    ``DeepSpeedZeroOptimizer.step()`` resets (deepspeed==0.19.8, runtime/zero/stage_1_and_2.py).
    Recheck on a DeepSpeed upgrade; test_non_finite_second_micro_batch_skips_the_whole_step fails
    if it goes stale. CPU offload keeps more state, but ``deepspeed_config`` never enables it.
    """
    from deepspeed.runtime.zero.stage_1_and_2 import INITIAL_MICRO_STEP_ID, DeepSpeedZeroOptimizer

    if not isinstance(optimizer, DeepSpeedZeroOptimizer):  # e.g. BF16_Optimizer: its zero_grad() cleared all
        return
    release = getattr(optimizer, "_release_preflattened_grad_buffers", None)
    if release is not None:
        release()
    for group in set(optimizer.all_grad_tensors) | set(optimizer.averaged_gradients):
        optimizer.all_grad_tensors[group] = None
        optimizer.averaged_gradients[group] = None
    optimizer.micro_step_id = INITIAL_MICRO_STEP_ID


def step_metrics(result: StepResult, engine) -> Dict[str, float]:
    """The step's mean losses and gradient norm as floats: one device-to-host read."""
    import torch

    values = result.sums / result.micro_batches
    if result.grad_norm is not None:
        values = torch.cat([values, result.grad_norm.reshape(1).float()])
    read = values.tolist()
    metrics = {"loss/total": read[0], "loss/rec": read[1], "loss/feat": read[2]}
    grad_norm = read[3] if result.grad_norm is not None else engine.get_global_grad_norm()
    if grad_norm is not None:
        metrics["train/grad_norm"] = float(grad_norm)
    return metrics
