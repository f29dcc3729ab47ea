"""GFM continual pretraining with DeepSpeed: the training run behind ``gfm_fast/train.py``.

    deepspeed gfm_fast/train.py [--config FILE.yaml] [--data SHARDS] [--output-dir DIR]
        [--teacher-weights FILE] [--max-steps N] [--zero-stage 0|1|2|3] [--resume auto|PATH|none]
        [section.key=value ...]
    python gfm_fast/train.py ...            # one process, no launcher needed
    gfm_fast.train("configs/tiny.yaml", run__max_steps=10)   # the same from Python

With no arguments it trains ``configs/tiny.yaml`` on the embedded sample shards (CPU if no GPU).
Setup order (shared STYLE.md section 4): distributed -> seed -> data -> models -> DeepSpeed engine
on the trainable module only (student encoder + projector + decoder); the frozen teacher lives
outside the engine and hands ``z_t`` to the student's loss. (The code lives in this module, not
in train.py, so that ``gfm_fast.train`` can be the function.)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import socket
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

from gfm_fast.config import ConfigError, TrainConfig, apply_overrides, load_config, to_dict
from gfm_fast.errors import TrainingError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CONFIG = "tiny.yaml"
CHECKPOINT_DIR = "checkpoints"
COMPLETE_MARKER = "COMPLETE"
CONFIG_FILE = "gfm_config.json"
MODEL_DIR = "model"
ABANDONED_DIR = "abandoned"  # under checkpoints/: newer checkpoints set aside when resuming from an older one
METRICS_FILE = "metrics.jsonl"
WARMUP_STEPS_FOR_THROUGHPUT = 5  # skip allocator/autotune warm-up when measuring images/s (nanoGPT)
PREVIEW_IMAGES = 4




def _user_errors() -> tuple:
    """Errors whose message already names the problem and the fix (printed without a traceback)."""
    from gfm_fast.data import TooManyFailures
    from gfm_fast.models.checkpoint import CheckpointError

    return (ConfigError, TrainingError, CheckpointError, TooManyFailures, FileNotFoundError)


@dataclass
class TrainResult:
    output_dir: str
    metrics: Dict[str, float] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------

def resolve_config_path(path: Optional[str]) -> Optional[str]:
    """A config path as given, or a bare name looked up in the shipped configs/ directory."""
    if path is None:
        return str(CONFIG_DIR / DEFAULT_CONFIG)
    if os.path.exists(path):
        return path
    shipped = CONFIG_DIR / path
    if shipped.exists():
        return str(shipped)
    shipped = CONFIG_DIR / f"{path}.yaml"
    if shipped.exists():
        return str(shipped)
    raise ConfigError(f"config file {path} does not exist (nor in {CONFIG_DIR}); "
                      f"shipped configs: {', '.join(sorted(p.name for p in CONFIG_DIR.glob('*.yaml')))}")


def _kwarg_overrides(overrides: Dict[str, Any]) -> List[str]:
    """``run__max_steps=5`` or ``**{"run.max_steps": 5}`` -> ["run.max_steps=5"]."""
    items = []
    for key, value in overrides.items():
        text = json.dumps(value) if isinstance(value, (list, tuple, dict, bool)) or value is None else str(value)
        items.append(f"{key.replace('__', '.')}={text}")
    return items


def build_config(config: Union[None, str, TrainConfig] = None, overrides: Optional[List[str]] = None) -> TrainConfig:
    if isinstance(config, TrainConfig):
        cfg = apply_overrides(config, overrides or [])
        cfg.validate()
        return cfg
    return load_config(resolve_config_path(config), overrides or [])


# --------------------------------------------------------------------------------------------
# Schedule and DeepSpeed configuration
# --------------------------------------------------------------------------------------------

def lr_at(step: int, total_steps: int, warmup_steps: int, base_lr: float, warmup_lr: float, min_lr: float) -> float:
    """Per-step LR: linear warmup from ``warmup_lr`` to ``base_lr``, then cosine to ``min_lr``."""
    if step < warmup_steps:
        return warmup_lr + (base_lr - warmup_lr) * step / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


@dataclass
class Schedule:
    total_steps: int
    warmup_steps: int
    base_lr: float
    warmup_lr: float
    min_lr: float
    global_batch: int
    stop_step: int  # training ends here (run.max_steps, or the end of the schedule)

    def lr(self, step: int) -> float:
        return lr_at(step, self.total_steps, self.warmup_steps, self.base_lr, self.warmup_lr, self.min_lr)


def make_schedule(cfg: TrainConfig, steps_per_epoch: int, world_size: int) -> Schedule:
    """Optimizer steps and LRs scaled by the global batch (GFM.md "Optimisation").

    One optimizer step consumes ``grad_accum`` loader batches. The warmup + cosine schedule spans
    ``optim.schedule_steps`` if set, else ``run.max_steps`` if set (compressed, keeping the warmup
    fraction), else all epochs; training stops at ``run.max_steps`` (default: the schedule's end),
    so a long run can be trained in chunks of ``run.max_steps``.
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
    import torch

    precision = cfg.run.precision
    if precision == "auto":
        if device_type == "cuda" and torch.cuda.is_bf16_supported():
            return "bf16"
        return "fp16" if device_type == "cuda" else "fp32"
    if precision == "fp16" and device_type == "cpu":
        raise ConfigError("run.precision=fp16 needs a GPU; use run.precision=fp32, bf16, bf16-mixed or auto on CPU")
    if precision.startswith("bf16") and device_type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"run.precision={precision}: this GPU has no bf16 support; use run.precision=fp16 or fp32")
    return precision


