"""``extract_features``: GFM student features for tensors, arrays, image files or a directory.

A thin layer over timm's ``forward_features`` + pooling (default) and ``forward_intermediates``
(per-stage maps, NCHW, strides 4/8/16/32), batched, without autograd, bf16 on CUDA.

Input scaling (documented once, applied everywhere):

* float tensors / float NumPy arrays are model inputs already normalised with the model's
  mean/std: used as they are;
* uint8 data (tensors, arrays, 8-bit PNG/JPEG/TIFF) is divided by 255, uint16 data (tensors,
  arrays, 16-bit PNG/TIFF, e.g. multi-band GeoTIFF) by 65535, floating-point TIFF bands are taken as
  already in [0, 1]; then each channel is normalised with the model's mean/std.

Image files are decoded by the training loader's decoder (gfm_fast.data.decode, whose docstring
states the rule for bit depth, gray, alpha, palette, CMYK and multi-band TIFF), so a file gives
the same pixels here as in training. Float input holding NaN or Inf is refused, naming the image.
"""
from __future__ import annotations

import numbers
import os
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from gfm_fast.data.decode import BandMismatch, CorruptSample, decode_image, full_scale
from gfm_fast.errors import ConfigError
from gfm_fast.models.io import load_model
from gfm_fast.models.pretrainer import GFMPretrainer, GFMStudent
from gfm_fast.models.swin import allow_any_input_size, encoder_config_of

__all__ = ["extract_features", "read_image", "check_device", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
INTEGER_RANGE = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}  # divisor to reach [0, 1]
PROGRESS_MIN_IMAGES = 256  # progress=None shows a bar from this many images on
PathLike = Union[str, os.PathLike]


class _Encoder:
    """The encoder to run, with what extraction needs to know about it."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.config = encoder_config_of(module)
        self.in_chans = self.config.swin.in_chans
        self.stride = self.config.swin.total_stride
        self.num_stages = len(module.layers)


def _resolve_encoder(model_or_path: Any) -> _Encoder:
    model = model_or_path
    if isinstance(model, (str, os.PathLike)):
        model = load_model(model)
    if isinstance(model, GFMPretrainer):
        model = model.student.encoder
    elif isinstance(model, GFMStudent):
        model = model.encoder
    if not isinstance(model, nn.Module) or not all(hasattr(model, a) for a in ("patch_embed", "layers")):
        raise TypeError(f"extract_features expects a Swin encoder, a GFMPretrainer/GFMStudent or a model path, got "
                        f"{type(model_or_path).__name__}")
    return _Encoder(model)


# --------------------------------------------------------------------------------------------
# Inputs -> batches of (B, C, H, W) tensors
# --------------------------------------------------------------------------------------------

def _to_nchw(data: torch.Tensor, chans: int, what: str) -> torch.Tensor:
    """(H,W) / (C,H,W) / (H,W,C) / (N,C,H,W) / (N,H,W,C) -> (N, C, H, W).

    Channels-last when the last dim has the model's channel count and dim 1 does not, or, when
    neither matches, when the last dim is the smaller one (channels are few, pixels many), so a
    wrong channel count is reported as such.
    """
    if data.dim() == 2:
        data = data.unsqueeze(-1)
    if data.dim() == 3:
        data = data.unsqueeze(0)
    if data.dim() != 4:
        raise ValueError(f"{what} must have 2 to 4 dimensions ((H, W), (C, H, W), (H, W, C) or a batch of them), "
                         f"got shape {tuple(data.shape)}")
    if data.shape[1] != chans and (data.shape[-1] == chans or data.shape[-1] < data.shape[1]):
        data = data.permute(0, 3, 1, 2)
    return data


def _slices(data: torch.Tensor, batch_size: int, scale: Optional[float],
            what: str) -> Iterator[Tuple[torch.Tensor, Optional[float], str]]:
    for start in range(0, data.shape[0], batch_size):
        batch = data[start:start + batch_size]
        _check_finite(batch, lambda i: f"{what}: image {start + i}")
        yield batch, scale, what


_TORCH_INTEGER_RANGE = {torch.uint8: 255.0, torch.uint16: 65535.0}


def _array_scale(dtype: Any, what: str) -> Optional[float]:
    """None for floats (already normalised), else the divisor that maps the integer range to [0, 1]."""
    if isinstance(dtype, torch.dtype):
        if dtype.is_floating_point:
            return None
        if dtype in _TORCH_INTEGER_RANGE:
            return _TORCH_INTEGER_RANGE[dtype]
    else:
        dtype = np.dtype(dtype)
        if dtype.kind == "f":
            return None
        if dtype in INTEGER_RANGE:
            return INTEGER_RANGE[dtype]
    raise TypeError(f"{what} has dtype {dtype}; expected uint8 or uint16 pixel values, or floats already normalised")


def read_image(path: PathLike, in_chans: Optional[int] = None) -> Tuple[np.ndarray, float]:
    """Read one image file as an (H, W, C) array and the divisor that maps it to [0, 1].

    A thin call into the training loader's decoder (``gfm_fast.data.decode.decode_image``): the
    same rule for 8/16-bit, gray, alpha, palette, CMYK and multi-band TIFF, documented there.

    Args:
        path: the image file (PNG, JPEG, TIFF incl. multi-band GeoTIFF, WebP, BMP).
        in_chans: the model's input channels: gray is replicated for 3, and a file whose bands
            do not fit is refused. None keeps the bands the rule gives.

    Raises:
        ValueError: the file does not exist, cannot be decoded or does not fit ``in_chans``
            (the message names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"image file {path} does not exist")
    try:
        array = decode_image(path.read_bytes(), path.suffix.lstrip("."), in_chans)
    except BandMismatch as exc:
        raise ValueError(f"image file {path}: {exc}") from None
    except CorruptSample as exc:
        raise ValueError(f"cannot read image file {path}: {exc}") from exc
    return array, full_scale(array.dtype)


