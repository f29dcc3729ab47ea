"""Checkpoints of a run: written complete or not at all, resumed exactly, refused by name when they do not fit.

The names of the run directory live in ``gfm_fast.run_dir``. A checkpoint is DeepSpeed's files
(model, optimizer) plus the client state below (step, loader positions, RNG states, skipped-step
counts), the run config and the exported encoder; its ``COMPLETE`` marker is written last.
A ZeRO checkpoint resumed by another number of ranks is converted to DeepSpeed's universal layout first
(``needs_resharding``, ``reshard``).
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from gfm_fast import run_dir
from gfm_fast.config import TrainConfig, to_dict
from gfm_fast.errors import TrainingError
from gfm_fast.training.distributed import gather_from_ranks

__all__ = ["Checkpoints", "resolve_resume", "check_same_architecture", "check_same_optimizer_layout",
           "check_tensors_only", "needs_resharding", "reshard", "global_batch_change", "client_state", "restore",
           "export_model"]


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
    """DeepSpeed checkpoints under ``<output>/checkpoints/step_XXXXXXXX``, the newest ``keep_last`` kept.

    A tag counts only once its ``COMPLETE`` marker exists; the marker is written by rank 0 after
    every rank has finished ``save_checkpoint`` (a barrier), so an interrupted save never shadows
    the last good checkpoint. ``latest()`` picks the newest complete tag.

    Args:
        output_dir: the run directory.
        keep_last: complete checkpoints to keep.
    """

    def __init__(self, output_dir: Path, keep_last: int):
        self.root = Path(output_dir) / run_dir.CHECKPOINT_DIR
        self.keep_last = keep_last

    tag = staticmethod(run_dir.checkpoint_tag)

    def complete_tags(self, root: Optional[Path] = None) -> List[str]:
        return run_dir.complete_tags(root or self.root)

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
            export(target / run_dir.MODEL_DIR)
        dist.barrier()
        if rank == 0:
            (target / run_dir.CHECKPOINT_CONFIG_FILE).write_text(client_state["gfm_config"])
            _fsync_tree(target)  # the tensors are on disk before the marker says so (power loss)
            marker = target / run_dir.COMPLETE_MARKER
            tmp = marker.with_suffix(".tmp")
            tmp.write_text(json.dumps({"step": step, "time": time.time()}))
            os.replace(tmp, marker)
            _fsync_path(target)  # the marker is durable before pruning removes older checkpoints
            self._prune(step)
            run_dir.write_latest(self.root)
        dist.barrier()
        return target

    def set_aside_after(self, step: int) -> List[Path]:
        """Move this run's complete checkpoints newer than ``step`` (left by a run that went further
        before this one resumed from an older checkpoint) to ``checkpoints/abandoned/``: otherwise
        they would pass for the newest on the next ``--resume auto``, and pruning by step would
        delete the checkpoints this run writes. Kept, not deleted; ``latest`` then names the newest
        remaining one. Rank 0 only."""
        moved = []
        for tag in self.complete_tags():
            if run_dir.tag_step(tag) > step:
                dest = self.root / run_dir.ABANDONED_DIR / tag
                if dest.exists():
                    dest = dest.with_name(f"{tag}.{time.strftime('%Y%m%d-%H%M%S')}")
                dest.parent.mkdir(exist_ok=True)
                os.rename(self.root / tag, dest)
                moved.append(dest)
        if moved:
            run_dir.write_latest(self.root)
        return moved

    def _prune(self, saved_step: int) -> None:
        """Keep the newest ``keep_last`` complete checkpoints, and remove the incomplete ones before
        ``saved_step``: saves a kill cut short (a scheduler's SIGKILL after its grace period lands
        mid-save), GBs each, which no run will complete or replace once this one has passed them."""
        tags = self.complete_tags()
        for old in tags[: max(0, len(tags) - self.keep_last)]:
            shutil.rmtree(self.root / old, ignore_errors=True)
        for path in self.root.iterdir():
            step = run_dir.tag_step(path.name)
            if step is not None and step < saved_step and not (path / run_dir.COMPLETE_MARKER).is_file():
                shutil.rmtree(path, ignore_errors=True)
        shutil.rmtree(self.root / run_dir.UNIVERSAL_DIR, ignore_errors=True)  # a conversion a kill left (``reshard``)


def resolve_resume(spec: Optional[str], checkpoints: Checkpoints) -> Optional[Path]:
    """``auto``: newest complete checkpoint of this run (or none); ``none`` (or None: an override
    ``run.resume=none`` parses as null); or an explicit path (a checkpoint, a run or a checkpoints directory)."""
    if spec is None or spec == "none":
        return None
    if spec == "auto":
        return checkpoints.latest()
    path = Path(spec)
    if (path / run_dir.COMPLETE_MARKER).is_file():
        return path
    newest = run_dir.newest_complete(path)
    if newest is not None:
        return newest
    raise TrainingError(f"--resume {spec}: no complete checkpoint there (a checkpoint directory has a "
                        f"{run_dir.COMPLETE_MARKER} marker); use --resume auto or --resume none")


def check_same_architecture(saved: Dict[str, Any], current: Dict[str, Any], where: Path) -> None:
    """A checkpoint from another model config is a clear error naming each key that differs."""
    diffs = [diff for key in ("student", "teacher", "mask_block", "teacher_bands")
             for diff in _differences(f"model.{key}", saved.get(key), current.get(key))]
    if diffs:
        raise TrainingError(f"checkpoint {where} was trained with a different architecture ({'; '.join(diffs)}); "
                            f"use the config it was trained with, or --resume none to start afresh")


def _differences(key: str, saved: Any, current: Any) -> List[str]:
    """``key: checkpoint X vs config Y`` for each differing value, per field of a section (``model.student``)."""
    if isinstance(saved, dict) and isinstance(current, dict):
        return [diff for name in sorted(set(saved) | set(current))
                for diff in _differences(f"{key}.{name}", saved.get(name), current.get(name))]
    return [] if saved == current else [f"{key}: checkpoint {saved!r} vs config {current!r}"]


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
        raise TrainingError(f"checkpoint {where} holds DeepSpeed optimizer state this run cannot load "
                            f"({'; '.join(diffs)}); resume with the checkpoint's settings, or start a new run "
                            "(--resume none or another --output-dir)")


def check_tensors_only(path: Path) -> Dict[str, Any]:
    """Refuse a checkpoint whose files hold anything but tensors and plain data; return the
    DeepSpeed config it was written with (recorded in its model-states file, read in the same pass).

    DeepSpeed unpickles its files without ``weights_only``; reading each one with
    ``weights_only=True`` first (memory-mapped, so cheap) means no code from a tampered file runs.
    Allowed beyond tensors and plain data: DeepSpeed's own state records (no code, just fields).
    """
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


def optimizer_partitions(path: Path) -> int:
    """How many data-parallel ranks the checkpoint's optimizer state is split over: one file each under
    ZeRO >= 1; 0 where it is whole (ZeRO-0 keeps it in the model-states file, readable at any world size)."""
    return len(list(Path(path).glob("*zero_pp_rank_*_optim_states.pt")))


def needs_resharding(path: Optional[Path], world_size: int) -> bool:
    """Whether resuming ``path`` with ``world_size`` ranks needs its ZeRO state converted (``reshard``)
    and the engine built to load the universal layout (``build_engine(load_universal=True)``)."""
    return path is not None and optimizer_partitions(path) not in (0, world_size)


def reshard(path: Path, rank: int, out: Path) -> Path:
    """Convert the ZeRO checkpoint at ``path``, written by another number of ranks, to DeepSpeed's
    universal layout (each parameter's weights and Adam moments whole) in ``out``, which an engine
    built with ``checkpoint.load_universal`` loads at any world size. ``out`` is in this run's own
    directory: ``path`` may be another run's, read-only. Collective: rank 0 converts, with
    DeepSpeed's ``ds_to_universal`` in a subprocess (it forks worker pools), while the other ranks
    wait (up to DeepSpeed's process-group timeout: DEEPSPEED_TIMEOUT minutes, 10); every rank
    returns ``out`` to pass to ``engine.load_checkpoint``, which ``restore`` removes after loading."""
    import torch.distributed as dist

    error = None
    if rank == 0:
        shutil.rmtree(out, ignore_errors=True)
        written_by, now = optimizer_partitions(path), dist.get_world_size()
        print(f"gfm_fast: {path} was written by {written_by} ranks, this run has {now}: converting its ZeRO "
              f"state to DeepSpeed's universal layout in {out}", file=sys.stderr, flush=True)
        # --inject_missing_state: the universal-checkpoint record DeepSpeed's converter asks for; ours
        # have none (no tensor or pipeline parallelism to describe).
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(path),
               "--output_folder", str(out / path.name), "--inject_missing_state"]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode != 0:
            tail = " | ".join(line.strip() for line in proc.stdout.strip().splitlines()[-3:])
            error = (f"could not convert checkpoint {path} for {now} ranks (DeepSpeed's "
                     f"ds_to_universal: {tail}); resume with the {written_by} ranks that wrote it")
    error = gather_from_ranks(error)[0]  # every rank learns rank 0's outcome, so none waits forever
    if error is not None:
        raise TrainingError(error)
    return out


def _load_universal(engine, root: Path, tag: str):
    """``engine.load_checkpoint`` of a universal checkpoint, mended where DeepSpeed's ZeRO-3 loader
    (0.19) goes wrong: it gives every param group group 0's hyperparameters (the no-decay group
    would decay) and one ``step`` tensor shared by every group, which AdamW then advances once per
    group and step, so its bias correction runs ahead. The freshly built groups' hyperparameters
    are this run's config; the Adam moments and step count come from the checkpoint."""
    import torch

    base = getattr(engine.optimizer, "optimizer", engine.optimizer)  # torch's AdamW inside DeepSpeed's wrapper
    hyperparameters = [{k: v for k, v in group.items() if k != "params"} for group in base.param_groups]
    loaded = engine.load_checkpoint(str(root), tag=tag)
    for group, own in zip(base.param_groups, hyperparameters):
        group.update(own)
    for state in base.state.values():
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = state["step"].clone()
    return loaded


def global_batch_change(saved_cfg: Optional[Dict[str, Any]], saved_ranks: int, cfg: TrainConfig,
                        world_size: int) -> Optional[str]:
    """What a resume at another global batch (ranks x batch x accumulation) changes, and the
    setting that keeps the checkpoint's; None when it is the same (or the checkpoint does not say)."""
    if saved_cfg is None:
        return None
    batch, accum = saved_cfg["data"]["batch_size"], saved_cfg["optim"]["grad_accum"]
    saved = saved_ranks * batch * accum
    now = world_size * cfg.data.batch_size * cfg.optim.grad_accum
    if saved == now:
        return None
    per_accum = world_size * cfg.data.batch_size
    keep = (f"optim.grad_accum={saved // per_accum} (or optim.global_batch={saved})" if saved % per_accum == 0
            else f"data.batch_size and optim.grad_accum with ranks x batch x accumulation = {saved}")
    return (f"the checkpoint's run trained at global batch {saved} ({saved_ranks} ranks x {batch} x accumulation "
            f"{accum}), this one at {now} ({world_size} x {cfg.data.batch_size} x {cfg.optim.grad_accum}): the "
            f"learning rate and schedule follow the new batch. To keep the checkpoint's, set {keep}")


def client_state(cfg: TrainConfig, step: int, epoch: int, loader, mask_generator,
                 stats: Dict[str, int]) -> Dict[str, Any]:
    """What resume needs beyond DeepSpeed's model/optimizer state: plain data and tensors only.
    Collective (gathers every rank's loader position and RNG states)."""
    import torch

    return {
        "gfm_step": step,
        "gfm_epoch": epoch,
        "gfm_config": json.dumps(to_dict(cfg)),
        "gfm_loader": json.dumps(gather_from_ranks(loader.state_dict())),
        # Per-rank RNG states, as byte tensors stacked by rank (ZeRO 0-2 store rank 0's file only).
        "gfm_mask_rng": torch.stack(gather_from_ranks(mask_generator.get_state().cpu())),
        "gfm_torch_rng": torch.stack(gather_from_ranks(torch.get_rng_state())),
        "gfm_stats": json.dumps(stats),
    }


def _saved_config(path: Path) -> Optional[Dict[str, Any]]:
    """The run config stored beside the checkpoint (read before any tensor file is)."""
    config_file = path / run_dir.CHECKPOINT_CONFIG_FILE
    return json.loads(config_file.read_text()) if config_file.is_file() else None


def restore(engine, path: Path, cfg: TrainConfig, ds_config: Dict[str, Any], loader,
            mask_generator) -> Tuple[int, int, Dict[str, int]]:
    """Load the checkpoint at ``path`` into the engine, loader and mask RNG, after checking it fits.
    ZeRO state written by another number of ranks is converted first (``reshard``): build the engine
    with ``load_universal=needs_resharding(path, world_size)``. Collective.

    Returns:
        (step, epoch, skipped-step counts) of the checkpoint.
    """
    import torch
    import torch.distributed as dist

    saved_cfg = _saved_config(path)
    if saved_cfg is not None:
        check_same_architecture(saved_cfg.get("model", {}), to_dict(cfg)["model"], path)
    saved_ds_config = check_tensors_only(path)
    check_same_optimizer_layout(saved_ds_config, ds_config, path)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    resharded = engine.load_universal_checkpoint()  # built so by needs_resharding
    if resharded:
        load_root = reshard(path, rank, Path(cfg.run.output_dir) / run_dir.CHECKPOINT_DIR / run_dir.UNIVERSAL_DIR)
        load_path, state = _load_universal(engine, load_root, path.name)
        dist.barrier()  # every rank has read it
        if rank == 0:
            shutil.rmtree(load_root, ignore_errors=True)
    else:
        load_path, state = engine.load_checkpoint(str(path.parent), tag=path.name)
    if load_path is None or state is None:
        raise TrainingError(f"could not load the DeepSpeed checkpoint at {path}")
    loader.load_state_dict(json.loads(state["gfm_loader"]))  # picks this rank's entry
    saved_ranks = state["gfm_mask_rng"].shape[0]
    change = global_batch_change(saved_cfg, saved_ranks, cfg, world_size)
    if change is not None and rank == 0:
        warnings.warn(change, stacklevel=2)
    if rank < saved_ranks and world_size == saved_ranks:
        mask_generator.set_state(state["gfm_mask_rng"][rank].clone())
        torch.set_rng_state(state["gfm_torch_rng"][rank].clone())
    else:  # resumed at another world size: fresh, rank- and step-dependent mask stream
        mask_generator.manual_seed(cfg.run.seed * 100_003 + rank + 7919 * int(state["gfm_step"]))
    # The restored position's epoch (older checkpoints saved a stale one); the skipped-step counts.
    saved_stats = {k: int(v) for k, v in json.loads(state.get("gfm_stats", "{}")).items()}
    return int(state["gfm_step"]), loader.epoch, saved_stats


def export_model(student, path: Path, zero_stage: int, rank: int) -> None:
    """Write the student encoder as safetensors + config (gathered from ZeRO-3 partitions). Collective."""
    import deepspeed

    from gfm_fast.models.io import save_model

    if zero_stage == 3:
        params = list(student.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            if rank == 0:
                save_model(student, str(path))
    elif rank == 0:
        save_model(student, str(path))
