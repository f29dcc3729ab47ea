"""GFM pretraining module: masked student + frozen teacher + projector/decoder + losses (docs/method.md).

``GFMStudent`` is the trainable part and the only module that goes into the DeepSpeed engine;
``GFMPretrainer`` adds the frozen teacher, input/mask validation and mask generation for
single-process use (tests, notebooks, evaluation); training runs the same ``forward`` with the
DeepSpeed engine as its student (``forward(images, student=engine)``).
"""
from __future__ import annotations

from typing import Dict, List, NamedTuple, Optional, Union

import torch
from torch import nn

from gfm_fast import ops
from gfm_fast.config import ModelConfig, TrainConfig
from gfm_fast.errors import ConfigError
from gfm_fast.ops._common import check_float, check_mask_values
from gfm_fast.masking import BlockMask, generate_block_mask
from gfm_fast.models.attention import set_attention
from gfm_fast.models.linear import set_bf16_matmul
from gfm_fast.models.swin import EncoderConfig, GFMSwinTransformer, build_student
from gfm_fast.models.teacher import FrozenTeacher

__all__ = ["GFMOutput", "DecoderConv", "GFMStudent", "GFMPretrainer", "param_groups", "NO_WEIGHT_DECAY_NAMES"]

# Parameter names (suffixes) that never get weight decay, besides every 1-D parameter.
NO_WEIGHT_DECAY_NAMES = ("mask_token", "relative_position_bias_table")


class GFMOutput(NamedTuple):
    """What one GFM forward returns.

    Attributes:
        loss: L_rec + alpha * L_feat (scalar).
        loss_rec: masked L1 reconstruction loss (scalar).
        loss_feat: -mean cos(z_s, z_t) (scalar).
        recon: the reconstruction D(r), (B, C, H, W) NCHW, detached; None unless requested.
        mask: the block mask used, (B, H / block, W / block) bool.
    """

    loss: torch.Tensor
    loss_rec: torch.Tensor
    loss_feat: torch.Tensor
    recon: Optional[torch.Tensor]
    mask: torch.Tensor