def _check_finite(data: torch.Tensor, what: Callable[[int], str]) -> None:
    """Refuse NaN/Inf in float input (they would come out as NaN features), naming the first such image."""
    if not data.is_floating_point():
        return
    bad = ~torch.isfinite(data).flatten(1).all(dim=1)
    if bool(bad.any()):
        first = int(bad.nonzero()[0, 0])
        raise ValueError(f"{what(first)} holds non-finite pixel values (NaN or Inf); fill or mask them (e.g. "
                         "np.nan_to_num, or replace nodata) before extracting features")


def _list_images(directory: Path) -> List[Path]:
    """The directory's own image files, sorted (not its subfolders: their layout is the caller's to choose)."""
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        hint = ""
        if any(p.is_dir() for p in directory.iterdir()):
            hint = (f" (subfolders are not searched: pass a list of files, e.g. "
                    f"sorted(Path({str(directory)!r}).rglob('*.png')), or use python -m gfm_fast.features)")
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in directory {directory}{hint}")
    return files


def _file_batches(files: Sequence[Path], chans: int, stride: int,
                  batch_size: int) -> Iterator[Tuple[torch.Tensor, Optional[float], str]]:
    """Read files lazily, batch_size at a time; consecutive images of one size and scale share a batch."""
    for start in range(0, len(files), batch_size):
        group: List[torch.Tensor] = []
        key = None
        for path in files[start:start + batch_size]:
            array, scale = read_image(path, chans)
            image = _to_nchw(torch.from_numpy(array.astype(np.int32) if array.dtype == np.uint16 else array),
                             chans, f"image file {path}")
            _check_finite(image, lambda _: f"image file {path}")
            _check_geometry(image, chans, stride, f"image file {path}")
            if group and (tuple(image.shape[1:]), scale) != key:
                yield torch.cat(group), key[1], f"images in {path.parent}"
                group = []
            group.append(image)
            key = (tuple(image.shape[1:]), scale)
        if group:
            yield torch.cat(group), key[1], f"images in {files[start].parent}"


