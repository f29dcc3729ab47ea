"""The whole GFM training step, ours against the reference GFM code's, at the same precision.

    python benchmarks/step_bench.py                      # CPU: Swin-B batch 4, fp32 and bf16
    python benchmarks/step_bench.py --model tiny --batch 16 --out benchmarks/results/cpu_step_tiny_b16.json

Both sides run one optimizer step on the same weights, batch and losses:
- ``reference``: ``gfm_fast.models.reference.ReferenceGFM``, the reference code's way (timm's
  explicit window attention, full-resolution reconstruction and per-pixel L1, fp32 teacher weights
  under the student's autocast, per-image host masks), ``clip_grad_norm_`` and torch's AdamW;
- ``ours``: the step the training loop runs (``gfm_fast.training.step.train_step`` through the
  DeepSpeed engine made by ``build_engine``: fused ops, measured attention paths, bf16 linears on
  the fastest exact GEMM (``model.bf16_matmul``), teacher cast once to the run's dtype, device
  masks, one host sync), with the same AdamW as the reference
  (``ours``: ``optim.fused=false``, DeepSpeed's clipping) and with the project's own choice on top
  (``ours+fused_adamw``: the default, torch's fused AdamW with the clipping folded in).
In bf16 on a CPU without bf16 instructions also ``ours+fused_adamw+bf16_matmul=native`` (the
default with torch's emulated bf16 GEMM instead of the widened one). On CUDA also
``ours+fused_adamw+teacher_cuda_graph`` (``run.teacher_cuda_graph``: the teacher's
forward replayed as a CUDA graph). In bf16 also ``ours+fused_adamw+precision=bf16``: DeepSpeed's bf16
(bf16 weights and gradients, fp32 master weights in the optimizer; at ZeRO-0 its unfused optimizer
reads every gradient back to the host), against the same autocast reference. "bf16" is autocast on
both sides (our ``run.precision=bf16-mixed``, the default on GPUs). Steps of all sides are
interleaved (one of each per round, after a warm-up round), the median of ``--runs`` rounds kept.

Every record carries the FLOPs of one image (counted by ``torch.utils.flop_counter`` on the reference
step: student forward + backward, teacher forward), the achieved GFLOP/s, the machine's matmul rate
at that precision measured in the same run, before and after the timed rounds, the better kept (the
fastest GEMM for it: on a CPU without bf16 instructions, the widened fp32 GEMM for bf16; all in
``matmul_GFLOPs_by_gemm``), the MFU against it (and on GPU against the card's datasheet peak), and
from one profiled step the count of ``aten::copy_`` calls, of host syncs
(tensor values read from Python: ``.item()``, ``.tolist()``, ``bool()``, ``float()``, ``int()`` of a
tensor, each a device-to-host sync on a GPU; reads inside a kernel, such as torch's CPU AdamW reading
its step counts, are not syncs), which attention kernels ran, and where the time went: the top ops
by CPU time and, on GPU, the top kernels by GPU time, the GPU's busy time and the kernel launches
(a busy time well under the step time means a launch-bound step).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _args import at_least, device as device_arg  # noqa: E402
from _timing import _quantile, _sync, environment, print_table  # noqa: E402

MODEL_SIZES = {  # name: (embed_dim, depths, heads); the teacher is Swin-B except for tiny (same as student)
    "tiny": (32, (2, 2, 2, 2), (1, 2, 4, 8)),
    "base": (128, (2, 2, 18, 2), (4, 8, 16, 32)),
    "large": (192, (2, 2, 18, 2), (6, 12, 24, 48)),
}
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Dense (no sparsity) bf16 tensor-core peaks from the datasheets, FLOP/s.
DATASHEET_BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
CLIP_GRAD = 5.0  # GFM's recipe, both sides
STEP_BATCH = {"cuda": 128, "cpu": 4}  # per step, by device type (GFM's batch per GPU on a GPU)


def model_config(size: str):
    from gfm_fast.config import ModelConfig, SwinConfig

    embed, depths, heads = MODEL_SIZES[size]
    student = SwinConfig(embed_dim=embed, depths=depths, num_heads=heads, window_size=6, img_size=192)
    teacher = (SwinConfig(embed_dim=embed, depths=depths, num_heads=heads, window_size=7, img_size=224)
               if size == "tiny" else SwinConfig(window_size=7, img_size=224))
    return ModelConfig(student=student, teacher=teacher)


def matmul_rates(device: torch.device, dtype: torch.dtype, n: Optional[int] = None, runs: int = 7) -> Dict[str, float]:
    """FLOP/s of one large square matmul at ``dtype`` (the fastest of ``runs``: the machine's limit,
    not its average under a neighbour's load), by every GEMM the step may use for it: torch's
    (``torch``), and for bf16 on CPU also torch's fp32 GEMM on widened bf16 operands
    (``widened``, ``gfm_fast.ops.widened_linear``, conversions included). The fastest is the
    machine's practical limit for the step. ``n``: 2048 on CPU, 8192 on a GPU (where a smaller
    product is over before the launch and the sync are)."""
    from gfm_fast.ops.widened_linear import widened_linear

    n = n or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    gemms = {"torch": lambda: torch.mm(a, b)}
    if device.type == "cpu" and dtype == torch.bfloat16:
        gemms["widened"] = lambda: widened_linear(a, b)
    rates = {}
    for name, gemm in gemms.items():
        samples = []
        for i in range(runs + 1):
            _sync(device)
            t0 = time.perf_counter()
            gemm()
            _sync(device)
            if i:  # the first call warms up
                samples.append(time.perf_counter() - t0)
        rates[name] = 2 * n ** 3 / min(samples)
    return rates


def timed_between_matmul_rates(time_sides: Callable[[], Dict], device: torch.device,
                               dtype: torch.dtype) -> Tuple[Dict, Dict[str, float]]:
    """``time_sides()``, and the matmul rates measured before and after it, the better of the two per
    GEMM: a neighbour's load that slows one measurement (seen here: half the rate, for minutes) does
    not pass for the machine's limit."""
    before = matmul_rates(device, dtype)
    timings = time_sides()
    after = matmul_rates(device, dtype)
    return timings, {gemm: max(rate, after[gemm]) for gemm, rate in before.items()}


