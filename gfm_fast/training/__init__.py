"""GFM continual pretraining with DeepSpeed: the training run behind ``gfm_fast/train.py``.

One file per concern (docs/architecture.md):

- ``loop``: ``run`` (setup, then one loop of step, log, checkpoint), ``train`` (from Python),
  ``main`` (the command line).
- ``step``: ``build_engine`` (DeepSpeed around the student only) and ``train_step`` (one optimizer
  step through ``GFMPretrainer.forward``), as the throughput benchmark and the tests use them.
- ``schedule``: LR schedule, precision, the DeepSpeed config.
- ``distributed``: ranks (launcher, SLURM or one process), devices, math modes, collectives.
- ``checkpoints``: complete-or-absent checkpoints, resume (at another world size too), and the
  checks that refuse one that does not fit; the run directory's names live in ``gfm_fast.run_dir``.
- ``run_log``: progress bar, TensorBoard, ``metrics.jsonl``, previews, images/s.
- ``stop``: SIGTERM / SIGINT / SIGUSR1 / SIGHUP as a save-and-stop request.
"""
from __future__ import annotations

from typing import Any

from gfm_fast.errors import TrainingError
from gfm_fast.run_dir import ABANDONED_DIR, CHECKPOINT_DIR, COMPLETE_MARKER, METRICS_FILE, MODEL_DIR
from gfm_fast.run_dir import CHECKPOINT_CONFIG_FILE as CONFIG_FILE
from gfm_fast.training.checkpoints import (Checkpoints, check_same_architecture, check_same_optimizer_layout,
                                           check_tensors_only, export_model, resolve_resume)
from gfm_fast.training.distributed import init_distributed, pick_device, set_math_modes
from gfm_fast.training.loop import (TrainResult, build_config, check_paths, main, parse_args, resolve_config_path,
                                    run, train)
from gfm_fast.training.run_log import RunLogger, preview_grid
from gfm_fast.training.schedule import Schedule, deepspeed_config, lr_at, make_schedule, resolve_precision
from gfm_fast.training.step import build_engine, train_step
from gfm_fast.training.stop import StopRequest

_StopRequest = StopRequest  # the name before the split

__all__ = ["train", "run", "main", "parse_args", "TrainResult", "build_config", "resolve_config_path", "check_paths",
           "build_engine", "train_step", "lr_at", "Schedule", "make_schedule", "resolve_precision",
           "deepspeed_config", "init_distributed", "pick_device", "set_math_modes", "Checkpoints", "resolve_resume",
           "check_same_architecture", "check_same_optimizer_layout", "check_tensors_only", "export_model",
           "RunLogger", "preview_grid", "StopRequest", "TrainingError", "compile_in_place", "COMPLETE_MARKER",
           "CHECKPOINT_DIR", "CONFIG_FILE", "MODEL_DIR", "METRICS_FILE", "ABANDONED_DIR"]


def __getattr__(name: str) -> Any:
    if name == "compile_in_place":  # moved beside the models; imported on use (it loads torch and timm)
        from gfm_fast.models.compile import compile_in_place

        return compile_in_place
    raise AttributeError(f"module 'gfm_fast.training' has no attribute {name!r}")
