"""The layout of a training run's output directory: one owner for every name in it.

    <output_dir>/
      config.yaml                    the effective config of the run
      metrics.jsonl                  one JSON line per logged step
      tb/                            TensorBoard events
      model/                         the final student encoder (``save_model``)
      checkpoints/
        latest                       DeepSpeed's pointer: the newest complete tag
        step_XXXXXXXX/               DeepSpeed files + gfm_config.json + model/ + COMPLETE
        abandoned/                   newer checkpoints set aside by a resume from an older one
        .universal/                  a checkpoint converted for another world size, while a resume loads it

A checkpoint counts only once its ``COMPLETE`` marker exists; readers find the newest one by its
marker (``newest_complete``), and the writer keeps ``latest`` naming it (``write_latest``), also
after checkpoints move. Training (``gfm_fast.training``) writes this layout, ``gfm_fast.models.io``
reads it. Torch-free, so that either side (and tools) can import it cheaply.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

__all__ = ["RUN_CONFIG_FILE", "METRICS_FILE", "TENSORBOARD_DIR", "MODEL_DIR", "CHECKPOINT_DIR", "LATEST_FILE",
           "COMPLETE_MARKER", "CHECKPOINT_CONFIG_FILE", "ABANDONED_DIR", "UNIVERSAL_DIR", "checkpoint_tag",
           "tag_step", "complete_tags", "newest_complete", "checkpoint_roots", "write_latest"]

RUN_CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tb"
MODEL_DIR = "model"  # the exported encoder, in the run directory and in each checkpoint
CHECKPOINT_DIR = "checkpoints"
LATEST_FILE = "latest"  # DeepSpeed's convention (its own tools read it)
COMPLETE_MARKER = "COMPLETE"
CHECKPOINT_CONFIG_FILE = "gfm_config.json"  # the run config beside each checkpoint's tensors
ABANDONED_DIR = "abandoned"  # under checkpoints/
UNIVERSAL_DIR = ".universal"  # under checkpoints/, only while a resume at another world size loads from it

_TAG_PREFIX = "step_"


def checkpoint_tag(step: int) -> str:
    """The checkpoint directory name of optimizer step ``step`` (sorts by step)."""
    return f"{_TAG_PREFIX}{step:08d}"


def tag_step(tag: str) -> Optional[int]:
    """The step of a ``checkpoint_tag`` name; None for any other name."""
    digits = tag[len(_TAG_PREFIX):]
    return int(digits) if tag.startswith(_TAG_PREFIX) and digits.isdigit() else None


def complete_tags(root: Path) -> List[str]:
    """The complete checkpoint tags directly under ``root`` (a checkpoints directory), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    tags = [p.name for p in root.iterdir() if tag_step(p.name) is not None and (p / COMPLETE_MARKER).is_file()]
    return sorted(tags, key=tag_step)


def checkpoint_roots(path: Path) -> List[Path]:
    """Where checkpoints of ``path`` may lie: a run directory's ``checkpoints/``, or ``path`` itself."""
    path = Path(path)
    return [path / CHECKPOINT_DIR, path]


def newest_complete(path: Path) -> Optional[Path]:
    """The newest complete checkpoint of a run directory or a checkpoints directory, or None."""
    for root in checkpoint_roots(path):
        tags = complete_tags(root)
        if tags:
            return root / tags[-1]
    return None


def write_latest(root: Path) -> None:
    """Point ``root/latest`` at the newest complete checkpoint (atomically), or remove it if none."""
    root = Path(root)
    latest = root / LATEST_FILE
    tags = complete_tags(root)
    if not tags:
        if latest.exists():
            latest.unlink()
        return
    tmp = latest.with_name(f".{LATEST_FILE}.tmp")
    tmp.write_text(tags[-1])
    os.replace(tmp, latest)
