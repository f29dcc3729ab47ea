"""GFM's Swin encoders, built on timm's ``SwinTransformer`` (never a fork of it).

The student is timm's Swin with one change, the one GFM makes: the patch embedding also takes a
block mask and blends a learned ``mask_token`` into the masked tokens (SimMIM). Parameter names
stay timm's (``patch_embed.proj.*``, ``patch_embed.norm.*``), plus ``mask_token`` at the encoder
level where the GFM/SimMIM release keeps it (``encoder.mask_token``).

Order follows timm's ``swin_transformer.py``: layers -> model -> stage slicing -> builders. The
``gfm_swin_*`` timm names are registered in ``gfm_fast.models.registry``.
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from functools import partial
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from timm.layers import PatchEmbed, trunc_normal_
from timm.models._manipulate import checkpoint_seq
from timm.models.swin_transformer import SwinTransformer, SwinTransformerBlock, window_partition, window_reverse
from torch import nn

from gfm_fast import ops
from gfm_fast.config import IMAGENET_MEAN, IMAGENET_STD, SwinConfig
from gfm_fast.models.attention import from_windows, set_attention, to_windows
from gfm_fast.models.linear import set_bf16_matmul
from gfm_fast.models.registry import ARCH_FIELDS, VARIANTS

__all__ = ["MaskedPatchEmbed", "GFMSwinTransformer", "EncoderConfig", "split_at_last_merging", "swin_kwargs",
           "build_student", "prune_to_trunk", "allow_any_input_size", "encoder_config_of", "variant_name"]

MASK_TOKEN_STD = 0.02  # SimMIM / GFM initialisation of the mask token


class MaskedPatchEmbed(PatchEmbed):
    """timm's ``PatchEmbed`` (NHWC output) that can also replace masked tokens by a mask token.

    Without a mask it is exactly timm's patch embedding. With a mask, the fused op
    ``gfm_fast.ops.masked_patch_embed`` does conv + LayerNorm + blend in one pass.
    """

    def __init__(self, *args: Any, backend: str = "auto", **kwargs: Any):
        super().__init__(*args, **kwargs)
        if self.patch_size[0] != self.patch_size[1]:
            raise ValueError(f"MaskedPatchEmbed needs a square patch, got {self.patch_size}")
        if not isinstance(self.norm, nn.LayerNorm):
            raise ValueError("MaskedPatchEmbed needs a LayerNorm after the patch projection (GFM's Swin has one)")
        self.backend = backend

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None,
                mask_token: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Embed images (B, C, H, W) NCHW into tokens (B, H/p, W/p, D) NHWC.

        Args:
            x: normalised images (B, C, H, W).
            mask: None (plain patch embedding), or (B, h, w) 0/1 on the token grid or any coarser
                grid that divides it (e.g. the 32-px block mask); upsampled on the fly.
            mask_token: (1, 1, D), required with ``mask``.
        """
        if mask is None:
            return super().forward(x)
        if mask_token is None:
            raise ValueError("MaskedPatchEmbed: a mask was given without a mask_token")
        batch, _, height, width = x.shape
        patch = self.patch_size[0]
        tokens = ops.masked_patch_embed(x, self.proj.weight, self.proj.bias, self.norm.weight, self.norm.bias, mask,
                                        mask_token, patch_size=patch, eps=self.norm.eps, backend=self.backend)
        return tokens.view(batch, height // patch, width // patch, -1)  # (B, H/p, W/p, D) NHWC

    def extra_repr(self) -> str:
        return f"patch_size={self.patch_size}, backend={self.backend!r}"


def _shift_mask(block: SwinTransformerBlock, x: torch.Tensor) -> Optional[torch.Tensor]:
    """The shifted-window mask for NHWC ``x``: the block's buffer, or with ``dynamic_mask`` timm's
    ``get_attn_mask`` for x's size, kept per size while :func:`allow_any_input_size` holds. Rebuilt
    every forward, a new mask would also miss the frozen attention-bias cache: 36% of a Swin-B/192
    batch-1 ``extract_features`` on CPU."""
    if not block.dynamic_mask:
        return block.attn_mask
    masks = getattr(block, "_gfm_masks_by_size", None)
    if masks is None or torch.compiler.is_compiling():
        return block.get_attn_mask(x)
    key = (x.shape[1], x.shape[2], x.device, x.dtype)
    if key not in masks:
        masks[key] = block.get_attn_mask(x)
    return masks[key]


def _attn_pad_then_shift(block: SwinTransformerBlock, x: torch.Tensor) -> torch.Tensor:
    """(Shifted) window attention of a timm Swin block on NHWC ``x``, padding *before* the cyclic
    shift, as the official Swin does for sizes the window does not divide.

    timm's ``_attn`` shifts first and pads after, while its attention mask (``get_attn_mask``) marks
    the wrapped-around rows at the end of the *padded* grid: with padding, rows that wrapped from
    the top share windows with, and attend to, rows at the bottom. Identical to timm's when the
    window divides the feature map (no padding), e.g. at GFM's 192 px, where the shift and the
    window partition are one gather of the tokens (``attention.to_windows``; under torch.compile
    inductor fuses timm's own roll and partition instead).
    """
    _, height, width, chans = x.shape
    win_h, win_w = block.window_size
    shift = tuple(block.shift_size)
    # Regions of the padded, shifted grid: built for this size only where timm would (dynamic_mask);
    # otherwise the block's buffer, made once for its build size, padded the same way.
    if height % win_h == 0 and width % win_w == 0 and not torch.compiler.is_compiling():
        mask = _shift_mask(block, x)
        windows = block.attn(to_windows(x, block.window_size, shift), mask=mask)
        return from_windows(windows, height, width, block.window_size, shift)
    x = torch.nn.functional.pad(x, (0, 0, 0, (-width) % win_w, 0, (-height) % win_h))
    padded_h, padded_w = x.shape[1], x.shape[2]
    if any(shift):
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    windows = window_partition(x, block.window_size).view(-1, block.window_area, chans)
    mask = _shift_mask(block, x)
    windows = block.attn(windows, mask=mask).view(-1, win_h, win_w, chans)
    x = window_reverse(windows, block.window_size, padded_h, padded_w)
    if any(shift):
        x = torch.roll(x, shifts=shift, dims=(1, 2))
    return x[:, :height, :width, :].contiguous()


class PadBeforeShiftBlock(SwinTransformerBlock):
    """timm's ``SwinTransformerBlock`` with :func:`_attn_pad_then_shift` (what :func:`pad_before_shift`
    turns timm's into: same parameters and state dict, picklable)."""

    _attn = _attn_pad_then_shift


def pad_before_shift(model: nn.Module) -> nn.Module:
    """Give every Swin block of ``model`` :func:`_attn_pad_then_shift` (in place; returns ``model``)."""
    for block in model.modules():
        if isinstance(block, SwinTransformerBlock):
            block.__class__ = PadBeforeShiftBlock
    return model


class GFMSwinTransformer(SwinTransformer):
    """timm ``SwinTransformer`` with GFM's masked patch embedding and ``mask_token``.

    All of timm's entry points keep working unmasked (``forward_features``, ``forward_head``,
    ``forward_intermediates``); GFM's masked forward is ``forward_trunk`` (-> h) followed by
    ``forward_tail`` (-> r).

    Args:
        ops_backend: backend of the fused masked patch embedding (auto | reference | cpp | triton).
        **kwargs: timm ``SwinTransformer`` arguments.
    """

    def __init__(self, *, ops_backend: str = "auto", **kwargs: Any):
        if "embed_layer" in kwargs:
            raise ValueError("GFMSwinTransformer builds its own masked patch embedding; do not pass embed_layer")
        super().__init__(embed_layer=partial(MaskedPatchEmbed, backend=ops_backend), **kwargs)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim))
        trunc_normal_(self.mask_token, std=MASK_TOKEN_STD)
        pad_before_shift(self)
        set_attention(self, "auto")  # the fastest measured path per device and precision
        set_bf16_matmul(self, "auto")  # bf16 linears on the fp32 GEMM where the CPU has no bf16 one

    @property
    def ops_backend(self) -> str:
        return self.patch_embed.backend

    @ops_backend.setter
    def ops_backend(self, backend: str) -> None:
        self.patch_embed.backend = backend

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return super().no_weight_decay() | {"mask_token"}

    def forward_trunk(self, images: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Masked patch embedding -> stages 1-3 -> the third patch merging: h, (B, H/32, W/32, F) NHWC."""
        x = self.patch_embed(images, mask, self.mask_token)  # (B, H/4, W/4, D) NHWC
        trunk, _, _ = split_at_last_merging(self)
        for module in trunk:
            x = module(x)
        return x

    def forward_tail(self, h: torch.Tensor) -> torch.Tensor:
        """The reconstruction branch: last-stage blocks then the final norm: r, (B, H/32, W/32, F) NHWC."""
        _, blocks, norm = split_at_last_merging(self)
        if self.layers[-1].grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            x = checkpoint_seq(blocks, h)
        else:
            x = blocks(h)
        return norm(x)


@dataclass
class EncoderConfig:
    """What an encoder needs besides its weights: architecture and input normalisation.

    Attached to encoders as ``encoder.gfm_config``; written to ``config.json`` by ``save_model``.
    """

    swin: SwinConfig
    mean: Tuple[float, ...] = IMAGENET_MEAN
    std: Tuple[float, ...] = IMAGENET_STD
    model_name: str = ""

    def __post_init__(self) -> None:
        self.mean, self.std = tuple(float(m) for m in self.mean), tuple(float(s) for s in self.std)
        if len(self.mean) != self.swin.in_chans or len(self.std) != self.swin.in_chans:
            raise ValueError(f"mean/std need {self.swin.in_chans} entries (one per input channel), got "
                             f"{len(self.mean)} and {len(self.std)}")
        if not self.model_name:
            self.model_name = variant_name(self.swin)


def split_at_last_merging(model: SwinTransformer) -> Tuple[List[nn.Module], nn.Sequential, nn.Module]:
    """Slice a timm Swin where GFM splits it: after the last patch merging.

    timm Swin is NHWC between stages and puts each PatchMerging at the *start* of the next stage
    (``layers[i].downsample`` for i > 0; ``layers[0].downsample`` is an Identity). The GFM paper's
    stages map onto timm modules as (4-stage Swin-B at 192 px, shapes NHWC):

    ==========================================  ============================================  ===============
    GFM                                         timm                                          output
    ==========================================  ============================================  ===============
    patch embedding                             ``patch_embed``                               (B, 48, 48, 128)
    stage 1                                     ``layers[0]`` (blocks only)                   (B, 48, 48, 128)
    merging 1 + stage 2                         ``layers[1]``                                 (B, 24, 24, 256)
    merging 2 + stage 3                         ``layers[2]``                                 (B, 12, 12, 512)
    merging 3 ("stages 1-3 through the third")  ``layers[3].downsample``                      (B, 6, 6, 1024) = h
    stage 4 + final norm (reconstruction)       ``layers[3].blocks``, ``norm``                (B, 6, 6, 1024) = r
    ==========================================  ============================================  ===============

    Args:
        model: a timm ``SwinTransformer`` (student, or a teacher whose tail was pruned).

    Returns:
        ``(trunk, tail_blocks, norm)``: the modules after the patch embedding that produce h, in
        order; the last stage's blocks; the final norm.
    """
    last = model.layers[-1]
    trunk = list(model.layers[:-1]) + [last.downsample]
    return trunk, last.blocks, model.norm


def prune_to_trunk(model: SwinTransformer) -> SwinTransformer:
    """Delete what runs after h (last-stage blocks, final norm, head), in place; returns ``model``.

    After this the model's ``forward_features`` returns h and the pruned parameters neither cost
    memory nor appear in its state dict (the idiom of timm's ``prune_intermediate_layers``, which
    cannot cut inside a stage).
    """
    model.layers[-1].blocks = nn.Sequential()
    model.norm = nn.Identity()
    model.reset_classifier(0, "")
    return model


# --------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------

def swin_kwargs(cfg: SwinConfig) -> Dict[str, Any]:
    """timm ``SwinTransformer`` keyword arguments for a ``SwinConfig`` (headless: num_classes=0)."""
    return dict(img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans, num_classes=0,
                embed_dim=cfg.embed_dim, depths=tuple(cfg.depths), num_heads=tuple(cfg.num_heads),
                window_size=cfg.window_size, mlp_ratio=cfg.mlp_ratio, drop_path_rate=cfg.drop_path_rate)


def build_student(cfg: SwinConfig, *, ops_backend: str = "auto", **kwargs: Any) -> GFMSwinTransformer:
    """The masked Swin student for ``cfg``; ``kwargs`` go to timm (e.g. ``dynamic_img_size=True``)."""
    cfg.validate("student")
    return GFMSwinTransformer(ops_backend=ops_backend, **{**swin_kwargs(cfg), **kwargs})


def variant_name(cfg: SwinConfig) -> str:
    """The registered timm name of an architecture, or a descriptive ``gfm_swin_custom_*`` name."""
    for name, known in VARIANTS.items():
        if all(_same(getattr(cfg, k), getattr(known, k)) for k in ARCH_FIELDS):
            return name
    return f"gfm_swin_custom_patch{cfg.patch_size}_window{cfg.window_size}_{cfg.img_size}"


def _same(a: Any, b: Any) -> bool:
    return tuple(a) == tuple(b) if isinstance(a, (tuple, list)) else a == b


def encoder_config_of(encoder: SwinTransformer) -> EncoderConfig:
    """``encoder.gfm_config``, or one read off the module (ImageNet mean/std) when it has none."""
    config = getattr(encoder, "gfm_config", None)
    if isinstance(config, EncoderConfig):
        return config
    first = encoder.layers[0].blocks[0]
    swin = SwinConfig(embed_dim=encoder.embed_dim, depths=tuple(len(stage.blocks) for stage in encoder.layers),
                      num_heads=tuple(stage.blocks[0].attn.num_heads for stage in encoder.layers),
                      window_size=int(first.attn.window_size[0]), img_size=int(encoder.patch_embed.img_size[0]),
                      patch_size=int(encoder.patch_embed.patch_size[0]), in_chans=encoder.patch_embed.proj.in_channels,
                      mlp_ratio=first.mlp_ratio)
    chans = swin.in_chans
    if chans == len(IMAGENET_MEAN):
        return EncoderConfig(swin, IMAGENET_MEAN, IMAGENET_STD)
    warnings.warn(f"a {chans}-band encoder without gfm_config: no per-band mean/std is known, so pixels scaled to "
                  f"[0, 1] are used as they are (mean 0, std 1). Attach encoder.gfm_config = EncoderConfig(swin, "
                  f"mean, std) with the statistics it was trained with", UserWarning, stacklevel=2)
    return EncoderConfig(swin, (0.0,) * chans, (1.0,) * chans)


@contextlib.contextmanager
def allow_any_input_size(model: SwinTransformer) -> Iterator[SwinTransformer]:
    """Let a fixed-size timm Swin take any input size within the block, as timm's ``dynamic_img_size``.

    The patch embedding stops asserting the build size and shifted-window blocks build their
    attention masks for the actual feature size; feature maps the window does not tile are padded
    before the cyclic shift (:func:`_attn_pad_then_shift`, also for a plain timm Swin). The model's
    own settings are restored on exit. Sizes must still be divisible by the total stride (checked
    by the caller).
    """
    embed = model.patch_embed
    blocks = [m for m in model.modules() if isinstance(m, SwinTransformerBlock)]
    saved = (embed.strict_img_size, [b.dynamic_mask for b in blocks], [type(b) for b in blocks])
    embed.strict_img_size = False
    for block in blocks:
        block.dynamic_mask = True
        block._gfm_masks_by_size = {}  # see _shift_mask; dropped on exit (may hold inference tensors)
    pad_before_shift(model)
    try:
        yield model
    finally:
        embed.strict_img_size = saved[0]
        for block, dynamic, kind in zip(blocks, saved[1], saved[2]):
            block.dynamic_mask = dynamic
            block.__class__ = kind
            del block._gfm_masks_by_size