class DecoderConv(nn.Conv2d):
    """The 1x1 conv of GFM's decoder D = (conv, PixelShuffle(s)).

    Called on features alone it is the plain conv (so ``decoder(r)`` reconstructs the image).
    Called with the target images and block mask it returns the fused masked L1 loss instead,
    using its weight block by block without building the reconstruction. The loss is computed
    inside this module's own call so that parameter-gathering hooks (DeepSpeed ZeRO-3) fetch the
    weight, which is too large to stay persistent.

    Args:
        in_dim: feature width F.
        out_chans: image channels C (the conv has s*s*C outputs).
        upscale: the PixelShuffle factor s (the student's total stride).
        backend: ops backend of the fused loss.
    """

    def __init__(self, in_dim: int, out_chans: int, upscale: int, backend: str = "auto"):
        super().__init__(in_dim, upscale ** 2 * out_chans, kernel_size=1)
        self.upscale, self.backend = upscale, backend

    def forward(self, features: torch.Tensor, images: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits (B, s*s*C, h, w) for ``features`` (B, F, h, w) NCHW, or with ``images`` (B, C, H, W)
        and block ``mask`` (B, h, w) the scalar L_rec."""
        if images is None:
            return super().forward(features)
        if mask is None:
            raise ValueError("DecoderConv: the reconstruction loss needs the block mask")
        return ops.decoder_l1_loss(features, self.weight, self.bias, images, mask, stride=self.upscale,
                                   backend=self.backend)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, upscale={self.upscale}, backend={self.backend!r}"


class GFMStudent(nn.Module):
    """The trainable part of GFM: masked Swin ``encoder``, ``projector`` P and ``decoder`` D.

    ``decoder`` is ``nn.Sequential(DecoderConv(F, C, s), PixelShuffle(s))`` so that its state-dict keys
    (``decoder.0.weight``/``bias``) match the GFM/SimMIM release; the loss never runs it: the fused
    ``decoder_l1_loss`` uses its conv weights block by block.

    Args:
        config: the model config (student/teacher architecture, alpha, ops backend, checkpointing).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        cfg = config.student
        self.alpha = float(config.alpha)
        self.stride = cfg.total_stride
        self.ops_backend = config.ops_backend
        self.encoder: GFMSwinTransformer = build_student(cfg, ops_backend=config.ops_backend)
        self.encoder.gfm_config = EncoderConfig(cfg, config.mean, config.std)
        set_attention(self.encoder, config.attention_path)
        if config.grad_checkpointing:
            self.encoder.set_grad_checkpointing(True)
        for stage in config.checkpoint_stages:  # activation checkpointing of chosen stages only
            self.encoder.layers[stage].grad_checkpointing = True
        width, teacher_width = self.encoder.num_features, config.teacher.num_features
        self.projector = nn.Linear(width, teacher_width)
        self.decoder = nn.Sequential(DecoderConv(width, cfg.in_chans, self.stride, backend=config.ops_backend),
                                     nn.PixelShuffle(self.stride))
        set_bf16_matmul(self, config.bf16_matmul)  # the encoder's linears and the projector

    def forward(self, images: torch.Tensor, mask: torch.Tensor, z_t: torch.Tensor,
                return_recon: bool = False) -> GFMOutput:
        """GFM student forward and losses.

        Args:
            images: normalised images x, (B, C, H, W) NCHW.
            mask: block mask at decoder-grid resolution, (B, H / s, W / s) 0/1 (s = total stride, 32);
                the patch embedding upsamples it to tokens on the fly.
            z_t: teacher feature (B, T), from ``FrozenTeacher``.
            return_recon: also return the (detached) reconstruction D(r).

        Returns:
            ``GFMOutput`` with loss = L_rec + alpha * L_feat.
        """
        h = self.encoder.forward_trunk(images, mask)  # (B, H/s, W/s, F) NHWC
        z_s = self.projector(h.mean(dim=(1, 2)))  # (B, T)
        r = self.encoder.forward_tail(h).permute(0, 3, 1, 2)  # (B, F, H/s, W/s) NCHW view of NHWC memory
        loss_rec = self.decoder[0](r, images, mask)
        loss_feat = ops.cosine_distillation(z_s, z_t, backend=self.ops_backend)
        recon = None
        if return_recon:
            with torch.no_grad():
                recon = self.decoder(r)
        return GFMOutput(loss_rec + self.alpha * loss_feat, loss_rec, loss_feat, recon, mask)

    def set_ops_backend(self, backend: str) -> None:
        """Switch every fused op of the student to ``backend`` (auto | reference | cpp | triton)."""
        self.ops_backend = backend
        self.encoder.ops_backend = backend
        self.decoder[0].backend = backend


class GFMPretrainer(nn.Module):
    """GFM: frozen teacher + trainable student; ``forward(images, mask=None)`` returns the losses.

    Args:
        config: ``ModelConfig`` (default: GFM's Swin-B 192/window 6 student, Swin-B 224/window 7
            teacher), or a ``TrainConfig`` (its ``model``). Validated on construction.
        teacher_state_dict: teacher weights already in memory (e.g. a GFM release's ``teacher.*``
            entries); used instead of ``config.teacher_weights``.

    Attributes:
        config: the ``ModelConfig``.
        student: ``GFMStudent`` (encoder, projector, decoder): the trainable part.
        teacher: ``FrozenTeacher``.
    """

    def __init__(self, config: Optional[Union[ModelConfig, TrainConfig]] = None, *,
                 teacher_state_dict: Optional[Dict[str, torch.Tensor]] = None):
        super().__init__()
        config = config if config is not None else ModelConfig()
        if isinstance(config, TrainConfig):  # what gfm_fast.train and the YAML files hold
            config = config.model
        if not isinstance(config, ModelConfig):
            raise ConfigError(f"GFMPretrainer takes a ModelConfig or a TrainConfig, got {type(config).__name__}; "
                              f"e.g. gfm_fast.config.load_config('configs/tiny.yaml').model")
        config.validate("model")
        self.config = config
        self.student = GFMStudent(config)
        self.teacher = FrozenTeacher(config, state_dict=teacher_state_dict)

    @property
    def encoder(self) -> GFMSwinTransformer:
        """The student encoder (what downstream work keeps)."""
        return self.student.encoder

    def forward(self, images: torch.Tensor, mask: Optional[Union[torch.Tensor, BlockMask]] = None, *,
                generator: Optional[torch.Generator] = None, return_recon: bool = False,
                student: Optional[nn.Module] = None) -> GFMOutput:
        """Compute the GFM losses for a batch.

        Args:
            images: normalised images (B, C, H, W) NCHW with C = student in_chans and H = W = img_size.
            mask: optional 0/1 mask at block level (B, H/block, W/block) or token level (B, H/p, W/p)
                (constant over each block), or a ``BlockMask`` of ``generate_block_mask`` with the
                config's block size, validated; drawn with ``gfm_fast.masking`` when None
                (no validation, no host sync: training draws its masks this way).
            generator: random source for the drawn mask.
            return_recon: also return the reconstruction D(r) (detached).
            student: what runs the student, by default ``self.student``; training passes the
                DeepSpeed engine that wraps ``self.student`` (the teacher stays outside it). The
                images reach it in its weights' dtype (bf16 under DeepSpeed's bf16).

        Returns:
            ``GFMOutput`` (loss, loss_rec, loss_feat, recon, mask at block level).
        """
        self._check_images(images)
        if mask is None:
            block_mask = generate_block_mask(images.shape[0], tuple(images.shape[-2:]),
                                             block_size=self.config.mask_block, ratio=self.config.mask_ratio,
                                             generator=generator, device=images.device).blocks
        else:
            block_mask = self.block_mask(mask, images)
        z_t = self.teacher(images)
        student = self.student if student is None else student
        weights_dtype = next(student.parameters()).dtype
        output = student(images.to(weights_dtype), self.decoder_mask(block_mask), z_t, return_recon=return_recon)
        return output._replace(mask=block_mask)

    def block_mask(self, mask: Union[torch.Tensor, BlockMask], images: torch.Tensor) -> torch.Tensor:
        """Validate a user mask and return it at block level (B, H/block, W/block) bool on the images' device."""
        cfg = self.config
        if isinstance(mask, BlockMask):  # what gfm_fast.masking.generate_block_mask returns
            if mask.block_size != cfg.mask_block:
                raise ValueError(f"mask has {mask.block_size}-px blocks but the model masks {cfg.mask_block}-px "
                                 f"blocks (model.mask_block); draw it with block_size={cfg.mask_block}")
            mask = mask.blocks
        batch, _, height, width = images.shape
        blocks = (height // cfg.mask_block, width // cfg.mask_block)
        tokens = (height // cfg.student.patch_size, width // cfg.student.patch_size)
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a torch.Tensor or a BlockMask, got {type(mask).__name__}")
        if mask.dim() != 3 or mask.shape[0] != batch or tuple(mask.shape[1:]) not in (blocks, tokens):
            raise ValueError(f"mask must have shape (B, {blocks[0]}, {blocks[1]}) (block level, {cfg.mask_block}-px "
                             f"blocks) or (B, {tokens[0]}, {tokens[1]}) (token level) with B = {batch}, "
                             f"got {tuple(mask.shape)}")
        if mask.is_complex():
            raise TypeError(f"mask must be boolean, integer or real, got {mask.dtype}")
        mask = mask.to(images.device)
        check_mask_values(mask)
        if tuple(mask.shape[1:]) == tokens and tokens != blocks:
            rep = cfg.mask_block // cfg.student.patch_size
            coarse = mask[:, ::rep, ::rep]
            if not torch.equal(coarse.repeat_interleave(rep, 1).repeat_interleave(rep, 2), mask):
                raise ValueError(f"token-level mask is not constant over {cfg.mask_block}-px blocks "
                                 f"({rep}x{rep} tokens); GFM masks whole blocks, pass a block-level mask "
                                 f"(B, {blocks[0]}, {blocks[1]}) instead")
            mask = coarse
        return mask.bool()

    def decoder_mask(self, block_mask: torch.Tensor) -> torch.Tensor:
        """The block mask (B, H/mask_block, W/mask_block) on the decoder grid, one entry per
        ``total_stride`` cell: what the student takes."""
        rep = self.config.mask_block // self.config.student.total_stride
        if rep == 1:
            return block_mask
        return block_mask.repeat_interleave(rep, 1).repeat_interleave(rep, 2)

    def _check_images(self, images: torch.Tensor) -> None:
        cfg = self.config.student
        check_float("images", images)
        if images.dim() != 4:
            raise ValueError(f"images must have shape (B, C, H, W), got {tuple(images.shape)}")
        batch, chans, height, width = images.shape
        if batch == 0:
            raise ValueError("images is an empty batch")
        if chans != cfg.in_chans:
            raise ValueError(f"images have {chans} channels but the student expects {cfg.in_chans} "
                             f"(model.student.in_chans)")
        if (height, width) != (cfg.img_size, cfg.img_size):
            raise ValueError(f"images are {height}x{width} but the model is built for {cfg.img_size}x{cfg.img_size} "
                             f"(model.student.img_size); resize/crop the inputs or change the config")


def param_groups(module: nn.Module, weight_decay: float) -> List[Dict]:
    """AdamW parameter groups: decay iff ``p.dim() >= 2``, never for mask tokens and rel-pos tables.

    timm's ``no_weight_decay()`` names (of any submodule) are honoured too. Frozen parameters
    (``requires_grad=False``, e.g. the teacher) are left out.

    Args:
        module: the trainable module (``GFMStudent``, or a ``GFMPretrainer``).
        weight_decay: decay for the decayed group.

    Returns:
        ``[{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]``.
    """
    skip = set()
    for prefix, sub in module.named_modules():
        if hasattr(sub, "no_weight_decay"):
            skip |= {f"{prefix}.{name}" if prefix else name for name in sub.no_weight_decay()}
    decay, no_decay = [], []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        exempt = param.dim() < 2 or name in skip or name.rsplit(".", 1)[-1] in NO_WEIGHT_DECAY_NAMES
        (no_decay if exempt else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
