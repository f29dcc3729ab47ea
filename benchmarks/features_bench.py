"""Feature extraction, ours against timm's Swin holding the same weights, at the same precision.

    python benchmarks/features_bench.py                      # CPU: Swin-B/192, batch 16, fp32 and bf16
    python benchmarks/features_bench.py --device cuda --batch 256

Both sides turn the same normalised batch into the pooled final features (1024 per image for Swin-B):
- ``timm``: the encoder saved with ``gfm_fast.save_model(layout="timm")`` and loaded back by plain
  timm (``timm.create_model("local-dir:...")``, no gfm_fast code), ``forward_features`` and the
  pooled head under ``torch.no_grad``: what a timm user runs;
- ``ours``: ``gfm_fast.extract_features`` (inference mode, the measured window-attention path, on a
  CPU without bf16 instructions the widened bf16 GEMM, bf16 autocast on a GPU).
"bf16" is autocast on both sides. On a GPU ``extract_features`` always runs bf16 autocast, so only
bf16 is compared there. Calls of the two sides are interleaved (one of each per round, after a
warm-up round), the median of ``--runs`` rounds kept. ``max_rel_diff`` is the largest difference
between the two sides' features relative to timm's largest feature. MFU is against the machine's
matmul rate measured around the timed rounds, as for the step (``step_bench.matmul_rates``), with the
forward's FLOPs counted by ``torch.utils.flop_counter`` on the timm side.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import environment, print_table  # noqa: E402
from step_bench import (PRECISIONS, count_flops, interleaved_medians, model_arguments, model_config,  # noqa: E402
                        parse_model_arguments, save_results, timed_between_matmul_rates)

FEATURES_BATCH = {"cuda": 256, "cpu": 16}  # images per call, by device type
TABLE_COLUMNS = ["case", "side", "precision", "batch", "median_ms", "p20_ms", "p80_ms", "runs", "images_per_s",
                 "achieved_GFLOPs", "matmul_GFLOPs", "mfu", "max_rel_diff", "speedup"]


def _encoders(size: str, device: torch.device):
    """Our student encoder with random weights, and plain timm's model loaded from the same weights."""
    import timm

    import gfm_fast
    from gfm_fast.models.swin import build_student

    torch.manual_seed(0)
    ours = build_student(model_config(size).student).to(device).eval()
    with tempfile.TemporaryDirectory() as tmp:
        gfm_fast.save_model(ours, Path(tmp) / "timm", layout="timm")
        theirs = timm.create_model(f"local-dir:{tmp}/timm", pretrained=True).to(device).eval()
    return ours, theirs


def run_features(device: torch.device, size: str, batch: int, precisions: List[str], warmup: int,
                 runs: int) -> List[Dict]:
    """Records of both sides at each precision (on a GPU bf16 only, see the module docstring)."""
    from gfm_fast import extract_features

    if device.type == "cuda" and "fp32" in precisions:
        print("features: extract_features runs bf16 autocast on a GPU; fp32 is not compared there")
        precisions = [p for p in precisions if p != "fp32"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours, theirs = _encoders(size, device)
    images = torch.randn(batch, 3, 192, 192, device=device)
    records = []
    for precision in precisions:
        autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

        def timm_features():
            with torch.no_grad(), torch.autocast(**autocast):
                return theirs.forward_head(theirs.forward_features(images), pre_logits=True).float().cpu()

        def our_features():
            with torch.autocast(**autocast):
                return extract_features(ours, images, batch_size=batch, device=device, progress=False)

        reference, got = timm_features(), our_features()  # also the first calls, untimed
        diff = ((got - reference).abs().max() / reference.abs().max()).item()
        flops = count_flops(timm_features)
        timings, rates = timed_between_matmul_rates(
            lambda: interleaved_medians({"timm": timm_features, "ours": our_features}, device, warmup, runs),
            device, PRECISIONS[precision])
        rate = max(rates.values())  # the fastest GEMM, as for the step
        for side, t in timings.items():
            achieved = flops / (t["median_ms"] / 1e3)
            records.append({"section": "features", "case": f"extract_features_{size}", "side": side,
                            "precision": precision, "batch": batch, **t,
                            "images_per_s": batch / (t["median_ms"] / 1e3), "flops_per_image": flops / batch,
                            "achieved_GFLOPs": achieved / 1e9, "matmul_GFLOPs": rate / 1e9, "mfu": achieved / rate,
                            "max_rel_diff": diff, "speedup": timings["timm"]["median_ms"] / t["median_ms"]})
    return records


def main(argv=None) -> int:
    parser = model_arguments(__doc__.split("\n\n")[0], "images per call (default: 256 on GPU, 16 on CPU)",
                             "repeatable (default: fp32 and bf16; on a GPU bf16 only)")
    parser.add_argument("--out", help="JSON path")
    args, device, batch = parse_model_arguments(parser, argv, FEATURES_BATCH)
    records = run_features(device, args.model, batch, args.precision or ["fp32", "bf16"], args.warmup, args.runs)
    env = environment(device)
    print(json.dumps({"environment": env}))
    print_table(records, TABLE_COLUMNS)
    if args.out:
        save_results(Path(args.out), env, records)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
