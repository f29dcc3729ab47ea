"""GFM's two losses in plain PyTorch: L_rec (``reconstruction_l1``) and L_feat (``cosine_distillation``).

Training adds them as ``L_rec + alpha * L_feat`` (``model.alpha``) in ``GFMStudent.forward``
(gfm_fast/models/pretrainer.py), through the fused ops ``gfm_fast.ops.decoder_l1_loss`` and
``gfm_fast.ops.cosine_distillation``, which are tested equal to these functions. The functions are
defined in gfm_fast/ops/reference.py, beside the references of the other fused ops; this module is
their documented public name. Formulas: docs/method.md.
"""
from __future__ import annotations

from gfm_fast.ops.reference import COS_EPS, REC_EPS, cosine_distillation, reconstruction_l1, upsample_mask

__all__ = ["reconstruction_l1", "cosine_distillation", "upsample_mask", "REC_EPS", "COS_EPS"]
