"""Scale-out projection (not a measurement): the largest student per GPU memory at each ZeRO stage,
and hours for the paper's 100-epoch GeoPile run on 1, 8 and 64 GPUs.

    python benchmarks/scaling_projection.py [--images-per-s R] [--efficiency 8=0.9,64=0.8] [--out F]
    python benchmarks/scaling_projection.py --model tiny          # seconds: the tests' size

Memory per GPU = model states + the frozen teacher + per-GPU batch x activation bytes per image.
- Model states, 16-bit training (``run.precision=bf16``) with fp32 master weights and AdamW: DeepSpeed's
  own estimators (``estimate_zero2_model_states_mem_needs``, ``estimate_zero3_model_states_mem_needs``,
  no offload) for stages 2 and 3; stages 0 and 1 in the same byte accounting (bytes per parameter:
  2 bf16 weights, 2 bf16 grads, 4 fp32 grads, 4 fp32 master weights, 8 Adam moments).
- The teacher (stages 1-3, outside the engine) is held whole on every GPU in bf16.
- Activation bytes per image are MEASURED here: the peak of torch's allocations over one student
  forward + backward at 192 px, at two batch sizes, differenced (so autocast's weight casts, the same
  at every batch, drop out; the gradients already exist). They are the bytes of the same tensors a GPU
  allocates in that dtype; on GPU, SDPA keeps no attention probabilities, so there it needs less.
  Other widths of the family (head dim 32, the measured depths) are extrapolated linearly in width.
Hours = images / (one-device rate x GPUs x scaling efficiency); the rate comes from ``--images-per-s``,
else the newest committed GPU step result under benchmarks/results/, else the project's H100 target
(3,000 images/s).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _args import at_least, fraction, positive_number  # noqa: E402
from _timing import environment, peak_memory_bytes, print_table  # noqa: E402

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed's estimators need no GPU
RESULTS = Path(__file__).resolve().parent / "results"
GIB = 2 ** 30
# name: (depths, the two embed widths measured); heads = width / 32 per stage base, as Swin-B and Swin-L.
MODELS = {"base": ((2, 2, 18, 2), (128, 192)), "tiny": ((2, 2, 2, 2), (32, 64))}
GPU_MEMORY_GB = (40, 80, 141)
GPU_COUNTS = (1, 8, 64)
TARGET_RATE = 3000.0  # the project's H100 target for the Swin-B step (bf16, batch 128 per GPU): not measured
PAPER_V100_GPU_HOURS = 93.3  # GFM paper, 100 epochs on GeoPile


def student_config(depths: Tuple[int, ...], width: int):
    """The GFM model config with a student of ``width`` (heads = width/32 x 1, 2, 4, 8) at 192 px.

    Its layers take fixed paths, not the ones this CPU would pick (the C++ window attention and the
    widened bf16 GEMM save other tensors: Swin-B bf16 measured 79 MiB per image on them, 87 on
    these): explicit attention, which keeps the attention probabilities that SDPA on CUDA does not
    (so a GPU needs at most this), and torch's bf16 GEMM, as on a GPU."""
    from gfm_fast.config import ModelConfig, SwinConfig

    heads = tuple(width // 32 * 2 ** i for i in range(len(depths)))
    return ModelConfig(student=SwinConfig(embed_dim=width, depths=depths, num_heads=heads, window_size=6),
                       attention="explicit", bf16_matmul="native")


def param_counts(depths: Tuple[int, ...], width: int) -> Dict[str, int]:
    """Student (encoder + projector + decoder: what the engine holds) parameters and its largest
    layer (ZeRO-3 gathers one at a time), counted on the meta device."""
    from gfm_fast.models.pretrainer import GFMStudent

    with torch.device("meta"):
        student = GFMStudent(student_config(depths, width))
    return {"student": sum(p.numel() for p in student.parameters()),
            "largest_layer": max(sum(p.numel() for p in m.parameters(recurse=False)) for m in student.modules())}


def teacher_params() -> int:
    """Parameters of the frozen teacher as the engine-less copy on every GPU holds it (stages 1-3)."""
    from gfm_fast.models.teacher import FrozenTeacher

    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the random teacher's warning
        return sum(p.numel() for p in FrozenTeacher(student_config((2, 2, 18, 2), 128)).parameters())


def model_state_bytes(stage: int, params: int, largest_layer: int, gpus: int) -> int:
    """Bytes of weights, gradients and optimizer state per GPU (16-bit training, AdamW, no offload)."""
    if stage == 0:
        return 20 * params
    if stage == 1:  # bf16 weights and grads whole; fp32 grads, master weights and moments partitioned
        return 4 * params + 16 * params // gpus
    nodes, per_node = (gpus // 8, 8) if gpus % 8 == 0 else (1, gpus)
    if stage == 2:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        return estimate_zero2_model_states_mem_needs(params, per_node, nodes, cpu_offload=False)[1]
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    return estimate_zero3_model_states_mem_needs(params, largest_layer, per_node, nodes, cpu_offload=False,
                                                 cpu_offload_params=False)[1]


def activation_bytes_per_image(depths: Tuple[int, ...], width: int, precision: str,
                               batches: Tuple[int, int] = (2, 4)) -> int:
    """Measured: peak allocator bytes of a student forward + backward, per extra image. The gradients
    exist before the measured step (they accumulate in place), so they are not counted as activations."""
    from gfm_fast.models.pretrainer import GFMStudent

    torch.manual_seed(0)
    cfg = student_config(depths, width)
    student = GFMStudent(cfg)
    grid = cfg.student.img_size // cfg.student.total_stride
    peaks = []
    for batch in batches:
        images = torch.randn(batch, cfg.student.in_chans, cfg.student.img_size, cfg.student.img_size)
        mask = torch.rand(batch, grid, grid) < cfg.mask_ratio
        z_t = torch.randn(batch, cfg.teacher.num_features)

        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = student(images, mask, z_t).loss
            loss.backward()

        step()  # first call: the gradients and one-time caches (window indices, attention masks)
        peaks.append(peak_memory_bytes(step, device=torch.device("cpu")))
    return (peaks[1] - peaks[0]) // (batches[1] - batches[0])


def largest_students(family: List[Dict], teacher: int, activation: Tuple[float, float],
                     batch: int, usable: float) -> List[Dict]:
    """Per card memory and GPU count: the widest student of ``family`` that fits at each ZeRO stage.
    ``activation`` is (intercept, slope) of bf16 activation bytes per image against width."""
    rows = []
    for memory in GPU_MEMORY_GB:
        for gpus in GPU_COUNTS:
            row = {"gpu_GB": memory, "gpus": gpus, "batch_per_gpu": batch}
            for stage in range(4):
                fits = [m for m in family
                        if model_state_bytes(stage, m["student"], m["largest_layer"], gpus) + 2 * teacher
                        + batch * (activation[0] + activation[1] * m["width"]) <= usable * memory * GIB]
                best = fits[-1] if fits else None
                beyond = "+" if best is family[-1] else ""  # the family's widest fits: it may go further
                row[f"zero{stage}"] = f"{best['width']}{beyond} ({best['student'] / 1e6:.0f}M)" if best else "none"
            rows.append(row)
    return rows


def committed_gpu_rate(results: Path = RESULTS) -> Optional[Tuple[float, str]]:
    """Images/s of our fastest Swin-B bf16 step in the newest committed GPU result, with its source."""
    newest = None
    for path in sorted(results.glob("*.json")):
        stamp = subprocess.run(["git", "log", "-1", "--format=%ct", "--", path.name], cwd=results,
                               capture_output=True, text=True, check=False).stdout.strip()
        data = json.loads(path.read_text())
        if not stamp or not isinstance(data, dict) or data.get("environment", {}).get("device_type") != "cuda":
            continue
        rates = [r["images_per_s"] for r in data.get("records", []) if r.get("case") == "train_step_base"
                 and str(r.get("side", "")).startswith("ours") and r.get("precision") == "bf16"]
        if rates and (newest is None or int(stamp) > newest[0]):
            newest = (int(stamp), max(rates), f"measured: {path.name} ({data['environment'].get('device')})")
    return None if newest is None else newest[1:]


def training_hours(rate: float, efficiency: Dict[int, float], images: int, epochs: int) -> List[Dict]:
    """Wall-clock and GPU-hours of ``epochs`` x ``images`` at ``rate`` images/s per device."""
    rows = []
    for gpus, eff in sorted(efficiency.items()):
        hours = images * epochs / (rate * gpus * eff) / 3600
        rows.append({"gpus": gpus, "efficiency": eff, "images_per_s": round(rate * gpus * eff), "hours": hours,
                     "gpu_hours": hours * gpus, "vs_paper_gpu_hours": PAPER_V100_GPU_HOURS / (hours * gpus)})
    return rows


def parse_efficiency(text: str) -> Dict[int, float]:
    """'8=0.9,64=0.8' -> {1: 1.0, 8: 0.9, 64: 0.8}."""
    try:
        pairs = {int(k): float(v) for k, v in (item.split("=") for item in text.split(",") if item)}
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--efficiency {text!r}: expected GPUS=FRACTION pairs, e.g. 8=0.9,64=0.8") from None
    if not all(g > 0 and 0 < e <= 1 for g, e in pairs.items()):
        raise argparse.ArgumentTypeError(f"--efficiency {text!r}: GPU counts must be positive, fractions in (0, 1]")
    return {1: 1.0, **pairs}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="base",
                        help="student family: base (Swin-B depths, measured at widths 128 and 192) or tiny")
    parser.add_argument("--images-per-s", type=positive_number, help="one-device rate (default: newest committed GPU "
                        "result, else the project's H100 target of 3000)")
    parser.add_argument("--efficiency", type=parse_efficiency, default=parse_efficiency("8=0.9,64=0.8"),
                        help="scaling efficiency per GPU count, an assumption (default 8=0.9,64=0.8)")
    parser.add_argument("--batch", type=at_least(1), default=128, help="per-GPU batch of the memory table")
    parser.add_argument("--usable", type=fraction, default=0.9, help="fraction of a card's memory usable by "
                        "tensors (the rest: CUDA context, NCCL buffers, fragmentation)")
    parser.add_argument("--images", type=at_least(1), default=600_000, help="GeoPile images per epoch")
    parser.add_argument("--epochs", type=at_least(1), default=100)
    parser.add_argument("--out", help="JSON path")
    args = parser.parse_args(argv)
    depths, measured_widths = MODELS[args.model]

    activations = []
    for width in measured_widths:
        for precision in ("fp32", "bf16"):
            per_image = activation_bytes_per_image(depths, width, precision)
            activations.append({"width": width, "precision": precision, "bytes_per_image": per_image,
                                "MiB_per_image": per_image / 2 ** 20})
    (w0, a0), (w1, a1) = [(r["width"], r["bytes_per_image"]) for r in activations if r["precision"] == "bf16"]
    slope = (a1 - a0) / (w1 - w0)
    family = [{"width": w, **param_counts(depths, w)} for w in range(32, 2049, 32)]
    teacher = teacher_params()
    states = [{"width": m["width"], "params_M": m["student"] / 1e6, "gpus": gpus,
               **{f"zero{s}_GiB": model_state_bytes(s, m["student"], m["largest_layer"], gpus) / GIB
                  for s in range(4)}}
              for m in family if m["width"] in measured_widths for gpus in GPU_COUNTS]
    memory = largest_students(family, teacher, (a0 - slope * w0, slope), args.batch, args.usable)

    if args.images_per_s:
        rate, source = args.images_per_s, "given on the command line"
    else:
        rate, source = committed_gpu_rate() or (TARGET_RATE, "the project's H100 target, not measured")
    hours = training_hours(rate, args.efficiency, args.images, args.epochs)

    print("PROJECTION, NOT A MEASUREMENT (only the activation bytes per image are measured, on this CPU)")
    print("\nactivation bytes per image, student forward + backward at 192 px (measured):")
    print_table(activations, ["width", "precision", "MiB_per_image"])
    print(f"\nmodel states per GPU, GiB (16-bit weights, AdamW; teacher adds {2 * teacher / GIB:.2f} GiB):")
    print_table(states, ["width", "params_M", "gpus"] + [f"zero{s}_GiB" for s in range(4)])
    print(f"\nlargest student width (params) per GPU, bf16, batch {args.batch} per GPU, {args.usable:.0%} "
          f"of the card usable:")
    print_table(memory, ["gpu_GB", "gpus"] + [f"zero{s}" for s in range(4)])
    print(f"\n{args.epochs} epochs x {args.images} images at {rate:.0f} images/s per device ({source}):")
    print_table(hours, ["gpus", "efficiency", "images_per_s", "hours", "gpu_hours", "vs_paper_gpu_hours"])
    print(f"(paper: {PAPER_V100_GPU_HOURS} V100 GPU-hours; vs_paper_gpu_hours = paper / projected GPU-hours)")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        assumptions = {"batch_per_gpu": args.batch, "usable_fraction": args.usable, "images": args.images,
                       "epochs": args.epochs, "rate_images_per_s": rate, "rate_source": source,
                       "efficiency": args.efficiency, "teacher_params": teacher, "model": args.model}
        out.write_text(json.dumps({"projection": True, "environment": environment(torch.device("cpu")),
                                   "assumptions": assumptions, "activation_per_image": activations,
                                   "model_states": states, "largest_student": memory, "hours": hours}, indent=1))
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
