"""Processes and devices: rank and world size (DeepSpeed's launcher, SLURM's ``srun``, or one
process), the device of each rank, process-wide math modes, and the few collectives the loop uses.
"""
from __future__ import annotations

import contextlib
import os
import re
import socket
from typing import Any, Callable, Dict, List, Mapping, Tuple

from gfm_fast.config import TrainConfig
from gfm_fast.errors import ConfigError

__all__ = ["init_distributed", "dist_backend", "launcher_env", "launcher_variables_restored", "LAUNCHER_VARIABLES",
           "first_slurm_host", "free_port", "pick_device", "set_math_modes", "gather_from_ranks", "max_over_ranks"]


def free_port() -> int:
    """A TCP port nothing on this machine listens on now: a fixed one (29500, say) may be another run's."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM host list (``SLURM_JOB_NODELIST``), e.g. ``gpu[07-09,12],cpu1`` -> ``gpu07``."""
    match = re.match(r"([^,\[]*)(?:\[([^\]]*)\])?([^,]*)", nodelist.strip())
    prefix, ranges, suffix = match.groups() if match else ("", None, "")
    if not prefix and not ranges:
        raise ConfigError(f"cannot read a host from SLURM_JOB_NODELIST={nodelist!r}; set MASTER_ADDR to the "
                          f"first node's address")
    first = ranges.split(",")[0].split("-")[0] if ranges else ""
    return f"{prefix}{first}{suffix}"


def launcher_env(environ: Mapping[str, str]) -> Dict[str, str]:
    """The torch.distributed variables this process lacks, from SLURM or for a single process.

    The DeepSpeed launcher (or torchrun) sets ``RANK`` and friends: then nothing is added. Under
    ``srun`` without a launcher, one task per rank: rank ``SLURM_PROCID``, world size
    ``SLURM_NTASKS``, local rank ``SLURM_LOCALID``, master the job's first node (port
    ``MASTER_PORT`` if set, else one derived from ``SLURM_JOB_ID``, the same in every task). Else
    one process on a free local port, whatever ``MASTER_ADDR`` / ``MASTER_PORT`` the shell exports
    (another run's: a second run on that port fails, an address elsewhere never answers).

    Args:
        environ: the process environment.

    Returns:
        The variables to add (an empty dict under a launcher).
    """
    if "RANK" in environ:
        return {}
    if "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ:
        world = int(environ.get("SLURM_STEP_NUM_TASKS") or environ["SLURM_NTASKS"])  # srun's step, else the job
        env = {"RANK": environ["SLURM_PROCID"], "WORLD_SIZE": str(world),
               "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
               "LOCAL_WORLD_SIZE": environ.get("SLURM_NTASKS_PER_NODE", "").split("(")[0] or str(world)}
        if world > 1:
            nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
            if "MASTER_ADDR" not in environ and not nodelist:
                raise ConfigError("srun without a launcher: set MASTER_ADDR (no SLURM_JOB_NODELIST to read it from)")
            env["MASTER_ADDR"] = environ.get("MASTER_ADDR") or first_slurm_host(nodelist)
            job = int(environ.get("SLURM_JOB_ID", "0"))
            env["MASTER_PORT"] = environ.get("MASTER_PORT") or str(20000 + job % 20000)
            return env
    else:
        env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}
    env["MASTER_ADDR"], env["MASTER_PORT"] = "127.0.0.1", str(free_port())
    return env


LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@contextlib.contextmanager
def launcher_variables_restored():
    """Puts :data:`LAUNCHER_VARIABLES` back as they were once the block ends. ``init_distributed``
    sets them for DeepSpeed; left behind after an in-process run, a process started later (another
    ``train.py``, a benchmark) would take them as its launcher's and fail to open its rendezvous
    on the port this process's store still holds."""
    saved = {key: os.environ.get(key) for key in LAUNCHER_VARIABLES}
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


DIST_BACKENDS = ("nccl", "gloo")


