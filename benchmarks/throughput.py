"""Measured speed and memory of the whole GFM training step and of each fused op vs plain PyTorch.

    python benchmarks/throughput.py                       # everything, sized for the device found
    python benchmarks/throughput.py --only step --model tiny --batch 16
    python benchmarks/throughput.py --out benchmarks/results/cpu.json   # + cpu.png, the step chart

Sections:
- step: one optimizer step of GFM, the training loop's own (teacher forward + student forward and
  backward + AdamW through DeepSpeed) against the reference GFM code's step, at each precision,
  with FLOPs, the measured matmul rate, MFU, copy and sync counts (benchmarks/step_bench.py).
- ops: each fused op per backend vs the reference (benchmarks/ops_bench.py).
- loader: decode + augment throughput vs a torchvision ImageFolder baseline (benchmarks/loader_bench.py).
- features: gfm_fast.extract_features vs plain timm holding the same weights (benchmarks/features_bench.py).
Output: one JSON record per case (see benchmarks/_timing.py and step_bench.py for what each carries),
tables, and a chart of the step beside the JSON.
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
from _args import at_least, device as device_arg  # noqa: E402
from _timing import environment, print_table  # noqa: E402
from step_bench import (MODEL_SIZES, PRECISIONS, STEP_BATCH, default_batch, run_step, save_results,  # noqa: E402
                        step_modes)

def _earlier_records(parser: argparse.ArgumentParser, out) -> List[Dict]:
    """--append: the records already in ``out`` (none while it does not exist)."""
    if out is None:
        parser.error("--append adds to the JSON of --out: give --out FILE")
    if not out.exists():
        return []
    try:
        return json.loads(out.read_text())["records"]
    except (ValueError, KeyError, TypeError):
        parser.error(f"--append: {out} is not a benchmark JSON (no 'records'); choose another --out")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=("step", "ops", "loader", "features"), action="append",
                        help="run only these sections (repeatable); default: all")
    parser.add_argument("--device", type=device_arg, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", choices=sorted(MODEL_SIZES), default="base", help="step and features model size")
    parser.add_argument("--batch", type=at_least(1), help="step batch (default: 128 on GPU, 4 on CPU)")
    parser.add_argument("--precision", choices=sorted(PRECISIONS), action="append",
                        help="step and features precisions, repeatable (default: fp32 and bf16; bf16 = autocast "
                             "on both sides)")
    parser.add_argument("--ops-batch", type=at_least(1), default=16, help="batch of the fused-op benchmarks (GFM shapes)")
    parser.add_argument("--features-batch", type=at_least(1),
                        help="images per extract_features call (default: 256 on GPU, 16 on CPU)")
    parser.add_argument("--threads", type=at_least(1), default=None, help="CPU threads (recorded)")
    parser.add_argument("--warmup", type=at_least(0), default=1, help="untimed runs/rounds after the first")
    parser.add_argument("--runs", type=at_least(1), default=5,
                        help="timed runs/rounds (the median is kept; the loader's timed rounds too)")
    parser.add_argument("--compile", action="store_true", help="step: also both sides under torch.compile")
    parser.add_argument("--compiled-only", action="store_true", help="step: only both sides under torch.compile")
    parser.add_argument("--out", help="write the JSON records here, and the step chart beside it (.png)")
    parser.add_argument("--append", action="store_true",
                        help="keep the records already in --out and add these (a GPU session's later phase)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sections = args.only or ["step", "ops", "loader", "features"]
    env = environment(device)
    out = Path(args.out) if args.out else None
    records: List[Dict] = _earlier_records(parser, out) if args.append else []
    if "ops" in sections:
        from ops_bench import print_table as print_ops_table
        from ops_bench import run_ops

        ops_records = [{"section": "ops", **r} for r in run_ops(device=device, batch=args.ops_batch,
                                                                 warmup=args.warmup, runs=args.runs)]
        print_ops_table(ops_records)
        records += ops_records
    if "step" in sections:  # its tables are printed, and the JSON rewritten, as each group ends
        done = list(records)
        records = done + run_step(device, args.model, args.batch or default_batch(STEP_BATCH, device),
                                  args.precision or ["fp32", "bf16"], args.warmup, args.runs,
                                  step_modes(args.compile, args.compiled_only),
                                  on_records=(lambda so_far: save_results(out, env, done + so_far)) if out else None)
    if "loader" in sections:
        from loader_bench import print_table as print_loader_table
        from loader_bench import run_loader

        loader_records = [{"section": "loader", **r} for r in run_loader(rounds=args.runs)]
        print_loader_table(loader_records)
        records += loader_records
    if "features" in sections:
        from features_bench import FEATURES_BATCH, run_features
        from features_bench import TABLE_COLUMNS as FEATURE_COLUMNS

        feature_records = run_features(device, args.model, args.features_batch or default_batch(FEATURES_BATCH, device),
                                       args.precision or ["fp32", "bf16"], args.warmup, args.runs)
        print_table(feature_records, FEATURE_COLUMNS)
        records += feature_records
    print(json.dumps({"environment": env}, indent=None))
    if out:
        save_results(out, env, records)
        has_step = any(r["section"] == "step" for r in records)
        print(f"wrote {out}" + (f" and {out.with_suffix('.png')}" if has_step else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