def datasheet_peak(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in DATASHEET_BF16_PEAK.items() if key in name), None)


class OurStep:
    """The training loop's own step: ``build_engine`` + ``train_step`` (DeepSpeed ZeRO-0, one process)."""

    def __init__(self, size: str, batch: int, precision: str, device: torch.device, fused_adamw: bool,
                 checkpoint_stages: Tuple[int, ...] = (), compile_: bool = False, teacher_cuda_graph: bool = False,
                 bf16_matmul: str = "auto", weights: Optional[Dict[str, torch.Tensor]] = None,
                 run_precision: Optional[str] = None):
        from gfm_fast.config import TrainConfig
        from gfm_fast.models.pretrainer import GFMPretrainer
        from gfm_fast.training.distributed import init_distributed
        from gfm_fast.training.step import build_engine

        init_distributed(device.type)
        cfg = TrainConfig()
        cfg.model = model_config(size)
        cfg.model.checkpoint_stages = tuple(checkpoint_stages)
        cfg.model.bf16_matmul = bf16_matmul
        cfg.run.compile = compile_  # run.compile_scope: regional (each Swin block)
        cfg.run.teacher_cuda_graph = teacher_cuda_graph
        cfg.data.batch_size, cfg.optim.clip_grad, cfg.optim.fused = batch, CLIP_GRAD, fused_adamw
        self.pretrainer = GFMPretrainer(cfg.model).to(device)
        if weights is not None:  # before the engine: DeepSpeed's bf16 mode copies its fp32 master weights there
            self.pretrainer.load_state_dict(weights)
        if run_precision is None:  # bf16: autocast, as the reference
            run_precision = "bf16-mixed" if precision == "bf16" else "fp32"
        self.engine, _ = build_engine(cfg, self.pretrainer, device, run_precision)
        self.generator = torch.Generator(device=device).manual_seed(0)

    def __call__(self, images: torch.Tensor) -> None:
        from gfm_fast.training.step import train_step

        train_step(self.engine, self.pretrainer, lambda: images, 1, generator=self.generator)