def deepspeed_config(cfg: TrainConfig, precision: str) -> Dict[str, Any]:
    """The DeepSpeed JSON: micro-batch, accumulation, clipping, precision and ZeRO stage live here."""
    ds: Dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": cfg.optim.grad_accum,
        "gradient_clipping": cfg.optim.clip_grad,
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
    if precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif precision == "bf16-mixed":  # DeepSpeed's engine runs the forward under torch.autocast
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    elif precision == "fp16":
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    return ds


# --------------------------------------------------------------------------------------------
# Distributed setup
# --------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed(device_type: str):
    """Initialise torch.distributed through DeepSpeed; default the launcher's env vars for one process."""
    if "RANK" not in os.environ:
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"})
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if device_type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import torch.distributed as dist

    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="gloo" if device_type == "cpu" else "nccl", verbose=False)
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))


def pick_device(cfg: TrainConfig, local_rank: int):
    import torch

    if cfg.run.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device=cuda but no GPU is visible; use run.device=auto or cpu")
    if cfg.run.device == "cuda" or (cfg.run.device == "auto" and torch.cuda.is_available()):
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


# --------------------------------------------------------------------------------------------
# Checkpoints: complete or absent, newest K kept
# --------------------------------------------------------------------------------------------

def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Flush every file under ``root``, then the directories, to stable storage."""
    for path in sorted(root.rglob("*"), key=lambda p: p.is_dir()):  # files first
        _fsync_path(path)
    _fsync_path(root)


class Checkpoints:
    """DeepSpeed checkpoints under ``<output>/checkpoints/step_XXXXXXXX``.

    A tag counts only once its ``COMPLETE`` marker exists; the marker is written by rank 0 after
    every rank has finished ``save_checkpoint`` (a barrier), so an interrupted save never shadows
    the last good checkpoint. ``latest()`` picks the newest complete tag.
    """

    def __init__(self, output_dir: Path, keep_last: int):
        self.root = output_dir / CHECKPOINT_DIR
        self.keep_last = keep_last

    @staticmethod
    def tag(step: int) -> str:
        return f"step_{step:08d}"

    def complete_tags(self, root: Optional[Path] = None) -> List[str]:
        root = root or self.root
        if not root.is_dir():
            return []
        return sorted(p.name for p in root.iterdir() if (p / COMPLETE_MARKER).is_file())

    def latest(self) -> Optional[Path]:
        tags = self.complete_tags()
        return self.root / tags[-1] if tags else None

    def save(self, engine, step: int, client_state: Dict[str, Any], rank: int,
             export: Optional[Callable[[Path], None]] = None) -> Path:
        """Collective: every rank calls it. The run config is written beside the tensors, and
        ``export(dir)`` (also collective) adds the model file that ``load_model`` reads."""
        import torch.distributed as dist

        tag = self.tag(step)
        target = self.root / tag
        if rank == 0 and target.exists():  # a partial save from an interrupted run: replace it
            shutil.rmtree(target)
        dist.barrier()
        engine.save_checkpoint(str(self.root), tag=tag, client_state=client_state, save_latest=False)
        if export is not None:
            export(target / MODEL_DIR)
        dist.barrier()
        if rank == 0:
            (target / CONFIG_FILE).write_text(client_state["gfm_config"])
            _fsync_tree(target)  # the tensors are on disk before the marker says so (power loss)
            marker = target / COMPLETE_MARKER
            tmp = marker.with_suffix(".tmp")
            tmp.write_text(json.dumps({"step": step, "time": time.time()}))
            os.replace(tmp, marker)
            _fsync_path(target)  # the marker is durable before pruning removes older checkpoints
            (self.root / "latest").write_text(tag)  # DeepSpeed's convention, for its own tools
            self._prune()
        dist.barrier()
        return target

    def set_aside_after(self, step: int) -> List[Path]:
        """Move this run's complete checkpoints newer than ``step`` (left by a run that went further
        before this one resumed from an older checkpoint) to ``checkpoints/abandoned/``: otherwise
        they would pass for the newest on the next ``--resume auto``, and pruning by step would
        delete the checkpoints this run writes. Kept, not deleted. Rank 0 only."""
        moved = []
        for tag in self.complete_tags():
            if int(tag.split("_")[1]) > step:
                dest = self.root / ABANDONED_DIR / tag
                if dest.exists():
                    dest = dest.with_name(f"{tag}.{time.strftime('%Y%m%d-%H%M%S')}")
                dest.parent.mkdir(exist_ok=True)
                os.rename(self.root / tag, dest)
                moved.append(dest)
        return moved

    def _prune(self) -> None:
        tags = self.complete_tags()
        for old in tags[: max(0, len(tags) - self.keep_last)]:
            shutil.rmtree(self.root / old, ignore_errors=True)


def resolve_resume(spec: Optional[str], checkpoints: Checkpoints) -> Optional[Path]:
    """``auto``: newest complete checkpoint of this run (or none); ``none`` (or None: an override
    ``run.resume=none`` parses as null); or an explicit path."""
    if spec is None or spec == "none":
        return None
    if spec == "auto":
        return checkpoints.latest()
    path = Path(spec)
    if (path / COMPLETE_MARKER).is_file():
        return path
    for root in (path / CHECKPOINT_DIR, path):  # a run directory or a checkpoints directory
        tags = checkpoints.complete_tags(root)
        if tags:
            return root / tags[-1]
    raise TrainingError(f"--resume {spec}: no complete checkpoint there (a checkpoint directory has a "
                        f"{COMPLETE_MARKER} marker); use --resume auto or --resume none")


def check_same_architecture(saved: Dict[str, Any], current: Dict[str, Any], where: Path) -> None:
    """A checkpoint from another model config is a clear error naming what differs."""
    keys = ("student", "teacher", "mask_block", "teacher_bands")
    diffs = [f"model.{k}: checkpoint {saved.get(k)!r} vs config {current.get(k)!r}"
             for k in keys if saved.get(k) != current.get(k)]
    if diffs:
        raise TrainingError(f"checkpoint {where} was trained with a different architecture:\n  " + "\n  ".join(diffs) +
                            "\nuse the config it was trained with, or --resume none to start afresh")


def _weights_dtype(ds_config: Dict[str, Any]) -> str:
    """The dtype DeepSpeed holds the trained weights in; it fixes the optimizer state's layout
    (fp32 and bf16-mixed share one: fp32 weights and a plain torch optimizer)."""
    for dtype in ("bf16", "fp16"):
        if ds_config.get(dtype, {}).get("enabled"):
            return dtype
    return "fp32"


def check_same_optimizer_layout(saved: Dict[str, Any], current: Dict[str, Any], where: Path) -> None:
    """DeepSpeed cannot load optimizer state written under another ZeRO stage or weight dtype (it
    fails deep inside with a missing file or key): name the difference and the fix instead."""
    stages = [(saved.get("zero_optimization") or {}).get("stage", 0),
              (current.get("zero_optimization") or {}).get("stage", 0)]
    dtypes = [_weights_dtype(saved), _weights_dtype(current)]
    diffs = []
    if stages[0] != stages[1]:
        diffs.append(f"ZeRO stage: checkpoint {stages[0]} vs config {stages[1]} (use run.zero_stage={stages[0]})")
    if dtypes[0] != dtypes[1]:
        same = {"fp32": "fp32 or bf16-mixed", "bf16": "bf16", "fp16": "fp16"}[dtypes[0]]
        diffs.append(f"weights: checkpoint {dtypes[0]} vs config {dtypes[1]} (use run.precision={same})")
    if diffs:
        raise TrainingError(f"checkpoint {where} holds DeepSpeed optimizer state this run cannot load:\n  "
                            + "\n  ".join(diffs) + "\nresume with the checkpoint's settings, or start a new run "
                            "(--resume none or another --output-dir)")


# --------------------------------------------------------------------------------------------
# Logging: progress bar, TensorBoard, previews
# --------------------------------------------------------------------------------------------

def _drop_logged_steps_after(log: Path, step: int) -> None:
    """Rewrite ``log`` (JSON lines with a "step") without the lines after ``step``, atomically."""
    if not log.is_file():
        return
    lines = log.read_text().splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        tmp = log.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, log)


class RunLogger:
    """Rank-0 progress bar, TensorBoard scalars/images and a JSON-lines metrics file."""

    def __init__(self, output_dir: Path, total_steps: int, start_step: int, enabled: bool, resumed: bool = False):
        self.enabled = enabled
        self.writer = self.bar = self.jsonl = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm

        # Resumed: the steps logged after the checkpoint (before a crash) are about to be run again.
        if resumed:
            _drop_logged_steps_after(output_dir / METRICS_FILE, start_step)
        self.writer = SummaryWriter(str(output_dir / "tb"), purge_step=start_step + 1 if resumed else None)
        self.jsonl = open(output_dir / METRICS_FILE, "a")
        self.bar = tqdm(total=total_steps, initial=start_step, desc="gfm", dynamic_ncols=True,
                        unit="step", mininterval=1.0, file=sys.stderr)

    def step(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def scalars(self, step: int, values: Dict[str, float]) -> None:
        if not self.enabled:
            return
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self.jsonl.flush()
        speed = values.get("perf/images_per_s")  # measured once the warm-up steps are over
        self.bar.set_postfix_str(
            f"loss {values['loss/total']:.4f} rec {values['loss/rec']:.4f} feat {values['loss/feat']:.4f} "
            f"lr {values['lr']:.2e}" + (f" {speed:.1f} img/s" if speed else ""))

    def preview(self, step: int, grid) -> None:
        if self.enabled:
            self.writer.add_image("preview/input_masked_reconstruction", grid, step)

    def message(self, text: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(text)

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            self.writer.close()
            self.jsonl.close()


def preview_grid(images, recon, block_mask, mean, std):
    """Rows of (input | masked input | reconstruction), de-normalised to [0, 1], first 3 channels."""
    import torch
    import torch.nn.functional as F

    mean_t = torch.tensor(mean, device=images.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=images.device).view(1, -1, 1, 1)
    show = lambda x: (x.float() * std_t + mean_t).clamp(0, 1)[:, :3]  # noqa: E731
    pixel_mask = F.interpolate(block_mask[:, None].float(), size=images.shape[-2:], mode="nearest")
    masked = images * (1 - pixel_mask)
    rows = torch.stack([show(images), show(masked), show(recon)], dim=1)  # (N, 3, C, H, W)
    rows = rows.flatten(0, 1)
    n, c, h, w = rows.shape
    grid = rows.view(n // 3, 3, c, h, w).permute(2, 0, 3, 1, 4).reshape(c, (n // 3) * h, 3 * w)
    return grid.cpu()


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------

class _StopRequest:
    """SIGTERM/SIGINT set a flag; the loop saves a checkpoint and exits at the next step boundary."""

    def __init__(self):
        self.signum: Optional[int] = None
        self._previous = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. called from a worker thread)
                pass

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:  # asked twice (e.g. a step stuck on data): stop now, as without us
            self.restore()
            signal.raise_signal(signum)
            return
        self.signum = signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def _all_reduce_flag(flag: bool, device) -> bool:
    """True on every rank when ``flag`` is True on any rank (keeps collectives in lock-step)."""
    import torch
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag else 0.0], device=device)
    if dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def set_math_modes(cfg: TrainConfig, device) -> Callable[[], None]:
    """Process-wide math settings: TF32 tensor cores for fp32 matmuls and convolutions on CUDA.
    Returns what puts the previous settings back (the run's choice must not outlive it: later
    fp32 work in the process, e.g. feature extraction, keeps the user's own)."""
    import torch

    if device.type != "cuda":
        return lambda: None
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    try:
        name, saved_matmul = "allow_tf32", matmul.allow_tf32
        value = cfg.run.tf32
    except RuntimeError:  # the user set torch >= 2.9's fp32_precision, after which allow_tf32 raises
        name, saved_matmul = "fp32_precision", matmul.fp32_precision
        value = "tf32" if cfg.run.tf32 else "ieee"
    saved_cudnn = cudnn.allow_tf32
    setattr(matmul, name, value)
    cudnn.allow_tf32 = cfg.run.tf32

    def restore() -> None:
        setattr(matmul, name, saved_matmul)  # through the API it was read with: mixing them raises
        cudnn.allow_tf32 = saved_cudnn

    return restore


def compile_in_place(*modules) -> None:
    """torch.compile each module in place (``nn.Module.compile``): parameter names, state dicts and
    the module DeepSpeed wraps stay the same, so checkpoints are interchangeable with eager runs.
    The fused ops are torch.library ops with fake kernels, so they sit in the graph as single nodes;
    their backends are imported here, because dynamo cannot trace an import (a graph break per op).
    Static shapes (every batch has the same shape): without ``dynamic=False``, a function compiled
    earlier in the process at another shape (e.g. a fused op's wrapper) makes dynamo recompile
    with symbolic shapes, whose reasoning over the Swin graph runs for many minutes."""
    from gfm_fast.ops import available_backends

    available_backends()
    for module in modules:
        module.compile(dynamic=False)


def export_model(student, path: Path, zero_stage: int, rank: int) -> None:
    """Write the student encoder as safetensors + config (gathered from ZeRO-3 partitions)."""
    import deepspeed

    from gfm_fast.models.io import save_model

    if zero_stage == 3:
        params = list(student.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            if rank == 0:
                save_model(student, str(path))
    elif rank == 0:
        save_model(student, str(path))


def run(cfg: TrainConfig) -> TrainResult:
    import numpy as np
    import torch

    device_hint = "cuda" if (cfg.run.device != "cpu" and torch.cuda.is_available()) else "cpu"
    rank, world_size, local_rank = init_distributed(device_hint)
    device = pick_device(cfg, local_rank)
    precision = resolve_precision(cfg, device.type)
    output_dir = Path(cfg.run.output_dir)
    is_main = rank == 0
    if is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        _write_effective_config(cfg, output_dir)

    # Seeds: the model initialises identically on every rank; data and masks differ per rank.
    torch.manual_seed(cfg.run.seed)
    np.random.seed(cfg.run.seed)

    from gfm_fast.data import make_loader

    loader = make_loader(cfg.data, img_size=cfg.model.student.img_size, in_chans=cfg.model.student.in_chans,
                         mean=cfg.model.mean, std=cfg.model.std, seed=cfg.run.seed, rank=rank,
                         world_size=world_size)
    schedule = make_schedule(cfg, loader.steps_per_epoch, world_size)

    import deepspeed

    from gfm_fast.masking import generate_block_mask
    from gfm_fast.models.pretrainer import GFMPretrainer, param_groups

    pretrainer = GFMPretrainer(cfg.model)
    teacher = pretrainer.teacher.to(device)
    student = pretrainer.student
    restore_math_modes = set_math_modes(cfg, device)
    if cfg.run.compile:
        compile_in_place(student, teacher)
    # torch's AdamW (no DeepSpeed op to compile); its fused multi-tensor kernel on GPU.
    optimizer = torch.optim.AdamW(param_groups(student, cfg.optim.weight_decay), lr=schedule.lr(0),
                                  betas=cfg.optim.betas, eps=cfg.optim.eps, fused=device.type == "cuda")
    ds_config = deepspeed_config(cfg, precision)
    engine, optimizer, _, _ = deepspeed.initialize(model=student, optimizer=optimizer, config=ds_config)
    # The images enter in the weights' dtype; bf16-mixed keeps fp32 weights and lets autocast pick per op.
    compute_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    mask_generator = torch.Generator(device=device).manual_seed(cfg.run.seed * 100_003 + rank)

    checkpoints = Checkpoints(output_dir, cfg.run.keep_last)
    step, epoch, stats = 0, 0, {"bad_steps": 0, "bad_in_row": 0}
    resume_from = resolve_resume(cfg.run.resume, checkpoints)
    if resume_from is not None:
        step, epoch, saved_stats = _restore(engine, resume_from, cfg, ds_config, loader, mask_generator)
        stats.update(saved_stats)
    loader.set_epoch(epoch)

    logger = RunLogger(output_dir, schedule.stop_step, step, is_main, resumed=resume_from is not None)
    already_finished = step >= schedule.stop_step
    if resume_from is not None:
        logger.message(f"resumed from {resume_from} at step {step}")
        if is_main and resume_from.parent.resolve() == checkpoints.root.resolve():
            for moved in checkpoints.set_aside_after(step):
                logger.message(f"newer checkpoint set aside (not deleted): {moved}")
        if already_finished:
            logger.message(f"this run already reached step {step} (stop at {schedule.stop_step}): nothing to do. "
                           f"To train further, raise run.max_steps: with optim.schedule_steps=0 the LR schedule is "
                           f"recomputed for the new length (the LR rises again); optim.schedule_steps={step} keeps "
                           f"the finished one. Or use another --output-dir / --resume none")
    logger.message(f"gfm_fast: {world_size} process(es) on {device.type}, {precision}, ZeRO-{cfg.run.zero_stage}, "
                   f"global batch {schedule.global_batch}, {schedule.stop_step} steps, "
                   f"peak lr {schedule.base_lr:.2e}, output {output_dir}")

    stop = _StopRequest()
    stop.install()
    metrics: Dict[str, float] = {}
    stream = _BatchStream(loader, epoch, device)
    # Block masks on the decoder's grid (one entry per total-stride cell), which the student takes.
    masks = lambda n: pretrainer.decoder_mask(generate_block_mask(  # noqa: E731
        n, cfg.model.student.img_size, block_size=cfg.model.mask_block, ratio=cfg.model.mask_ratio,
        generator=mask_generator, device=device).blocks)
    speed = _Throughput(schedule.global_batch)
    # The loader's epoch, not the stream's: after an epoch's last batch the loader has already moved on.
    client_state = lambda: _client_state(cfg, step, loader.epoch, loader, mask_generator, stats)  # noqa: E731
    export = lambda path: export_model(student, path, cfg.run.zero_stage, rank)  # noqa: E731
    try:
        while step < schedule.stop_step:
            lr = schedule.lr(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            logs = (step + 1) % cfg.run.log_every == 0 or step + 1 == schedule.stop_step
            result = _train_step(engine, teacher, stream, masks, compute_dtype, cfg.optim.grad_accum, device,
                                 measure_grad_norm=logs)
            if result is None:
                _count_bad_step(stats, step, cfg.run.max_bad_steps, logger)
                continue
            stats["bad_in_row"] = 0
            step += 1
            logger.step()
            speed.step()
            if logs:
                metrics = _step_metrics(result, lr, engine, loader, stats, stream, speed)
                logger.scalars(step, metrics)
            if step % cfg.run.preview_every == 0:
                _log_preview(engine, result, compute_dtype, cfg, logger, step)
            stop_now = stop.signum is not None
            if world_size > 1:
                stop_now = _all_reduce_flag(stop_now, device)
            last = step == schedule.stop_step or stop_now
            if step % cfg.run.ckpt_every == 0 or last:
                checkpoints.save(engine, step, client_state(), rank, export=export)
            if last:
                export(output_dir / MODEL_DIR)
            if stop_now:
                logger.message(f"signal {stop.signum}: checkpoint saved at step {step}, stopping")
                # The signal's number (SIGTERM on ranks that only heard of it from another rank).
                metrics["interrupted"] = float(stop.signum or signal.SIGTERM)
                break
        if already_finished:  # the loop had nothing to do
            # A run stopped between its final checkpoint and the export still gets its model/.
            if _all_reduce_flag(not (output_dir / MODEL_DIR / "model.safetensors").is_file(), device):
                export(output_dir / MODEL_DIR)
            metrics = _last_logged_metrics(output_dir)
    finally:
        stop.restore()
        restore_math_modes()
        logger.close()
    metrics["step"] = float(step)
    return TrainResult(str(output_dir), metrics)


def _last_logged_metrics(output_dir: Path) -> Dict[str, float]:
    """The last line of metrics.jsonl (without its step), or {} when there is none."""
    log = output_dir / METRICS_FILE
    lines = log.read_text().splitlines() if log.is_file() else []
    last = json.loads(lines[-1]) if lines else {}
    return {k: float(v) for k, v in last.items() if k != "step" and isinstance(v, (int, float))}


class _BatchStream:
    """Loader batches across epochs (every rank yields the same count), timing the wait for data."""

    def __init__(self, loader, epoch: int, device):
        self.loader, self.epoch, self.device = loader, epoch, device
        self.batches = iter(loader)
        self.wait = 0.0  # seconds spent waiting for the last batch

    def next(self):
        start = time.perf_counter()
        try:
            images = next(self.batches)
        except StopIteration:
            self.epoch += 1
            self.loader.set_epoch(self.epoch)
            self.batches = iter(self.loader)
            images = next(self.batches)
        self.wait = time.perf_counter() - start
        return images.to(self.device, non_blocking=True)


class _Throughput:
    """Images/s over the steps after the warm-up (allocator, autotune), host wall clock."""

    def __init__(self, global_batch: int):
        self.global_batch, self.steps, self.t0, self.images = global_batch, 0, None, 0

    def step(self) -> None:
        self.steps += 1
        if self.steps == WARMUP_STEPS_FOR_THROUGHPUT:
            self.t0 = time.perf_counter()
        elif self.t0 is not None:
            self.images += self.global_batch

    def images_per_s(self) -> Optional[float]:
        return self.images / (time.perf_counter() - self.t0) if self.images else None


@dataclass
class _StepResult:
    sums: Any  # (3,) tensor: loss, loss_rec, loss_feat summed over micro-batches
    micro_batches: int
    wait_s: float  # data-loader wait over the step
    images: Any  # the last micro-batch, its mask and z_t (for previews)
    mask: Any
    z_t: Any
    grad_norm: Any = None  # (,) tensor, where DeepSpeed keeps none (see _grad_norm_before_step)


def _train_step(engine, teacher, stream: _BatchStream, masks: Callable[[int], Any], compute_dtype, grad_accum: int,
                device, measure_grad_norm: bool = False) -> Optional[_StepResult]:
    """One optimizer step over ``grad_accum`` micro-batches; None (nothing applied, the partial
    gradients discarded) when a loss was non-finite."""
    import torch

    sums, wait = torch.zeros(3, device=device), 0.0
    for i in range(grad_accum):
        # The optimizer runs after this step's last micro-batch, whatever DeepSpeed's own
        # micro-step counter says (a skipped step leaves that counter mid-accumulation).
        engine.set_gradient_accumulation_boundary(i == grad_accum - 1)
        images = stream.next()
        wait += stream.wait
        mask = masks(images.shape[0])
        z_t = teacher(images)
        out = engine(images.to(compute_dtype), mask, z_t)
        # Non-finite loss: every rank skips the whole step together (ZeRO collectives stay in
        # step), dropping what its earlier micro-batches accumulated.
        if _all_reduce_flag(not bool(torch.isfinite(out.loss.detach().float())), device):
            _discard_gradients(engine)
            return None
        engine.backward(out.loss)
        grad_norm = _grad_norm_before_step(engine) if measure_grad_norm and i == grad_accum - 1 else None
        engine.step()
        sums += torch.stack([out.loss.detach().float(), out.loss_rec.detach().float(), out.loss_feat.detach().float()])
    return _StepResult(sums, grad_accum, wait, images, mask, z_t, grad_norm)


def _grad_norm_before_step(engine):
    """The gradients' global L2 norm (before clipping) where DeepSpeed records none: ZeRO-0 with
    torch's optimizer in fp32 or bf16-mixed. Elsewhere ``engine.get_global_grad_norm()`` has it."""
    import torch

    if engine.zero_optimization_stage() != 0 or engine.bfloat16_enabled() or engine.fp16_enabled():
        return None
    grads = [p.grad.detach() for p in engine.module.parameters() if p.grad is not None]
    if not grads:
        return None
    norms = torch._foreach_norm(grads)  # one fused pass, as torch.nn.utils.clip_grad_norm_
    return torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))


def _discard_gradients(engine) -> None:
    """Drop every gradient accumulated since the last optimizer step, so the next step starts clean.

    Where DeepSpeed keeps them between micro-batches (checked against deepspeed==0.19.8):
    - ZeRO-0, and ZeRO-1 until its boundary reduction: ``param.grad``, cleared by ``engine.zero_grad()``.
    - ZeRO-3: a flat buffer of reduced gradient partitions that each backward *adds* to while the
      optimizer's ``micro_step_id`` > 0 (stage3.py ``partition_grads``); the optimizer's
      ``zero_grad()`` resets it to 0, so the next step's first micro-batch overwrites the buffer.
    - ZeRO-2 reduces every micro-batch and sums the owned partition in ``all_grad_tensors``
      (stage_1_and_2.py ``independent_gradient_partition_epilogue``); only the optimizer's
      ``step()`` clears that: see ``_reset_zero12_accumulation``.
    """
    engine.zero_grad()
    if engine.zero_optimization():
        engine.optimizer.zero_grad(set_to_none=True)
        if engine.zero_optimization_stage() in (1, 2):
            _reset_zero12_accumulation(engine.optimizer)


def _reset_zero12_accumulation(optimizer) -> None:
    """Forget the gradient partitions a ZeRO-1/2 optimizer summed over this step's micro-batches.

    DeepSpeed internals, because no public call does this: what ``DeepSpeedZeroOptimizer.step()``
    and its overflow branch reset (deepspeed==0.19.8, runtime/zero/stage_1_and_2.py). Recheck on
    a DeepSpeed upgrade; test_non_finite_second_micro_batch_skips_the_whole_step fails if it goes
    stale. CPU offload keeps more state, but ``deepspeed_config`` never enables it.
    """
    from deepspeed.runtime.zero.stage_1_and_2 import INITIAL_MICRO_STEP_ID, DeepSpeedZeroOptimizer

    if not isinstance(optimizer, DeepSpeedZeroOptimizer):  # e.g. BF16_Optimizer: its zero_grad() cleared all
        return
    for group in set(optimizer.all_grad_tensors) | set(optimizer.averaged_gradients):
        optimizer.all_grad_tensors[group] = None
        optimizer.averaged_gradients[group] = None
    optimizer.micro_step_id = INITIAL_MICRO_STEP_ID


def _count_bad_step(stats: Dict[str, int], step: int, max_bad_steps: int, logger) -> None:
    stats["bad_steps"] += 1
    stats["bad_in_row"] += 1
    logger.message(f"step {step}: non-finite loss, step skipped "
                   f"({stats['bad_in_row']} in a row, {stats['bad_steps']} in total)")
    if stats["bad_in_row"] >= max_bad_steps:
        raise TrainingError(f"{stats['bad_in_row']} consecutive non-finite losses at step {step}: "
                            f"lower optim.base_lr, check the data, or raise run.max_bad_steps")


def _step_metrics(result: _StepResult, lr: float, engine, loader, stats, stream, speed) -> Dict[str, float]:
    """The logged scalars (one host sync: the loss sums)."""
    loss, loss_rec, loss_feat = (result.sums / result.micro_batches).tolist()
    metrics = {"loss/total": loss, "loss/rec": loss_rec, "loss/feat": loss_feat, "lr": lr,
               "data/wait_ms": result.wait_s * 1e3, "data/corrupt_samples": float(loader.stats["corrupt_samples"]),
               "train/bad_steps": float(stats["bad_steps"]), "train/epoch": float(stream.epoch)}
    grad_norm = engine.get_global_grad_norm() if result.grad_norm is None else result.grad_norm
    if grad_norm is not None:
        metrics["train/grad_norm"] = float(grad_norm)
    images_per_s = speed.images_per_s()
    if images_per_s is not None:
        metrics["perf/images_per_s"] = images_per_s
    return metrics


def _client_state(cfg, step, epoch, loader, mask_generator, stats) -> Dict[str, Any]:
    """What resume needs beyond DeepSpeed's model/optimizer state: plain data and tensors only."""
    import torch

    return {
        "gfm_step": step,
        "gfm_epoch": epoch,
        "gfm_config": json.dumps(to_dict(cfg)),
        "gfm_loader": json.dumps(_gather_from_ranks(loader.state_dict())),
        # Per-rank RNG states, as byte tensors stacked by rank (ZeRO 0-2 store rank 0's file only).
        "gfm_mask_rng": torch.stack(_gather_from_ranks(mask_generator.get_state().cpu())),
        "gfm_torch_rng": torch.stack(_gather_from_ranks(torch.get_rng_state())),
        "gfm_stats": json.dumps(stats),
    }


def _gather_from_ranks(value: Any) -> List[Any]:
    """Every rank's ``value`` (loader positions and RNG states differ per rank), indexed by rank."""
    import torch.distributed as dist

    values: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def _restore(engine, path: Path, cfg: TrainConfig, ds_config: Dict[str, Any], loader, mask_generator):
    import torch

    saved_cfg = _saved_config(path)
    if saved_cfg is not None:
        check_same_architecture(saved_cfg.get("model", {}), to_dict(cfg)["model"], path)
    saved_ds_config = check_tensors_only(path)
    check_same_optimizer_layout(saved_ds_config, ds_config, path)
    load_path, state = engine.load_checkpoint(str(path.parent), tag=path.name)
    if load_path is None or state is None:
        raise TrainingError(f"could not load the DeepSpeed checkpoint at {path}")
    import torch.distributed as dist

    loader.load_state_dict(json.loads(state["gfm_loader"]))  # picks this rank's entry
    rank, saved_ranks = dist.get_rank(), state["gfm_mask_rng"].shape[0]
    if rank < saved_ranks and dist.get_world_size() == saved_ranks:
        mask_generator.set_state(state["gfm_mask_rng"][rank].clone())
        torch.set_rng_state(state["gfm_torch_rng"][rank].clone())
    else:  # resumed at another world size: fresh, rank- and step-dependent mask stream
        mask_generator.manual_seed(cfg.run.seed * 100_003 + rank + 7919 * int(state["gfm_step"]))
    # The restored position's epoch (older checkpoints saved a stale one); the skipped-step counts.
    saved_stats = {k: int(v) for k, v in json.loads(state.get("gfm_stats", "{}")).items()}
    return int(state["gfm_step"]), loader.epoch, saved_stats


def check_tensors_only(path: Path) -> Dict[str, Any]:
    """Refuse a checkpoint whose files hold anything but tensors and plain data; return the
    DeepSpeed config it was written with (recorded in its model-states file, read in the same pass).

    DeepSpeed unpickles its files without ``weights_only``; reading each one with
    ``weights_only=True`` first (memory-mapped, so cheap) means no code from a tampered file runs.
    Allowed beyond tensors and plain data: DeepSpeed's own state records (no code, just fields).
    """
    import pickle

    import torch
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    deepspeed_records = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]
    ds_config = None
    for file in sorted(path.glob("*.pt")):
        try:
            with torch.serialization.safe_globals(deepspeed_records):
                contents = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError as exc:
            raise TrainingError(f"checkpoint file {file} holds objects other than tensors and plain data; refusing "
                                f"to unpickle it ({str(exc).splitlines()[0]}). Resume from a checkpoint written by "
                                f"gfm_fast, or --resume none") from None
        except (RuntimeError, EOFError, OSError) as exc:
            raise TrainingError(f"checkpoint file {file} is unreadable or truncated ({exc}); resume from an "
                                f"earlier checkpoint (--resume PATH) or --resume none") from None
        if ds_config is None and file.name.endswith("model_states.pt"):
            ds_config = contents.get("ds_config") or {}
    if ds_config is None:
        raise TrainingError(f"checkpoint {path} has no DeepSpeed model-states file; resume from another "
                            f"checkpoint (--resume PATH) or --resume none")
    return ds_config


