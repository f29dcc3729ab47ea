"""Export a GFM encoder to ONNX or ``torch.export`` (``.pt2``) and check the file against eager PyTorch.

    python -m gfm_fast.export --model runs/gfm/model --out gfm.onnx --format onnx
    python -m gfm_fast.export --model gfm.pth --out gfm.pt2 --format pt2 --image-size 256 --stages 0 1 2 3

The exported graph takes *normalised* images (B, C, S, S) float32 (pixels scaled to [0, 1], then
the model's mean/std, as ``extract_features`` does; the values are stored in the file's metadata)
and returns what ``extract_features`` returns: the pooled feature (B, F), or with ``--stages`` one
NCHW map per stage (the last with the final norm). The batch is dynamic; the spatial size S is
fixed at export (Swin's window partition, cyclic shift and attention masks are laid out for one
size): export once per size. The command runs the file (ONNX Runtime, or ``torch.export.load``)
and eager PyTorch on the same random batch and reports the largest difference relative to the
largest eager value; it fails above 1e-4.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

import torch
from torch import nn

from gfm_fast.errors import GFMError, exit_status

__all__ = ["export_model", "ExportResult", "FORMATS", "TOLERANCE"]

FORMATS = ("onnx", "pt2")
TOLERANCE = 1e-4  # largest |exported - eager| / max |eager|
CHECK_BATCH = 3  # differs from the example batch (2), so the dynamic batch is exercised
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")  # the [export] extra: exporter, its IR, the check
METADATA_FILE = "gfm_fast.json"  # pt2 extra file; ONNX metadata_props keys are the same JSON's keys


class ExportError(GFMError, RuntimeError):
    """The export cannot be made or does not match eager PyTorch; the message says why."""


class _Features(nn.Module):
    """The encoder as ``extract_features`` runs it: pooled feature or per-stage NCHW maps."""

    def __init__(self, encoder: nn.Module, stages: Optional[List[int]]):
        super().__init__()
        self.encoder, self.stages = encoder, stages

    def forward(self, x: torch.Tensor):
        if self.stages is None:
            return self.encoder.forward_head(self.encoder.forward_features(x), pre_logits=True)
        return tuple(self.encoder.forward_intermediates(x, indices=self.stages, norm=True, output_fmt="NCHW",
                                                        intermediates_only=True))


@dataclass
class ExportResult:
    """What ``export_model`` wrote and how close it is to eager PyTorch."""

    path: Path
    format: str
    input_shape: Tuple[int, ...]  # with the dynamic batch as -1
    output_shapes: List[Tuple[int, ...]]
    max_relative_error: float
    checked_with: str

    def summary(self) -> str:
        outputs = ", ".join(str(s) for s in self.output_shapes)
        return (f"wrote {self.path} ({self.format}): input {self.input_shape} (batch dynamic), output {outputs}; "
                f"check against eager PyTorch with {self.checked_with}: max relative difference "
                f"{self.max_relative_error:.2e} <= {TOLERANCE:g}: OK")


def _metadata(config: Any, size: int, stages: Optional[List[int]]) -> dict:
    return {"mean": list(config.mean), "std": list(config.std), "in_chans": config.swin.in_chans,
            "image_size": size, "stages": stages, "model_name": config.model_name,
            "input": "normalised float32 (B, C, H, W): pixels in [0, 1], then (x - mean) / std"}


def _require_onnx_packages() -> None:
    """Before any work: torch's exporter imports onnxscript deep inside, and the check needs onnxruntime."""
    missing = [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise ExportError(f"ONNX export needs {', '.join(ONNX_PACKAGES)} ({', '.join(missing)} not installed): "
                          "GFM_EXTRAS=export bash scripts/install.sh in the repository (gfm_fast is not on PyPI)")


def _export_onnx(module: nn.Module, example: torch.Tensor, out: Path, names: List[str], meta: dict) -> None:
    import onnx

    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.onnx.export(module, (example,), dynamo=True, input_names=["images"], output_names=names,
                                dynamic_shapes={"x": {0: batch}}, optimize=True, verbose=False)
    model = program.model_proto
    for key, value in meta.items():
        model.metadata_props.add(key=key, value=json.dumps(value))
    onnx.save(model, str(out))


def _run_onnx(path: Path, x: torch.Tensor) -> Tuple[List[torch.Tensor], str]:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    return [torch.from_numpy(o) for o in outputs], f"ONNX Runtime {onnxruntime.__version__} (CPU)"


def _export_pt2(module: nn.Module, example: torch.Tensor, out: Path, meta: dict) -> None:
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(module, (example,), dynamic_shapes={"x": {0: batch}})
    torch.export.save(program, str(out), extra_files={METADATA_FILE: json.dumps(meta)})


def _run_pt2(path: Path, x: torch.Tensor) -> Tuple[List[torch.Tensor], str]:
    outputs = torch.export.load(str(path)).module()(x)
    return list(outputs) if isinstance(outputs, (tuple, list)) else [outputs], "torch.export.load"


def export_model(model_or_path: Any, out: Any, *, format: str = "onnx", image_size: Optional[int] = None,
                 stages: Optional[Sequence[int]] = None) -> ExportResult:
    """Export an encoder and check the file against eager PyTorch.

    Args:
        model_or_path: an encoder (``load_model`` result, a timm Swin) or any path ``load_model`` reads.
        out: the file to write (``.onnx`` / ``.pt2``).
        format: ``"onnx"`` or ``"pt2"``.
        image_size: the fixed input side in pixels (default: the model's; a multiple of 32).
        stages: None for the pooled feature, or stage indices for per-stage NCHW maps.

    Returns:
        An ``ExportResult`` (shapes, the measured difference).

    Raises:
        ExportError: unknown format, a size the model cannot take, missing ONNX packages, or a
            file whose outputs differ from eager by more than ``TOLERANCE``.
    """
    from gfm_fast.features import _stage_indices
    from gfm_fast.models.attention import attention_path
    from gfm_fast.models.io import load_model
    from gfm_fast.models.swin import allow_any_input_size, encoder_config_of

    if format not in FORMATS:
        raise ExportError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    if format == "onnx":
        _require_onnx_packages()
    encoder = load_model(model_or_path) if isinstance(model_or_path, (str, Path)) else model_or_path
    encoder = encoder.float().cpu().eval()
    config = encoder_config_of(encoder)
    size = int(image_size or config.swin.img_size)
    if size <= 0 or size % config.swin.total_stride:
        raise ExportError(f"--image-size {size} is not a positive multiple of {config.swin.total_stride} "
                          f"(the model's total stride)")
    picked = _stage_indices(stages, len(encoder.layers))
    module = _Features(encoder, picked).eval()
    names = ["features"] if picked is None else [f"stage{i}" for i in picked]
    meta = _metadata(config, size, picked)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    example = torch.randn(2, config.swin.in_chans, size, size, generator=generator)
    check = torch.randn(CHECK_BATCH, config.swin.in_chans, size, size, generator=generator)
    # Written and checked under a temporary name, then renamed: a file at ``out`` is always a checked
    # one (never half written by a killed export, nor one that failed the check).
    tmp = out.with_name(f"{out.stem}.tmp{out.suffix}")
    try:
        # Standard operators only (SDPA), not gfm_fast's CPU kernel: the file must run without gfm_fast.
        with torch.no_grad(), allow_any_input_size(encoder), attention_path(encoder, "sdpa"):
            if format == "onnx":
                _export_onnx(module, example, tmp, names, meta)
            else:
                _export_pt2(module, example, tmp, meta)
            eager = module(check)
        eager = list(eager) if isinstance(eager, tuple) else [eager]
        with torch.no_grad():
            exported, checked_with = _run_onnx(tmp, check) if format == "onnx" else _run_pt2(tmp, check)
        if len(exported) != len(eager) or any(a.shape != b.shape for a, b in zip(exported, eager)):
            raise ExportError(f"{out}: output shapes {[tuple(a.shape) for a in exported]} differ from eager "
                              f"{[tuple(b.shape) for b in eager]}")
        error = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-12)) for a, b in zip(exported, eager))
        if not error <= TOLERANCE:
            raise ExportError(f"{out}: outputs differ from eager PyTorch by {error:.2e} (relative), above "
                              f"{TOLERANCE:g}")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return ExportResult(out, format, (-1, config.swin.in_chans, size, size),
                        [(-1, *b.shape[1:]) for b in eager], error, checked_with)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gfm_fast.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="anything gfm_fast.load_model reads (model dir, run dir, file)")
    parser.add_argument("--out", required=True, help="output file (.onnx or .pt2)")
    parser.add_argument("--format", choices=FORMATS, help="default: from the --out suffix")
    parser.add_argument("--image-size", type=int, default=None, help="fixed input side (default: the model's)")
    parser.add_argument("--stages", type=int, nargs="+", default=None,
                        help="export per-stage NCHW maps of these stages (default: the pooled feature)")
    args = parser.parse_args(argv)
    fmt = args.format or Path(args.out).suffix.lstrip(".").lower()
    # ValueError: bad stages or model arguments, named in the message; OSError: an --out where nothing can be written
    return exit_status(lambda: print(export_model(args.model, args.out, format=fmt, image_size=args.image_size,
                                                  stages=args.stages).summary()),
                       (GFMError, ValueError, OSError))


if __name__ == "__main__":
    sys.exit(main())
