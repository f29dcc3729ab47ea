"""The training run: setup, then one loop of step, log, checkpoint; and the command line around it.

    deepspeed gfm_fast/train.py [--config FILE.yaml] [--data SHARDS] [--output-dir DIR]
        [--teacher-weights FILE] [--student-weights PATH] [--max-steps N] [--zero-stage 0|1|2|3]
        [--resume auto|PATH|none] [section.key=value ...]
    python gfm_fast/train.py ...            # one process, no launcher needed
    srun python gfm_fast/train.py ...       # one task per GPU under SLURM (docs/scaling.md)
    gfm_fast.train("configs/tiny.yaml", run__max_steps=10)   # the same from Python

With no arguments it trains ``configs/tiny.yaml`` on the embedded sample shards (CPU if no GPU).
SIGTERM, SIGINT, SIGUSR1 or SIGHUP saves a checkpoint at the end of the current step and exits
with 128 + the signal's number; ``--resume auto`` (the default) continues from it.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import tarfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from gfm_fast import run_dir
from gfm_fast.config import TrainConfig, apply_overrides, load_config
from gfm_fast.errors import ConfigError, GFMError, TrainingError, exit_status

__all__ = ["TrainResult", "run", "train", "main", "parse_args", "build_config", "resolve_config_path",
           "check_paths", "resume_command"]

CONFIG_DIR = Path(__file__).resolve().parent.parent.parent / "configs"
DEFAULT_CONFIG = "tiny.yaml"
PREVIEW_IMAGES = 4


@dataclass
class TrainResult:
    """The run directory and the last logged metrics (plus ``step``, and ``interrupted``: the signal number)."""

    output_dir: str
    metrics: Dict[str, float] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Configuration and the files a run needs
# --------------------------------------------------------------------------------------------

def resolve_config_path(path: Optional[str]) -> Optional[str]:
    """A config path as given, or a shipped config by name (``tiny``, ``tiny.yaml``) or by its path in
    the repository (``configs/tiny.yaml``, as the docs write it) from any working directory."""
    if path is None:
        return str(CONFIG_DIR / DEFAULT_CONFIG)
    if os.path.exists(path):
        return path
    relative = Path(path)
    if relative.parent == Path(CONFIG_DIR.name):
        relative = Path(relative.name)
    for shipped in (CONFIG_DIR / relative, CONFIG_DIR / f"{relative}.yaml"):
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
    """A validated ``TrainConfig`` from a config object, a YAML path or a shipped name, plus ``key=value`` overrides."""
    if isinstance(config, TrainConfig):
        cfg = apply_overrides(config, overrides or [])
        cfg.validate()
        return cfg
    return load_config(resolve_config_path(config), overrides or [])


def check_paths(cfg: TrainConfig) -> None:
    """The files the run needs exist and are what they should be, before any work starts.

    Shards: the pattern names at least one existing local file (or remote URLs), and the first
    local one is a tar archive (later unreadable shards count as failed shards while training).
    ``data.source_weights`` names sources of the build's manifest. An explicit ``--resume PATH``
    holds a complete checkpoint. The output directory can be made and written (it is not made here).
    A local ``run.eval_data`` exists (its contents are listed when the run starts), and so does a
    ``model.student_weights`` path (read when the run starts).
    """
    problem = _output_dir_problem(Path(cfg.run.output_dir))
    if problem:
        raise ConfigError(f"run.output_dir (--output-dir) {cfg.run.output_dir}: {problem}; choose another one")
    eval_data = cfg.run.eval_data if cfg.run.eval_every > 0 else None
    if eval_data and not _is_remote(eval_data) and not Path(os.path.expanduser(eval_data)).exists():
        raise ConfigError(f"run.eval_data {eval_data} does not exist; pass a labelled folder (root/<class>/<image>) "
                          f"or shards, or run.eval_every=0")
    if cfg.run.resume not in (None, "none", "auto"):
        from gfm_fast.training.checkpoints import resolve_resume

        try:
            resolve_resume(cfg.run.resume, checkpoints=None)  # a path: needs no checkpoints of this run
        except TrainingError as exc:
            raise ConfigError(str(exc)) from None
    student = cfg.model.student_weights
    if student is not None and not os.path.exists(student):
        raise ConfigError(f"model.student_weights (--student-weights): {student} does not exist; pass a GFM release "
                          f"file, a training run or model directory, or model.student_weights=null for a random start")
    weights = cfg.model.teacher_weights
    if weights is not None and not os.path.isfile(weights):
        raise ConfigError(f"model.teacher_weights: {weights} does not exist; pass --teacher-weights PATH (the "
                          f"ImageNet-22k Swin-B checkpoint swin_base_patch4_window7_224_22k.pth, or a timm one), "
                          f"or model.teacher_weights=null for a random teacher (testing only)")
    from gfm_fast.data import resolve_shards

    try:
        shards = resolve_shards(cfg.data.shards)
    except GFMError:
        raise
    except (OSError, ValueError) as exc:
        raise ConfigError(f"data.shards (--data): {exc}") from None
    from gfm_fast.data.shards import acceptance_rates

    acceptance_rates(cfg.data.source_weights, shards.source_counts)  # names the manifest lacks: ConfigError
    first = next((url for url in shards.urls if os.path.isfile(url)), None)
    if first is not None and not tarfile.is_tarfile(first):
        raise ConfigError(f"data.shards (--data): {first} is not a tar archive; pass WebDataset .tar shards (a brace "
                          f"pattern, URLs, or a directory written by `python -m gfm_fast.data build`)")


def _is_remote(spec: str) -> bool:
    """A shard spec that names no local path (a brace pattern, URLs, a pipe: command)."""
    return "{" in spec or "://" in spec or spec.startswith("pipe:")


def _output_dir_problem(path: Path) -> Optional[str]:
    """Why ``path`` cannot become the run directory, or None; its nearest existing ancestor decides."""
    existing = path.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None


def resume_command(output_dir: Path, world_size: int, under_srun: bool = False) -> str:
    """The command that continues this run from its newest checkpoint: its effective config, --resume auto."""
    config = shlex.quote(str(Path(output_dir).resolve() / run_dir.RUN_CONFIG_FILE))
    script = Path(__file__).resolve().parents[1] / "train.py"
    try:  # as the docs write it from the repository root; from anywhere else, where it is
        script = script.relative_to(Path.cwd().resolve())
    except ValueError:
        pass
    args = f"{shlex.quote(str(script))} --config {config} --resume auto"
    if world_size == 1:
        return f"python {args}"
    if under_srun:
        return f"srun python {args}"
    return f"deepspeed <the same launcher options> {args}"


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------

def run(cfg: TrainConfig) -> TrainResult:
    """Train with a validated config (``train`` and ``main`` build one); every rank calls it."""
    from gfm_fast.training.distributed import launcher_variables_restored

    with launcher_variables_restored():
        return _run(cfg)


def _run(cfg: TrainConfig) -> TrainResult:
    import numpy as np
    import torch

    from gfm_fast.data import make_loader
    from gfm_fast.models.io import remove_stale_staging
    from gfm_fast.models.pretrainer import GFMPretrainer
    from gfm_fast.models.pretrainer_io import STUDENT_HEADS, load_student_weights
    from gfm_fast.training.checkpoints import (Checkpoints, client_state, export_model, needs_resharding,
                                               resolve_resume, restore)
    from gfm_fast.training.distributed import init_distributed, max_over_ranks, pick_device, set_math_modes
    from gfm_fast.training.run_log import RunLogger, Throughput, last_logged_metrics, write_effective_config
    from gfm_fast.training.schedule import deepspeed_config, make_schedule, resolve_grad_accum, resolve_precision
    from gfm_fast.training.step import BatchStream, build_engine, train_step
    from gfm_fast.training.stop import StopRequest

    # --- setup: processes, device, data, model, engine, resume (docs/architecture.md)
    under_srun = "RANK" not in os.environ and "SLURM_PROCID" in os.environ  # before init_distributed sets RANK
    rank, world_size, local_rank = init_distributed("cuda" if cfg.run.device != "cpu" and torch.cuda.is_available()
                                                    else "cpu")
    cfg = resolve_grad_accum(cfg, world_size)  # optim.global_batch: the same at any number of ranks
    device = pick_device(cfg, local_rank)
    precision = resolve_precision(cfg, device.type)
    output_dir = Path(cfg.run.output_dir)
    is_main = rank == 0
    if is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        write_effective_config(cfg, output_dir)
        remove_stale_staging(output_dir / run_dir.MODEL_DIR)  # a final save a SIGKILL cut short
    torch.manual_seed(cfg.run.seed)  # the model initialises identically on every rank
    np.random.seed(cfg.run.seed)
    loader = make_loader(cfg.data, img_size=cfg.model.student.img_size, in_chans=cfg.model.student.in_chans,
                         mean=cfg.model.mean, std=cfg.model.std, seed=cfg.run.seed, rank=rank, world_size=world_size)
    schedule = make_schedule(cfg, loader.steps_per_epoch, world_size)
    pretrainer = GFMPretrainer(cfg.model)
    eval_set = _open_eval_set(cfg) if is_main else None  # a bad folder fails now, not after hours
    checkpoints = Checkpoints(output_dir, cfg.run.keep_last)
    resume_from = resolve_resume(cfg.run.resume, checkpoints)
    started_from = None  # the student's starting weights (a resumed run takes its checkpoint's)
    if cfg.model.student_weights is not None and resume_from is None:
        parts = load_student_weights(pretrainer.student, cfg.model.student_weights, cfg.model.teacher_bands)
        kept = " and ".join(part for part in STUDENT_HEADS if part not in parts)
        started_from = (f"student started from {cfg.model.student_weights} ({', '.join(parts)}"
                        + (f"; {kept} as initialised: not in the file, or other shapes)" if kept else ")"))
    restore_math_modes = set_math_modes(cfg, device)
    engine, optimizer = build_engine(cfg, pretrainer, device, precision,
                                     load_universal=needs_resharding(resume_from, world_size))
    mask_generator = torch.Generator(device=device).manual_seed(cfg.run.seed * 100_003 + rank)  # per rank

    step, epoch, stats = 0, 0, {"bad_steps": 0, "bad_in_row": 0}
    if resume_from is not None:
        step, epoch, saved_stats = restore(engine, resume_from, cfg, deepspeed_config(cfg, precision), loader,
                                           mask_generator)
        stats.update(saved_stats)
    loader.set_epoch(epoch)
    logger = RunLogger(output_dir, schedule.stop_step, step, is_main)
    already_finished = step >= schedule.stop_step
    _report_start(logger, checkpoints, resume_from, step, schedule, is_main)
    if started_from is not None:
        logger.message(started_from)
    logger.message(f"gfm_fast: {world_size} process(es) on {device.type}, {precision}, ZeRO-{cfg.run.zero_stage}, "
                   f"global batch {schedule.global_batch} ({cfg.data.batch_size} x {world_size} ranks x "
                   f"{cfg.optim.grad_accum} accumulated), {schedule.stop_step} steps, "
                   f"peak lr {schedule.base_lr:.2e}, output {output_dir}")

    def save() -> Path:  # collective; the loader's epoch, not the stream's (after an epoch's last batch it moved on)
        state = client_state(cfg, step, loader.epoch, loader, mask_generator, stats)
        return checkpoints.save(engine, step, state, rank, export=export)

    def export(path: Path) -> None:
        export_model(pretrainer.student, path, cfg.run.zero_stage, rank)

    stop = StopRequest().install()
    batches = BatchStream(loader, epoch, device)
    speed = Throughput(schedule.global_batch)
    metrics: Dict[str, float] = {}
    saved_step = step if resume_from is not None else None
    # --- the loop: step, log, checkpoint
    try:
        while step < schedule.stop_step:
            lr = schedule.lr(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            evaluates = cfg.run.eval_every > 0 and (step + 1) % cfg.run.eval_every == 0
            logs = (step + 1) % cfg.run.log_every == 0 or step + 1 == schedule.stop_step or evaluates
            result = train_step(engine, pretrainer, batches, cfg.optim.grad_accum, generator=mask_generator,
                                stop_signal=lambda: stop.signum or 0, measure_grad_norm=logs)
            if result.applied:
                stats["bad_in_row"] = 0
                step += 1
                logger.step()
                speed.step()
                if logs:
                    metrics = _metrics(result, engine, lr, loader, stats, batches, speed)
                    if evaluates:
                        metrics.update(_knn_eval(pretrainer, eval_set, cfg.run.zero_stage, is_main))
                    logger.scalars(step, metrics)
                if step % cfg.run.preview_every == 0:
                    _log_preview(pretrainer, engine, result, cfg, logger, step)
            else:
                _count_bad_step(stats, step, cfg.run.max_bad_steps, logger)
            last = step == schedule.stop_step or result.stop
            if (step % cfg.run.ckpt_every == 0 or last) and saved_step != step:
                save()
                saved_step = step
            if last:
                export(output_dir / run_dir.MODEL_DIR)
            if result.stop:
                signum = result.stop  # the same on every rank, also where the signal did not arrive
                metrics["interrupted"] = float(signum)
                saved = checkpoints.root / checkpoints.tag(step)
                logger.message(f"{signal.Signals(signum).name}: saved checkpoint {saved} (step {step}) and "
                               f"{output_dir / run_dir.MODEL_DIR}; exiting with {128 + signum}. Resume with: "
                               f"{resume_command(output_dir, world_size, under_srun)}")
                break
        if already_finished:  # the loop had nothing to do
            # A run stopped between its final checkpoint and the export still gets its model/.
            if max_over_ranks([not (output_dir / run_dir.MODEL_DIR / "model.safetensors").is_file()], device)[0]:
                export(output_dir / run_dir.MODEL_DIR)
            metrics = last_logged_metrics(output_dir)
    finally:
        batches.close()  # stop the loader's workers now, also on errors and a second Ctrl-C
        stop.restore()
        restore_math_modes()
        logger.close()
    metrics["step"] = float(step)
    return TrainResult(str(output_dir), metrics)


def _report_start(logger, checkpoints, resume_from: Optional[Path], step: int, schedule,
                  is_main: bool) -> None:
    """Say where the run resumed; set aside checkpoints newer than the one it resumed from (all of
    them when it starts afresh: an earlier run's would pass for this one's on ``--resume auto``)."""
    if resume_from is not None:
        logger.message(f"resumed from {resume_from} at step {step}")
    if is_main and (resume_from is None or resume_from.parent.resolve() == checkpoints.root.resolve()):
        for moved in checkpoints.set_aside_after(step):
            logger.message(f"newer checkpoint set aside (not deleted): {moved}")
    if resume_from is not None and step >= schedule.stop_step:
        logger.message(f"this run already reached step {step} (stop at {schedule.stop_step}): nothing to do. "
                       f"To train further, raise run.max_steps: with optim.schedule_steps=0 the LR schedule is "
                       f"recomputed for the new length (the LR rises again); optim.schedule_steps={step} keeps "
                       f"the finished one. Or use another --output-dir / --resume none")


def _metrics(result, engine, lr: float, loader, stats: Dict[str, int], batches, speed) -> Dict[str, float]:
    """The logged scalars of a step (one device-to-host read, in ``step_metrics``)."""
    from gfm_fast.training.step import step_metrics

    metrics = step_metrics(result, engine)
    metrics.update({"lr": lr, "data/wait_ms": result.wait_s * 1e3,
                    "data/corrupt_samples": float(loader.stats["corrupt_samples"]),
                    "train/bad_steps": float(stats["bad_steps"]), "train/epoch": float(batches.epoch)})
    images_per_s = speed.images_per_s()
    if images_per_s is not None:
        metrics["perf/images_per_s"] = images_per_s
    return metrics


def _open_eval_set(cfg: TrainConfig):
    """The labelled set of ``run.eval_data``, listed once (None when ``run.eval_every`` is 0)."""
    if cfg.run.eval_every <= 0:
        return None
    from gfm_fast.eval import EvalError, open_dataset

    try:
        return open_dataset(cfg.run.eval_data)
    except EvalError as exc:  # its messages name the eval CLI's --data: say which key this is
        raise ConfigError(f"run.eval_data (the k-NN set of run.eval_every): {exc}") from None


def _knn_eval(pretrainer, eval_set, zero_stage: int, is_main: bool) -> Dict[str, float]:
    """k-NN top-1 of the student encoder on ``run.eval_data`` (rank 0; under ZeRO-3 every rank
    first gathers the partitioned weights, a collective)."""
    import contextlib

    from gfm_fast.eval import knn_accuracy

    encoder = pretrainer.student.encoder
    gather = contextlib.nullcontext()
    if zero_stage == 3:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(list(encoder.parameters()), modifier_rank=None)
    with gather:
        return {"eval/knn_top1": knn_accuracy(encoder, eval_set)} if is_main else {}


def _log_preview(pretrainer, engine, result, cfg: TrainConfig, logger, step: int) -> None:
    """Reconstruction preview of the step's last micro-batch; every rank runs it (ZeRO-3 gathers are collective)."""
    import torch

    from gfm_fast.training.run_log import preview_grid

    n = min(PREVIEW_IMAGES, result.images.shape[0])
    images, mask = result.images[:n], result.mask[:n]
    with torch.no_grad():
        out = pretrainer(images, mask, student=engine, return_recon=True)
    logger.preview(step, preview_grid(images, out.recon.float(), mask, cfg.model.mean, cfg.model.std))