class ReferenceStep:
    """The reference GFM code's training step (see the module docstring)."""

    def __init__(self, model, batch: int, precision: str, device: torch.device):
        from gfm_fast.models.reference import reference_token_masks

        self.model, self.batch, self.device = model, batch, device
        self.autocast = precision == "bf16"
        from gfm_fast.models.pretrainer import param_groups

        self.params = [p for p in model.student.parameters()]
        self.optimizer = torch.optim.AdamW(param_groups(model.student, 0.05), lr=1e-4)
        cfg = model.config
        rng = np.random.default_rng(0)
        self.masks = lambda: reference_token_masks(batch, cfg.student.img_size, cfg.mask_block,  # noqa: E731
                                                   cfg.student.patch_size, cfg.mask_ratio, rng)

    def __call__(self, images: torch.Tensor) -> None:
        mask = self.masks().to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            loss, _, _ = self.model(images, mask)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, CLIP_GRAD)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def count_flops(step: Callable[[], None]) -> int:
    """FLOPs of one step as ``torch.utils.flop_counter`` counts them (matmuls, convolutions, SDPA)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return counter.get_total_flops()


class HostReads(torch.overrides.TorchFunctionMode):
    """Counts the tensor values read from Python while active."""

    READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__float__,
             torch.Tensor.__int__, torch.Tensor.numpy}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += func in self.READS
        return func(*args, **(kwargs or {}))


def profile_counts(step: Callable[[], None], device: torch.device) -> Dict[str, object]:
    """Per step: ``aten::copy_`` calls, host syncs (:class:`HostReads`) and the attention kernels that ran."""
    from torch.profiler import ProfilerActivity, profile

    from _timing import _native_stderr_silenced

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with _native_stderr_silenced(), profile(activities=activities) as prof:
        step()
        _sync(device)
    reads = HostReads()  # in a step of its own: under torch.compile a function mode makes dynamo retrace
    with reads:
        step()
        _sync(device)
    counts: Dict[str, int] = {}
    for event in prof.events():
        counts[event.name] = counts.get(event.name, 0) + 1
    attention = {name: n for name, n in counts.items()
                 if "attention" in name or name in ("aten::bmm", "aten::_softmax")}
    return {"copy_calls": counts.get("aten::copy_", 0), "host_syncs": reads.count,
            "attention_kernels": attention, **where_time_goes(prof.key_averages(), device)}


def where_time_goes(averages, device: torch.device, top: int = 12) -> Dict[str, object]:
    """From one profiled step: the ops (CPU) or kernels (CUDA) that took the most time, with their
    calls and ms, and on CUDA how long the GPU was busy and how many kernels the host launched
    (busy time well under the step time means the step waits on the host: launch-bound)."""
    from torch.autograd import DeviceType

    def ranked(rows, time_of):
        rows = sorted((a for a in rows if time_of(a) > 0), key=time_of, reverse=True)[:top]
        return [{"name": a.key[:120], "ms": time_of(a) / 1e3, "calls": a.count} for a in rows]

    out: Dict[str, object] = {"top_cpu_ops": ranked(averages, lambda a: a.self_cpu_time_total)}
    if device.type == "cuda":
        # Kernels only: a CPU op's entry also carries the time of the kernels it launched.
        kernels = [a for a in averages if a.device_type != DeviceType.CPU]
        out["top_gpu_kernels"] = ranked(kernels, lambda a: a.self_device_time_total)
        out["gpu_busy_ms"] = sum(a.self_device_time_total for a in kernels) / 1e3
        out["kernel_launches"] = sum(a.count for a in averages if "LaunchKernel" in a.key)  # cuda/cuLaunchKernel(Ex)
    return out


def interleaved_medians(steps: Dict[str, Callable[[], None]], device: torch.device, warmup: int,
                        runs: int) -> Dict[str, Dict[str, float]]:
    """Median / p20 / p80 ms per side, one call of each side per round (load hits all alike)."""
    samples: Dict[str, List[float]] = {name: [] for name in steps}
    for round_ in range(warmup + runs):
        for name, step in steps.items():
            _sync(device)
            t0 = time.perf_counter()
            step()
            _sync(device)
            if round_ >= warmup:
                samples[name].append((time.perf_counter() - t0) * 1e3)
    return {name: {"median_ms": statistics.median(s), "p20_ms": _quantile(s, 0.2), "p80_ms": _quantile(s, 0.8),
                   "runs": len(s)} for name, s in samples.items()}


def bench_precision(size: str, batch: int, precision: str, device: torch.device, warmup: int, runs: int,
                    compile_mode: bool, checkpoint_stages: Tuple[int, ...] = ()) -> List[Dict]:
    """Records of every side of one (model size, precision) pair."""
    from gfm_fast.models.reference import ReferenceGFM
    from gfm_fast.ops.widened_linear import cpu_has_bf16_matmul

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the random teacher's warning
        ours = OurStep(size, batch, precision, device, fused_adamw=False, compile_=compile_mode)
        weights = {k: v.clone() for k, v in ours.pretrainer.state_dict().items()}  # the same on every side
        ours_fused = OurStep(size, batch, precision, device, fused_adamw=True, compile_=compile_mode, weights=weights)
        reference = ReferenceGFM(model_config(size)).to(device)
    reference.load_state_dict({k: v.float() for k, v in weights.items()}, strict=False)
    ref_step = ReferenceStep(reference, batch, precision, device)
    images = torch.randn(batch, 3, 192, 192, device=device)
    sides: Dict[str, Callable[[], None]] = {"reference": lambda: ref_step(images), "ours": lambda: ours(images),
                                            "ours+fused_adamw": lambda: ours_fused(images)}

    def add_variant(label: str, **options) -> None:
        """The default step with one option changed, as side ``ours+fused_adamw+<label>``."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            step = OurStep(size, batch, precision, device, fused_adamw=True, weights=weights, **options)
        sides["ours+fused_adamw+" + label] = lambda: step(images)

    if checkpoint_stages:  # the speed cost of activation checkpointing (model.checkpoint_stages)
        add_variant("checkpoint_stages=" + ",".join(map(str, checkpoint_stages)), checkpoint_stages=checkpoint_stages)
    if precision == "bf16" and device.type == "cpu" and not cpu_has_bf16_matmul() and not compile_mode:
        # The default minus the widened bf16 GEMM (model.bf16_matmul=native): what the option is worth.
        add_variant("bf16_matmul=native", bf16_matmul="native")
    if device.type == "cuda" and not compile_mode:  # the teacher replayed as a CUDA graph (run.teacher_cuda_graph)
        add_variant("teacher_cuda_graph", teacher_cuda_graph=True)
    if precision == "bf16" and not compile_mode:  # DeepSpeed's bf16 weights (run.precision=bf16)
        add_variant("precision=bf16", run_precision="bf16")
    flops = count_flops(sides["reference"])  # model FLOPs, counted on the eager reference step
    if compile_mode:  # the user's obvious alternative: torch.compile of the reference model
        reference.student.compile(dynamic=False)
        reference.teacher.compile(dynamic=False)
    compile_s = {}
    for name, step in sides.items():  # the first call compiles (when asked): timed apart
        t0 = time.perf_counter()
        step()
        _sync(device)
        compile_s[name] = time.perf_counter() - t0
    timings, rates = timed_between_matmul_rates(lambda: interleaved_medians(sides, device, warmup, runs), device,
                                                PRECISIONS[precision])
    rate = max(rates.values())
    peak = datasheet_peak(device)
    records = []
    for name, step in sides.items():
        t = timings[name]
        achieved = flops / (t["median_ms"] / 1e3)
        record = {"section": "step", "case": f"train_step_{size}", "side": name + ("+compile" if compile_mode else ""),
                  "precision": precision, "batch": batch, **t, "images_per_s": batch / (t["median_ms"] / 1e3),
                  "flops_per_image": flops / batch, "achieved_GFLOPs": achieved / 1e9,
                  "matmul_GFLOPs": rate / 1e9, "matmul_GFLOPs_by_gemm": {k: v / 1e9 for k, v in rates.items()},
                  "mfu": achieved / rate,
                  "mfu_datasheet": achieved / peak if peak else None,
                  "first_step_s": compile_s[name], **profile_counts(step, device)}
        records.append(record)
    ref_ms = timings["reference"]["median_ms"]
    for record in records:
        record["speedup"] = ref_ms / record["median_ms"]
    return records


