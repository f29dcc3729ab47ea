"""``python -m gfm_fast.eval``: k-NN and linear-probe accuracy of frozen GFM features on labelled scenes.

    python -m gfm_fast.eval --model runs/gfm --data /data/UCMerced_LandUse/Images --json eval/ucm.json
    python -m gfm_fast.eval --model run_a --model run_b --data /data/eurosat-shards --protocol knn
    python -m gfm_fast.eval --model runs/gfm --data /data/AID --teacher swin_base_patch4_window7_224_22k.pth

Prints a table; with ``--json OUT`` also writes OUT, the same report as Markdown (OUT with ``.md``)
and one confusion-matrix PNG per model beside it. Errors in the input are one line (exit status 2).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import List, Optional, Tuple


def _bands(text: str) -> Tuple[int, ...]:
    try:
        return tuple(int(b) for b in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated band indices such as 3,2,1, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m gfm_fast.eval", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--model", action="append", required=True, metavar="MODEL",
                        help="a model directory, training run directory, DeepSpeed checkpoint, GFM release or Swin "
                             "checkpoint (repeat to compare models)")
    parser.add_argument("--data", required=True, metavar="DIR_OR_SHARDS",
                        help="class folders DIR/<class>/<image> (train.txt/test.txt honoured), or WebDataset shards "
                             "with cls/json labels (build dir, .tar, brace pattern)")
    parser.add_argument("--protocol", choices=("knn", "linear", "both"), default="both")
    parser.add_argument("--json", metavar="OUT", help="write the report as JSON, Markdown (.md) and confusion PNGs")
    parser.add_argument("--image-size", type=int, help="resize images to this side (default: the model's input size)")
    parser.add_argument("--stage", type=int,
                        help="use this stage's averaged map (0-based, -1 = last; default: last stage, pooled)")
    parser.add_argument("--folds", type=int, default=5, help="k of the stratified k-fold for small sets (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of splits and the random-init baseline")
    parser.add_argument("--k", type=int, default=20, help="k-NN neighbours (default 20)")
    parser.add_argument("--temperature", type=float, default=0.07, help="k-NN vote temperature (default 0.07)")
    parser.add_argument("--baseline-random", action=argparse.BooleanOptionalAction, default=True,
                        help="also score a randomly initialised model of the same architecture (default: on)")
    parser.add_argument("--teacher", metavar="FILE", help="also score this Swin checkpoint's own features, e.g. the "
                                                          "ImageNet-22k teacher swin_base_patch4_window7_224_22k.pth")
    parser.add_argument("--teacher-bands", type=_bands, default=(0, 1, 2), metavar="B,G,R",
                        help="multi-band models: the bands the teacher's RGB filters read (default 0,1,2)")
    parser.add_argument("--cache-dir", help="feature cache (default: $GFM_FAST_CACHE/eval, else "
                        "$XDG_CACHE_HOME/gfm_fast/eval, else ~/.cache/gfm_fast/eval)")
    parser.add_argument("--no-cache", action="store_true", help="neither read nor write cached features")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from gfm_fast.errors import exit_status
    from gfm_fast.eval.runner import evaluate

    def work() -> None:
        if args.json:  # before minutes of extraction, not after
            _check_writable(args.json)
        report = evaluate(args.model, args.data, protocol=args.protocol, stage=args.stage,
                          image_size=args.image_size, folds=args.folds, seed=args.seed, k=args.k,
                          temperature=args.temperature, baseline_random=args.baseline_random, teacher=args.teacher,
                          teacher_bands=args.teacher_bands, cache_dir=args.cache_dir, use_cache=not args.no_cache,
                          batch_size=args.batch_size, device=args.device, progress=not args.no_progress)
        print(report.to_table(), end="")
        for path in report.write(args.json) if args.json else []:
            print(f"wrote {path}")

    return exit_status(work)


def _check_writable(path: str) -> None:
    """``--json``'s folder exists (made now) and takes files."""
    from gfm_fast.eval.datasets import EvalError

    folder = Path(path).parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EvalError(f"--json {path}: cannot create its folder {folder} ({exc.strerror or exc})") from None
    if not os.access(folder, os.W_OK):
        raise EvalError(f"--json {path}: its folder {folder} is not writable")


if __name__ == "__main__":
    sys.exit(main())
