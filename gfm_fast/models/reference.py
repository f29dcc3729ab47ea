"""GFM as the public reference code computes it: the yardstick of every speed claim.

Plain PyTorch on plain timm, written the way the GFM release (built on SimMIM) does its step, so
that ``benchmarks/throughput.py`` and the tests compare our step with the real alternative, not
with our own code on a slower backend:

- student: timm ``SwinTransformer`` with its explicit window attention (bmm, softmax, bmm), the
  patch embedding followed by the mask-token blend ``x * (1 - w) + mask_token * w`` at token level;
- decoder: the full-resolution reconstruction ``PixelShuffle(Conv2d(r))``, a per-pixel L1 loss
  against the images and the mask upsampled to pixels with ``repeat_interleave``;
- distillation: ``-F.cosine_similarity(z_s, z_t).mean()``;
- teacher: an unpruned timm Swin, fp32 weights, run through stages 1-3 under whatever autocast
  the caller's step uses (its weights are cast on every step, as the release's AMP does);
- masks: one NumPy permutation per image on the host (the release's ``MaskGenerator``), at token
  level, copied to the device.

Parameter names equal ``GFMPretrainer``'s (``student.*``, ``teacher.*``), so
``load_state_dict(pretrainer.state_dict(), strict=False)`` gives both the same weights (the
reference teacher's unused last stage stays as initialised). See docs/method.md.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformer
from torch import nn

from gfm_fast.config import ModelConfig
from gfm_fast.masking import num_masked_blocks
from gfm_fast.models.swin import swin_kwargs

__all__ = ["ReferenceGFM", "reference_token_masks"]


def reference_token_masks(batch: int, img_size: int, mask_block: int, patch_size: int, ratio: float,
                          rng: np.random.Generator) -> torch.Tensor:
    """Per-image host masks as the release's ``MaskGenerator``: a random permutation of the blocks,
    the first ``ceil(ratio * blocks)`` masked, repeated to token level: (B, H/p, W/p) int64."""
    grid = img_size // mask_block
    count = num_masked_blocks(grid * grid, ratio)
    rep = mask_block // patch_size
    masks = []
    for _ in range(batch):
        flat = np.zeros(grid * grid, dtype=np.int64)
        flat[rng.permutation(grid * grid)[:count]] = 1
        masks.append(flat.reshape(grid, grid).repeat(rep, axis=0).repeat(rep, axis=1))
    return torch.from_numpy(np.stack(masks))


class _Student(nn.Module):
    """SimMIM-style Swin encoder + projector P + decoder D, state-dict compatible with GFMStudent."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        cfg = config.student
        self.encoder = SwinTransformer(**swin_kwargs(cfg))
        self.encoder.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.projector = nn.Linear(cfg.num_features, config.teacher.num_features)
        self.decoder = nn.Sequential(nn.Conv2d(cfg.num_features, cfg.total_stride ** 2 * cfg.in_chans, 1),
                                     nn.PixelShuffle(cfg.total_stride))

    def forward(self, images: torch.Tensor, token_mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Returns (z_s (B, T), reconstruction (B, C, H, W))."""
        enc = self.encoder
        x = enc.patch_embed(images)  # (B, H/4, W/4, D) NHWC
        w = token_mask.unsqueeze(-1).type_as(x)
        x = x * (1.0 - w) + enc.mask_token * w
        for layer in enc.layers[:-1]:
            x = layer(x)
        h = enc.layers[-1].downsample(x)  # (B, H/32, W/32, F)
        z_s = self.projector(h.mean(dim=(1, 2)))
        r = enc.norm(enc.layers[-1].blocks(h)).permute(0, 3, 1, 2)
        return z_s, self.decoder(r)


class ReferenceGFM(nn.Module):
    """The reference GFM step's model: ``forward(images, token_mask)`` -> (loss, loss_rec, loss_feat).

    Args:
        config: the same ``ModelConfig`` as the ``GFMPretrainer`` it is compared with.
    """

    def __init__(self, config: Optional[ModelConfig] = None):
        super().__init__()
        self.config = config if config is not None else ModelConfig()
        self.student = _Student(self.config)
        self.teacher = SwinTransformer(**swin_kwargs(self.config.teacher))
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        self.bands = list(self.config.teacher_bands)

    def train(self, mode: bool = True) -> "ReferenceGFM":
        super().train(mode)
        self.teacher.eval()
        return self

    def teacher_features(self, images: torch.Tensor) -> torch.Tensor:
        """z_t: the teacher's stages 1-3 on the resized images, averaged over tokens, (B, T)."""
        t = self.teacher
        with torch.no_grad():
            x = F.interpolate(images[:, self.bands], size=tuple(t.patch_embed.img_size), mode="bilinear",
                              align_corners=True)
            x = t.patch_embed(x)
            for layer in t.layers[:-1]:
                x = layer(x)
            return t.layers[-1].downsample(x).mean(dim=(1, 2))

    def forward(self, images: torch.Tensor, token_mask: torch.Tensor):
        z_t = self.teacher_features(images)
        z_s, recon = self.student(images, token_mask)
        patch = self.config.student.patch_size
        pixel_mask = token_mask.repeat_interleave(patch, 1).repeat_interleave(patch, 2).unsqueeze(1)
        pixel_mask = pixel_mask.type_as(recon)
        loss_rec = (F.l1_loss(images, recon, reduction="none") * pixel_mask).sum() \
            / (pixel_mask.sum() + 1e-5) / images.shape[1]
        loss_feat = -F.cosine_similarity(z_s, z_t.detach(), dim=-1).mean()
        return loss_rec + self.config.alpha * loss_feat, loss_rec, loss_feat