def write_chart(records: List[Dict], path: Path) -> None:
    """Images/s of every side per precision, each bar labelled with its MFU."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["case"], r["precision"]) for r in records})
    sides = list(dict.fromkeys(r["side"] for r in records))
    fig, ax = plt.subplots(figsize=(4 + 0.55 * len(sides) * len(groups), 4.5))
    width = 0.8 / len(sides)
    for i, side in enumerate(sides):
        for j, group in enumerate(groups):
            match = [r for r in records if (r["case"], r["precision"]) == group and r["side"] == side]
            if not match:
                continue
            r = match[0]
            bar = ax.bar(j + i * width, r["images_per_s"], width, color=f"C{i}", label=side if j == 0 else None)
            ax.bar_label(bar, labels=[f"{r['speedup']:.2f}x\nMFU {r['mfu']:.0%}"], fontsize=7)
    ax.set_xticks([j + width * (len(sides) - 1) / 2 for j in range(len(groups))],
                  [f"{case.replace('train_step_', '')}\n{precision}, batch {records[0]['batch']}"
                   for case, precision in groups])
    ax.set_ylabel("images / s (median)")
    ax.set_title("GFM training step, ours vs the reference code\n(speed-up; MFU against the matmul rate "
                 "measured in the run)", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)  # beside the bars
    ax.margins(y=0.25)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


TABLE_COLUMNS = ["case", "side", "precision", "batch", "median_ms", "p20_ms", "p80_ms", "runs", "images_per_s",
                 "achieved_GFLOPs", "matmul_GFLOPs", "mfu", "copy_calls", "host_syncs", "speedup"]


STEP_MODES = ("eager", "compile")


def step_modes(compile_: bool, compiled_only: bool) -> Tuple[str, ...]:
    """The groups the command line asks for: eager, and with ``--compile`` compiled too, or with
    ``--compiled-only`` the compiled group alone (a GPU session runs it as a later phase)."""
    return ("compile",) if compiled_only else ("eager", "compile") if compile_ else ("eager",)


def run_step(device: torch.device, size: str, batch: int, precisions: List[str], warmup: int, runs: int,
             modes: Tuple[str, ...] = ("eager",), checkpoint_stages: Tuple[int, ...] = (),
             on_records: Optional[Callable[[List[Dict]], None]] = None) -> List[Dict]:
    """Records of every precision in each of ``modes`` (eager, compile: both sides under torch.compile),
    each group's table printed as it ends; ``on_records`` gets all the records so far after each group,
    so that a run stopped at a deadline keeps what it measured."""
    records = []
    for precision in precisions:
        for compiled in (mode == "compile" for mode in STEP_MODES if mode in modes):
            group = bench_precision(size, batch, precision, device, warmup, runs, compile_mode=compiled,
                                    checkpoint_stages=() if compiled else checkpoint_stages)
            print_table(group, TABLE_COLUMNS + (["gpu_busy_ms", "kernel_launches"] if device.type == "cuda" else []))
            records += group
            if on_records:
                on_records(records)
    return records


def save_results(out: Path, env: Dict, records: List[Dict]) -> None:
    """The JSON at ``out`` (written whole, then renamed) and the chart of its step records beside it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    partial.write_text(json.dumps({"environment": env, "records": records}, indent=1))
    partial.replace(out)
    step_records = [r for r in records if r.get("section") == "step"]
    if step_records:
        write_chart(step_records, out.with_suffix(".png"))