def _count_bad_step(stats: Dict[str, int], step: int, max_bad_steps: int, logger) -> None:
    stats["bad_steps"] += 1
    stats["bad_in_row"] += 1
    logger.message(f"step {step}: non-finite loss, step skipped "
                   f"({stats['bad_in_row']} in a row, {stats['bad_steps']} in total)")
    if stats["bad_in_row"] >= max_bad_steps:
        raise TrainingError(f"{stats['bad_in_row']} consecutive non-finite losses at step {step}: "
                            f"lower optim.base_lr, check the data, or raise run.max_bad_steps")


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------

def train(config: Union[None, str, TrainConfig] = None, **overrides: Any) -> TrainResult:
    """Run GFM pretraining from Python; returns the output directory and the final metrics.

    Args:
        config: a TrainConfig, a YAML path, a shipped config name ("tiny", "gfm_swin_base"), or None
            for configs/tiny.yaml.
        **overrides: ``section__key=value`` (e.g. ``run__max_steps=10``), or dotted keys via
            ``**{"run.max_steps": 10}``.

    Returns:
        ``TrainResult``.
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
    parser.add_argument("--student-weights", help="start the student from these weights: a GFM release, a run, a "
                        "model directory (model.student_weights)")
    parser.add_argument("--max-steps", type=int, help="stop after N optimizer steps (run.max_steps)")
    parser.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), help="DeepSpeed ZeRO stage (run.zero_stage)")
    parser.add_argument("--resume", help="auto | none | PATH (run.resume)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. data.batch_size=16")
    return parser.parse_intermixed_args(argv)  # options and key=value overrides in any order


def main(argv: Optional[List[str]] = None) -> int:
    """The command line: 0 when done, 2 for a problem the user can fix (a bad config or path, a
    checkpoint of another run: one ``error:`` line, no traceback), 128 + the signal's number when a
    signal stopped the run."""
    args = parse_args(argv)
    shortcuts = {"data.shards": args.data, "run.output_dir": args.output_dir,
                 "model.teacher_weights": args.teacher_weights, "model.student_weights": args.student_weights,
                 "run.max_steps": args.max_steps,
                 "run.zero_stage": args.zero_stage, "run.resume": args.resume}
    overrides = [f"{k}={v}" for k, v in shortcuts.items() if v is not None] + list(args.overrides)
    if args.resume is not None:  # --resume wins over a run.resume=... given among the overrides
        overrides.append(f"run.resume={args.resume}")

    def work() -> int:
        cfg = build_config(args.config, overrides)
        check_paths(cfg)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")
            result = run(cfg)
        interrupted = result.metrics.get("interrupted")  # the shell's code for that signal: 143, 130, 138
        return 128 + int(interrupted) if interrupted else 0

    # GFMError only: an OSError in the middle of training keeps its traceback, for a bug report
    return exit_status(work, (GFMError,))