def _batches(images: Any, chans: int, stride: int, batch_size: int) -> Tuple[int, Iterator]:
    """(number of images, iterator of (batch, divisor or None if normalised, description))."""
    if isinstance(images, torch.Tensor):
        scale = _array_scale(images.dtype, "images tensor")
        if scale is None:  # model inputs: NCHW by contract
            if images.dim() not in (3, 4):
                raise ValueError(f"a float images tensor must be (B, C, H, W) or (C, H, W), got {tuple(images.shape)}")
            data = images if images.dim() == 4 else images.unsqueeze(0)
        else:
            data = _to_nchw(images, chans, "images tensor")
        return _counted(data, batch_size, scale, "images tensor")
    if isinstance(images, np.ndarray):
        if not images.dtype.isnative:  # e.g. '>u2' from a big-endian raster: same values, this machine's order
            images = images.astype(images.dtype.newbyteorder("="))
        scale = _array_scale(images.dtype, "images array")
        # No copy: batches are views, each cast to float on its own (uint16 included).
        data = _to_nchw(torch.from_numpy(np.ascontiguousarray(images)), chans, "images array")
        return _counted(data, batch_size, scale, "images array")
    if isinstance(images, (str, os.PathLike)):
        path = Path(images)
        files = _list_images(path) if path.is_dir() else [path]
        return len(files), _file_batches(files, chans, stride, batch_size)
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("images is an empty list")
        if not all(isinstance(p, (str, os.PathLike)) for p in images):
            raise TypeError("a list of images must hold file paths (str or Path); stack arrays or tensors into one "
                            "batch instead")
        return len(images), _file_batches([Path(p) for p in images], chans, stride, batch_size)
    raise TypeError(f"images must be a tensor, a NumPy array, a list of file paths or a directory, got "
                    f"{type(images).__name__}")


def _counted(data: torch.Tensor, batch_size: int, scale: Optional[float], what: str) -> Tuple[int, Iterator]:
    if data.shape[0] == 0:
        raise ValueError(f"{what} is empty (0 images)")
    return data.shape[0], _slices(data, batch_size, scale, what)


def _check_geometry(batch: torch.Tensor, chans: int, stride: int, what: str) -> None:
    if batch.shape[1] != chans:
        raise ValueError(f"{what}: {batch.shape[1]} channels but the model takes {chans} "
                         f"(shape {tuple(batch.shape)}); select or stack the model's bands")
    height, width = batch.shape[-2:]
    if stride and (height % stride or width % stride or height == 0 or width == 0):
        raise ValueError(f"{what}: size {height}x{width} is not divisible by {stride}; resize or crop to a multiple "
                         f"of {stride} (e.g. {max(stride, height // stride * stride)}x"
                         f"{max(stride, width // stride * stride)})")