def _saved_config(path: Path) -> Optional[Dict[str, Any]]:
    """The run config stored beside the checkpoint (written before any tensor file is read)."""
    config_file = path / CONFIG_FILE
    return json.loads(config_file.read_text()) if config_file.is_file() else None


def _write_effective_config(cfg: TrainConfig, output_dir: Path) -> None:
    import yaml

    tmp = output_dir / "config.yaml.tmp"
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    os.replace(tmp, output_dir / "config.yaml")


def _log_preview(engine, result: _StepResult, compute_dtype, cfg, logger, step) -> None:
    """Reconstruction preview; every rank runs the forward (ZeRO-3 gathers are collective)."""
    import torch

    n = min(PREVIEW_IMAGES, result.images.shape[0])
    images, mask = result.images[:n], result.mask[:n]
    with torch.no_grad():
        out = engine(images.to(compute_dtype), mask, result.z_t[:n], return_recon=True)
    logger.preview(step, preview_grid(images, out.recon.float(), mask, cfg.model.mean, cfg.model.std))


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------

def check_paths(cfg: TrainConfig) -> None:
    """Files the run needs exist, before any work starts."""
    weights = cfg.model.teacher_weights
    if weights is not None and not os.path.isfile(weights):
        raise ConfigError(f"model.teacher_weights: {weights} does not exist; pass --teacher-weights PATH (the "
                          f"ImageNet-22k Swin-B checkpoint swin_base_patch4_window7_224_22k.pth, or a timm one), "
                          f"or model.teacher_weights=null for a random teacher (testing only)")


