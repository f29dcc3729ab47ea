"""Fused GFM operators with interchangeable backends (reference | cpp | triton | auto).

    from gfm_fast import ops
    tokens = ops.masked_patch_embed(images, w, b, nw, nb, mask, mask_token)
    loss = ops.decoder_l1_loss(r, dec_w, dec_b, images, block_mask)
    loss = ops.cosine_distillation(z_s, z_t)
"""
from gfm_fast.ops._backend import BACKENDS, BackendUnavailableError, available_backends, resolve
from gfm_fast.ops.cosine_distillation import CosineDistillation, cosine_distillation
from gfm_fast.ops.decoder_l1_loss import DecoderL1Loss, decoder_l1_loss
from gfm_fast.ops.masked_patch_embed import MaskedPatchEmbed, masked_patch_embed

__all__ = ["BACKENDS", "BackendUnavailableError", "available_backends", "resolve", "masked_patch_embed",
           "MaskedPatchEmbed", "decoder_l1_loss", "DecoderL1Loss", "cosine_distillation", "CosineDistillation"]