def dist_backend(device_type: str, environ: Mapping[str, str] = os.environ) -> str:
    """gloo on CPU, NCCL on GPU; ``GFM_DIST_BACKEND=gloo|nccl`` overrides (e.g. gloo on a GPU
    machine whose NCCL does not start: one process needs no real communication)."""
    chosen = environ.get("GFM_DIST_BACKEND") or ("gloo" if device_type == "cpu" else "nccl")
    if chosen not in DIST_BACKENDS:
        raise ConfigError(f"GFM_DIST_BACKEND={chosen!r} is not a backend this project runs; use one of "
                          f"{', '.join(DIST_BACKENDS)} or unset it")
    if chosen == "nccl" and device_type == "cpu":
        raise ConfigError("GFM_DIST_BACKEND=nccl needs GPUs, but this run is on the CPU; unset it or use gloo")
    return chosen


def init_distributed(device_type: str) -> Tuple[int, int, int]:
    """Initialise torch.distributed through DeepSpeed, on :func:`dist_backend`'s backend.

    Returns:
        (rank, world size, local rank).
    """
    backend = dist_backend(device_type)
    os.environ.update(launcher_env(os.environ))
    if device_type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import torch.distributed as dist

    if not dist.is_initialized():
        try:
            deepspeed.init_distributed(dist_backend=backend, verbose=False)
        except OSError as exc:  # on CPU DeepSpeed JIT-builds its shm op, by default under ~/.cache
            from torch.utils.cpp_extension import get_default_build_root

            build_root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
            if device_type != "cpu" or not exc.filename or not build_root.startswith(str(exc.filename)):
                raise
            raise ConfigError(f"DeepSpeed builds its CPU communication op in {build_root}, which cannot be "
                              f"created ({exc.strerror}: {exc.filename}); set TORCH_EXTENSIONS_DIR to a "
                              f"writable folder") from None
        if device_type == "cpu":
            _unlink_shm_allreduce_buffer(dist.get_rank())
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))


def shm_allreduce_buffer(rank: int, environ: Mapping[str, str] = os.environ) -> str:
    """The /dev/shm file DeepSpeed's CPU backend creates for ``rank`` when every rank runs on one
    machine (its shm_comm op: ``deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>``)."""
    return (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{environ.get('MASTER_ADDR', '')}_"
            f"{environ.get('MASTER_PORT', '')}_{rank}")


def _unlink_shm_allreduce_buffer(rank: int) -> None:
    """DeepSpeed never removes its CPU all-reduce buffers (66 MB of RAM per rank, named by port):
    each local multi-process CPU run left them in /dev/shm until a reboot, and enough runs filled
    memory. Once every rank has mapped its peers' buffers (they do so inside init_distributed,
    before the barrier), the names can go: the mappings stay valid and the kernel frees the
    memory when the last process exits, however it exits."""
    import deepspeed.comm.comm as ds_comm
    import torch.distributed as dist

    # The op maps buffers only when LOCAL_SIZE is the world size (every rank on this machine): the
    # same answer on every rank, so either all ranks reach the barrier or none does.
    in_use = (getattr(ds_comm.cdb, "shm_comm_op", None) is not None
              and os.environ.get("LOCAL_SIZE") == str(dist.get_world_size()))
    if not in_use:
        return
    dist.barrier()
    try:
        os.unlink(shm_allreduce_buffer(rank))
    except FileNotFoundError:
        pass


def pick_device(cfg: TrainConfig, local_rank: int):
    """This rank's device: GPU ``local_rank`` among the visible ones (``srun --gpus-per-task=1``
    shows each task one GPU), or the CPU."""
    import torch

    if cfg.run.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device=cuda but no GPU is visible; use run.device=auto or cpu")
    if cfg.run.device == "cuda" or (cfg.run.device == "auto" and torch.cuda.is_available()):
        index = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def set_math_modes(cfg: TrainConfig, device) -> Callable[[], None]:
    """Process-wide math settings: TF32 tensor cores for fp32 matmuls and convolutions on CUDA.

    Returns:
        What puts the previous settings back (the run's choice must not outlive it: later fp32
        work in the process, e.g. feature extraction, keeps the user's own).
    """
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


def gather_from_ranks(value: Any) -> List[Any]:
    """Every rank's ``value`` (loader positions and RNG states differ per rank), indexed by rank."""
    import torch.distributed as dist

    values: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def max_over_ranks(values, device) -> List[float]:
    """Each entry of ``values`` (numbers, or a tensor on ``device``) maximised over the ranks, as floats.

    One all-reduce and one read to the host: the loop's only device-to-host sync per step.
    """
    import torch
    import torch.distributed as dist

    t = values.float() if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=torch.float32, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()
