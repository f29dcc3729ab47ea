"""Frozen features of a labelled image set: decode, resize, normalise, ``extract_features``, cache.

Every image is scaled to [0, 1] (8-bit by 255, 16-bit by 65535, float TIFF bands as they are),
resized to the model's input size (``config.swin.img_size``, or ``image_size``) with antialiased
bilinear interpolation (non-square images are stretched to a square, as scene classification
benchmarks do), normalised with the model's mean/std and passed to ``extract_features`` in batches.
The feature of an image is the last stage's pooled feature, or with ``stage`` the global average of
that stage's map (NCHW, averaged over H and W).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from gfm_fast.data.decode import to_unit_scale
from gfm_fast.eval.cache import FeatureCache
from gfm_fast.eval.datasets import EvalError, LabelledImages
from gfm_fast.eval.models import EvalModel
from gfm_fast.features import extract_features
from gfm_fast.models.swin import EncoderConfig

__all__ = ["Features", "input_size", "prepared_batches", "model_features"]


@dataclass
class Features:
    """One model's features of a data set, and how they were obtained."""

    values: torch.Tensor  # (N, D) float32, in the data set's order
    image_size: int
    stage: Optional[int]  # None: the last stage, pooled
    cached: bool
    seconds: float


def input_size(config: EncoderConfig, image_size: Optional[int]) -> int:
    """The side images are resized to: ``image_size`` or the model's own, checked against its stride."""
    size = int(image_size) if image_size is not None else int(config.swin.img_size)
    stride = config.swin.total_stride
    if size <= 0 or size % stride:
        raise EvalError(f"--image-size {size} must be a positive multiple of the model's stride {stride} "
                        f"(e.g. {max(stride, size // stride * stride)})")
    return size


def _to_input(pixels: np.ndarray, chans: int, size: int, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(H, W, C) pixels -> normalised (C, size, size) float32."""
    scale = to_unit_scale(pixels.dtype)
    image = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32)).permute(2, 0, 1) * scale
    if image.shape[0] == 1 and chans == 3:
        image = image.expand(3, -1, -1)  # gray into an RGB model
    if tuple(image.shape[1:]) != (size, size):
        image = F.interpolate(image[None], size=(size, size), mode="bilinear", align_corners=False,
                              antialias=True)[0]
    return (image - mean) / std


def prepared_batches(dataset: LabelledImages, config: EncoderConfig, size: int,
                     batch_size: int) -> Iterator[torch.Tensor]:
    """Normalised (B, C, size, size) float32 batches of ``dataset``, in order (NCHW)."""
    chans = config.swin.in_chans
    mean = torch.tensor(config.mean, dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(config.std, dtype=torch.float32).view(-1, 1, 1)
    for start in range(0, len(dataset), batch_size):
        indices = range(start, min(start + batch_size, len(dataset)))
        yield torch.stack([_to_input(dataset.read(i, chans), chans, size, mean, std) for i in indices])


def compute_features(encoder: torch.nn.Module, batches: Sequence[torch.Tensor], stage: Optional[int],
                     device: torch.device, bar: Optional[tqdm] = None) -> torch.Tensor:
    """Features of prepared batches: pooled last stage, or the spatial mean of ``stage``'s map."""
    outputs = []
    for batch in batches:
        if stage is None:
            outputs.append(extract_features(encoder, batch, batch_size=len(batch), device=device, progress=False))
        else:
            maps = extract_features(encoder, batch, batch_size=len(batch), device=device, stages=[stage],
                                    progress=False)
            outputs.append(maps[stage].mean(dim=(2, 3)))  # (B, C_stage, H, W) NCHW -> (B, C_stage)
        if bar is not None:
            bar.update(len(batch))
    return torch.cat(outputs)


def model_features(model: EvalModel, dataset: LabelledImages, *, data_fingerprint: str, stage: Optional[int],
                   image_size: Optional[int], batch_size: int, device: torch.device, cache: FeatureCache,
                   progress: bool = True) -> Features:
    """``model``'s features of ``dataset``, from the cache when an identical run stored them.

    Args:
        model: the encoder and its cache fingerprint.
        dataset: the labelled images.
        data_fingerprint: ``dataset.fingerprint()``, computed once per evaluation.
        stage: a stage index from ``resolve_stage`` (None: last stage, pooled).
        image_size: input side, or None for the model's own.
        batch_size: images per forward pass.
        device: where the encoder runs.
        cache: the feature cache (features of in-memory models are never cached).
        progress: show a progress bar while extracting.
    """
    size = input_size(model.config, image_size)
    key = None
    if model.fingerprint is not None:
        key = cache.key(model=model.fingerprint, data=data_fingerprint, image_size=size, stage=stage,
                        device=device.type)
    start = time.perf_counter()
    values = cache.load(key)
    if values is not None and values.shape[0] == len(dataset):
        return Features(values, size, stage, True, time.perf_counter() - start)
    with tqdm(total=len(dataset), unit="img", desc=f"features {model.label}", disable=not progress) as bar:
        batches = prepared_batches(dataset, model.config, size, batch_size)
        values = compute_features(model.encoder, batches, stage, device, bar)
    cache.save(key, values)
    return Features(values, size, stage, False, time.perf_counter() - start)