def _normalization(config, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """The model's mean and std as (1, C, 1, 1) tensors on ``device``, built once per call (a
    per-batch ``torch.tensor(..., device=cuda)`` is a blocking host-to-device copy)."""
    mean = torch.tensor(config.mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    std = torch.tensor(config.std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    return mean, std


def _prepare(batch: torch.Tensor, scale: Optional[float], mean_std: Tuple[torch.Tensor, torch.Tensor],
             device: torch.device) -> torch.Tensor:
    """Move to ``device`` first (uint8 travels 4x lighter), then scale and normalise."""
    batch = batch.to(device, non_blocking=True)
    if scale is None:
        return batch.float()
    mean, std = mean_std
    return (batch.float() / scale - mean) / std


# --------------------------------------------------------------------------------------------
# The entry point
# --------------------------------------------------------------------------------------------

def _stage_indices(stages: Optional[Sequence[int]], num_stages: int) -> Optional[List[int]]:
    if stages is None:
        return None
    if isinstance(stages, numbers.Integral):
        stages = [stages]
    picked = []
    for stage in stages:
        if isinstance(stage, bool) or not isinstance(stage, numbers.Integral) or not -num_stages <= stage < num_stages:
            raise ValueError(f"stages must be ints in [0, {num_stages}) (or negative from the end), got {stage!r}")
        picked.append(stage % num_stages)
    if not picked:
        raise ValueError("stages is empty; pass None for the pooled feature or e.g. [0, 1, 2, 3]")
    return sorted(set(int(stage) for stage in picked))


def check_device(device: Union[str, torch.device]) -> torch.device:
    """``torch.device(device)``, refusing a name torch does not know or a CUDA device this machine
    lacks in one line (torch would fail later, in the first copy, with a driver message).

    Raises:
        ConfigError: the device name and what is available instead.
    """
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device {str(device)!r} is not a device name; use 'cpu', 'cuda' or 'cuda:N'") from None
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (resolved.index or 0) >= count:
            have = "no CUDA device" if count == 0 else f"{count} CUDA device(s)"
            raise ConfigError(f"device {str(device)!r} is not available: this machine has {have}; use 'cpu'"
                              f"{'' if count == 0 else ' or cuda:0'}")
    return resolved


def _default_device(module: nn.Module) -> torch.device:
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _run(module: nn.Module, x: torch.Tensor, stages: Optional[List[int]]):
    if stages is None:
        return module.forward_head(module.forward_features(x), pre_logits=True).float().cpu()
    maps = module.forward_intermediates(x, indices=stages, norm=True, output_fmt="NCHW", intermediates_only=True)
    return [m.float().cpu() for m in maps]


def extract_features(model_or_path: Any, images: Any, *, batch_size: int = 64,
                     device: Optional[Union[str, torch.device]] = None, stages: Optional[Sequence[int]] = None,
                     progress: Optional[bool] = None) -> Union[torch.Tensor, Dict[int, torch.Tensor]]:
    """GFM encoder features for a set of images.

    Args:
        model_or_path: an encoder (``load_model`` result or any timm Swin), a ``GFMPretrainer``
            (its student encoder is used), or a path accepted by ``gfm_fast.load_model``.
        images: a float tensor (B, C, H, W) or (C, H, W) already normalised; a uint8/uint16 tensor or
            a uint8/uint16/float NumPy array, HWC or CHW, single image or batch (integers are scaled
            to [0, 1] and normalised with the model's mean/std; floats are taken as normalised);
            a list of image file paths (PNG, JPEG, TIFF incl. multi-band GeoTIFF); a single file;
            or a directory (its images, sorted by name). See the module docstring for scaling.
            H and W must be divisible by 32; they need not equal the training size.
        batch_size: images per forward pass.
        device: where to run (default: the model's device; for a path, CUDA when available).
            The model is moved there.
        stages: None for the pooled final feature; a list of stage indices (e.g. [0, 1, 2, 3]) for
            per-stage maps. The last stage gets the final norm, as in the pooled feature.
        progress: show a tqdm bar (default: only for >= 256 images).

    Returns:
        (N, num_features) float32 (1024 for Swin-B) on the CPU, or with ``stages`` a dict
        ``{i: (N, C_i, H_i, W_i)}`` NCHW at stride 4 * 2**i (128/256/512/1024 channels for Swin-B).
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    encoder = _resolve_encoder(model_or_path)
    picked = _stage_indices(stages, encoder.num_stages)
    module = encoder.module
    if device is not None:
        device = check_device(device)
    elif isinstance(model_or_path, (str, os.PathLike)):
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = _default_device(module)
    module.to(device)
    count, batches = _batches(images, encoder.in_chans, encoder.stride, batch_size)
    show = progress if progress is not None else count >= PROGRESS_MIN_IMAGES
    use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    weights_dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)
    mean_std = _normalization(encoder.config, device)
    outputs: List[Any] = []
    size = None  # per-stage maps of all images must share one size
    was_training = module.training
    module.eval()
    try:
        with torch.inference_mode(), allow_any_input_size(module), tqdm(total=count, unit="img", disable=not show,
                                                                       desc="extract_features") as bar:
            for batch, scale, what in batches:
                _check_geometry(batch, encoder.in_chans, encoder.stride, what)
                size = size or batch.shape[-2:]
                if picked is not None and batch.shape[-2:] != size:
                    raise ValueError("images of different sizes give per-stage maps of different sizes; pass "
                                     "images of one size when asking for stages (or use the pooled feature)")
                x = _prepare(batch, scale, mean_std, device)
                if not use_bf16:  # a model cast to bf16/fp16 (e.g. on CPU) takes inputs of its own dtype
                    x = x.to(weights_dtype)
                with torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else nullcontext():
                    outputs.append(_run(module, x, picked))
                bar.update(batch.shape[0])
    finally:
        module.train(was_training)
    if picked is None:
        return torch.cat(outputs)
    return {stage: torch.cat([out[i] for out in outputs]) for i, stage in enumerate(picked)}


if __name__ == "__main__":  # python -m gfm_fast.features: feature files, see gfm_fast.features_cli
    from gfm_fast.features_cli import main

    raise SystemExit(main())
