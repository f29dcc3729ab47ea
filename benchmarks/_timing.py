"""The one timer for every benchmark: warm-up discarded, then N timed runs; median with p20/p80.

CUDA runs are timed with CUDA events around each call; CPU runs with a synchronised wall clock.
Peak memory is the CUDA allocator's peak on GPU, and the peak of torch's CPU allocations
(profiler memory events) on CPU, both relative to the memory live before the call.
"""
from __future__ import annotations

import contextlib
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional

import torch


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    runs: int

    def as_dict(self) -> Dict[str, float]:
        return asdict(self)


def _quantile(values: List[float], q: float) -> float:
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo, hi = int(pos), min(int(pos) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], *, device: torch.device, warmup: int = 3, runs: int = 10,
            setup: Optional[Callable[[], None]] = None) -> Timing:
    """Time ``fn()`` (``setup()`` runs untimed before each call, e.g. zeroing grads)."""
    for _ in range(warmup):
        if setup:
            setup()
        fn()
    _sync(device)
    samples = []
    for _ in range(runs):
        if setup:
            setup()
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return Timing(statistics.median(samples), _quantile(samples, 0.2), _quantile(samples, 0.8), runs)


COPY_BUFFER_BYTES = 1 << 30  # large enough to leave every cache behind


def copy_bandwidth(device: torch.device, nbytes: int = COPY_BUFFER_BYTES, runs: int = 10) -> float:
    """The device's achievable memory bandwidth in bytes/s: a device-to-device copy, counting the
    bytes read and written. The yardstick of the bandwidth-bound ops' "fraction of bandwidth"."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    timing = time_fn(lambda: dst.copy_(src), device=device, warmup=2, runs=runs)
    return 2 * nbytes / (timing.median_ms / 1e3)


@contextlib.contextmanager
def _native_stderr_silenced():
    """Kineto writes "profiler_start/stop" lines (and, on a CUDA build with no GPU, a
    gpuGetDeviceCount ERROR) straight to fd 2 on every profiler session, whatever its log level:
    dozens of lines that bury the table. Python-level errors still reach stderr after the block."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_memory_bytes(fn: Callable[[], object], *, device: torch.device) -> int:
    """Peak bytes allocated by torch during ``fn()`` above what was live before it."""
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return int(torch.cuda.max_memory_allocated(device) - base)
    from torch.profiler import ProfilerActivity, profile

    with _native_stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # The raw allocator records: prof.events() folds allocations made inside an op into that op
    # and only lists the rest as "[memory]", so it cannot give a peak.
    records = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]" and str(e.device_type()) == "DeviceType.CPU")
    live, peak = 0, 0
    for _, nbytes in records:  # +bytes on alloc, -bytes on free
        live += nbytes
        peak = max(peak, live)
    return int(peak)


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=False,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        return ""


def _cpu_model() -> str:
    """This CPU's model name, from /proc/cpuinfo where there is one."""
    try:
        lines = open("/proc/cpuinfo").read().splitlines()
    except OSError:
        return platform.processor() or "cpu"
    fields = {key.strip(): value.strip() for key, value in (line.split(":", 1) for line in lines if ":" in line)}
    return fields.get("model name", platform.processor() or "cpu")


def environment(device: torch.device) -> Dict[str, object]:
    """What produced a number: device, versions, threads, git sha (``+dirty`` when the working tree
    had uncommitted changes outside benchmarks/results, so the sha alone does not name the code that ran)."""
    sha = _git("rev-parse", "--short", "HEAD")
    if sha and _git("status", "--porcelain", "--untracked-files=no", "--", ":(top)", ":(top,exclude)benchmarks/results"):
        sha += "+dirty"
    from gfm_fast.ops.widened_linear import cpu_has_bf16_matmul

    info: Dict[str, object] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_model(),
        # without AVX512-BF16/AMX (x86) torch's bf16 GEMMs are emulated, slower than fp32 (gfm_fast.models.linear)
        "cpu_bf16_instructions": cpu_has_bf16_matmul(),
        "device_type": device.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpu_threads": torch.get_num_threads(),
        "git_sha": sha,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def print_table(records: List[Dict], columns: List[str]) -> None:
    """A readable fixed-width table of ``records`` (missing values as '-'; ``peak_bytes`` in MiB).
    A column no record has (e.g. the CUDA-only bandwidth_fraction on a CPU) is left out."""
    def value(record, column):
        if column == "peak_MiB":
            peak = record.get("peak_bytes")
            return None if peak is None else peak / 2 ** 20
        return record.get(column)

    columns = [c for c in columns if any(value(r, c) is not None for r in records)]
    rows = [[_cell(value(r, c)) for c in columns] for r in records]
    widths = [max([len(c)] + [len(row[i]) for row in rows]) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in rows:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))