def train(config: Union[None, str, TrainConfig] = None, **overrides: Any) -> TrainResult:
    """Run GFM pretraining from Python; returns the output directory and the final metrics.

    Args:
        config: a TrainConfig, a YAML path, a shipped config name ("tiny", "gfm_swin_base"), or None
            for configs/tiny.yaml.
        **overrides: ``section__key=value`` (e.g. ``run__max_steps=10``), or dotted keys via
            ``**{"run.max_steps": 10}``.
    """
    cfg = build_config(config, _kwarg_overrides(overrides))
    check_paths(cfg)
    return run(cfg)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gfm_fast/train.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help=f"YAML config (default: configs/{DEFAULT_CONFIG})")
    parser.add_argument("--data", help="shards: brace pattern, URLs, or a built shard dir (data.shards)")
    parser.add_argument("--output-dir", help="run directory (run.output_dir)")
    parser.add_argument("--teacher-weights", help="ImageNet-22k Swin-B weights file (model.teacher_weights)")
    parser.add_argument("--max-steps", type=int, help="stop after N optimizer steps (run.max_steps)")
    parser.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), help="DeepSpeed ZeRO stage (run.zero_stage)")
    parser.add_argument("--resume", help="auto | none | PATH (run.resume)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. data.batch_size=16")
    return parser.parse_intermixed_args(argv)  # options and key=value overrides in any order


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    shortcuts = {"data.shards": args.data, "run.output_dir": args.output_dir,
                 "model.teacher_weights": args.teacher_weights, "run.max_steps": args.max_steps,
                 "run.zero_stage": args.zero_stage, "run.resume": args.resume}
    overrides = [f"{k}={v}" for k, v in shortcuts.items() if v is not None] + list(args.overrides)
    try:
        cfg = build_config(args.config, overrides)
        check_paths(cfg)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")
        try:
            result = run(cfg)
        except _user_errors() as exc:  # a message naming the problem and the fix; no traceback needed
            print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
    if result.metrics.get("interrupted"):
        return 128 + int(result.metrics["interrupted"])  # the shell's code for that signal: 143, 130
    return 0
