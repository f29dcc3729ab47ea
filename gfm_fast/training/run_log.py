"""What a run reports: rank 0's progress bar, TensorBoard scalars and previews, ``metrics.jsonl``, images/s.

Logging reads values back from the device once per log interval (``step.step_metrics``), never per step.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Dict, Optional

from gfm_fast import run_dir
from gfm_fast.config import TrainConfig, to_dict

__all__ = ["RunLogger", "preview_grid", "Throughput", "last_logged_metrics", "write_effective_config"]

WARMUP_STEPS_FOR_THROUGHPUT = 5  # skip allocator/autotune warm-up when measuring images/s (nanoGPT)


def _logged_step(line: str) -> Optional[int]:
    """The step of a metrics.jsonl line; None for a line a crash tore (a power loss, a full disk)."""
    try:
        return json.loads(line).get("step", 0)
    except ValueError:
        return None


def _drop_logged_steps_after(log: Path, step: int) -> None:
    """Rewrite ``log`` (JSON lines with a "step") without the lines after ``step`` or torn ones, atomically."""
    if not log.is_file():
        return
    lines = log.read_text(errors="replace").splitlines()
    logged = [_logged_step(line) for line in lines]
    kept = [line for line, at in zip(lines, logged) if at is not None and at <= step]
    if len(kept) != len(lines):
        tmp = log.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, log)


class RunLogger:
    """Rank-0 progress bar, TensorBoard scalars/images and a JSON-lines metrics file.

    Args:
        output_dir: the run directory.
        total_steps: the step the run stops at (the bar's end).
        start_step: the step the run starts from.
        enabled: False on every rank but 0 (all calls then do nothing).

    Steps logged after ``start_step`` (by a run that crashed after its checkpoint, or before its
    first one) are about to be run again, so they leave the log and TensorBoard.
    """

    def __init__(self, output_dir: Path, total_steps: int, start_step: int, enabled: bool):
        self.enabled = enabled
        self.writer = self.bar = self.jsonl = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm

        _drop_logged_steps_after(output_dir / run_dir.METRICS_FILE, start_step)
        self.writer = SummaryWriter(str(output_dir / run_dir.TENSORBOARD_DIR), purge_step=start_step + 1)
        self.jsonl = open(output_dir / run_dir.METRICS_FILE, "a")
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
    """Rows of (input | masked input | reconstruction), de-normalised to [0, 1], first 3 channels.

    Args:
        images: normalised inputs (N, C, H, W).
        recon: reconstructions (N, C, H, W).
        block_mask: (N, h, w) block mask at any grid dividing (H, W).
        mean: per-channel mean used to normalise.
        std: per-channel std used to normalise.

    Returns:
        A (3, N * H, 3 * W) image tensor on the CPU.
    """
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


class Throughput:
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


def last_logged_metrics(output_dir: Path) -> Dict[str, float]:
    """The last line of metrics.jsonl (without its step), or {} when there is none."""
    log = output_dir / run_dir.METRICS_FILE
    lines = log.read_text().splitlines() if log.is_file() else []
    last = json.loads(lines[-1]) if lines else {}
    return {k: float(v) for k, v in last.items() if k != "step" and isinstance(v, (int, float))}


def write_effective_config(cfg: TrainConfig, output_dir: Path) -> None:
    """``config.yaml``: the run's config after defaults and overrides (atomically)."""
    import yaml

    target = output_dir / run_dir.RUN_CONFIG_FILE
    tmp = target.with_suffix(".yaml.tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    os.replace(tmp, target)
