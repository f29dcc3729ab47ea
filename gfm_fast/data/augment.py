"""The GFM augmentation, one sample at a time, driven by an explicit torch.Generator.

RandomResizedCrop(img_size, scale=(0.67, 1), ratio=(3/4, 4/3), bilinear) -> horizontal flip
(p=0.5) -> to [0, 1] -> normalise with mean/std (docs/method.md). The crop and flip draws are
the same draws, in the same order, as torchvision's ``RandomResizedCrop`` + ``RandomHorizontalFlip``
on the global RNG, so a generator seeded with ``s`` reproduces torchvision under
``torch.manual_seed(s)`` (tests/data/test_augment.py checks it).

Resizing is ``F.interpolate(bilinear, antialias=True)`` on the cropped view of the decoded array:
on uint8 it matches Pillow's crop + bilinear resize (what torchvision does on PIL images) to
within one grey level and is 2.4-3.2x faster than Pillow's crop + resize (256 and 512 px images,
benchmarks/results/loader_cpu.json). The crop is a view (no copy):
the decoded HWC array is already a channels-last NCHW tensor, torch's fastest uint8 layout.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Dict, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from gfm_fast.data.decode import to_unit_scale

_CROP_TRIES = 10  # torchvision's RandomResizedCrop tries 10 times before a centre crop
_MAX_DRAFT_REDUCTION = 8  # libjpeg decodes at 1/2, 1/4, 1/8 scale


@dataclass(frozen=True)
class CropBox:
    """Crop in full-resolution pixel coordinates, plus the flip decision."""

    top: int
    left: int
    height: int
    width: int
    flip: bool


class GFMAugment:
    """Random resized crop + flip + normalisation of one image at a time.

    Args:
        img_size: output side in pixels (192 for GFM).
        in_chans: channels of the output (gray input is replicated when this is 3).
        mean: per-channel mean of the [0, 1]-scaled image.
        std: per-channel std of the [0, 1]-scaled image.
        scale: RandomResizedCrop area range.
        ratio: RandomResizedCrop aspect-ratio range.
        hflip: probability of a horizontal flip.
    """

    def __init__(self, img_size: int, in_chans: int, mean: Sequence[float], std: Sequence[float],
                 scale: Tuple[float, float] = (0.67, 1.0), ratio: Tuple[float, float] = (3 / 4, 4 / 3),
                 hflip: float = 0.5):
        if len(mean) != in_chans or len(std) != in_chans:
            raise ValueError(f"mean and std need {in_chans} entries (one per channel), got {len(mean)} and "
                             f"{len(std)}; pass per-band statistics for multi-band imagery")
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be positive, got {tuple(std)}")
        self.img_size = int(img_size)
        self.in_chans = int(in_chans)
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.hflip = float(hflip)
        # torchvision computes log(ratio) in float32; keep those exact values for identical draws.
        self._log_ratio = [float(v) for v in torch.log(torch.tensor(self.ratio))]
        self.mean, self.std = tuple(mean), tuple(std)
        self._affine: Dict[np.dtype, Tuple[torch.Tensor, torch.Tensor]] = {}

    # ---------------------------------------------------------------- parameters
    def sample_box(self, width: int, height: int, generator: torch.Generator) -> CropBox:
        """Draw a crop (torchvision RandomResizedCrop.get_params) and a flip, in that order."""
        area = height * width
        box = None
        for _ in range(_CROP_TRIES):
            target_area = area * torch.empty(1).uniform_(*self.scale, generator=generator).item()
            aspect = math.exp(torch.empty(1).uniform_(*self._log_ratio, generator=generator).item())
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = torch.randint(0, height - h + 1, size=(1,), generator=generator).item()
                left = torch.randint(0, width - w + 1, size=(1,), generator=generator).item()
                box = (top, left, h, w)
                break
        if box is None:
            box = self._centre_box(width, height)
        flip = torch.rand(1, generator=generator).item() < self.hflip
        return CropBox(*box, flip=flip)

    def _centre_box(self, width: int, height: int) -> Tuple[int, int, int, int]:
        in_ratio = width / height
        if in_ratio < min(self.ratio):
            w, h = width, int(round(width / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            w, h = int(round(height * max(self.ratio))), height
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def draft_reduction(self, box: CropBox) -> int:
        """Largest JPEG DCT reduction (1, 2, 4, 8) that keeps the crop at least img_size wide."""
        reduce = 1
        while reduce < _MAX_DRAFT_REDUCTION and min(box.height, box.width) // (2 * reduce) >= self.img_size:
            reduce *= 2
        return reduce

    # ---------------------------------------------------------------- pixels
    def crop_resize(self, array: np.ndarray, box: CropBox, full_size: Tuple[int, int]) -> torch.Tensor:
        """Crop ``box`` out of an (H, W, C) array and resize it to img_size.

        Args:
            array: decoded pixels, HWC, possibly decoded at reduced size (JPEG draft).
            box: crop in full-resolution coordinates.
            full_size: (width, height) of the full-resolution image, to rescale ``box``.

        Returns:
            (C, img_size, img_size) tensor, NCHW-indexed; uint8 for uint8 input, else
            float32 in the stored units (to_unit_scale gives the factor to [0, 1]).
        """
        image = _as_tensor(array).permute(2, 0, 1).unsqueeze(0)  # (1, C, H, W), channels-last
        height, width = image.shape[-2:]
        top, left, h, w = _rescale_box(box, width / full_size[0], height / full_size[1], width, height)
        crop = image[:, :, top:top + h, left:left + w]
        if crop.dtype != torch.uint8:
            crop = crop.float()  # torch's antialiased resize takes uint8 or float
        size = (self.img_size, self.img_size)
        out = crop if (h, w) == size else F.interpolate(crop, size=size, mode="bilinear", align_corners=False,
                                                        antialias=True)
        out = out[0]
        return out.flip(-1) if box.flip else out

    def normalize_into(self, out: torch.Tensor, image: torch.Tensor, dtype: np.dtype) -> None:
        """out = (image * to_unit_scale(dtype) - mean) / std (gray is broadcast to C).

        Args:
            out: (C, S, S) float32 destination (a row of the batch).
            image: (C or 1, S, S) tensor from crop_resize.
            dtype: the stored sample type of the decoded image (uint8, uint16, float32).
        """
        scale, bias = self._affine_for(np.dtype(dtype))
        # copy_ converts dtype and layout (channels-last -> NCHW) in one pass; the broadcast
        # mul_/add_ then vectorise, unlike a mixed-dtype addcmul (~3x slower, measured).
        out.copy_(image).mul_(scale).add_(bias)

    def _affine_for(self, dtype: np.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        if dtype not in self._affine:
            self._affine[dtype] = normalization_affine(self.mean, self.std, dtype)
        return self._affine[dtype]


def normalization_affine(mean: Sequence[float], std: Sequence[float],
                         dtype: np.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """(scale, bias), each (C, 1, 1) float32: ``x * scale + bias = (x * to_unit_scale(dtype) - mean) / std``.

    The one computation of the normalisation constants, shared by the workers (normalize_into) and
    the loader's on-device normalisation of uint8 batches, so both use the same float32 values.
    """
    inv_std = 1.0 / torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    return to_unit_scale(np.dtype(dtype)) * inv_std, -mean * inv_std


def _as_tensor(array: np.ndarray) -> torch.Tensor:
    """Zero-copy tensor view; Pillow's arrays are read-only, which is fine: nothing writes to them."""
    if array.flags.writeable:
        return torch.from_numpy(array)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's "array is not writable" notice
        return torch.from_numpy(array)


def _rescale_box(box: CropBox, sx: float, sy: float, width: int, height: int) -> Tuple[int, int, int, int]:
    """Map a full-resolution box onto an image decoded at scale (sx, sy), clipped to it."""
    if sx == 1.0 and sy == 1.0:
        return box.top, box.left, box.height, box.width
    top, left = min(int(round(box.top * sy)), height - 1), min(int(round(box.left * sx)), width - 1)
    h = max(1, min(int(round(box.height * sy)), height - top))
    w = max(1, min(int(round(box.width * sx)), width - left))
    return top, left, h, w
