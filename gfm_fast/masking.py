"""Vectorised on-device block masks for masked image modelling (docs/method.md, "Block masks").

One call draws the masks of the whole batch on the target device from an explicit
``torch.Generator``: no per-sample NumPy permutation in loader workers. Exactly
``ceil(ratio * num_blocks)`` blocks are masked in every image.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch

Size2 = Union[int, Tuple[int, int]]


def _pair(size: Size2) -> Tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


@dataclass(frozen=True)
class BlockMask:
    """A batch of block masks.

    Attributes:
        blocks: (B, H / block, W / block) bool, True = masked.
        block_size: pixels per mask block side (32 in GFM).
    """

    blocks: torch.Tensor
    block_size: int


def num_masked_blocks(num_blocks: int, ratio: float) -> int:
    """ceil(ratio * num_blocks): 22 of 36 for GFM's 0.6 at 192 px."""
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"mask ratio must lie in (0, 1), got {ratio}")
    # round() guards against float error such as 0.6 * 36 = 21.599999999999998 -> 22 either way,
    # while 0.5 * 36 = 18.0 must stay 18.
    return min(num_blocks, math.ceil(round(ratio * num_blocks, 9)))


def generate_block_mask(batch_size: int, img_size: Size2 = 192, *, block_size: int = 32, ratio: float = 0.6,
                        generator: Optional[torch.Generator] = None,
                        device: Optional[Union[str, torch.device]] = None) -> BlockMask:
    """Draw ``batch_size`` random block masks, each with exactly ceil(ratio * blocks) masked blocks.

    Args:
        batch_size: number of images B.
        img_size: image size (H, W) or a single int; both must be divisible by ``block_size``.
        block_size: mask block side in pixels.
        ratio: fraction of blocks to mask.
        generator: the random source; its device decides where the draw happens. With no
            generator the global RNG of ``device`` is used.
        device: where the mask lives (default: the generator's device, else CPU).

    Returns:
        A ``BlockMask`` whose ``blocks`` is (B, H / block_size, W / block_size) bool.
    """
    height, width = _pair(img_size)
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if block_size <= 0 or height % block_size or width % block_size:
        raise ValueError(f"image size {height}x{width} is not divisible by the mask block size {block_size}; "
                         f"choose an image size that is a multiple of {block_size}")
    grid_h, grid_w = height // block_size, width // block_size
    num_blocks = grid_h * grid_w
    k = num_masked_blocks(num_blocks, ratio)
    draw_device = generator.device if generator is not None else torch.device(device or "cpu")
    target = torch.device(device) if device is not None else draw_device
    # Random scores per block; the k smallest are masked. argsort of i.i.d. uniforms gives a
    # uniformly random k-subset per row, all rows in one kernel.
    scores = torch.rand(batch_size, num_blocks, generator=generator, device=draw_device)
    chosen = scores.argsort(dim=1)[:, :k]
    blocks = torch.zeros(batch_size, num_blocks, dtype=torch.bool, device=draw_device)
    blocks.scatter_(1, chosen, True)
    return BlockMask(blocks.view(batch_size, grid_h, grid_w).to(target), block_size)