def model_arguments(description: str, batch_help: str, precision_help: str) -> argparse.ArgumentParser:
    """A parser with what every benchmark of a whole model takes: device, model size, batch,
    precisions, warm-up and timed rounds, threads."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", type=device_arg, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", choices=sorted(MODEL_SIZES), default="base")
    parser.add_argument("--batch", type=at_least(1), help=batch_help)
    parser.add_argument("--precision", choices=sorted(PRECISIONS), action="append", help=precision_help)
    parser.add_argument("--warmup", type=at_least(0), default=1, help="untimed rounds after the first call")
    parser.add_argument("--runs", type=at_least(1), default=5, help="timed rounds (median kept)")
    parser.add_argument("--threads", type=at_least(1), help="CPU threads (recorded)")
    return parser


def default_batch(batches: Dict[str, int], device: torch.device) -> int:
    """The batch of ``batches`` (by device type) for ``device``: the GPU's on CUDA, else the CPU's."""
    return batches["cuda" if device.type == "cuda" else "cpu"]


def parse_model_arguments(parser: argparse.ArgumentParser, argv, batches: Dict[str, int]):
    """(arguments, device, batch): the thread count applied, the batch defaulted per device."""
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    return args, device, args.batch or default_batch(batches, device)


def main(argv=None) -> int:
    parser = model_arguments(__doc__.split("\n\n")[0], "per step (default: 128 on GPU, 4 on CPU)",
                             "repeatable (default: fp32 and bf16)")
    parser.add_argument("--compile", action="store_true", help="also both sides under torch.compile")
    parser.add_argument("--compiled-only", action="store_true", help="only both sides under torch.compile")
    parser.add_argument("--checkpoint-stages", type=at_least(0), nargs="+", default=(),
                        help="also ours with activation checkpointing of these stages (e.g. 2)")
    parser.add_argument("--out", help="JSON path; the chart is written beside it (.png)")
    args, device, batch = parse_model_arguments(parser, argv, STEP_BATCH)
    stages = len(MODEL_SIZES[args.model][1])
    if any(stage >= stages for stage in args.checkpoint_stages):
        parser.error(f"--checkpoint-stages: the {args.model} model has stages 0 to {stages - 1}")
    env = environment(device)
    out = Path(args.out) if args.out else None
    run_step(device, args.model, batch, args.precision or ["fp32", "bf16"], args.warmup, args.runs,
             step_modes(args.compile, args.compiled_only), tuple(args.checkpoint_stages),
             on_records=(lambda so_far: save_results(out, env, so_far)) if out else None)
    print(json.dumps({"environment": env}))
    if out:
        print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
