"""Measured speed and memory of the whole GFM training step and of each fused op vs plain PyTorch.

    python benchmarks/throughput.py                       # everything, sized for the device found
    python benchmarks/throughput.py --only step --model base --batch 16
    python benchmarks/throughput.py --out benchmarks/results/cpu.json

Sections:
- step: one optimizer step of GFM (teacher forward + student forward/backward + AdamW), with the
  fused ops (backend auto) against the plain-PyTorch reference ops; images/s and peak memory.
  Also the teacher forward alone, since it is a large, pure-inference part of every step.
- ops: each fused op per backend vs the reference (benchmarks/ops_bench.py).
- loader: decode + augment throughput vs a torchvision ImageFolder baseline (benchmarks/loader_bench.py).
Output: one JSON record per case (see benchmarks/_timing.py for what each carries) plus a table.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import environment, peak_memory_bytes, print_table, time_fn  # noqa: E402

MODEL_SIZES = {
    # name: (embed_dim, depths, heads)
    "tiny": (32, (2, 2, 2, 2), (1, 2, 4, 8)),
    "base": (128, (2, 2, 18, 2), (4, 8, 16, 32)),
    "large": (192, (2, 2, 18, 2), (6, 12, 24, 48)),
}


def _model_config(size: str, backend: str):
    from gfm_fast.config import ModelConfig, SwinConfig

    embed, depths, heads = MODEL_SIZES[size]
    student = SwinConfig(embed_dim=embed, depths=depths, num_heads=heads, window_size=6, img_size=192)
    teacher = SwinConfig(embed_dim=embed if size == "tiny" else 128, depths=depths if size == "tiny" else (2, 2, 18, 2),
                         num_heads=heads if size == "tiny" else (4, 8, 16, 32), window_size=7, img_size=224)
    return ModelConfig(student=student, teacher=teacher, ops_backend=backend)


def bench_step(device: torch.device, size: str, batch: int, backends: List[str], dtype: torch.dtype,
               warmup: int, runs: int) -> List[Dict]:
    """Full training step (teacher + student fwd/bwd + AdamW step) per ops backend, the student in
    ``dtype``. A backend named ``<name>+compile`` also runs the student and teacher through
    torch.compile (run.compile); ``<name>+mixed`` keeps the student fp32 and runs its forward under
    autocast(bf16) (run.precision=bf16-mixed)."""
    import warnings

    from gfm_fast.masking import generate_block_mask
    from gfm_fast.models.pretrainer import GFMPretrainer, param_groups

    from gfm_fast.training import compile_in_place

    records = []
    for backend in backends:
        ops_backend, _, variant = backend.partition("+")
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # random teacher
            model = GFMPretrainer(_model_config(size, ops_backend)).to(device)
        mixed = variant == "mixed"
        student_dtype = torch.float32 if mixed else dtype
        student, teacher = model.student.to(student_dtype), model.teacher
        if variant == "compile":
            compile_in_place(student, teacher)
        opt = torch.optim.AdamW(param_groups(student, 0.05), lr=1e-4,
                                **({"fused": True} if device.type == "cuda" else {}))
        images = torch.randn(batch, 3, 192, 192, device=device)
        gen = torch.Generator(device=device).manual_seed(0)

        def step():
            mask = generate_block_mask(batch, 192, generator=gen, device=device).blocks
            z_t = teacher(images)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=mixed):
                out = student(images.to(student_dtype), mask, z_t)
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        def teacher_only():
            teacher(images)

        timing = time_fn(step, device=device, warmup=warmup, runs=runs)
        peak = peak_memory_bytes(step, device=device) if device.type == "cuda" else None
        records.append({"section": "step", "case": f"train_step_{size}", "backend": backend, "batch": batch,
                        "dtype": "bf16-mixed" if mixed else str(dtype).replace("torch.", ""), **timing.as_dict(),
                        "images_per_s": batch / (timing.median_ms / 1e3), "peak_bytes": peak})
        if backend == backends[0]:
            t_teacher = time_fn(teacher_only, device=device, warmup=warmup, runs=runs)
            records.append({"section": "step", "case": f"teacher_forward_{size}", "backend": "-", "batch": batch,
                            "dtype": str(teacher.dtype).replace("torch.", "") if hasattr(teacher, "dtype") else "-",
                            **t_teacher.as_dict(), "images_per_s": batch / (t_teacher.median_ms / 1e3),
                            "peak_bytes": None})
    ref = next((r for r in records if r["backend"] == "reference"), None)
    for r in records:
        if ref is not None and r["case"] == ref["case"]:
            r["speedup"] = ref["median_ms"] / r["median_ms"]
    return records


TABLE_COLUMNS = ["section", "case", "backend", "mode", "batch", "dtype", "median_ms", "p20_ms", "p80_ms",
                 "images_per_s", "img_s", "peak_MiB", "speedup"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=("step", "ops", "loader"), action="append",
                        help="run only these sections (repeatable); default: all")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", choices=sorted(MODEL_SIZES), help="step model size (default: base on GPU, tiny on CPU)")
    parser.add_argument("--batch", type=int, help="step batch (default: 128 on GPU, 8 on CPU)")
    parser.add_argument("--ops-batch", type=int, default=16, help="batch of the fused-op benchmarks (GFM shapes)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (recorded)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--compile", action="store_true", help="step: also time torch.compile'd student+teacher")
    parser.add_argument("--mixed", action="store_true",
                        help="step: also time run.precision=bf16-mixed (fp32 student, autocast forward; on by default on GPU)")
    parser.add_argument("--out", help="write the JSON records here (default: print only)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    sections = args.only or ["step", "ops", "loader"]
    records: List[Dict] = []
    if "ops" in sections:
        from ops_bench import run_ops

        records += [{"section": "ops", **r} for r in run_ops(device=device, batch=args.ops_batch,
                                                              warmup=args.warmup, runs=args.runs)]
    if "step" in sections:
        backends = (["reference", "auto"] + (["auto+compile"] if args.compile else [])
                    + (["auto+mixed"] if args.mixed or gpu else []))
        dtype = torch.bfloat16 if gpu else torch.float32
        records += bench_step(device, args.model or ("base" if gpu else "tiny"), args.batch or (128 if gpu else 8),
                              backends, dtype, args.warmup, args.runs)
    if "loader" in sections:
        from loader_bench import run_loader

        records += [{"section": "loader", **r} for r in run_loader()]
    env = environment(device)
    print(json.dumps({"environment": env}, indent=None))
    print_table(records, TABLE_COLUMNS)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"environment": env, "records": records}, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
